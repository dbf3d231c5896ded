"""`ConsistentHashRouter`: session affinity by consistent hashing."""

from __future__ import annotations

import bisect
import hashlib
from typing import Any

from flotilla.serve.request_router import PendingRequest, RequestRouter, RunningReplica
from flotilla.serve.schema import DeploymentID

__all__ = ["DEFAULT_NUM_FALLBACK_REPLICAS", "DEFAULT_NUM_VIRTUAL_NODES", "ConsistentHashRouter"]

DEFAULT_NUM_VIRTUAL_NODES = 100
DEFAULT_NUM_FALLBACK_REPLICAS = 2


def ring_hash(key: str) -> int:
    """A 64-bit hash of `key`, the same in every process (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class ConsistentHashRouter(RequestRouter):
    """Each replica holds `num_virtual_nodes` points on a hash ring; a request goes to the
    replica at the first point at or after the hash of its session id (a request without one:
    of its own id, so those spread evenly). When that replica is full, the next
    `num_fallback_replicas` distinct replicas clockwise are tried, then the request waits and
    tries again. Routers in different processes build the same ring from the same replicas, so
    a session stays on one replica wherever its requests come from; a replica added or removed
    moves only the sessions whose points change owner.

    `request_router_kwargs`: `num_virtual_nodes` (int > 0, default 100) and
    `num_fallback_replicas` (int >= 0, default 2; 0 is strict affinity)."""

    def __init__(self, deployment_id: DeploymentID, *args: Any, **kwargs: Any) -> None:
        super().__init__(deployment_id, *args, **kwargs)
        self.num_virtual_nodes = DEFAULT_NUM_VIRTUAL_NODES
        self.num_fallback_replicas = DEFAULT_NUM_FALLBACK_REPLICAS
        self._points: list[int] = []
        self._owners: list[str] = []  # the replica id at each point
        self._ring_of: frozenset[str] = frozenset()

    def initialize_state(self, **kwargs: object) -> None:
        vnodes = kwargs.get("num_virtual_nodes", DEFAULT_NUM_VIRTUAL_NODES)
        fallback = kwargs.get("num_fallback_replicas", DEFAULT_NUM_FALLBACK_REPLICAS)
        if not isinstance(vnodes, int) or isinstance(vnodes, bool) or vnodes <= 0:
            raise ValueError(f"num_virtual_nodes must be a positive int, got {vnodes!r}.")
        if not isinstance(fallback, int) or isinstance(fallback, bool) or fallback < 0:
            raise ValueError(f"num_fallback_replicas must be a non-negative int, got {fallback!r}.")
        self.num_virtual_nodes, self.num_fallback_replicas = vnodes, fallback
        self._ring_of = frozenset()

    def _ring(self, ids: frozenset[str]) -> None:
        """Rebuild the ring for replica ids `ids` (when they changed)."""
        if ids == self._ring_of:
            return
        pairs = sorted((ring_hash(f"{rid}:{i}"), rid) for rid in ids for i in range(self.num_virtual_nodes))
        self._points = [p for p, _ in pairs]
        self._owners = [rid for _, rid in pairs]
        self._ring_of = ids

    def owners(self, key: str) -> list[str]:
        """The replica ids to try for `key`, in order: its owner, then the fallbacks."""
        if not self._points:
            return []
        want = min(1 + self.num_fallback_replicas, len(self._ring_of))
        out: list[str] = []
        i = bisect.bisect_left(self._points, ring_hash(key))
        n = len(self._points)
        for step in range(n):
            rid = self._owners[(i + step) % n]
            if rid not in out:
                out.append(rid)
                if len(out) == want:
                    break
        return out

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        self._ring(frozenset(by_id))
        if pending_request is None:
            return [list(candidate_replicas)]
        pending_request.routing_context.should_backoff = True
        meta = pending_request.metadata
        return [[by_id[rid]] for rid in self.owners(meta.session_id or meta.internal_request_id)]
