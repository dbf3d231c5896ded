"""One listening socket shared by every direct-ingress replica of a port.

The head creates and holds the socket (so it exists, and connections queue in its backlog,
even while no replica runs), and hands a duplicate of its descriptor to each replica over a
Unix socket in the session folder (SCM_RIGHTS). All replicas accept from the one queue: a
replica that drains just stops accepting, and the connections waiting in the backlog are
taken by the others instead of being reset, as they would be with one SO_REUSEPORT socket
per replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket


def bind_tcp(host: str, port: int, backlog: int = 2048, reuse_port: bool = False,
             claim: bool = False) -> socket.socket:
    """A non-blocking listening TCP socket on host:port (raises OSError). `reuse_port`:
    SO_REUSEPORT, so other proxies (Ray nodes sharing this address) can bind the port too;
    with `claim`, only if no socket holds the port yet (else another session's proxies would
    share it silently): a plain bind is tried first, and raises EADDRINUSE if one does."""
    if reuse_port and claim:
        with bind_tcp(host, port, backlog=1) as probe:
            port = probe.getsockname()[1]
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class SharedListener:
    """Holds the listening socket and serves its descriptor at `path` (head side)."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.path = path
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await loop.create_unix_server(lambda: _FdSender(self.sock), self.path)
        os.chmod(self.path, 0o600)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class _FdSender(asyncio.Protocol):
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The loop's socket object may be a stand-in without sendmsg: use a duplicate.
        fd = transport.get_extra_info("socket").fileno()
        try:
            with socket.socket(fileno=os.dup(fd)) as conn:
                socket.send_fds(conn, [b"L"], [self.sock.fileno()])
        except OSError:
            pass
        transport.close()


def receive(path: str, timeout: float = 10.0) -> socket.socket:
    """The shared listening socket, fetched from the head (replica side; blocking, brief)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(timeout)
        c.connect(path)
        _, fds, _, _ = socket.recv_fds(c, 1, 1)
    if not fds:
        raise OSError(f"no listening socket was received from {path}")
    sock = socket.socket(fileno=fds[0])
    sock.setblocking(False)
    return sock
