"""Custom request routers (Ray Serve's alpha `ray.serve.request_router` API).

A deployment with `request_router_config=RequestRouterConfig(request_router_class=...)` has
every router of its calls (the proxy's, a driver's handles, other deployments' handles) ask an
instance of that class which replicas to try: `choose_replicas(candidate_replicas,
pending_request)` returns ranks of replicas, best first. The router sends the request to the
least loaded replica with room (fewer than `max_ongoing_requests` in flight from this router)
in the first rank that has one; when none has room, it asks again after a backoff
(`initial_backoff_s`, times `backoff_multiplier` per try, at most `max_backoff_s`).

A replica's `record_routing_stats()` (sync or async, returning a dict), when the deployment
defines it, is called every `request_routing_stats_period_s` (bounded by
`request_routing_stats_timeout_s`); its last answer is `RunningReplica.routing_stats`.

Differences from Ray Serve: `on_request_routed` gets `result=None` (the reply is not there
yet); `RunningReplica.get_queue_len()` answers from the router's own count of requests in
flight (no probe); `rank_replicas_via_locality` ranks by Ray node on the Ray backend (there is
no availability-zone rank) and puts every replica first on the local backend (one machine,
`node_id` "").
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from flotilla.serve.schema import DeploymentID, ReplicaID

__all__ = [
    "FIFOMixin",
    "LocalityMixin",
    "MultiplexMixin",
    "PendingRequest",
    "ReplicaID",
    "ReplicaResult",
    "RequestMetadata",
    "RequestRouter",
    "RequestRoutingContext",
    "RunningReplica",
]


@dataclass
class RequestMetadata:
    """What a router knows of a request before it is sent."""

    request_id: str
    internal_request_id: str
    call_method: str = "__call__"
    route: str = ""
    app_name: str = ""
    multiplexed_model_id: str = ""
    session_id: str = ""
    is_streaming: bool = False
    is_http_request: bool = False


@dataclass
class RequestRoutingContext:
    """What the tries to route one request have done so far, kept across its tries: a router's
    `choose_replicas` may set and read these (Ray's mixins mark what they tried). flotilla
    waits between tries whatever `should_backoff` says: the wait ends as soon as a slot frees
    or a replica is added, so it never holds a request back from a free replica."""

    multiplexed_start_matching_time: float | None = None
    tried_fewest_multiplexed_models: bool = False
    tried_first_multiplexed_models: bool = False
    tried_same_node: bool = False
    tried_same_az: bool = False
    should_backoff: bool = False


@dataclass
class PendingRequest:
    """A request waiting for a replica: its arguments (empty for an HTTP request, whose body
    goes to the replica unread), metadata, routing context, and a future that gets the
    `RunningReplica` it is sent to."""

    args: list[Any]
    kwargs: dict[Any, Any]
    metadata: RequestMetadata
    created_at: float = field(default_factory=time.time)
    #: Made by the router on its loop (None in a request made outside one, as in a test).
    future: asyncio.Future[Any] | None = None
    routing_context: RequestRoutingContext = field(default_factory=RequestRoutingContext)
    resolved: bool = False

    def reset_future(self) -> None:
        """A new future, on the running loop (for a request routed again)."""
        self.future = asyncio.get_running_loop().create_future()


class ReplicaResult:
    """The type of `on_request_routed`'s `result` in Ray Serve; flotilla passes None."""


class RunningReplica:
    """A replica a router can send to, as `choose_replicas` sees it."""

    __slots__ = ("_routed", "availability_zone", "max_ongoing_requests", "multiplexed_model_ids",
                 "node_id", "replica_id", "routing_stats")

    def __init__(self, replica_id: ReplicaID, *, max_ongoing_requests: int = 5,
                 multiplexed_model_ids: set[str] | None = None, routing_stats: dict[str, Any] | None = None,
                 node_id: str = "", availability_zone: str | None = None) -> None:
        self.replica_id = replica_id
        self.max_ongoing_requests = max_ongoing_requests
        self.multiplexed_model_ids: set[str] = multiplexed_model_ids or set()
        self.routing_stats: dict[str, Any] = routing_stats or {}
        self.node_id = node_id
        self.availability_zone = availability_zone
        self._routed = 0  # requests in flight from this router (kept by the router)

    @property
    def actor_id(self) -> str:
        return self.replica_id.unique_id

    @property
    def is_cross_language(self) -> bool:
        return False

    async def get_queue_len(self, *, deadline_s: float = 0.1) -> int:
        """Requests this router has in flight on the replica."""
        return self._routed

    def __repr__(self) -> str:
        return f"RunningReplica(replica_id={self.replica_id.unique_id!r})"


class RequestRouter(ABC):
    """Base of custom request routers: implement `choose_replicas`. Constructed once per
    router (per process and event loop) with the deployment's id; `initialize_state` then gets
    `request_router_kwargs`."""

    initial_backoff_s = 0.025
    backoff_multiplier = 2.0
    max_backoff_s = 0.5

    def __init__(self, deployment_id: DeploymentID, *args: Any, **kwargs: Any) -> None:
        self._deployment_id = deployment_id
        self._replicas: dict[ReplicaID, RunningReplica] = {}
        self._replicas_updated_event = asyncio.Event()

    def initialize_state(self, **kwargs: Any) -> None:
        """Called once with the config's `request_router_kwargs`."""
        return None

    @abstractmethod
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Ranks of replicas to try for `pending_request`, the most preferred first."""

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """Called when a request has been given a replica (`result` is None here)."""
        return None

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """Called when a request to a replica has finished (answered, failed or cancelled)."""
        return None

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """The replicas to route to now (the router calls it on every change)."""
        self._replicas = {r.replica_id: r for r in replicas}
        self._replicas_updated_event.set()

    @property
    def curr_replicas(self) -> dict[ReplicaID, RunningReplica]:
        return self._replicas

    @property
    def app_name(self) -> str:
        return self._deployment_id.app_name

    def select_available_replicas(self, candidates: list[RunningReplica] | None = None) -> list[RunningReplica]:
        """Those of `candidates` (all replicas if None) with room for another request."""
        pool = list(self._replicas.values()) if candidates is None else candidates
        return [r for r in pool if r._routed < r.max_ongoing_requests]

    async def _backoff(self, attempt: int) -> None:
        await asyncio.sleep(min(self.max_backoff_s, self.initial_backoff_s * self.backoff_multiplier ** attempt))


class FIFOMixin:
    """Requests get replicas in the order they came (what flotilla's routers do anyway)."""


class MultiplexMixin:
    """`rank_replicas_via_multiplex`: model affinity for multiplexed deployments."""

    def rank_replicas_via_multiplex(self, replicas: list[RunningReplica],
                                    multiplexed_model_id: str) -> list[list[RunningReplica]]:
        """[replicas holding the model, those (of the rest) holding the fewest models, the rest]."""
        having = [r for r in replicas if multiplexed_model_id in r.multiplexed_model_ids]
        rest = [r for r in replicas if multiplexed_model_id not in r.multiplexed_model_ids]
        fewest = min((len(r.multiplexed_model_ids) for r in rest), default=0)
        return [having, [r for r in rest if len(r.multiplexed_model_ids) == fewest],
                [r for r in rest if len(r.multiplexed_model_ids) != fewest]]


class LocalityMixin:
    """`rank_replicas_via_locality`: [same node, same zone, others]."""

    def rank_replicas_via_locality(self, replicas: list[RunningReplica]) -> list[list[RunningReplica]]:
        """On the Ray backend, the replicas on this process's Ray node first; on the local
        backend (one machine, no node ids) every replica is on this node."""
        here = _this_node()
        if not here:
            return [list(replicas), [], []]
        same = [r for r in replicas if not r.node_id or r.node_id == here]
        return [same, [], [r for r in replicas if r.node_id and r.node_id != here]]


def _this_node() -> str:
    """This process's Ray node id, where Ray runs in it; "" otherwise."""
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            return str(ray.get_runtime_context().get_node_id())
    except Exception:
        pass
    return ""


def pick_in(rank: list[RunningReplica]) -> RunningReplica | None:
    """The least loaded replica of `rank` with room (ties broken at random), else None."""
    best: list[RunningReplica] = []
    low = None
    for r in rank:
        n = r._routed
        if n >= r.max_ongoing_requests:
            continue
        if low is None or n < low:
            best, low = [r], n
        elif n == low:
            best.append(r)
    return random.choice(best) if best else None
