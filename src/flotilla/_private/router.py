"""Replica choice, queueing and backpressure for one deployment, in one process.

Every process that sends requests (the proxy, a driver with handles, a replica calling
another deployment) has one `Router` per target deployment. The controller pushes the
replica set to it; the router never asks the controller per request.

Invariants: a router never has more than `max_ongoing_requests` requests in flight on one
replica; beyond that, requests wait in FIFO order; once more than `max_queued_requests`
wait, new ones are rejected with `BackPressureError`. Among replicas with room it picks the
less loaded of two chosen at random (power of two choices).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import time
from collections import deque
from typing import Any

from flotilla._private.protocol import CALL, CANCEL, END, ERR, HSTART, HTTP, STREAM, YIELD
from flotilla._private.transport import FrameProtocol, frame
from flotilla.exceptions import ActorDiedError, as_local_error
from flotilla.serve.exceptions import BackPressureError, DeploymentUnavailableError
from flotilla.serve.schema import DeploymentID

logger = logging.getLogger(__name__)


class Channel:
    """A minimal single-consumer queue of reply frames (for streams)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[tuple[Any, ...]] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def push(self, msg: tuple[Any, ...]) -> None:
        self._items.append(msg)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def get(self) -> tuple[Any, ...]:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._items.popleft()


class ReplicaConn:
    """The router's connection to one replica and what it has in flight there."""

    __slots__ = ("_ids", "connecting", "id", "in_flight", "models", "path", "pending", "proto", "ready", "router")

    def __init__(self, router: Router, replica_id: str, path: str) -> None:
        self.router = router
        self.id = replica_id
        self.path = path
        self.in_flight = 0
        self.pending: dict[int, Any] = {}
        self.ready = False
        self.connecting: asyncio.Task[None] | None = None
        self.models: tuple[str, ...] = ()
        self._ids = itertools.count(1)
        self.proto = FrameProtocol(self._on_message, self._on_close)

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_unix_connection(lambda: self.proto, self.path)
        except OSError as e:
            logger.warning("could not connect to replica %s: %s", self.id, e)
            self.router._drop(self)
            return
        self.ready = True
        self.router._connected(self)

    def next_id(self) -> int:
        return next(self._ids)

    def _on_message(self, msg: tuple[Any, ...]) -> None:
        rid = msg[0]
        h = self.pending.get(rid)
        if h is None:
            return
        code = msg[1]
        if h.__class__ is Channel:
            h.push(msg)
            if code in (END, ERR):
                del self.pending[rid]
            return
        if code == HSTART:
            ch = Channel()
            self.pending[rid] = ch
            if not h.done():
                h.set_result((*msg, ch))
            return
        del self.pending[rid]
        if not h.done():
            h.set_result(msg)

    def _on_close(self, exc: BaseException | None) -> None:
        self.ready = False
        pending, self.pending = self.pending, {}
        if pending:
            err = ActorDiedError(
                f"Replica {self.id} died while handling {len(pending)} request(s); "
                "it is being replaced. Retry the request."
            )
            for rid, h in pending.items():
                if h.__class__ is Channel:
                    h.push((rid, ERR, err, "", "ActorDiedError"))
                elif not h.done():
                    h.set_result((rid, ERR, err, "", "ActorDiedError"))
        self.router._drop(self)

    def close(self) -> None:
        self.proto.close()


class Router:
    def __init__(
        self,
        deployment_id: DeploymentID,
        on_wait: Any = None,
        cold_start_timeout_s: float = 60.0,
    ) -> None:
        self.deployment_id = deployment_id
        self.on_wait = on_wait
        self.cold_start_timeout_s = cold_start_timeout_s
        self.replicas: dict[str, ReplicaConn] = {}
        self.ready: list[ReplicaConn] = []
        # Waiting requests, FIFO: (future to hand a replica to, multiplexed model id or "").
        self.queue: deque[tuple[asyncio.Future[ReplicaConn], str]] = deque()
        self.max_ongoing = 5
        self.max_queued = -1
        self.exists: bool | None = None  # None until the controller has answered
        self._done = 0  # requests finished since _rate_t (for the drain rate)
        self._rate_t = time.monotonic()
        self._rate = 0.0
        self.subscription: asyncio.Task[None] | None = None

    # ---- updates from the controller ----------------------------------------------------
    def update(self, info: dict[str, Any]) -> None:
        self.exists = info.get("exists", False)
        self.max_ongoing = info.get("max_ongoing_requests", 5)
        self.max_queued = info.get("max_queued_requests", -1)
        wanted = {r[0]: r[1] for r in info.get("replicas", ())}
        models = {r[0]: r[2] for r in info.get("replicas", ()) if len(r) > 2}
        for rid in list(self.replicas):
            if rid not in wanted:
                conn = self.replicas.pop(rid)
                if conn in self.ready:
                    self.ready.remove(conn)
                # In-flight requests finish; the replica is drained before it stops.
                if not conn.pending:
                    conn.close()
        loop = asyncio.get_running_loop()
        for rid, path in wanted.items():
            if rid not in self.replicas:
                conn = ReplicaConn(self, rid, path)
                self.replicas[rid] = conn
                conn.connecting = loop.create_task(conn.connect())
            self.replicas[rid].models = models.get(rid, ())
        if not self.exists:
            self._fail_queue(self._unavailable())
            return
        self._dispatch()
        # Requests queued before the limits were known: shed what exceeds them now.
        while self.max_queued != -1 and len(self.queue) > self.max_queued:
            fut, _ = self.queue.pop()
            if not fut.done():
                fut.set_exception(
                    BackPressureError(num_queued_requests=len(self.queue), max_queued_requests=self.max_queued)
                )

    def _unavailable(self) -> DeploymentUnavailableError:
        d = self.deployment_id
        return DeploymentUnavailableError(
            f"Deployment '{d.name}' in application '{d.app_name}' does not exist (it was "
            "deleted or never deployed)."
        )

    def _connected(self, conn: ReplicaConn) -> None:
        if self.replicas.get(conn.id) is conn:
            self.ready.append(conn)
            self._dispatch()
        else:
            conn.close()

    def _drop(self, conn: ReplicaConn) -> None:
        if conn in self.ready:
            self.ready.remove(conn)
        if self.replicas.get(conn.id) is conn:
            del self.replicas[conn.id]
        if self.queue:
            self._dispatch()

    def _fail_queue(self, err: BaseException) -> None:
        while self.queue:
            fut, _ = self.queue.popleft()
            if not fut.done():
                fut.set_exception(err)

    def close(self) -> None:
        for conn in self.replicas.values():
            conn.close()
        self.replicas.clear()
        self.ready.clear()

    # ---- choosing a replica -------------------------------------------------------------
    def _pick(self) -> ReplicaConn | None:
        ready = self.ready
        n = len(ready)
        limit = self.max_ongoing
        if n == 1:
            r = ready[0]
            return r if r.in_flight < limit else None
        if n == 0:
            return None
        a, b = random.sample(ready, 2)
        r = a if a.in_flight <= b.in_flight else b
        if r.in_flight < limit:
            return r
        r = min(ready, key=lambda c: c.in_flight)
        return r if r.in_flight < limit else None

    def _pick_for_model(self, model_id: str) -> ReplicaConn | None:
        """A replica that already holds `model_id` and has room, the least loaded first."""
        best = None
        for r in self.ready:
            if model_id in r.models and r.in_flight < self.max_ongoing and (best is None or r.in_flight < best.in_flight):
                best = r
        return best

    def _choose(self, model_id: str) -> ReplicaConn | None:
        if not model_id:
            return self._pick()
        r = self._pick_for_model(model_id)
        if r is not None:
            return r
        if any(model_id in c.models and not c.ready for c in self.replicas.values()):
            return None  # its replica is still connecting: wait a moment for it
        return self._pick()

    async def acquire(self, model_id: str = "") -> ReplicaConn:
        """A replica with a slot reserved for the caller; waits in FIFO order if none."""
        if not self.queue:
            r = self._choose(model_id)
            if r is not None:
                r.in_flight += 1
                return r
        if self.exists is False:
            raise self._unavailable()
        if self.max_queued != -1 and len(self.queue) >= self.max_queued:
            raise BackPressureError(
                num_queued_requests=len(self.queue), max_queued_requests=self.max_queued
            )
        fut: asyncio.Future[ReplicaConn] = asyncio.get_running_loop().create_future()
        entry = (fut, model_id)
        self.queue.append(entry)
        cold = not self.replicas
        if self.on_wait is not None:
            self.on_wait(cold)
        try:
            if not cold:
                return await fut
            # No replica at all (scaled to zero, or all being replaced): bounded wait.
            return await asyncio.wait_for(asyncio.shield(fut), self.cold_start_timeout_s)
        except TimeoutError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                return fut.result()
            fut.cancel()
            try:
                self.queue.remove(entry)
            except ValueError:
                pass
            d = self.deployment_id
            raise DeploymentUnavailableError(
                f"No replica of deployment '{d.name}' in application '{d.app_name}' became "
                f"available within {self.cold_start_timeout_s:g}s; it may be starting slowly or "
                "failing to start (see serve.status())."
            ) from None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result())
            else:
                try:
                    self.queue.remove(entry)
                except ValueError:
                    pass
            raise

    def drain_rate(self) -> float:
        """Requests finished per second, recently (a 1 s window, smoothed)."""
        now = time.monotonic()
        dt = now - self._rate_t
        if dt >= 1.0:
            rate = self._done / dt
            self._rate = rate if self._rate == 0 else 0.5 * self._rate + 0.5 * rate
            self._done = 0
            self._rate_t = now
        elif self._rate == 0 and dt > 0 and self._done:
            return self._done / dt
        return self._rate

    def retry_after_s(self) -> int:
        """Seconds after which the queue should have room again (for Retry-After)."""
        rate = self.drain_rate()
        if rate <= 0:
            return 1
        return max(1, math.ceil(len(self.queue) / rate))

    def release(self, r: ReplicaConn) -> None:
        self._done += 1
        r.in_flight -= 1
        if r.id not in self.replicas and not r.pending:
            r.close()  # removed from the set and now idle
        if self.queue:
            self._dispatch()

    def _dispatch(self) -> None:
        while self.queue:
            fut, model_id = self.queue[0]
            r = self._choose(model_id)
            if r is None:
                return
            self.queue.popleft()
            if fut.done():
                continue
            r.in_flight += 1
            fut.set_result(r)


    # ---- requests ---------------------------------------------------------------------
    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: Any) -> Any:
        r = await self.acquire(meta.get("multiplexed_model_id", "") if meta else "")
        try:
            if not r.ready:
                raise ActorDiedError(f"Replica {r.id} died before the request was sent.")
            rid = r.next_id()
            fut = asyncio.get_running_loop().create_future()
            data = frame((rid, CALL, method, args, kwargs, meta))
            r.pending[rid] = fut
            r.proto.send_raw(data)
            try:
                msg = await fut
            except asyncio.CancelledError:
                r.pending.pop(rid, None)
                r.proto.send((rid, CANCEL))
                raise
        finally:
            self.release(r)
        if msg[1] == ERR:
            raise as_local_error(msg[2], msg[3], msg[4])
        return msg[2]

    async def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: Any):  # type: ignore[no-untyped-def]
        """Yield the items of a generator method, as the replica produces them."""
        r = await self.acquire()
        rid = 0
        done = False
        try:
            rid = r.next_id()
            ch = Channel()
            data = frame((rid, STREAM, method, args, kwargs, meta))
            r.pending[rid] = ch
            r.proto.send_raw(data)
            while True:
                msg = await ch.get()
                code = msg[1]
                if code == YIELD:
                    yield msg[2]
                elif code == END:
                    done = True
                    return
                elif code == ERR:
                    done = True
                    raise as_local_error(msg[2], msg[3], msg[4])
        finally:
            if not done and rid:
                r.pending.pop(rid, None)
                r.proto.send((rid, CANCEL))
            self.release(r)

    async def http(self, scope: dict[str, Any], body: bytes, meta: Any) -> tuple[Any, ...]:
        """Send an HTTP request; returns (first reply frame, replica, request id).

        A streaming reply's first frame is (rid, HSTART, status, headers, Channel).
        """
        r = await self.acquire(meta.get("multiplexed_model_id", "") if meta else "")
        rid = r.next_id()
        fut = asyncio.get_running_loop().create_future()
        r.pending[rid] = fut
        try:
            if not r.ready:
                raise ActorDiedError(f"Replica {r.id} died before the request was sent.")
            r.proto.send((rid, HTTP, scope, body, meta))
            try:
                return (await fut), r, rid
            except asyncio.CancelledError:
                r.pending.pop(rid, None)
                r.proto.send((rid, CANCEL))
                raise
        finally:
            self.release(r)
