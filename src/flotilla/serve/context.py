"""Ray Serve's `serve.context` module, for code that reads the request context the way Ray's
docs and examples do: `serve.context._get_serve_request_context().request_id` (also `.route`,
`.app_name`, `.multiplexed_model_id`), or, in older examples,
`serve.context._serve_request_context.get()`. `serve.get_request_context()` is the public form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flotilla._private import context as _context
from flotilla.serve.multiplex import get_request_context
from flotilla.serve.schema import ReplicaContext

__all__ = ["_RequestContext", "_get_internal_replica_context", "_get_serve_request_context", "_serve_request_context"]


@dataclass(frozen=True)
class _RequestContext:
    """The request being handled: empty strings outside one."""

    route: str = ""
    request_id: str = ""
    _internal_request_id: str = ""
    app_name: str = ""
    multiplexed_model_id: str = ""
    session_id: str = ""
    grpc_context: Any = None
    is_http_request: bool = False


def _get_serve_request_context() -> _RequestContext:
    """The current request's context (an empty one outside a request), in Ray's shape:
    `serve.get_request_context()`'s fields."""
    c = get_request_context()
    meta = _context.request_meta.get() or {}
    return _RequestContext(route=c.route, request_id=c.request_id, _internal_request_id=c.request_id,
                           app_name=c.app_name, multiplexed_model_id=c.multiplexed_model_id,
                           session_id=meta.get("session_id", "") or "",
                           is_http_request=bool(c.route) and "grpc" not in meta)


class _RequestContextVar:
    """`_serve_request_context.get()` as in Ray's older examples (a read-only view)."""

    def get(self, default: Any = None) -> _RequestContext:
        return _get_serve_request_context()


_serve_request_context = _RequestContextVar()


def _get_internal_replica_context() -> ReplicaContext | None:
    """The replica's context inside one, else None."""
    return _context.replica_context
