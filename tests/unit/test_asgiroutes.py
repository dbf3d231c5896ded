"""Route templates of an ingress app and the names a proxy gives requests by them (checked
against Ray 2.60's names for the same app and requests; one case, an included router under a
route prefix, where Ray's own matcher misses and names it by the prefix, differs on purpose)."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, FastAPI, WebSocket
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from flotilla._private import asgiroutes
from flotilla._private.asgiroutes import Names, templates


async def _ep(request):
    return PlainTextResponse("x")


async def _raw(scope, receive, send):
    pass


def _app() -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.get("/")(lambda: 1)
    app.get("/items/me")(lambda: 1)
    app.get("/items/{id}")(lambda id: 1)
    app.post("/only-post")(lambda: 1)
    app.get("/slash/")(lambda: 1)
    app.get("/files/{p:path}")(lambda p: 1)

    @app.websocket("/ws/{room}")
    async def ws(websocket: WebSocket, room: str):
        pass

    users = APIRouter()
    users.get("/{u}/x")(lambda u: 1)
    app.include_router(users, prefix="/users")
    app.mount("/sub", Starlette(routes=[Route("/a/{x}", _ep), Route("/", _ep)]))
    app.mount("/raw", _raw)
    return app


def test_templates_in_matching_order_with_mounts_and_included_routers():
    assert templates(_app()) == [
        ("/", ["GET"], "http"), ("/items/me", ["GET"], "http"), ("/items/{id}", ["GET"], "http"),
        ("/only-post", ["POST"], "http"), ("/slash/", ["GET"], "http"), ("/files/{p:path}", ["GET"], "http"),
        ("/ws/{room}", None, "websocket"), ("/users/{u}/x", ["GET"], "http"),
        ("/sub/a/{x}", ["GET", "HEAD"], "http"), ("/sub/", ["GET", "HEAD"], "http"), ("/raw", None, "mount"),
    ]


def test_an_app_without_routes_has_no_templates():
    assert templates(_raw) is None
    assert templates(FastAPI(docs_url=None, redoc_url=None, openapi_url=None)) is None


@pytest.mark.parametrize(("method", "path", "name"), [
    ("GET", "/", "/"),
    ("GET", "/items/me", "/items/me"),          # the first route that matches, as Starlette's
    ("GET", "/items/5", "/items/{id}"),
    ("GET", "/items/5/", "/items/{id}/"),       # Starlette would redirect: named as Ray names it
    ("GET", "/slash", "/slash"),
    ("GET", "/files/a/b/c", "/files/{p:path}"),
    ("GET", "/users/7/x", "/users/{u}/x"),
    ("GET", "/sub/a/1", "/sub/a/{x}"),
    ("GET", "/raw/anything", "/raw"),
    ("GET", "/only-post", "/"),                 # the path matched, the method did not: the prefix
    ("POST", "/only-post", "/only-post"),
    ("HEAD", "/items/5", "/"),                  # a FastAPI GET route does not take HEAD
    ("HEAD", "/sub/a/1", "/sub/a/{x}"),         # a Starlette one does
    ("GET", "/nope", "/"),
    ("WS", "/ws/r1", "/ws/{room}"),
    ("GET", "/ws/r1", "/"),                     # a websocket route does not name an HTTP request
])
def test_names_at_the_root(method, path, name):
    assert Names("/", templates(_app())).name(method, path) == name


@pytest.mark.parametrize(("method", "path", "name"), [
    ("GET", "/pre", "/pre"),
    ("GET", "/pre/", "/pre/"),
    ("GET", "/pre/items/5", "/pre/items/{id}"),
    ("GET", "/pre/users/7/x", "/pre/users/{u}/x"),
    ("GET", "/pre/nope", "/pre"),
    ("POST", "/pre/items/5", "/pre"),
    ("WS", "/pre/ws/r1", "/pre/ws/{room}"),
])
def test_names_under_a_prefix(method, path, name):
    assert Names("/pre", templates(_app())).name(method, path) == name


def test_the_name_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(asgiroutes, "CACHE_SIZE", 8)
    names = Names("/", templates(_app()))
    for i in range(20):
        assert names.name("GET", f"/items/{i}") == "/items/{id}"
        assert len(names.cache) <= 8
