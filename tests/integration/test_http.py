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
