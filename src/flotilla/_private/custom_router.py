"""A deployment's custom request router (`flotilla.serve.request_router`) inside a `Router`.

The `Router` keeps its connections, slots and counts; for a deployment whose config names a
router class, `CustomRouting.acquire` replaces its queue and power-of-two choice: it asks the
user's `choose_replicas` for ranks and takes the least loaded replica with room in the first
rank that has one, else asks again after a backoff (woken early when a slot frees).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import cloudpickle

from flotilla.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestMetadata,
    RequestRouter,
    RunningReplica,
    pick_in,
)

if TYPE_CHECKING:
    from flotilla._private.router import ReplicaConn, Router

_ids = itertools.count(1)
logger = logging.getLogger("flotilla.router")


class CustomRouting:
    def __init__(self, router: Router, spec: dict[str, Any]) -> None:
        self.router = router
        self.spec = spec
        self.user: RequestRouter | None = None
        self.error: BaseException | None = None
        self.replicas: dict[str, RunningReplica] = {}  # by replica id, those the controller listed
        self.routed: dict[str, deque[str]] = {}  # replica id -> internal ids of requests in flight
        self.waiting = 0  # requests that found no replica with room and wait for one
        self.freed: asyncio.Event | None = None
        self.failure: BaseException | None = None  # waiting requests fail with it (`fail`)
        self.failures = 0  # `fail` calls so far: a request fails if one came while it waited
        self._listed: tuple[str, ...] = ()
        self._prefix = f"{id(self):x}-"
        try:
            cls = cloudpickle.loads(spec["cls"])
            user = cls(router.deployment_id)
            for k in ("initial_backoff_s", "backoff_multiplier", "max_backoff_s"):
                if k in spec:
                    setattr(user, k, spec[k])
            user.initialize_state(**spec.get("kwargs", {}))
            self.user = user
        except Exception as e:
            d = router.deployment_id
            self.error = RuntimeError(
                f"The request router of deployment '{d.name}' in application '{d.app_name}' could not be "
                f"set up in this process: {type(e).__name__}: {e}")
            self.error.__cause__ = e

    def same(self, spec: dict[str, Any]) -> bool:
        return spec == self.spec

    def sync(self, stats: dict[str, Any] | None = None, nodes: dict[str, str] | None = None) -> list[RunningReplica]:
        """The replicas to choose from as `RunningReplica`s: those the controller listed, not
        draining (counts and stats brought up to date); the user's router hears of a changed
        set (`update_replicas`)."""
        r = self.router
        reps = self.replicas
        out = []
        for c in r.replicas.values():  # those still connecting too: the set the controller gave
            w = reps.get(c.id)
            if w is None:
                w = reps[c.id] = RunningReplica(ReplicaID(c.id, r.deployment_id))
            w.max_ongoing_requests = r.max_ongoing
            w.multiplexed_model_ids = set(c.models)
            w._routed = c.in_flight
            if stats is not None:
                w.routing_stats = stats.get(c.id) or {}
            if nodes is not None:
                w.node_id = nodes.get(c.id, "")
            if not c.draining and not c.retired:
                out.append(w)
        ids = tuple(w.replica_id.unique_id for w in out)
        if ids != self._listed:
            self._listed = ids
            for gone in set(reps) - set(r.replicas):
                del reps[gone]
            if self.user is not None:
                self.user.update_replicas(out)
        return out

    def _pending(self, model_id: str, req: tuple[Any, ...] | None) -> PendingRequest:
        method, args, kwargs, meta, kind = req if req is not None else ("__call__", (), {}, None, "call")
        meta = meta or {}
        metadata = RequestMetadata(
            request_id=meta.get("request_id", "") or "", internal_request_id=f"{self._prefix}{next(_ids)}",
            call_method=method, route=meta.get("route", "") or "", app_name=self.router.deployment_id.app_name,
            multiplexed_model_id=model_id, session_id=meta.get("session_id", "") or "",
            is_streaming=kind in ("stream", "http", "ws"),  # HTTP streams, as Ray's
            is_http_request=kind in ("http", "ws"))
        pending = PendingRequest(list(args), dict(kwargs), metadata)
        pending.reset_future()
        return pending

    async def acquire(self, model_id: str, req: tuple[Any, ...] | None) -> ReplicaConn:
        """A replica with a slot reserved for the request, as the user's router ranks them."""
        if self.error is not None:
            raise self.error
        user = self.user
        assert user is not None
        router = self.router
        pending = self._pending(model_id, req)
        failures = self.failures
        attempt = 0
        waiting = False
        cold_since: float | None = None
        try:
            while True:
                if router.exists is False or (router.failed and not router.replicas):
                    raise router._unavailable()
                cands = self.sync()
                if cands:
                    cold_since = None
                    c, w = await self._choose(user, cands, pending)
                    if c is not None and not c.ready and c.connecting is not None and not c.connecting.done():
                        # chosen while its connection is being made: wait for it, choose again
                        await asyncio.wait([c.connecting], timeout=router.cold_start_timeout_s)
                        continue
                    if c is not None and w is not None:
                        c.in_flight += 1
                        router.held += 1
                        w._routed = c.in_flight
                        self.routed.setdefault(c.id, deque()).append(pending.metadata.internal_request_id)
                        if pending.future is not None and not pending.future.done():
                            pending.future.set_result(w)
                        user.on_request_routed(pending, w.replica_id, None)
                        return c
                else:
                    now = time.monotonic()
                    if cold_since is None:
                        cold_since = now
                        if router.on_wait is not None:
                            router.on_wait(not router.replicas)
                    elif not router.replicas and now - cold_since > router.cold_start_timeout_s:
                        raise router._cold_timeout()
                if not waiting:
                    if router.max_queued != -1 and self.waiting >= router.max_queued:
                        raise router.refused(self.waiting)
                    waiting = True
                    self.waiting += 1
                    continue  # one more try at once, as Ray's router
                await self._pause(user, attempt)
                attempt += 1
                if self.failures != failures and self.failure is not None:
                    raise self.failure
        finally:
            if waiting:
                self.waiting -= 1

    async def _choose(self, user: RequestRouter, cands: list[RunningReplica],
                      pending: PendingRequest) -> tuple[ReplicaConn | None, RunningReplica | None]:
        """The first rank's least loaded replica with room, from the user's ranks."""
        router = self.router
        ranks = await user.choose_replicas(cands, pending)
        for rank in ranks or ():
            if not isinstance(rank, (list, tuple)):
                raise TypeError(
                    f"{type(user).__name__}.choose_replicas() must return ranks: a list of lists of "
                    f"RunningReplica (the first the most preferred), got {type(ranks).__name__} of {type(rank).__name__}")
            w = pick_in(rank)
            c = router.replicas.get(w.replica_id.unique_id) if w is not None else None
            if c is None or c.draining or c.retired:
                continue
            return c, w
        return None, None

    async def _pause(self, user: RequestRouter, attempt: int) -> None:
        """The backoff before the next try; a freed slot or a new replica ends it early."""
        if self.freed is None:
            self.freed = asyncio.Event()
        self.freed.clear()
        delay = min(user.max_backoff_s, user.initial_backoff_s * user.backoff_multiplier ** attempt)
        try:
            await asyncio.wait_for(self.freed.wait(), delay)
        except TimeoutError:
            pass

    def released(self, c: ReplicaConn) -> None:
        """A request on `c` finished: the user's router hears of it; waiting requests retry."""
        ids = self.routed.get(c.id)
        if ids:
            rid = ids.popleft()
            if self.user is not None:
                try:
                    self.user.on_request_completed(ReplicaID(c.id, self.router.deployment_id), rid)
                except Exception:  # the user's hook: it must not break the release of the slot
                    logger.exception("on_request_completed() of the request router of %s raised",
                                     self.router.deployment_id)
        self.wake()

    def fail(self, err: BaseException) -> None:
        """Fail the requests waiting for a replica now (the deployment is gone, or the cluster)."""
        if self.waiting:
            self.failure = err
            self.failures += 1
            self.wake()

    def wake(self) -> None:
        if self.freed is not None and self.waiting:
            self.freed.set()
