"""Turning a deployment's return value into an HTTP response, and HTTP helpers."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any

logger = logging.getLogger("flotilla.http")

JSON = [(b"content-type", b"application/json")]
TEXT = [(b"content-type", b"text/plain; charset=utf-8")]
#: bytes and None go out as `text/plain` (no charset), as Ray Serve sends them.
RAW = [(b"content-type", b"text/plain")]


def _session_headers(name: str) -> frozenset[bytes]:
    """The header names (as ASGI gives them: lower case) that carry a session id: `name`
    with '-' and '_' taken as the same, as Ray's proxy matches it."""
    key = name.strip().lower()
    return frozenset({key.encode("latin-1"), key.replace("_", "-").encode("latin-1"),
                      key.replace("-", "_").encode("latin-1")})


#: The session id header (Ray's `RAY_SERVE_SESSION_ID_HEADER_KEY`, default `x-session-id`):
#: its value is the request's `session_id` (custom request routers' session affinity).
SESSION_HEADERS = _session_headers(os.environ.get("RAY_SERVE_SESSION_ID_HEADER_KEY") or "x-session-id")


def _default(obj: Any) -> Any:
    dump = getattr(obj, "model_dump", None)  # pydantic v2
    if callable(dump):
        return dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars
    if callable(tolist):
        return tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    # The rest as Ray Serve encodes them: dates, UUIDs, decimals, enums, bytes, paths, ...
    from fastapi.encoders import jsonable_encoder

    try:
        return jsonable_encoder(obj)
    except ValueError as e:  # what it cannot take either
        raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable") from e


#: `json.dumps(result, default=_default, separators=(",", ":"))`'s encoder, made once (dumps
#: makes one per call); compact, as Ray Serve writes JSON responses.
_JSON = json.JSONEncoder(default=_default, separators=(",", ":"))


def encode_result(result: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body for a plain return value (not a Starlette Response): text,
    bytes and None (an empty body) as they are, anything else as JSON."""
    if isinstance(result, str):
        body = result.encode()
        ctype = TEXT
    elif isinstance(result, (bytes, bytearray, memoryview)):
        body = bytes(result)
        ctype = RAW
    elif result is None:
        body = b""
        ctype = RAW
    else:
        body = _JSON.encode(result).encode()
        ctype = JSON
    return 200, [ctype[0], (b"content-length", str(len(body)).encode())], body


def plain(status: int, text: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = text.encode()
    return status, [TEXT[0], (b"content-length", str(len(body)).encode())], body


def unavailable(e: BaseException) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
    """The HTTP answer to a `BackPressureError` or `DeploymentUnavailableError` that a request's
    code let out (a call to another deployment refused): its status (503, or the refusing
    deployment's `backpressure_config`) and message, as Ray's replicas answer; None for any
    other error (a 500)."""
    from flotilla.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(e, BackPressureError):
        status, headers, body = plain(e.status_code, e.message)
        if e.retry_after_s is not None:
            headers.append((b"retry-after", str(math.ceil(e.retry_after_s)).encode()))
        return status, headers, body
    if isinstance(e, DeploymentUnavailableError):
        return plain(503, str(e))
    return None


def add_unavailable_handlers(app: Any) -> None:
    """Have a Starlette or FastAPI app (an ingress) answer `unavailable` errors itself, which
    it would otherwise answer with a 500."""
    if not hasattr(app, "add_exception_handler"):
        return
    from starlette.responses import Response

    from flotilla.serve.exceptions import BackPressureError, DeploymentUnavailableError

    def answer(_request: Any, e: Exception) -> Any:
        status, headers, body = unavailable(e) or plain(500, "Internal Server Error")
        return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers
                                                           if k != b"content-length"})

    handlers = getattr(app, "exception_handlers", {})
    for cls in (BackPressureError, DeploymentUnavailableError):
        if cls not in handlers:  # the app's own handler, if it has one, stays
            app.add_exception_handler(cls, answer)


SCOPE_KEYS = ("type", "http_version", "method", "scheme", "path", "raw_path", "query_string", "headers", "client", "server")


def forward_scope(scope: dict[str, Any], prefix: str, root: str = "") -> dict[str, Any]:
    """The picklable part of an ASGI scope, with root_path set to `root` + the route prefix
    (the path stays whole, as Starlette >= 0.33 expects)."""
    fwd = {k: scope[k] for k in SCOPE_KEYS if k in scope}
    fwd["root_path"] = root if prefix == "/" else root + prefix
    return fwd


def mount(root_path: str, path: str) -> tuple[str, str]:
    """Where a request falls under `HTTPOptions.root_path`: (the path to route, the root).

    Under the root ('/serve/api/x' with root '/serve'): ('/api/x', '/serve'). Outside it, the
    path is routed as it is, with no root (`mount_scope` first puts the root in front).
    """
    if root_path and path.startswith(root_path) and (len(path) == len(root_path) or path[len(root_path)] == "/"):
        return path[len(root_path):] or "/", root_path
    return path, ""


def mount_scope(root_path: str, scope: dict[str, Any]) -> tuple[str, str]:
    """`mount` for a request's scope, as Ray Serve treats `root_path`: the prefix a reverse
    proxy in front strips, so a request for '/api/x' is the app's '/serve/api/x' (its scope's
    `path` and `raw_path` get the root, and its root_path is the root plus the route). One
    that still carries the root is taken as it is."""
    if root_path:
        path = scope["path"]
        if not (path.startswith(root_path) and (len(path) == len(root_path) or path[len(root_path)] == "/")):
            scope["path"] = root_path + path
            raw = scope.get("raw_path")
            if raw:
                scope["raw_path"] = root_path.encode() + raw
    return mount(root_path, scope["path"])


def prefix_matches(prefix: str, path: str) -> bool:
    return prefix == "/" or path == prefix or (path.startswith(prefix) and path[len(prefix)] == "/")


class _TooLarge(bytes):
    """The marker `read_body` returns for a body over the limit."""


TOO_LARGE = _TooLarge()


def _content_length(scope: dict[str, Any]) -> int | None:
    for k, v in scope["headers"]:
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


async def read_body(receive: Any, scope: dict[str, Any] | None = None, limit: int | None = None) -> bytes | None:
    """The whole request body, in linear time; None if the client disconnected first, and
    `TOO_LARGE` as soon as it is known to exceed `limit` bytes (the rest is not read)."""
    if limit is not None and scope is not None:
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            return TOO_LARGE
    msg = await receive()
    if msg["type"] == "http.disconnect":
        return None
    first = msg.get("body", b"")
    if not msg.get("more_body", False):
        return first if limit is None or len(first) <= limit else TOO_LARGE
    parts = [first]
    size = len(first)
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunk = msg.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            return TOO_LARGE
        parts.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(parts)


def too_large(limit: int | None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    status, headers, body = plain(
        413, f"Request body too large: the limit is {limit} bytes "
        "(http_options={'max_request_body_bytes': N} sets it)."
    )
    return status, [*headers, (b"connection", b"close")], body


async def relay_stream(send: Any, ch: Any) -> bool:
    """Send a streaming response's chunks from `ch` to the client (the start is sent).

    Returns True when the stream ended cleanly. On Abort, an error or a dead replica it
    returns False WITHOUT the terminating empty chunk: the server then breaks the connection
    off, so the client sees an incomplete response instead of a complete-looking one.
    """
    from flotilla._private.protocol import Chunk, End

    while True:
        msg = await ch.get()
        cls = msg.__class__
        if cls is Chunk:
            await send({"type": "http.response.body", "body": msg.data, "more_body": True})
        elif cls is End:
            await send({"type": "http.response.body", "body": b""})
            return True
        else:
            logger.warning("a streaming response broke off: %s", getattr(msg, "reason", None) or getattr(msg, "error", None) or msg)
            return False


def _whole_writer(send: Any) -> Any:
    """The server's one-write `whole(status, headers, body, extra)` behind `send`, if it has
    one (`lean_http.LeanCycle`); else None."""
    return getattr(getattr(send, "__self__", None), "whole", None)


async def reply(
    send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes, extra: tuple[bytes, bytes] | None = None
) -> int:
    """Send a whole response; returns its status."""
    whole = _whole_writer(send)
    if whole is not None:
        return await whole(status, headers, body, extra)  # type: ignore[no-any-return]
    if extra is not None:
        headers = [*headers, extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return status


async def send_whole(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes, extra: tuple[bytes, bytes]) -> int:
    """Send a replica's whole response (an HFULL frame's parts), adding one header; returns status."""
    whole = _whole_writer(send)
    if whole is not None:
        return await whole(status, headers, body, extra)  # type: ignore[no-any-return]
    headers.append(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return status
