"""Route templates of an ingress ASGI app (FastAPI, Starlette): the `route` of a request's
metrics, access log line and request context is its route prefix, or for such an app the
template its path matched under it ("/api/users/{user_id}": one label for every user, not one
per path), as in Ray Serve.

A replica reads its app's templates once (`templates`); the controller gives them to the
proxies with the route table; a proxy names a request by them (`Names`), off the hot path for
every other app. The matching follows Starlette's: routes in order, a mount's routes under its
path, a path that matches only with its trailing slash toggled named as the redirect would be.
A path whose method no route takes, or that no route matches, is named by the prefix.
"""

from __future__ import annotations

import re
from typing import Any

#: One template: (path, methods or None for any, kind): kind "http", "websocket" or "mount"
#: (a mounted app without routes of its own: everything under its path).
Template = tuple[str, "list[str] | None", str]

#: Names kept per route prefix; past this the cache starts again (paths with ids are many).
CACHE_SIZE = 4096


def templates(app: Any) -> list[Template] | None:
    """`app`'s route templates in matching order, None if it has no routes to name by."""
    routes = getattr(app, "routes", None)
    if not routes:
        return None
    out: list[Template] = []
    try:
        _walk(routes, "", out)
    except Exception:  # an unusual router: requests are named by the prefix
        return None
    return out or None


def _walk(routes: list[Any], prefix: str, out: list[Template]) -> None:
    from starlette.routing import Mount, WebSocketRoute

    for route in routes:
        inner = getattr(route, "original_router", None)
        context = getattr(route, "include_context", None)
        if inner is not None and context is not None:  # FastAPI's include_router, kept nested
            _walk(inner.routes, prefix + context.prefix, out)
            continue
        path = getattr(route, "path", None)
        if not isinstance(path, str):
            continue
        if isinstance(route, Mount):
            if route.routes:
                _walk(route.routes, prefix + path, out)
            else:
                out.append((prefix + path, None, "mount"))
        elif isinstance(route, WebSocketRoute):
            out.append((prefix + path, None, "websocket"))
        else:
            methods = getattr(route, "methods", None)
            out.append((prefix + path, sorted(methods) if methods else None, "http"))


class Names:
    """Names the requests of one route prefix by its app's templates."""

    def __init__(self, prefix: str, tmpl: list[Template]) -> None:
        from starlette.routing import compile_path

        self.source = tmpl
        self.prefix = "" if prefix == "/" else prefix
        #: (regex, methods or None for any, template, kind) in matching order
        self.rules: list[tuple[re.Pattern[str], frozenset[str] | None, str, str]] = []
        for path, methods, kind in tmpl:
            regex = compile_path(path.rstrip("/") + "/{path:path}" if kind == "mount" else path)[0]
            allowed = None if methods is None else frozenset(methods)  # Starlette's include HEAD, FastAPI's not
            self.rules.append((regex, allowed, path, kind))
        self.cache: dict[tuple[str, str], str] = {}

    def name(self, method: str, path: str) -> str:
        """The route of a request for `path` (the whole path, prefix included); `method`
        "WS" for a websocket (as Ray labels it)."""
        key = (method, path)
        got = self.cache.get(key)
        if got is None:
            if len(self.cache) >= CACHE_SIZE:
                self.cache.clear()
            got = self.cache[key] = self._match(method, path[len(self.prefix):]) or self.prefix or "/"
        return got

    def _match(self, method: str, sub: str) -> str | None:
        found = self._find(method, sub)
        if found is None and (self.prefix or sub != "/"):  # as Starlette's slash redirect would go
            if sub.endswith("/"):
                found = self._find(method, sub[:-1])
                found = None if found is None else found + "/"
            else:
                found = self._find(method, sub + "/")
                found = None if found is None else found[:-1]
        if not found:
            return None
        return self.prefix + "/" + found.lstrip("/") if self.prefix else found

    def _find(self, method: str, sub: str) -> str | None:
        skip = "http" if method == "WS" else "websocket"
        for regex, allowed, template, kind in self.rules:
            if kind != skip and regex.match(sub) and (allowed is None or method in allowed):
                return template
        return None
