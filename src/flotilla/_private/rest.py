"""The head's REST API (127.0.0.1:8265 by default): what the CLI talks to.

Ray's shape where Ray has one:
- `GET /api/serve/applications/`: every application's status and applied config;
- `PUT /api/serve/applications/`: deploy a config (JSON, Ray's `ServeDeploySchema`); 200 once
  it is accepted (validated, removals and builds started), 400 naming the field when it is bad;
- `DELETE /api/serve/applications/`: delete every application;
- `POST /api/v1/applications/{app}/deployments/{name}/scale`: Ray 2.60's external scaling
  (`{"target_num_replicas": n}` for an application deployed with `external_scaler_enabled`).

flotilla's own, under `/api/flotilla/`: `cluster` (where the cluster is: namespace, session
folder, URLs), `status` (what `flotilla status` prints, as JSON), `config` (the latest applied
config), `POST shutdown` (drain and stop the cluster); the dashboard's `dashboard`,
`timeseries` and `logs` (see `dashboard.py` and docs/DASHBOARD.md); and `GET /-/healthz`. The
dashboard page is `/`, its files under `/static/`.

Bound beyond 127.0.0.1 it requires `Authorization: Bearer <token>` on everything but healthz
(compared in constant time; failures counted, never logged with the token). A browser opens
`/?token=<token>` once: that sets an HttpOnly, SameSite=Strict cookie, which is accepted in place
of the header for GET requests only. A request that changes something (not GET) and carries an
`Origin` that is not this server is refused (403), so a web page elsewhere cannot drive a local
cluster from a browser. JSON only: nothing is unpickled here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import h11

logger = logging.getLogger("flotilla.rest")

MAX_BODY = 16 << 20
READ_TIMEOUT_S = 30.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")

COOKIE = "flotilla_token"


class Reply(NamedTuple):
    status: int
    ctype: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


@dataclass
class Request:
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)  # the first value of each parameter
    params: dict[str, str] = field(default_factory=dict)  # a route pattern's `{name}` parts


Route = Callable[[Request], Awaitable[Reply]]


def json_reply(value: Any, status: int = 200) -> Reply:
    return Reply(status, "application/json", json.dumps(value, default=str).encode())


def empty_reply(status: int = 200) -> Reply:
    """No body, as Ray's dashboard answers an accepted PUT or DELETE."""
    return Reply(status, "application/octet-stream", b"")


def text_reply(status: int, text: str) -> Reply:
    return Reply(status, "text/plain; charset=utf-8", (text.rstrip("\n") + "\n").encode())


def _cookie(headers: dict[str, str], name: str) -> str:
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""


class RestServer:
    """A small HTTP/1.1 server (h11) over `routes`: {(method, path): coroutine(body, headers)}."""

    def __init__(self, routes: dict[tuple[str, str], Route], token: str | None = None) -> None:
        self.routes = routes
        self.token = token
        self.auth_failures = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 << 10)
        try:
            while True:
                got = await asyncio.wait_for(self._read(conn, reader), READ_TIMEOUT_S)
                if got is None:
                    break
                req, body = got
                status, ctype, payload, extra = await self._dispatch(req, body)
                headers = [("content-type", ctype), ("content-length", str(len(payload))), *extra]
                if status == 401:
                    headers.append(("www-authenticate", 'Bearer realm="flotilla"'))
                writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
                writer.write(conn.send(h11.Data(data=payload)) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
        except (TimeoutError, ConnectionError, h11.ProtocolError):
            pass
        except Exception:
            logger.exception("REST API connection failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read(self, conn: h11.Connection, reader: asyncio.StreamReader) -> tuple[h11.Request, bytes] | None:
        req: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                req = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise h11.ProtocolError("body too large")
            elif isinstance(event, h11.EndOfMessage):
                assert req is not None
                return req, bytes(body)
            else:  # ConnectionClosed, or PAUSED between requests
                return None

    async def _dispatch(self, req: h11.Request, body: bytes) -> Reply:
        method = req.method.decode()
        target = urlsplit(req.target.decode("latin-1"))
        path = target.path
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in req.headers}
        query = {k: v[0] for k, v in parse_qs(target.query).items()}
        if path == "/-/healthz":
            return text_reply(200, "success")
        if method != "GET" and not _same_origin(headers):
            return text_reply(403, f"{method} {path} from the web page at {headers.get('origin')} is not allowed")
        if self.token is not None:
            given = headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            if method == "GET" and path == "/" and "token" in query and self._valid(query["token"]):
                return Reply(303, "text/plain", b"", (
                    ("location", "/"),
                    ("set-cookie", f"{COOKIE}={query['token']}; HttpOnly; SameSite=Strict; Path=/")))
            ok = scheme.lower() == "bearer" and self._valid(value.strip())
            if not ok and method == "GET":
                ok = self._valid(_cookie(headers, COOKIE))
            if not ok:
                self.auth_failures += 1
                return text_reply(401, "this flotilla REST API needs 'Authorization: Bearer <token>' "
                                       "(the token `flotilla start` printed, or FLOTILLA_TOKEN); "
                                       "in a browser, open /?token=<token> once")
        if not path.endswith("/") and not path.startswith("/static/"):
            path += "/"
        route = self.routes.get((method, path))
        params: dict[str, str] = {}
        if route is None:
            route, params = self._match(method, path)
        if route is None:
            if any(p == path for _, p in self.routes):
                allowed = sorted(m for m, p in self.routes if p == path)
                return text_reply(405, f"{method} is not allowed on {path}; use {', '.join(allowed)}")
            return text_reply(404, f"no such endpoint {path}; see /api/serve/applications/")
        try:
            return await route(Request(method, path, body, headers, query, params))
        except Exception as e:
            logger.exception("REST API %s %s failed", method, path)
            return text_reply(500, f"internal error: {type(e).__name__}: {e}")

    def _match(self, method: str, path: str) -> tuple[Route | None, dict[str, str]]:
        """The route whose pattern (`/a/{x}/b/`: one path segment per `{name}`) fits `path`."""
        parts = path.split("/")
        for (m, pattern), route in self.routes.items():
            if m != method or "{" not in pattern:
                continue
            want = pattern.split("/")
            if len(want) != len(parts):
                continue
            got: dict[str, str] = {}
            for w, p in zip(want, parts, strict=True):
                if w.startswith("{") and w.endswith("}") and p:
                    got[w[1:-1]] = unquote(p)
                elif w != p:
                    break
            else:
                return route, got
        return None, {}

    def _valid(self, given: str) -> bool:
        assert self.token is not None
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())


def _same_origin(headers: dict[str, str]) -> bool:
    """No `Origin` (not a browser), or the page's origin is this server."""
    origin = headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == headers.get("host", "")
