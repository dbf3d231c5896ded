"""gRPC helpers for deployment code, as Ray Serve's `ray.serve.grpc_util`.

A method called through the gRPC ingress that has a `grpc_context` parameter receives a
`RayServegRPCContext`; what it sets (status code, details, trailing metadata) travels back
with the result and is applied to the gRPC response by the proxy.
"""

from __future__ import annotations

from typing import Any


def _code_name(code: Any) -> str:
    """A status code (a `grpc.StatusCode` or its name) as its name."""
    name = getattr(code, "name", code)
    if not isinstance(name, str):
        raise TypeError(f"expected a grpc.StatusCode, got {code!r}")
    return name


class RayServegRPCContext:
    """The gRPC context a deployment method sees (Ray Serve's `RayServegRPCContext`).

    Unlike `grpc.ServicerContext` it lives in the replica: `set_code`, `set_details` and
    `set_trailing_metadata` are recorded and applied to the response by the proxy.
    """

    def __init__(self, invocation_metadata: list[tuple[str, Any]] | None = None, peer: str = "") -> None:
        self._code = "OK"
        self._details = ""
        self._trailing: list[tuple[str, Any]] = []
        self._invocation_metadata = list(invocation_metadata or [])
        self._peer = peer

    def code(self) -> Any:
        """The status code to finish the RPC with (a `grpc.StatusCode`)."""
        import grpc

        return grpc.StatusCode[self._code]

    def set_code(self, code: Any) -> None:
        """Set the status code to finish the RPC with."""
        self._code = _code_name(code)

    def details(self) -> str:
        return self._details

    def set_details(self, details: str) -> None:
        """Set the status details (the error message the client sees)."""
        self._details = details

    def trailing_metadata(self) -> list[tuple[str, Any]]:
        return list(self._trailing)

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        """Set the trailing metadata: (key, value) pairs."""
        self._trailing = [tuple(kv) for kv in trailing_metadata]  # type: ignore[misc]

    def invocation_metadata(self) -> list[tuple[str, Any]]:
        """The request's metadata, as (key, value) pairs."""
        return list(self._invocation_metadata)

    def peer(self) -> str:
        return self._peer

    def set_compression(self, compression: Any) -> None:
        """Accepted and ignored: the proxy's channel settings decide."""

    def _state(self) -> tuple[str, str, list[tuple[str, Any]]]:
        return self._code, self._details, self._trailing


class gRPCStatusError(Exception):
    """A user exception raised after the method set a status code on its `grpc_context`:
    the proxy answers with that code (and details) instead of INTERNAL."""

    def __init__(self, message: str, code: str, details: str = "", trailing: list[tuple[str, Any]] | None = None) -> None:
        super().__init__(message, code, details, trailing)
        self.message = message
        self.code = code
        self.details = details
        self.trailing = trailing or []

    def __str__(self) -> str:
        return self.details or self.message
