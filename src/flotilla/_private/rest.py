"""The head's REST API (127.0.0.1:8265 by default): what the CLI talks to.

Ray's shape where Ray has one:
- `GET /api/serve/applications/`: every application's status and applied config;
- `PUT /api/serve/applications/`: deploy a config (JSON, Ray's `ServeDeploySchema`); 200 once
  it is accepted (validated, removals and builds started), 400 naming the field when it is bad;
- `DELETE /api/serve/applications/`: delete every application.

flotilla's own, under `/api/flotilla/`: `cluster` (where the cluster is: namespace, session
folder, URLs), `status` (what `flotilla status` prints, as JSON), `config` (the latest applied
config), `POST shutdown` (drain and stop the cluster); and `GET /-/healthz`.

Bound beyond 127.0.0.1 it requires `Authorization: Bearer <token>` on everything but healthz
(compared in constant time; failures counted, never logged with the token). JSON only: nothing
is unpickled here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import h11

logger = logging.getLogger("flotilla.rest")

MAX_BODY = 16 << 20
READ_TIMEOUT_S = 30.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")

Reply = tuple[int, str, bytes]
Route = Callable[[bytes, dict[str, str]], Awaitable[Reply]]


def json_reply(value: Any, status: int = 200) -> Reply:
    return status, "application/json", json.dumps(value, default=str).encode()


def text_reply(status: int, text: str) -> Reply:
    return status, "text/plain; charset=utf-8", (text.rstrip("\n") + "\n").encode()


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
                status, ctype, payload = await self._dispatch(req, body)
                headers = [("content-type", ctype), ("content-length", str(len(payload)))]
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
        path = req.target.decode().split("?", 1)[0]
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in req.headers}
        if path == "/-/healthz":
            return text_reply(200, "success")
        if self.token is not None:
            given = headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
                self.auth_failures += 1
                return text_reply(401, "this flotilla REST API needs 'Authorization: Bearer <token>' "
                                       "(the token `flotilla start` printed, or FLOTILLA_TOKEN)")
        if not path.endswith("/"):
            path += "/"
        route = self.routes.get((method, path))
        if route is None:
            if any(p == path for _, p in self.routes):
                allowed = sorted(m for m, p in self.routes if p == path)
                return text_reply(405, f"{method} is not allowed on {path}; use {', '.join(allowed)}")
            return text_reply(404, f"no such endpoint {path}; see /api/serve/applications/")
        try:
            return await route(body, headers)
        except Exception as e:
            logger.exception("REST API %s %s failed", method, path)
            return text_reply(500, f"internal error: {type(e).__name__}: {e}")
