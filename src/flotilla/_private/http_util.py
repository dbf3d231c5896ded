"""Turning a deployment's return value into an HTTP response, and HTTP helpers."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

JSON = [(b"content-type", b"application/json")]
TEXT = [(b"content-type", b"text/plain; charset=utf-8")]
OCTETS = [(b"content-type", b"application/octet-stream")]


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
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def encode_result(result: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body for a plain return value (not a Starlette Response)."""
    if isinstance(result, str):
        body = result.encode()
        ctype = TEXT
    elif isinstance(result, (bytes, bytearray, memoryview)):
        body = bytes(result)
        ctype = OCTETS
    else:
        body = json.dumps(result, default=_default).encode()
        ctype = JSON
    return 200, [ctype[0], (b"content-length", str(len(body)).encode())], body


def plain(status: int, text: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = text.encode()
    return status, [TEXT[0], (b"content-length", str(len(body)).encode())], body


SCOPE_KEYS = ("type", "http_version", "method", "scheme", "path", "raw_path", "query_string", "headers", "client", "server")


def forward_scope(scope: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The picklable part of an ASGI scope, with root_path set to the route prefix."""
    fwd = {k: scope[k] for k in SCOPE_KEYS if k in scope}
    fwd["root_path"] = "" if prefix == "/" else prefix
    return fwd


def prefix_matches(prefix: str, path: str) -> bool:
    return prefix == "/" or path == prefix or (path.startswith(prefix) and path[len(prefix)] == "/")


async def read_body(receive: Any) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    body = b""
    more = True
    while more:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    return body


async def reply(
    send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes, extra: tuple[bytes, bytes] | None = None
) -> int:
    """Send a whole response; returns its status."""
    if extra is not None:
        headers = [*headers, extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return status


async def send_whole(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes, extra: tuple[bytes, bytes]) -> int:
    """Send a replica's whole response (an HFULL frame's parts), adding one header; returns status."""
    headers.append(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return status
