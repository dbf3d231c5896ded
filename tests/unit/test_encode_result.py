"""`http_util.encode_result`: a handler's plain return value as an HTTP response."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import uuid
from typing import Any

import pytest

from flotilla._private import http_util


@dataclasses.dataclass
class Point:
    x: int
    y: float


class Arrayish:
    def tolist(self) -> list[int]:
        return [1, 2]


@pytest.mark.parametrize("value", [
    {"ok": True}, [1, "é", None, 2.5], {"nested": {"p": Point(1, 2.0)}}, Arrayish(), {"a": float("nan")}, 7,
])
def test_json_values_encode_as_json_dumps_with_the_default_hook(value: Any) -> None:
    status, headers, body = http_util.encode_result(value)
    assert status == 200 and headers[0] == (b"content-type", b"application/json")
    assert body == json.dumps(value, default=http_util._default, separators=(",", ":")).encode()
    assert headers[1] == (b"content-length", str(len(body)).encode())


def test_text_and_bytes_pass_as_they_are_with_ray_serves_content_types() -> None:
    assert http_util.encode_result("hé")[1][0] == (b"content-type", b"text/plain; charset=utf-8")
    assert http_util.encode_result("hé")[2] == "hé".encode()
    assert http_util.encode_result(b"\x00\x01")[1][0] == (b"content-type", b"text/plain")
    assert http_util.encode_result(b"\x00\x01")[2] == b"\x00\x01"


def test_none_is_an_empty_text_body() -> None:
    status, headers, body = http_util.encode_result(None)
    assert (status, headers[0], body) == (200, (b"content-type", b"text/plain"), b"")
    assert headers[1] == (b"content-length", b"0")


class Color(enum.Enum):
    RED = "red"


def test_what_fastapis_jsonable_encoder_takes_encodes_as_it_does() -> None:
    """Ray Serve encodes a plain return value with FastAPI's jsonable_encoder: dates, UUIDs,
    decimals, enums and bytes inside a structure come out as JSON, not as a 500."""
    value = {
        "at": datetime.datetime(2026, 12, 4, 17, 0, 1), "day": datetime.date(2026, 12, 4),
        "id": uuid.UUID(int=1), "price": decimal.Decimal("1.5"), "color": Color.RED, "raw": b"ab",
    }
    assert json.loads(http_util.encode_result(value)[2]) == {
        "at": "2026-12-04T17:00:01", "day": "2026-12-04", "id": str(uuid.UUID(int=1)),
        "price": 1.5, "color": "red", "raw": "ab",
    }


def test_what_json_cannot_encode_raises() -> None:
    with pytest.raises(TypeError):
        http_util.encode_result({"x": object()})
