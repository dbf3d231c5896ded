"""Every request gets an answer (issue #10, "Done when"): user errors that do not unpickle,
unpicklable results, large and oversized bodies, broken streams and non-UTF-8 headers.

A reply that never comes must fail these tests by a timeout, never hang the suite.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import requests
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from flotilla import serve
from flotilla.exceptions import GetTimeoutError
from flotilla.serve.handle import DeploymentHandle
from tests.conftest import running_cluster, skip_direct_on_ray

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

LIMIT = 1 << 20
MODES: dict[str, dict[str, Any]] = {"proxy": {}, "direct": {"direct_ingress": True}, "limit": {"max_request_body_bytes": LIMIT}}
BOTH = pytest.mark.parametrize("cluster", ["proxy", "direct"], indirect=True)


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[str]:
    """A cluster with the proxy (default), direct ingress ("direct"), or a body limit ("limit")."""
    mode = getattr(request, "param", "proxy")
    skip_direct_on_ray(mode)
    with running_cluster(MODES[mode], num_cpus=4) as url:
        yield url


class CodedError(Exception):
    """Pickles, but does not unpickle: `Exception.__reduce__` gives `(cls, (message,))`."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg


@serve.deployment(max_ongoing_requests=2, ray_actor_options={"num_cpus": 0.5})
class Thrower:
    def boom(self) -> None:
        raise CodedError(418, "short and stout")

    def lock(self) -> Any:
        return threading.Lock()

    def ok(self) -> str:
        return "fine"

    async def __call__(self, request: Request) -> Any:
        what = request.url.path.rsplit("/", 1)[-1]
        if what == "boom":
            self.boom()
        if what == "lock":
            return self.lock()
        return "fine"


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Front:
    """Composition: the HTTP ingress awaits a downstream call that raises CodedError."""

    def __init__(self, back: DeploymentHandle) -> None:
        self.back = back

    async def __call__(self, request: Request) -> Any:
        return await self.back.boom.remote()


def assert_coded_error(e: BaseException) -> None:
    assert not isinstance(e, GetTimeoutError), f"no reply within the timeout: {e!r}"
    text = str(e)
    assert "CodedError" in text and "418: short and stout" in text and "Traceback" in text, text
    # The class is importable here, so the caller gets the original class, attributes included.
    assert isinstance(e, CodedError), type(e).__mro__
    assert (e.code, e.msg) == (418, "short and stout")


def timed_get(c: httpx.Client, path: str, within_s: float = 1.0) -> httpx.Response:
    t0 = time.monotonic()
    r = c.get(path)
    took = time.monotonic() - t0
    assert took < within_s, f"{path} answered after {took:.2f}s"
    return r


def test_user_exception_with_two_arg_init_reaches_the_handle_within_a_second(url: str) -> None:
    h = serve.run(Thrower.bind(), name="thr", route_prefix=None)
    t0 = time.monotonic()
    with pytest.raises(Exception) as info:
        h.boom.remote().result(timeout_s=1)
    assert_coded_error(info.value)
    assert time.monotonic() - t0 < 1


def test_user_exception_with_two_arg_init_is_http_500_within_a_second(url: str) -> None:
    serve.run(Thrower.bind(), name="thr", route_prefix="/thr")
    with httpx.Client(base_url=url, timeout=2) as c:
        r = timed_get(c, "/thr/boom")
    assert r.status_code == 500


def test_traceback_of_code_shipped_by_value_names_its_file_and_line(url: str) -> None:
    """A class defined in a function (or in __main__) travels by value; its traceback still
    shows the file and line it was written in, with the line's text, as Ray's does."""

    @serve.deployment
    class Local:
        def __call__(self) -> None:
            raise ValueError("raised on purpose")  # the line the traceback shows

    h = serve.run(Local.bind(), name="local", route_prefix=None)
    with pytest.raises(ValueError) as info:
        h.remote().result(timeout_s=10)
    text = str(info.value)
    assert f'File "{__file__}", line' in text and "in __call__" in text, text
    assert 'raise ValueError("raised on purpose")  # the line the traceback shows' in text
    assert "<dynamic-code>" not in text


def test_user_exception_from_a_downstream_deployment_reaches_http_and_handles(url: str) -> None:
    serve.run(Front.bind(Thrower.bind()), name="front", route_prefix="/front")
    with httpx.Client(base_url=url, timeout=2) as c:
        assert timed_get(c, "/front").status_code == 500
    back = serve.get_deployment_handle("Thrower", "front")
    with pytest.raises(Exception) as info:
        back.boom.remote().result(timeout_s=1)
    assert_coded_error(info.value)


def test_failed_replies_free_their_slots(url: str) -> None:
    """Twice max_ongoing_requests (2) errors over each path, then a normal request is served."""
    h = serve.run(Thrower.bind(), name="thr", route_prefix="/thr")
    with httpx.Client(base_url=url, timeout=2) as c:
        for _ in range(4):
            with pytest.raises(Exception) as info:
                h.boom.remote().result(timeout_s=1)
            assert not isinstance(info.value, GetTimeoutError), "a slot is held by a reply that never came"
            assert timed_get(c, "/thr/boom").status_code == 500
        assert h.ok.remote().result(timeout_s=1) == "fine"
        r = timed_get(c, "/thr/ok")
        assert (r.status_code, r.text) == (200, "fine")


def test_unpicklable_result_is_an_error_not_a_hang(url: str) -> None:
    h = serve.run(Thrower.bind(), name="thr", route_prefix="/thr")
    t0 = time.monotonic()
    with pytest.raises(Exception) as info:
        h.lock.remote().result(timeout_s=2)
    assert not isinstance(info.value, GetTimeoutError), "the reply never came"
    assert time.monotonic() - t0 < 2
    assert "lock" in str(info.value), str(info.value)
    with httpx.Client(base_url=url, timeout=3) as c:
        assert timed_get(c, "/thr/lock", within_s=2).status_code == 500
        assert h.ok.remote().result(timeout_s=1) == "fine"


def test_unpicklable_arguments_are_an_error_and_free_their_slots(url: str) -> None:
    """Twice max_ongoing_requests (2) calls whose arguments cannot be pickled each fail at once,
    and the deployment still serves: a call that never reached a replica holds no slot."""
    h = serve.run(Thrower.bind(), name="thr", route_prefix=None)
    for _ in range(4):
        with pytest.raises(Exception) as info:
            h.ok.remote(threading.Lock()).result(timeout_s=2)
        assert not isinstance(info.value, GetTimeoutError), "a call that was never sent holds a slot"
        assert "pickle" in str(info.value), str(info.value)
    assert h.ok.remote().result(timeout_s=2) == "fine"


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Echo:
    async def __call__(self, request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream")


@BOTH
def test_64_mib_body_is_echoed_whole_and_fast(url: str) -> None:
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    data = random.Random(10).randbytes(64 << 20)
    with httpx.Client(base_url=url, timeout=30) as c:
        t0 = time.monotonic()
        r = c.post("/echo", content=data)
        took = time.monotonic() - t0
    assert r.status_code == 200
    assert len(r.content) == len(data) and r.content == data
    assert took < 5, f"64 MiB echo took {took:.1f}s"


def raw_response_head(sock: socket.socket) -> bytes:
    """Read until the end of the response head (or the connection closes)."""
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def send_some(sock: socket.socket, data: bytes) -> None:
    """Send what the server takes: it may answer and stop reading (or close) at any point."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass


@pytest.mark.parametrize("cluster", ["limit"], indirect=True)
def test_body_over_max_request_body_bytes_is_413_without_reading_it_all(url: str) -> None:
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    with httpx.Client(base_url=url, timeout=10) as c:
        small = os.urandom(LIMIT // 2)
        r = c.post("/echo", content=small)
        assert r.status_code == 200 and r.content == small
        assert c.post("/echo", content=b"x" * (LIMIT + 1)).status_code == 413
    addr = urlsplit(url)
    host, port = addr.hostname or "127.0.0.1", addr.port or 80
    # A declared length over the limit: 413 after only part of the body was sent.
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {256 << 20}\r\n\r\n".encode())
        send_some(s, b"x" * (256 << 10))
        head = raw_response_head(s)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    # A chunked body with no declared length: 413 once it passes the limit.
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (64 << 10, b"y" * (64 << 10))
        send_some(s, chunk * (4 * LIMIT // (64 << 10)))
        head = raw_response_head(s)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Breaking:
    """/raise: the generator raises after two chunks; /hang: it waits (for the test to kill it)."""

    async def __call__(self, request: Request) -> StreamingResponse:
        mode = request.url.path.rsplit("/", 1)[-1]

        async def gen() -> Any:
            yield f"{os.getpid()}\n"
            yield "chunk1\n"
            if mode == "raise":
                raise RuntimeError("generator broke")
            await asyncio.sleep(30)
            yield "never\n"

        return StreamingResponse(gen(), media_type="text/plain")


BROKEN = (httpx.RemoteProtocolError, httpx.ReadError)


@BOTH
def test_stream_whose_generator_raises_is_seen_as_broken(url: str) -> None:
    serve.run(Breaking.bind(), name="brk", route_prefix="/brk")
    lines: list[str] = []
    with httpx.Client(base_url=url, timeout=10) as c, c.stream("GET", "/brk/raise") as r:
        assert r.status_code == 200
        with pytest.raises(BROKEN):
            for line in r.iter_lines():
                lines.append(line)
    assert lines[1:] == ["chunk1"], lines
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(f"{url}/brk/raise", timeout=10).content  # noqa: B018
    # http.client is what requests (via urllib3) reads with: an unterminated chunked body is
    # an IncompleteRead there (requests' ChunkedEncodingError), not a clean end.
    addr = urlsplit(url)
    conn = http.client.HTTPConnection(addr.hostname or "127.0.0.1", addr.port, timeout=10)
    try:
        conn.request("GET", "/brk/raise")
        resp = conn.getresponse()
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
    finally:
        conn.close()


@BOTH
def test_stream_whose_replica_is_killed_is_seen_as_broken(url: str) -> None:
    serve.run(Breaking.bind(), name="brk", route_prefix="/brk")
    with httpx.Client(base_url=url, timeout=10) as c, c.stream("GET", "/brk/hang") as r:
        assert r.status_code == 200
        it = r.iter_lines()
        pid = int(next(it))
        assert next(it) == "chunk1"
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(BROKEN):
            for _ in it:
                pass
    assert time.monotonic() - t0 < 5


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
def plain(request: Request) -> str:
    return "served"


@BOTH
@pytest.mark.parametrize("header", ["X-Request-ID", "serve_multiplexed_model_id"])
def test_non_utf8_header_values_are_served(url: str, header: str) -> None:
    serve.run(plain.bind(), name="plain", route_prefix="/plain")
    with httpx.Client(base_url=url, timeout=5) as c:
        r = c.get("/plain", headers=[(header.encode(), b"\xff\xfeid-\xc3")])
    assert (r.status_code, r.text) == (200, "served")


DROPPED_SCRIPT = '''
import asyncio, gc, sys
import flotilla
from flotilla import serve

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Err:
    def __call__(self):
        raise ValueError("nobody reads this")

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Caller:
    def __init__(self, err):
        self.err = err

    async def __call__(self):
        self.err.remote()  # dropped unread, from a replica's loop
        return "ok"

flotilla.init(num_cpus=2, log_to_driver=True)
h = serve.run(Err.bind(), name="err", route_prefix=None)
seen = h.remote()
try:
    seen.result(timeout_s=30)
except ValueError:
    pass
h.remote()  # dropped unread, from sync code
async def main():
    h.remote()  # dropped unread, from a loop
    await asyncio.sleep(0.5)
asyncio.run(main())
c = serve.run(Caller.bind(Err.bind()), name="caller", route_prefix=None)
assert c.remote().result(timeout_s=30) == "ok"
try:
    h.remote().result(timeout_s=30)  # one more call, answered after the dropped ones
except ValueError:
    pass
gc.collect()
serve.shutdown()
flotilla.shutdown()
print("done", flush=True)
'''


def test_a_failed_response_dropped_unread_is_not_logged(tmp_path):
    """As Ray's: nothing is printed for a failed call whose response nobody reads (asyncio's
    "Future exception was never retrieved" with the traceback was); reading it still raises."""
    import subprocess
    import sys

    script = tmp_path / "dropped.py"
    script.write_text(DROPPED_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOTILLA_ADDRESS")}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env,
                       cwd=str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == "done", r.stderr
    assert "never retrieved" not in r.stderr, r.stderr
