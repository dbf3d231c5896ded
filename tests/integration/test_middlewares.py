"""http_options["middlewares"]: Starlette middlewares around the proxy's ASGI app."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from flotilla import serve
from flotilla.serve.exceptions import ConfigError
from tests.conftest import free_port, running_cluster

pytestmark = pytest.mark.slow


class AddHeader:
    """Adds `x-<name>: <order>` to every response; records the order middlewares ran in."""

    def __init__(self, app: Any, name: str) -> None:
        self.app = app
        self.name = name

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = scope.setdefault("state", {}).setdefault("order", [])
        seen.append(self.name)
        position = str(len(seen))

        async def wrapped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (f"x-{self.name}".encode(), position.encode())]}
            await send(message)

        await self.app(scope, receive, wrapped)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    mws = [Middleware(AddHeader, name="outer"), Middleware(AddHeader, name="inner"),
           Middleware(CORSMiddleware, allow_origins=["https://example.com"], allow_methods=["GET", "POST"])]
    with running_cluster({"middlewares": mws}, num_cpus=2) as url:
        yield url


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
def hello(request: Any = None) -> str:
    return "hi"


def test_middlewares_wrap_the_proxy_in_order(url: str) -> None:
    serve.run(hello.bind(), name="hello", route_prefix="/h")
    r = httpx.get(url + "/h", timeout=10)
    assert r.status_code == 200 and r.text == "hi"
    assert r.headers["x-outer"] == "1" and r.headers["x-inner"] == "2"  # first = outermost
    r = httpx.get(url + "/nowhere", timeout=10)  # the proxy's own answers pass through them too
    assert r.status_code == 404 and r.headers["x-outer"] == "1"


def test_cors_preflight(url: str) -> None:
    serve.run(hello.bind(), name="hello", route_prefix="/h")
    r = httpx.options(url + "/h", timeout=10, headers={
        "Origin": "https://example.com", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://example.com"
    assert "POST" in r.headers["access-control-allow-methods"]
    r = httpx.get(url + "/h", timeout=10, headers={"Origin": "https://example.com"})
    assert r.text == "hi" and r.headers["access-control-allow-origin"] == "https://example.com"
    r = httpx.options(url + "/h", timeout=10, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 400


def test_non_middleware_entries_fail_start(url: str) -> None:
    with pytest.raises(ConfigError, match=r"not a starlette\.middleware\.Middleware"):
        serve.start(http_options={"port": free_port(), "middlewares": [AddHeader]})


def test_cors_preflight_with_api_keys_reaches_the_cors_middleware_only() -> None:
    """Browsers send CORS preflights without credentials: CORSMiddleware answers them, and
    nothing else gets past the keys without one."""
    cors = Middleware(CORSMiddleware, allow_origins=["https://example.com"], allow_methods=["GET"],
                      allow_headers=["authorization"])
    with running_cluster({"middlewares": [cors], "api_keys": ["k-123"]}, num_cpus=2) as url:
        serve.run(hello.bind(), name="hello", route_prefix="/h")
        pre = {"Origin": "https://example.com", "Access-Control-Request-Method": "GET",
               "Access-Control-Request-Headers": "authorization"}
        r = httpx.options(url + "/h", headers=pre, timeout=10)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://example.com"
        # a preflight-looking request from an origin CORS refuses never reaches the app
        r = httpx.options(url + "/h", headers={**pre, "Origin": "https://evil.example"}, timeout=10)
        assert r.status_code == 400 and "hi" not in r.text
        assert httpx.get(url + "/h", headers={"Origin": "https://example.com"}, timeout=10).status_code == 401
        ok = httpx.get(url + "/h", headers={"Origin": "https://example.com", "Authorization": "Bearer k-123"},
                       timeout=10)
        assert ok.status_code == 200 and ok.text == "hi"
        assert ok.headers["access-control-allow-origin"] == "https://example.com"
    # keys without middlewares: a preflight is refused like any other keyless request
    with running_cluster({"api_keys": ["k-123"]}, num_cpus=2) as url:
        serve.run(hello.bind(), name="hello", route_prefix="/h")
        assert httpx.options(url + "/h", headers=pre, timeout=10).status_code == 401


def test_a_preflight_no_middleware_answers_meets_the_inner_key_check() -> None:
    with running_cluster({"middlewares": [Middleware(AddHeader, name="only")], "api_keys": ["k-123"]},
                         num_cpus=2) as url:
        serve.run(hello.bind(), name="hello", route_prefix="/h")
        pre = {"Origin": "https://example.com", "Access-Control-Request-Method": "GET"}
        r = httpx.options(url + "/h", headers=pre, timeout=10)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
