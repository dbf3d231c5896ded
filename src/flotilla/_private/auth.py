"""Mutual authentication of TCP connections before any byte is unpickled.

Unix sockets live in a 0700 session folder, so only our own user can reach them. TCP (the Ray
backend's data plane between nodes) can be reached by anyone who can route to the port, and a
frame is a pickle: loading one from a stranger runs the stranger's code. So every TCP
connection first proves, in both directions, that the other end knows the per-cluster secret
`K` (`new_secret()`, 32 random bytes handed out through Ray, never written to disk, the
environment or a log):

    server -> client   HELLO  = MAGIC | Ns                      36 bytes
    client -> server   PROOF  = MAGIC | Nc | HMAC(K, CLIENT | Ns | Nc)   68 bytes
    server -> client   ANSWER = HMAC(K, SERVER | Ns | Nc)                 32 bytes

`Ns` and `Nc` are fresh 32-byte nonces, so a transcript recorded on one connection is worth
nothing on another; `CLIENT` and `SERVER` are distinct labels, so a proof sent back to its
author (reflection) is not the proof it expects. The server proves itself only to a client
that proved itself first, and checks with `hmac.compare_digest`. Both sides parse these fixed
sizes with `struct` only, refuse anything longer (a conforming peer sends nothing more until
the handshake is over), and give up after `HANDSHAKE_TIMEOUT` seconds. Only then is the real
protocol (a `FrameProtocol`) created and handed the transport: it never sees a byte of a
connection that did not authenticate.

A refused connection is closed, counted in `failures[(side, reason)]` (exported as
`flotilla_auth_failures_total{side, reason}`) and logged once per side and peer address.

This authenticates; it does not encrypt, nor protect frames after the handshake from an
attacker who can rewrite the traffic in flight (that needs TLS).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import socket
import struct
from collections import Counter
from collections.abc import Callable
from hashlib import sha256
from typing import Any, Literal

logger = logging.getLogger(__name__)

MAGIC = b"FLA\x01"  # "flotilla auth", version 1
NONCE = 32
HELLO = struct.Struct(f"<4s{NONCE}s")  # magic, Ns
PROOF = struct.Struct(f"<4s{NONCE}s32s")  # magic, Nc, client proof
ANSWER = struct.Struct("<32s")  # server proof
CLIENT = b"flotilla-auth-v1 client->server\0"
SERVER = b"flotilla-auth-v1 server->client\0"
HANDSHAKE_TIMEOUT = 5.0  # seconds a peer has to complete the handshake
MIN_SECRET = 16
METRIC = "flotilla_auth_failures_total"

Side = Literal["server", "client"]
Reason = Literal["bad_magic", "bad_proof", "oversize", "timeout", "eof"]
# Refused handshakes by (side, reason): side is the end that refused ("server": we accepted
# the connection, "client": we dialled it); reason is one of `Reason` ("eof": the peer closed
# first, which is how a client sees a server refuse it). Read by the metrics exporter.
failures: Counter[tuple[Side, Reason]] = Counter()
_logged: set[tuple[Side, str]] = set()  # (side, peer host) already logged
_MAX_LOGGED = 4096


class AuthError(ConnectionError):
    """The other end of a TCP connection did not authenticate (or we could not)."""


def new_secret() -> bytes:
    """A fresh per-cluster secret."""
    return secrets.token_bytes(32)


_cluster_secret: bytes | None = None


def set_cluster_secret(secret: bytes | None) -> None:
    """Remember this process's cluster secret (the Ray backend: the driver and the proxy get it
    from the head, replicas from their actor's arguments); in memory only."""
    global _cluster_secret
    _cluster_secret = None if secret is None else check_secret(secret)


def cluster_secret() -> bytes:
    """This process's cluster secret; raises AuthError when it has none (a local-backend
    process asked to reach a TCP address)."""
    if _cluster_secret is None:
        raise AuthError("this process has no cluster secret, so it cannot reach a TCP address")
    return _cluster_secret


def check_secret(secret: Any) -> bytes:
    if not isinstance(secret, bytes):
        raise TypeError(f"the cluster secret must be bytes, not {type(secret).__name__}")
    if len(secret) < MIN_SECRET:
        raise ValueError(f"the cluster secret must be at least {MIN_SECRET} bytes (use auth.new_secret())")
    return secret


def failures_total() -> int:
    return sum(failures.values())


def _proof(secret: bytes, label: bytes, ns: bytes, nc: bytes) -> bytes:
    return hmac.digest(secret, label + ns + nc, sha256)


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def feed(proto: asyncio.BaseProtocol, data: bytes) -> None:
    """Hand `data` to `proto` as its transport would (by `get_buffer` for a buffered one)."""
    if not isinstance(proto, asyncio.BufferedProtocol):
        proto.data_received(data)  # type: ignore[attr-defined]
        return
    view = memoryview(data)
    while view:
        buf = memoryview(proto.get_buffer(len(view)))
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        proto.buffer_updated(n)
        view = view[n:]


class _Handshake(asyncio.Protocol):
    """What both ends share: a bounded buffer, a deadline, refusal; then the hand-over."""

    side: Side

    def __init__(self, secret: bytes, timeout: float) -> None:
        self.secret = secret
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.finished = False
        self.peer = "?"
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _nodelay(transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        self._timer = asyncio.get_running_loop().call_later(self.timeout, self.refuse, "timeout")

    def refuse(self, reason: Reason) -> None:
        if self.finished:
            return
        self.finished = True
        self._stop_timer()
        failures[(self.side, reason)] += 1
        key = (self.side, self.peer)
        if key not in _logged and len(_logged) < _MAX_LOGGED:
            _logged.add(key)
            logger.warning(
                "%s refused a connection %s %s: %s (only counted from now on for this address)",
                self.side, "from" if self.side == "server" else "to", self.peer, reason,
            )
        if self.transport is not None:
            self.transport.abort()
        self.refused(reason)

    def refused(self, reason: Reason) -> None:
        """Hook: the handshake failed for `reason`."""

    def hand_over(self, inner: asyncio.BaseProtocol, rest: bytes) -> None:
        """The peer is authenticated: `inner` gets the transport, then any bytes after the handshake."""
        self.finished = True
        self._stop_timer()
        t = self.transport
        assert t is not None
        t.set_protocol(inner)
        inner.connection_made(t)
        if rest and not t.is_closing():
            feed(inner, rest)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def eof_received(self) -> bool | None:
        self.refuse("eof")
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.refuse("eof")


class ServerHandshake(_Handshake):
    """Accepted connections start here; `factory()` builds the real protocol once the client
    proved itself (so nothing is built, registered or fed for a stranger)."""

    side: Side = "server"

    def __init__(self, factory: Callable[[], asyncio.BaseProtocol], secret: bytes, timeout: float) -> None:
        super().__init__(secret, timeout)
        self.factory = factory
        self.ns = secrets.token_bytes(NONCE)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport.write(HELLO.pack(MAGIC, self.ns))  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if self.finished:
            return
        buf = self.buf = self.buf + data
        if len(buf) > PROOF.size:
            self.refuse("oversize")
        elif len(buf) >= 4 and buf[:4] != MAGIC:
            self.refuse("bad_magic")
        elif len(buf) == PROOF.size:
            _, nc, mac = PROOF.unpack(buf)
            if not hmac.compare_digest(mac, _proof(self.secret, CLIENT, self.ns, nc)):
                self.refuse("bad_proof")
                return
            self.buf = b""
            try:
                inner = self.factory()
            except Exception:
                logger.exception("could not set up an authenticated connection from %s", self.peer)
                self.finished = True
                self._stop_timer()
                self.transport.abort()  # type: ignore[union-attr]
                return
            self.transport.write(_proof(self.secret, SERVER, self.ns, nc))  # type: ignore[union-attr]
            self.hand_over(inner, b"")


class ClientHandshake(_Handshake):
    """Dialled connections start here; `inner` gets the transport once the server proved
    itself. `done` resolves then, or fails with `AuthError`."""

    side: Side = "client"

    def __init__(self, inner: asyncio.BaseProtocol, secret: bytes, timeout: float) -> None:
        super().__init__(secret, timeout)
        self.inner = inner
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.nc = secrets.token_bytes(NONCE)
        self.ns: bytes | None = None

    def data_received(self, data: bytes) -> None:
        if self.finished:
            return
        buf = self.buf = self.buf + data
        if self.ns is None:  # waiting for the server's hello
            if len(buf) > HELLO.size:
                self.refuse("oversize")
            elif len(buf) >= 4 and buf[:4] != MAGIC:
                self.refuse("bad_magic")
            elif len(buf) == HELLO.size:
                _, self.ns = HELLO.unpack(buf)
                self.buf = b""
                self.transport.write(PROOF.pack(MAGIC, self.nc, _proof(self.secret, CLIENT, self.ns, self.nc)))  # type: ignore[union-attr]
        elif len(buf) >= ANSWER.size:  # the server's proof, then perhaps its first frames
            (mac,) = ANSWER.unpack_from(buf)
            if not hmac.compare_digest(mac, _proof(self.secret, SERVER, self.ns, self.nc)):
                self.refuse("bad_proof")
                return
            self.buf = b""
            try:
                self.hand_over(self.inner, buf[ANSWER.size :])
            except BaseException as e:  # the caller must not wait for ever
                if not self.done.done():
                    self.done.set_exception(e)
                raise
            if not self.done.done():
                self.done.set_result(None)

    def refused(self, reason: Reason) -> None:
        if not self.done.done():
            self.done.set_exception(AuthError(f"the handshake with {self.peer} failed: {reason}"))

    def abort(self) -> None:
        """The caller gave up (cancelled): close without counting a failure."""
        self.finished = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.abort()
