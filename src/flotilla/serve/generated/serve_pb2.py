"""Ray Serve's `serve_pb2` for `RayServeAPIService`, hand-encoded (no protobuf package needed):
the request and response messages of its two RPCs, which the gRPC ingress serves, so a client
written as Ray's gRPC guide shows works (`from flotilla.serve.generated import serve_pb2,
serve_pb2_grpc`)."""

from __future__ import annotations

from typing import Any

__all__ = ["HealthzRequest", "HealthzResponse", "ListApplicationsRequest", "ListApplicationsResponse"]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _string_field(value: str | bytes) -> bytes:
    """Field 1, wire type 2 (length-delimited). (grpc.aio hands a returned str over as bytes.)"""
    data = value.encode() if isinstance(value, str) else value
    return b"\x0a" + _varint(len(data)) + data


def encode_list_applications(names: list[str]) -> bytes:
    """`ListApplicationsResponse { repeated string application_names = 1; }`."""
    return b"".join(_string_field(n) for n in names)


def encode_healthz(message: str | bytes) -> bytes:
    """`HealthzResponse { string message = 1; }`."""
    return _string_field(message)


def decode_strings(data: bytes) -> list[str]:
    """Field 1's strings of a message (for tests and clients without Ray's generated code)."""
    out: list[str] = []
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        wire = key & 7
        if wire == 2:
            n, i = _read_varint(data, i)
            if key >> 3 == 1:
                out.append(data[i:i + n].decode())
            i += n
        elif wire == 0:
            _, i = _read_varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return out


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = n = 0
    while True:
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i
        shift += 7


class _Message:
    """The part of protobuf's message API a gRPC stub and its caller use."""

    def SerializeToString(self) -> bytes:
        raise NotImplementedError

    def ParseFromString(self, data: bytes) -> None:
        raise NotImplementedError

    @classmethod
    def FromString(cls, data: bytes) -> Any:
        msg = cls()
        msg.ParseFromString(data)
        return msg

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({vars(self)})"


class HealthzRequest(_Message):
    def SerializeToString(self) -> bytes:
        return b""

    def ParseFromString(self, data: bytes) -> None:
        pass


class ListApplicationsRequest(HealthzRequest):
    pass


class HealthzResponse(_Message):
    def __init__(self, message: str = "") -> None:
        self.message = message

    def SerializeToString(self) -> bytes:
        return encode_healthz(self.message) if self.message else b""

    def ParseFromString(self, data: bytes) -> None:
        self.message = (decode_strings(data) or [""])[0]


class ListApplicationsResponse(_Message):
    def __init__(self, application_names: list[str] | None = None) -> None:
        self.application_names = list(application_names or [])

    def SerializeToString(self) -> bytes:
        return encode_list_applications(self.application_names)

    def ParseFromString(self, data: bytes) -> None:
        self.application_names = decode_strings(data)
