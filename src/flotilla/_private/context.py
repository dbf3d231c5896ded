"""Per-process and per-request context: which replica this is, which request is running."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from flotilla._private.metrics import RequestIds
from flotilla.serve.schema import ReplicaContext

#: Set once in a replica process, before the user's constructor runs.
replica_context: ReplicaContext | None = None

#: Metadata of the request being handled (request_id, multiplexed_model_id, route...).
request_meta: ContextVar[dict[str, Any] | None] = ContextVar("flotilla_request_meta", default=None)

_ids = RequestIds()


def replica_labels() -> tuple[str, str, str] | None:
    """(deployment, replica, application): the labels a replica's metrics carry; None
    outside a replica."""
    ctx = replica_context
    return None if ctx is None else (ctx.deployment, ctx.replica_tag, ctx.app_name)


def _new_ids() -> None:
    global _ids
    _ids = RequestIds()


os.register_at_fork(after_in_child=_new_ids)  # a forked replica makes ids of its own


def new_request_id() -> str:
    """The id of a handle call made outside any request, in a UUID's form as Ray Serve's."""
    return _ids.uuid()


#: Under this key of a request's meta: the handle calls made while serving it, awaited or not
#: (`spawned`); cancelling the request cancels them too (`cancel_spawned`), as Ray Serve cascades.
SPAWNED = "spawned"


def spawned(meta: dict[str, Any], call: Any) -> None:
    """Keep `call` (a `DeploymentResponse` or `DeploymentResponseGenerator`) with the request."""
    calls = meta.get(SPAWNED)
    if calls is None:
        meta[SPAWNED] = [call]
        return
    if len(calls) % 64 == 0:  # a long request making many calls: now and then, forget those over
        calls[:] = [c for c in calls if not c._over()]
    calls.append(call)


def cancel_spawned(meta: dict[str, Any]) -> None:
    """The request was cancelled: cancel the calls it made that are not over."""
    for call in meta.pop(SPAWNED, ()):
        if not call._over():
            call._cancel_call()


#: Set by the replica: called with the model ids a multiplexed loader now holds.
on_models_changed: Callable[[list[str]], None] | None = None
