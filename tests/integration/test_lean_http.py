"""The proxy's lean HTTP path (`lean_http`) on its own: a uvicorn server with `LeanProtocol`
and a plain ASGI app, real sockets on 127.0.0.1. Every response is read byte for byte, so the
framing (Content-Length, chunked, HEAD, connection close) is checked as a client sees it, on
the lean path and on the requests it leaves to uvicorn (large or chunked bodies, Expect)."""

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

from flotilla._private import httpguard, lean_http
from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.slow

SEEN: dict[str, Any] = {}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """/echo: the body back, with how it arrived; /stream: three chunks; /whole: one write;
    /fail: raises; /none: returns without a response; /wait: until cancelled; /bad: a header
    value with a newline; /short: less body than its Content-Length."""
    if scope["type"] != "http":
        return
    path = scope["path"]
    SEEN["cycle"] = type(getattr(send, "__self__", None)).__name__
    SEEN["scope"] = scope
    if path == "/echo":
        body, reads = b"", 0
        while True:
            m = await receive()
            reads += 1
            SEEN["body_type"] = type(m.get("body")).__name__
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode()), (b"x-reads", str(reads).encode())]})
        await send({"type": "http.response.body", "body": body})
    elif path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for part in (b"one", b"two", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/whole":
        from flotilla._private import http_util

        await http_util.reply(send, 201, [(b"content-type", b"text/plain")], b"made", (b"x-extra", b"1"))
    elif path == "/fail":
        raise RuntimeError("boom")
    elif path == "/none":
        return
    elif path == "/wait":
        gone = asyncio.current_task()
        cycle = getattr(send, "__self__", None)
        if isinstance(cycle, lean_http.LeanCycle):
            cycle.cancel_on_gone = gone
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            SEEN["cancelled"] = time.monotonic()
            raise
    elif path == "/bad":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1\r\nx-b: 2")]})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/short":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]})
        await send({"type": "http.response.body", "body": b"abc"})
    else:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@contextlib.contextmanager
def server(**lean: Any) -> Iterator[tuple[str, int]]:
    port = free_port()
    proto, _ = httpguard.protocol_class({}, "test", lean=True, **lean)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=proto, lifespan="off", log_level="critical",
                            timeout_keep_alive=5, server_header=False, date_header=False)
    srv = uvicorn.Server(config)
    srv.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_until_complete, args=(srv.serve(),), daemon=True)
    t.start()
    wait_for(lambda: srv.started, timeout=10, what="the server started")
    try:
        yield ("127.0.0.1", port)
    finally:
        srv.should_exit = True
        t.join(10)
        loop.close()


@pytest.fixture(scope="module")
def addr() -> Iterator[tuple[str, int]]:
    with server() as a:
        yield a


_FILES: dict[int, Any] = {}


def read_response(s: socket.socket, head_only: bool = False) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """(status line, headers, body) of one response, framed as the headers say (buffered per
    socket: pipelined responses may arrive in one read)."""
    f = _FILES.get(id(s))
    if f is None or f.closed:
        f = _FILES[id(s)] = s.makefile("rb")
    line = f.readline().rstrip(b"\r\n")
    assert line, "connection closed before a response"
    headers: dict[bytes, bytes] = {}
    while (h := f.readline().rstrip(b"\r\n")):
        k, _, v = h.partition(b":")
        assert k.lower() not in headers, h
        headers[k.lower()] = v.strip()
    if head_only:
        return line, headers, b""
    if b"content-length" in headers:
        return line, headers, f.read(int(headers[b"content-length"]))
    if headers.get(b"transfer-encoding") == b"chunked":
        body = b""
        while (size := int(f.readline().strip(), 16)):
            body += f.read(size)
            assert f.read(2) == b"\r\n"
        assert f.read(2) == b"\r\n"
        return line, headers, body
    return line, headers, f.read()


def connect(addr: tuple[str, int]) -> socket.socket:
    return socket.create_connection(addr, timeout=5)


def closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_plain_requests_run_on_the_lean_cycle_with_their_body(addr: tuple[str, int]) -> None:
    with connect(addr) as s:
        s.sendall(b"POST /echo?q=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        line, headers, body = read_response(s)
        assert (line, body, headers[b"x-reads"]) == (b"HTTP/1.1 200 OK", b"hello", b"1")
        assert SEEN["cycle"] == "LeanCycle"
        scope = SEEN["scope"]
        assert (scope["method"], scope["path"], scope["raw_path"], scope["query_string"]) == ("POST", "/echo", b"/echo", b"q=1")
        # kept alive: a second request on the same connection, its body in two reads
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nwor")
        time.sleep(0.05)
        s.sendall(b"ld")
        s.sendall(b"!")
        assert read_response(s)[2] == b"world!"


def test_large_chunked_and_expect_requests_take_uvicorns_cycle(addr: tuple[str, int]) -> None:
    big = b"x" * (lean_http.LEAN_BODY_BYTES + 1)
    with connect(addr) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
        line, _, body = read_response(s)
        assert line == b"HTTP/1.1 200 OK" and body == big and SEEN["cycle"] == "RequestResponseCycle"
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        assert read_response(s)[2] == b"abcde" and SEEN["cycle"] == "RequestResponseCycle"
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(b"ok")
        assert read_response(s)[2] == b"ok"
        # and the next plain request on that connection is lean again
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s)[0] == b"HTTP/1.1 200 OK" and SEEN["cycle"] == "LeanCycle"


def test_pipelined_requests_are_answered_in_order(addr: tuple[str, int]) -> None:
    with connect(addr) as s:
        s.sendall(b"".join(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n%02d" % i for i in range(10)))
        assert [read_response(s)[2] for _ in range(10)] == [b"%02d" % i for i in range(10)]


def test_streamed_whole_head_and_empty_responses_are_framed(addr: tuple[str, int]) -> None:
    with connect(addr) as s:
        s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        _, headers, body = read_response(s)
        assert headers[b"transfer-encoding"] == b"chunked" and body == b"onetwothree"
        s.sendall(b"GET /whole HTTP/1.1\r\nHost: x\r\n\r\n")
        line, headers, body = read_response(s)
        assert (line, body, headers[b"content-length"], headers[b"x-extra"]) == (b"HTTP/1.1 201 Created", b"made", b"4", b"1")
        s.sendall(b"HEAD /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        line, headers, _ = read_response(s, head_only=True)
        assert line == b"HTTP/1.1 200 OK" and headers[b"content-length"] == b"0"
        s.sendall(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        line, headers, _ = read_response(s, head_only=True)
        assert line == b"HTTP/1.1 204 No Content" and b"transfer-encoding" not in headers and b"content-length" not in headers


def test_http_1_0_and_connection_close_end_the_connection(addr: tuple[str, int]) -> None:
    for request in (b"GET /whole HTTP/1.0\r\n\r\n", b"GET /whole HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
        with connect(addr) as s:
            s.sendall(request)
            _, headers, body = read_response(s)
            assert body == b"made" and headers[b"connection"] == b"close"
            assert closed(s)


def test_app_errors_give_500_or_a_broken_connection(addr: tuple[str, int]) -> None:
    with connect(addr) as s:
        s.sendall(b"GET /fail HTTP/1.1\r\nHost: x\r\n\r\n")
        line, _, body = read_response(s)
        assert line == b"HTTP/1.1 500 Internal Server Error" and body == b"Internal Server Error"
        assert closed(s)
    with connect(addr) as s:
        s.sendall(b"GET /none HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s)[0] == b"HTTP/1.1 500 Internal Server Error"
    for path in (b"/bad", b"/short"):  # never a response the client would misread
        with connect(addr) as s:
            s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            with contextlib.suppress(OSError):
                while chunk := s.recv(65536):
                    data += chunk
            assert b"x-b" not in data, data
            assert data == b"" or (b"content-length: 10" in data and not data.endswith(b"abc" + b"\0" * 7)), data


def test_a_client_that_goes_away_cancels_the_task_at_once(addr: tuple[str, int]) -> None:
    SEEN.pop("cancelled", None)
    s = connect(addr)
    s.sendall(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: SEEN.get("scope", {}).get("path") == "/wait", what="the request reached the app")
    t0 = time.monotonic()
    s.close()
    wait_for(lambda: "cancelled" in SEEN, timeout=5, what="the app's task cancelled")
    assert SEEN["cancelled"] - t0 < 0.5


@pytest.mark.parametrize("views", [False, True])
def test_large_bodies_up_to_the_limit_arrive_whole_in_one_buffer(views: bool) -> None:
    limit = 8 << 20
    with server(large_bodies=limit, body_views=views) as addr, connect(addr) as s:
        body = bytes(range(256)) * (3 << 12)  # 3 MiB
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 100_000):  # in pieces, as a slow client sends
            s.sendall(body[i:i + 100_000])
        _, headers, got = read_response(s)
        assert got == body and headers[b"x-reads"] == b"1" and SEEN["cycle"] == "LeanCycle"
        assert SEEN["body_type"] == ("memoryview" if views else "bytes")
        over = b"y" * (limit + 1)  # over the limit: uvicorn's cycle, chunk by chunk
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(over) + over)
        _, headers, got = read_response(s)
        assert got == over and SEEN["cycle"] == "RequestResponseCycle" and int(headers[b"x-reads"]) > 1
