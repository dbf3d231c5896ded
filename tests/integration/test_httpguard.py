"""The HTTP connection guard on its own: a uvicorn server with the bounded protocol, real
sockets on 127.0.0.1, tiny limits. Covers what is slow to reach through a whole cluster: the
cap with every connection busy (503), eviction order, and kept-alive connections."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from flotilla._private import httpguard
from flotilla._private.metrics import STORE
from tests.conftest import free_port

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S = 0.5
LEAN = {"on": False}


@pytest.fixture(autouse=True, params=[False, True], ids=["uvicorn", "lean"])
def lean(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every bound holds on uvicorn's protocol and on the proxy's lean one (`lean_http`)."""
    LEAN["on"] = request.param
    yield
    LEAN["on"] = False


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(1.0)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.contextmanager
def server(**options: Any) -> Iterator[tuple[tuple[str, int], httpguard.Guard]]:
    port = free_port()
    proto, guard = httpguard.protocol_class({"request_header_timeout_s": HEADER_TIMEOUT_S, **options}, "test", lean=LEAN["on"])
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=proto, lifespan="off", log_level="warning",
                            timeout_keep_alive=5)
    srv = uvicorn.Server(config)
    srv.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_until_complete, args=(srv.serve(),), daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield ("127.0.0.1", port), guard
    finally:
        srv.should_exit = True
        t.join(10)
        loop.close()


def request(addr: tuple[str, int], path: str = "/", keep: bool = False) -> socket.socket:
    s = socket.create_connection(addr, timeout=5)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{'' if keep else 'Connection: close'}\r\n\r\n".encode())
    return s


def read_all(s: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(OSError):
        while chunk := s.recv(65536):
            data += chunk
    return data


def read_one(s: socket.socket) -> bytes:
    """One response of `app` (its body is "ok") from a kept-alive connection."""
    data = b""
    while not data.endswith(b"\r\n\r\nok"):
        chunk = s.recv(4096)
        assert chunk, data
        data += chunk
    return data


def counter(name: str, *labels: str) -> float:
    return float(STORE.values.get(name, {}).get(("test", *labels), 0.0))


def test_at_the_cap_a_new_connection_evicts_the_oldest_idle_one() -> None:
    with server(max_connections=3) as (addr, _):
        idle = [socket.create_connection(addr, timeout=5) for _ in range(3)]
        time.sleep(0.1)
        before = counter("flotilla_http_connections_evicted")
        assert read_all(request(addr)).startswith(b"HTTP/1.1 200")
        assert read_all(idle[0]) == b"", "the oldest idle connection was closed"
        assert counter("flotilla_http_connections_evicted") == before + 1
        for s in idle:
            s.close()


def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503() -> None:
    with server(max_connections=2) as (addr, guard):
        busy = [request(addr, "/slow") for _ in range(2)]
        time.sleep(0.2)
        before = counter("flotilla_http_connections_refused")
        assert read_all(request(addr)).startswith(b"HTTP/1.1 503")
        assert counter("flotilla_http_connections_refused") == before + 1
        for s in busy:  # the busy ones were not touched
            assert read_all(s).startswith(b"HTTP/1.1 200")
        assert len(guard.open) <= 2


def test_kept_alive_connection_that_trickles_its_next_request_is_closed() -> None:
    with server() as (addr, _):
        s = request(addr, keep=True)
        assert read_one(s).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET / HTTP/1.1\r\n")
        t0 = time.monotonic()
        with contextlib.suppress(OSError):
            while time.monotonic() - t0 < 3 and s.send(b"X: y\r\n"):
                time.sleep(0.05)
        assert read_all(s).startswith(b"HTTP/1.1 408")
        assert time.monotonic() - t0 < HEADER_TIMEOUT_S + 1.5
        # Bare CRLFs between requests do not keep a connection open either.
        s = request(addr, keep=True)
        assert read_one(s).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        with contextlib.suppress(OSError):
            while time.monotonic() - t0 < 3 and s.send(b"\r\n"):
                time.sleep(0.05)
        data = read_all(s)
        assert data == b"" or data.startswith(b"HTTP/1.1 408"), data
        assert time.monotonic() - t0 < HEADER_TIMEOUT_S + 1.5


def test_header_bytes_are_counted_across_reads() -> None:
    with server(max_request_header_bytes=1000) as (addr, _):
        s = socket.create_connection(addr, timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(OSError):
            for _ in range(100):
                s.sendall(b"X-Part: " + b"p" * 90 + b"\r\n")
                time.sleep(0.002)
        assert read_all(s).startswith(b"HTTP/1.1 431")
        assert read_all(request(addr)).startswith(b"HTTP/1.1 200")  # a normal request still passes


def test_nofile_fit() -> None:
    assert httpguard.fit_connections(10_000, 20_000) == 10_000
    assert httpguard.fit_connections(10_000, 1024) == 768
    assert httpguard.fit_connections(10_000, 8) == 6
