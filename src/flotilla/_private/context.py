"""Per-process and per-request context: which replica this is, which request is running."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from flotilla.serve.schema import ReplicaContext

#: Set once in a replica process, before the user's constructor runs.
replica_context: ReplicaContext | None = None

#: Metadata of the request being handled (request_id, multiplexed_model_id, route...).
request_meta: ContextVar[dict[str, Any] | None] = ContextVar("flotilla_request_meta", default=None)

#: Set by the replica: called with the model ids a multiplexed loader now holds.
on_models_changed: Callable[[list[str]], None] | None = None
