"""`RoundRobinRouter`: requests take the replicas in turn."""

from __future__ import annotations

import random
from typing import Any

from flotilla.serve.request_router import PendingRequest, RequestRouter, RunningReplica
from flotilla.serve.schema import DeploymentID

__all__ = ["RoundRobinRouter"]


def _turn(replicas: list[RunningReplica], start: int) -> list[list[RunningReplica]]:
    """Singleton ranks of `replicas` from index `start` on, wrapping around."""
    n = len(replicas)
    return [[replicas[(start + i) % n]] for i in range(n)]


class RoundRobinRouter(RequestRouter):
    """Each request starts at the next replica of a cursor over the replicas (ordered by id,
    so the order holds while the set does not change); when that replica is full, the next
    one takes it. A multiplexed request goes round the replicas that hold its model first,
    with a cursor of its model's own, then round the others."""

    def __init__(self, deployment_id: DeploymentID, *args: Any, **kwargs: Any) -> None:
        super().__init__(deployment_id, *args, **kwargs)
        self._cursor = random.randrange(1 << 30)  # routers in several processes start apart
        self._model_cursors: dict[str, int] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        replicas = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        if not replicas:
            return []
        model = ""
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
            model = pending_request.metadata.multiplexed_model_id
        if model:
            warm = [r for r in replicas if model in r.multiplexed_model_ids]
            if warm:
                start = self._model_cursors.get(model, 0)
                self._model_cursors[model] = start + 1
                if len(self._model_cursors) > 4 * len(replicas) + 64:  # forget models no replica holds
                    held = set().union(*(r.multiplexed_model_ids for r in replicas))
                    self._model_cursors = {m: c for m, c in self._model_cursors.items() if m in held}
                cold = [r for r in replicas if model not in r.multiplexed_model_ids]
                return _turn(warm, start) + (_turn(cold, self._next()) if cold else [])
        return _turn(replicas, self._next())

    def _next(self) -> int:
        self._cursor += 1
        return self._cursor
