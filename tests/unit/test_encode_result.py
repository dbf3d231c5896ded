"""`http_util.encode_result`: a handler's plain return value as an HTTP response."""

from __future__ import annotations

import dataclasses
import json
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
    assert body == json.dumps(value, default=http_util._default).encode()
    assert headers[1] == (b"content-length", str(len(body)).encode())


def test_text_and_bytes_pass_as_they_are() -> None:
    assert http_util.encode_result("hé")[2] == "hé".encode()
    assert http_util.encode_result(b"\x00\x01")[1][0] == (b"content-type", b"application/octet-stream")


def test_what_json_cannot_encode_raises() -> None:
    with pytest.raises(TypeError):
        http_util.encode_result({"x": object()})
