"""The HTTP proxy: routing, return-value conversion, errors, health and routes endpoints."""

from __future__ import annotations

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse

from flotilla import serve

pytestmark = pytest.mark.slow


@serve.deployment
class Api:
    async def __call__(self, request: Request):
        path = request.url.path
        if path.endswith("/json"):
            body = await request.json()
            return {"got": body, "query": dict(request.query_params)}
        if path.endswith("/text"):
            return "plain text"
        if path.endswith("/response"):
            return JSONResponse({"custom": True}, status_code=201, headers={"x-flotilla": "1"})
        if path.endswith("/error"):
            raise RuntimeError("boom")
        if path.endswith("/list"):
            return [1, 2, 3]
        if path.endswith("/stream"):
            def gen():
                for i in range(5):
                    yield f"{i},"
            return StreamingResponse(gen(), media_type="text/plain")
        if path.endswith("/info"):
            return {"path": path, "root_path": request.scope.get("root_path"), "method": request.method,
                    "header": request.headers.get("x-test")}
        return PlainTextResponse("default")


def test_return_values_become_http_responses(url):
    serve.run(Api.bind(), name="api", route_prefix="/api")
    with httpx.Client(base_url=url) as c:
        r = c.post("/api/json?q=1", json={"a": 1})
        assert r.status_code == 200 and r.json() == {"got": {"a": 1}, "query": {"q": "1"}}
        assert r.headers["content-type"] == "application/json"
        r = c.get("/api/text")
        assert r.text == "plain text" and r.headers["content-type"].startswith("text/plain")
        r = c.get("/api/response")
        assert r.status_code == 201 and r.json() == {"custom": True} and r.headers["x-flotilla"] == "1"
        assert c.get("/api/list").json() == [1, 2, 3]
        assert c.get("/api/stream").text == "0,1,2,3,4,"
        info = c.get("/api/info", headers={"x-test": "yes"}).json()
        assert info == {"path": "/api/info", "root_path": "/api", "method": "GET", "header": "yes"}


@serve.deployment
class NoArgs:
    def __call__(self) -> int:
        return 1


@serve.deployment
async def no_args_fn() -> str:
    return "hello"


@serve.deployment
class Values:
    def __call__(self, request: Request):
        import datetime
        import uuid

        kind = request.url.path.rsplit("/", 1)[-1]
        if kind == "none":
            return None
        if kind == "bytes":
            return b"\x00raw"
        return {"at": datetime.date(2026, 12, 4), "id": uuid.UUID(int=7)}


def test_a_handler_with_no_parameters_is_called_without_the_request(url):
    """Ray Serve calls an HTTP entry that takes no arguments without the request."""
    serve.run(NoArgs.bind(), name="noargs", route_prefix="/noargs")
    serve.run(no_args_fn.bind(), name="noargsfn", route_prefix="/fn")
    with httpx.Client(base_url=url) as c:
        r = c.get("/noargs", headers={"x-request-id": "123-234"})
        assert (r.status_code, r.json(), r.headers["x-request-id"]) == (200, 1, "123-234")
        r = c.get("/fn")
        assert (r.status_code, r.text) == (200, "hello")


def test_plain_values_are_encoded_as_ray_serve_encodes_them(url):
    serve.run(Values.bind(), name="values", route_prefix="/v")
    with httpx.Client(base_url=url) as c:
        r = c.get("/v/none")
        assert (r.status_code, r.content, r.headers["content-type"]) == (200, b"", "text/plain")
        r = c.get("/v/bytes")
        assert (r.status_code, r.content, r.headers["content-type"]) == (200, b"\x00raw", "text/plain")
        r = c.get("/v/json")
        assert r.status_code == 200 and r.json() == {"at": "2026-12-04", "id": "00000000-0000-0000-0000-000000000007"}


def test_user_error_gives_500_and_app_keeps_serving(url):
    serve.run(Api.bind(), name="api", route_prefix="/api")
    with httpx.Client(base_url=url) as c:
        r = c.get("/api/error")
        assert r.status_code == 500
        assert "boom" not in r.text  # no traceback leaks to the client
        # A body that is not JSON, sent to a handler that parses JSON.
        r = c.post("/api/json", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 500
        assert c.get("/api/text").status_code == 200


def test_unknown_route_is_404_and_builtin_endpoints(url):
    for name in list(serve.status().applications):  # a test before may have left one
        serve.delete(name)
    r = httpx.get(f"{url}/-/healthz", timeout=30)  # no route yet: unhealthy, as Ray's (was 200)
    assert (r.status_code, r.text) == (503, "Route table is not populated yet.")
    serve.run(Api.options(name="Handles").bind(), name="handles_only", route_prefix=None)
    assert httpx.get(f"{url}/-/healthz", timeout=30).status_code == 503
    serve.run(Api.bind(), name="api", route_prefix="/api")
    with httpx.Client(base_url=url) as c:
        assert c.get("/nothing-here").status_code == 404
        assert c.get("/apix").status_code == 404
        r = c.get("/-/healthz")
        assert r.status_code == 200 and r.text == "success"
        assert c.get("/-/routes").json() == {"/api": "api"}


def test_longest_prefix_wins(url):
    @serve.deployment
    def which(request):
        return "root"

    @serve.deployment
    def sub(request):
        return "sub"

    serve.run(which.bind(), name="root", route_prefix="/")
    serve.run(sub.bind(), name="sub", route_prefix="/a/b")
    with httpx.Client(base_url=url) as c:
        assert c.get("/a/b/c").text == "sub"
        assert c.get("/a/b").text == "sub"
        assert c.get("/a/bc").text == "root"
        assert c.get("/").text == "root"


def test_concurrent_requests(url):
    serve.run(Api.options(num_replicas=2).bind(), name="api", route_prefix="/api")
    import concurrent.futures

    with httpx.Client(base_url=url) as c, concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda i: c.post("/api/json", json=i).json()["got"], range(200)))
    assert codes == list(range(200))


def _idle_close_after(base: str) -> float:
    """Seconds from a response on a kept-alive connection until the server closes it; a
    second request sent at once on that connection must be answered first."""
    import socket
    import time
    from urllib.parse import urlsplit

    u = urlsplit(base)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        req = b"GET /ka/text HTTP/1.1\r\nHost: x\r\n\r\n"
        for _ in range(2):
            s.sendall(req)
            got = b""
            while b"plain text" not in got:
                chunk = s.recv(65536)
                assert chunk, f"closed before the response: {got!r}"
                got += chunk
        t0 = time.monotonic()
        assert s.recv(1) == b""  # the server closes the idle connection
        return time.monotonic() - t0


def test_keep_alive_timeout_s_fractional_and_from_ray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import running_cluster

    with running_cluster(http_options={"keep_alive_timeout_s": 0.6}) as base:
        serve.run(Api.bind(), name="ka", route_prefix="/ka")
        assert 0.3 < _idle_close_after(base) < 3
    # Ray Serve: RAY_SERVE_HTTP_KEEP_ALIVE_TIMEOUT_S wins over keep_alive_timeout_s.
    monkeypatch.setenv("RAY_SERVE_HTTP_KEEP_ALIVE_TIMEOUT_S", "1.5")
    with running_cluster(http_options={"keep_alive_timeout_s": 30}) as base:
        serve.run(Api.bind(), name="ka", route_prefix="/ka")
        assert 1.2 < _idle_close_after(base) < 5
