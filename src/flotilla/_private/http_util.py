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
