"""The `route` of a request (its request context, metric labels, access log lines): the route
prefix, or for a FastAPI / Starlette ingress the matched route template under it, as Ray's
("/prefix/dynamic/{user_id}", one label for every user instead of one per path)."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, FastAPI, WebSocket
from fastapi.responses import PlainTextResponse
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

import flotilla
from flotilla import serve
from flotilla._private.client import Runtime
from flotilla.serve.context import _get_serve_request_context
from tests.conftest import wait_for

pytestmark = pytest.mark.slow


def _route() -> str:
    return _get_serve_request_context().route


@serve.deployment
class Plain:
    def __call__(self) -> str:
        return _route()


api = FastAPI()
users = APIRouter()


@users.get("/{user_id}/items/{item_id}")
def _item() -> PlainTextResponse:
    return PlainTextResponse(_route())


api.include_router(users, prefix="/users")


@serve.deployment
@serve.ingress(api)
class Api:
    @api.get("/fastapi-path")
    def root(self) -> PlainTextResponse:
        return PlainTextResponse(_route())

    @api.get("/dynamic/{user_id}")
    def dynamic(self, user_id: str) -> PlainTextResponse:
        return PlainTextResponse(_route())

    @api.post("/only-post")
    def only_post(self) -> PlainTextResponse:
        return PlainTextResponse(_route())

    @api.websocket("/rooms/{room}")
    async def room(self, ws: WebSocket, room: str) -> None:
        await ws.accept()
        await ws.send_text(_route())
        await ws.close()


@pytest.mark.parametrize(("target", "prefix", "path", "expected"), [
    (Plain, None, "/", "/"),
    (Plain, None, "/subpath", "/"),
    (Plain, "/prefix", "/prefix", "/prefix"),
    (Plain, "/prefix", "/prefix/subpath", "/prefix"),
    (Api, None, "/fastapi-path", "/fastapi-path"),
    (Api, None, "/dynamic/abc123", "/dynamic/{user_id}"),
    (Api, "/prefix", "/prefix/fastapi-path", "/prefix/fastapi-path"),
    (Api, "/prefix", "/prefix/dynamic/abc123", "/prefix/dynamic/{user_id}"),
    (Api, "/prefix", "/prefix/users/7/items/9", "/prefix/users/{user_id}/items/{item_id}"),
])
def test_the_request_context_route_is_the_prefix_or_the_matched_template(url, target, prefix, path, expected):
    kwargs = {} if prefix is None else {"route_prefix": prefix}
    serve.run(target.bind(), name="r", **kwargs)
    r = httpx.get(url + path, timeout=30)
    assert r.status_code == 200, r.text
    assert r.text.strip('"') == expected


def test_metrics_and_replica_access_logs_carry_the_template_not_each_path(url):
    serve.run(Api.bind(), name="labels", route_prefix="/api")
    with httpx.Client(base_url=url, timeout=30) as c:
        for i in range(5):
            assert c.get(f"/api/dynamic/user-{i}").status_code == 200
        assert c.get("/api/no-such-route").status_code == 404  # no template: the prefix
        assert c.get("/api/only-post").status_code == 405  # the path matched, not the method: the prefix

    def routes() -> set[str] | None:
        text = httpx.get(flotilla.metrics_url(), timeout=30).text
        got = {(s.labels["route"], s.labels["status_code"]): s.value for fam in text_string_to_metric_families(text)
               for s in fam.samples
               if s.name == "ray_serve_num_http_requests_total" and s.labels.get("application") == "labels"}
        return got if sum(got.values()) == 7 else None

    assert wait_for(routes, what="the proxy's request counts by route") == {
        ("/api/dynamic/{user_id}", "200"): 5, ("/api", "404"): 1, ("/api", "405"): 1}
    logs = os.path.join(Runtime.current().session_dir, "logs")
    wait_for(lambda: "".join(Path(p).read_text() for p in glob.glob(f"{logs}/replica_labels_*.log"))
             .count(" GET /api/dynamic/{user_id} 200 ") == 5, what="five replica access lines with the template")
    wait_for(lambda: Path(f"{logs}/proxy.log").read_text().count("GET /api/dynamic/user-") == 5,
             what="the proxy's access lines, with each path")


def test_a_websocket_is_named_by_its_template(url):
    serve.run(Api.bind(), name="ws", route_prefix="/chat")
    with connect(url.replace("http://", "ws://") + "/chat/rooms/kitchen", open_timeout=30) as ws:
        assert ws.recv(timeout=30) == "/chat/rooms/{room}"
