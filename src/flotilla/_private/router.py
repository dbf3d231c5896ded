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
import contextlib
import functools
import itertools
import logging
import math
import os
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from operator import attrgetter
from typing import TYPE_CHECKING, Any, NamedTuple

from flotilla._private import trace
from flotilla._private.errors import local_error, undecodable_reply
from flotilla._private.protocol import (
    STREAM_WINDOW,
    Abort,
    Call,
    Cancel,
    Credit,
    Drain,
    DrainAck,
    End,
    Err,
    Http,
    HttpFull,
    HttpStart,
    Ok,
    Rejected,
    ResponsePending,
    Stream,
    WsCredit,
    WsIn,
    WsOpen,
    Yield,
    oob,
    wire_args,
)
from flotilla._private.transport import FrameProtocol, connect_addr
from flotilla.exceptions import ActorDiedError, RaySystemError
from flotilla.serve.exceptions import BackPressureError, DeploymentUnavailableError
from flotilla.serve.schema import DeploymentID

if TYPE_CHECKING:
    from flotilla._private.custom_router import CustomRouting

logger = logging.getLogger(__name__)

_IN_FLIGHT = attrgetter("in_flight")  # a replica's load as its router alone sees it

_ENDS = (End, Err, Abort, Rejected)  # messages after which a stream's request id is free
_REJECTED = Rejected()


def _queue_ms() -> float:
    try:
        return max(0.0, float(os.environ.get("FLOTILLA_REPLICA_QUEUE_MS", "5")))
    except ValueError:
        return 5.0


#: When every replica is at max_ongoing_requests, a router may still send a replica about this
#: much of its recent work (ms at its throughput) to wait in the replica's own queue, at most
#: REPLICA_QUEUE_MAX requests: the replica's slots still bound its user code to
#: max_ongoing_requests, and neither process sleeps between requests. 0: Ray's strict rule,
#: every request past the limits waits in the router.
REPLICA_QUEUE_S = _queue_ms() / 1000.0
REPLICA_QUEUE_MAX = 32


def ahead_for(rate: float, replicas: int, queue_s: float = REPLICA_QUEUE_S, cap: int = REPLICA_QUEUE_MAX) -> int:
    """How many requests past max_ongoing_requests one of `replicas` replicas may hold when
    the router finishes `rate` requests/s: `queue_s` of its share, at most `cap`."""
    return max(0, min(cap, int(rate / max(1, replicas) * queue_s)))


class Failed(NamedTuple):
    """Stands in for a reply that never came (replica died, frame undecodable): raise `error`."""

    error: BaseException


def reply_value(reply: Any) -> Any:
    """The return value a call's reply carries; raises the error it carries."""
    cls = reply.__class__
    if cls is Ok:
        return reply.result
    if cls is Err:
        raise local_error(reply)
    if cls is Failed:
        raise reply.error
    raise RaySystemError(f"unexpected reply {cls.__name__} to a call")


class DirectCall:
    """A call in flight for a blocked caller (`Router.call_direct`). It stands in
    `ReplicaConn.pending` where a reply future would: the reply settles the caller's outcome
    at once. `cancel` cancels it wherever it is (sent, or retried after a rejection). Once
    settled it lets go of the caller's arguments and callback (no cycle through the caller's
    response keeps a reply's buffers alive until the garbage collector runs)."""

    __slots__ = ("answered", "call", "on_done", "out", "r", "retry", "router", "t0", "tag")

    def __init__(self, router: Router, r: ReplicaConn, call: tuple[Any, ...], out: asyncio.Future[Any],
                 on_done: Callable[[asyncio.Future[Any]], None]) -> None:
        self.router = router
        self.r = r
        self.call = call  # method, args, kwargs, meta: as the caller gave them, for a retry
        self.out = out
        self.on_done: Callable[[asyncio.Future[Any]], None] | None = on_done
        self.t0 = time.perf_counter()
        self.tag = 0
        self.answered = False  # the replica's reply came
        self.retry: asyncio.Task[Any] | None = None

    # the reply-future side, as ReplicaConn uses it (`cancel` does `_abandon`'s part)
    def done(self) -> bool:
        return self.answered

    def set_result(self, reply: Any) -> None:
        self.answered = True
        self.router._direct_reply(self, reply)

    def settle(self) -> None:
        """`out` is settled: tell the caller, then hold on to nothing of its."""
        on_done, self.on_done, self.call = self.on_done, None, ()
        if on_done is not None:
            on_done(self.out)

    def cancel(self) -> None:
        """Cancel the call at its replica (or its retry) and settle `out` as cancelled."""
        if self.retry is not None:
            self.retry.cancel()  # `retried` settles `out`
            return
        if self.answered or self.out.done():
            return
        r = self.r
        if r.pending.pop(self.tag, None) is not None:
            r.proto.send(self.tag, Cancel())
        self.router.release(r)
        self.out.cancel()
        self.settle()

    def retried(self, t: asyncio.Task[Any]) -> None:
        out = self.out
        if out.done():
            return
        if t.cancelled():
            out.cancel()
        elif (e := t.exception()) is not None:
            out.set_exception(e)
        else:
            out.set_result(t.result())
        self.settle()


class Channel:
    """The reply messages of one streaming request, for a single consumer.

    Holds at most `STREAM_WINDOW` items: each item taken is credited back to the sender
    (in batches of half the window), which waits when it runs out of credit. So a slow
    consumer slows the producer instead of filling this process's memory.
    """

    __slots__ = ("_grant", "_items", "_on_end", "_taken", "_waiter", "cancel", "ended", "on_credit", "start")

    def __init__(self, grant: Callable[[int], None] | None = None, cancel: Callable[[], None] | None = None) -> None:
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._grant = grant
        self._taken = 0
        self.cancel: Callable[[], None] = cancel or _nothing
        self.start: HttpStart | None = None
        self.ended = False  # its last message arrived, or it was cancelled
        self._on_end: Callable[[], None] | None = None
        self.on_credit: Callable[[int], None] | None = None  # a WebSocket's WsCredit

    def on_end(self, cb: Callable[[], None]) -> None:
        """Call `cb` once when the stream ends (at once if it already has)."""
        if self.ended:
            cb()
        else:
            self._on_end = cb

    def finish(self) -> None:
        if not self.ended:
            self.ended = True
            cb, self._on_end = self._on_end, None
            if cb is not None:
                cb()

    def push(self, msg: Any) -> None:
        self._items.append(msg)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        msg = self._items.popleft()
        if self._grant is not None:
            self._taken += 1
            if self._taken >= STREAM_WINDOW // 2:
                self._grant(self._taken)
                self._taken = 0
        return msg


def _nothing() -> None:
    return None


class ReplicaConn:
    """The router's connection to one replica and what it has in flight there.

    `in_flight` counts slots taken (requests acquired for this replica, sent or about to be);
    `pending` maps request ids sent to their reply future or stream `Channel`. A connection
    is `retired` once the controller removed the replica or the replica said it drains; it
    closes when nothing is in flight or pending on it any more.
    """

    __slots__ = ("_ids", "connecting", "draining", "id", "in_flight", "models", "path", "pending", "proto", "ready",
                 "retired", "router", "unsent")

    def __init__(self, router: Router, replica_id: str, path: str) -> None:
        self.router = router
        self.id = replica_id
        self.path = path
        self.in_flight = 0
        self.pending: dict[int, Any] = {}
        self.ready = False
        self.draining = False
        self.retired = False
        self.connecting: asyncio.Task[None] | None = None
        self.models: tuple[str, ...] = ()
        self._ids = itertools.count(1)
        #: tags of requests whose write failed (the replica had gone): answered Rejected at the
        #: close, so their callers send them elsewhere (they never started)
        self.unsent: list[int] | None = None
        self.proto = FrameProtocol(self._on_message, self._on_close, self._on_bad_frame)

    async def connect(self) -> None:
        try:
            await connect_addr(self.path, self.proto)  # a Unix path, or authenticated "tcp://"
        except OSError as e:
            logger.warning("could not connect to replica %s: %s", self.id, e)
            self.router._drop(self)
            return
        except RuntimeError:
            loop = self.router.loop
            if loop is not None and loop.is_closed():  # a caller's loop that ended mid-connect
                return
            raise
        self.ready = True
        self.router._connected(self)

    def next_id(self) -> int:
        return next(self._ids)

    def _on_message(self, tag: int, msg: Any) -> None:
        h = self.pending.get(tag)
        if h is None:
            if tag == 0 and type(msg) is Drain:
                self._drain()
            return  # the reply to a request its caller cancelled
        if h.__class__ is Channel:
            if msg.__class__ is WsCredit:
                if h.on_credit is not None:
                    h.on_credit(msg.n)
                return
            h.push(msg)
            if type(msg) in _ENDS:
                del self.pending[tag]
                h.finish()
                if self.retired:
                    self.maybe_close()
            return
        if type(msg) is HttpStart:
            ch = self.stream_channel(tag)
            ch.start = msg
            self.pending[tag] = ch
            if not h.done():
                h.set_result(ch)
            return
        del self.pending[tag]
        if not h.done():
            h.set_result(msg)

    def stream_channel(self, tag: int) -> Channel:
        proto = self.proto

        def grant(n: int) -> None:
            proto.send(tag, Credit(n))

        def cancel() -> None:
            if self.pending.pop(tag, None) is not None:
                proto.send(tag, Cancel())
                ch.finish()
                if self.retired:
                    self.maybe_close()

        ch = Channel(grant, cancel)
        return ch

    def _drain(self) -> None:
        """The replica drains: send it nothing new (requests waiting here go elsewhere)."""
        self.draining = True
        self.proto.send(0, DrainAck())
        self.router._retire(self)

    def _on_bad_frame(self, tag: int, err: BaseException) -> None:
        h = self.pending.pop(tag, None)
        if h is None:
            logger.error("replica %s sent a frame that could not be decoded (tag %d): %r", self.id, tag, err)
            return
        failed = Failed(undecodable_reply("reply", err))
        if h.__class__ is Channel:
            h.push(failed)
            h.finish()
            self.proto.send(tag, Cancel())
        elif not h.done():
            h.set_result(failed)

    def _on_close(self, exc: BaseException | None) -> None:
        self.ready = False
        pending, self.pending = self.pending, {}
        unsent, self.unsent = self.unsent, None
        if unsent:
            for tag in unsent:
                h = pending.pop(tag, None)
                if h is not None and h.__class__ is not Channel and not h.done():
                    h.set_result(_REJECTED)
        if pending:
            dep = self.router.deployment_id
            failed = Failed(ActorDiedError(
                f"Replica {self.id} of deployment '{dep.name}' (application '{dep.app_name}') died while "
                f"handling {len(pending)} request(s); it is being replaced. Retry the request."
            ))
            for h in pending.values():
                if h.__class__ is Channel:
                    h.push(failed)
                    h.finish()
                elif not h.done():
                    h.set_result(failed)
        self.router._drop(self)

    def maybe_close(self) -> None:
        if self.in_flight == 0 and not self.pending:
            self.proto.close()

    def abort(self) -> None:
        """The controller says the replica died: fail what is in flight on it now, rather than
        when TCP notices (never, for a node that vanished without closing its sockets)."""
        self.proto.abort()

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
        self.retiring: dict[str, ReplicaConn] = {}  # no longer chosen, still open
        self.ready: list[ReplicaConn] = []
        # Waiting requests, FIFO: (future to hand a replica to, multiplexed model id or "",
        # whether it may wait in a replica's own queue (`_queue_ahead`)).
        self.queue: deque[tuple[asyncio.Future[ReplicaConn], str, bool]] = deque()
        self.max_ongoing = 5
        self.max_queued = -1
        self.backpressure: dict[str, Any] | None = None  # the deployment's backpressure_config
        #: requests a replica may hold past max_ongoing_requests now (`_ahead`), when that
        #: was worked out, and `_finished` then
        self._ahead_n = 0
        self._ahead_t = 0.0
        self._ahead_done = 0
        self._finished = 0  # requests finished, ever (the drain rate and `_ahead` read it)
        self.exists: bool | None = None  # None until the controller has answered
        self.failed = ""  # why its version failed to deploy (DEPLOY_FAILED), if it did
        self._rate_done = 0  # `_finished` at _rate_t
        self._rate_t = time.monotonic()
        self._rate = 0.0
        self.subscription: asyncio.Task[None] | None = None
        #: The loop it runs on, known from the first update or queued request (3.11's
        #: `get_running_loop` costs a getpid: not once per request).
        self.loop: asyncio.AbstractEventLoop | None = None
        self._queue_hist = trace.series(deployment_id, "router_queue")
        #: finished calls for `fold_calls`, flat: trace.CALL_FIELDS items each
        self._calls: list[Any] = []
        self.info: dict[str, Any] | None = None  # the last update
        #: routers of this deployment on other loops of this process, fed each update
        #: (`looprouter.Follower`)
        self.followers: list[Any] = []
        #: the deployment's other routers in this process (the lead and its followers, set by
        #: the lead's `regroup`): they admit requests together, as one router would
        self.peers: tuple[Router, ...] = ()
        #: slots it holds on replicas (the sum of its connections' `in_flight`): peers skip a
        #: router that holds none and has no queue
        self.held = 0
        #: the deployment's custom request router, if its config names one (`custom_router`)
        self.custom: CustomRouting | None = None
        self._informed: asyncio.Event | None = None  # set by the first update (`acquire` waits)

    def _traced(self, meta: Any, t0: float, queued: float) -> None:
        """Keep a finished call for `fold_calls`; the request path does no more."""
        done = self._calls
        done += (meta.get("request_id") if meta else None, t0, time.perf_counter(), queued,
                 meta.get("route", "") if meta else "")
        if len(done) == trace.CALL_FIELDS:
            (self.loop or asyncio.get_running_loop()).call_later(trace.FOLD_S, self.fold_calls)
        elif len(done) >= trace.FOLD_MAX * trace.CALL_FIELDS:
            self.fold_calls()

    def fold_calls(self) -> None:
        """The calls kept since the last fold into the router_queue histogram and the trace ring."""
        done, self._calls = self._calls, []
        if done:
            trace.calls_done(self._queue_hist, self.deployment_id, done)

    # ---- updates from the controller ----------------------------------------------------
    def regroup(self) -> None:
        """On the lead (the runtime's loop): its followers changed; each router of the
        deployment gets its new peers (none when the lead is alone)."""
        group = (self, *self.followers) if self.followers else ()
        for m in self.peers:
            if m not in group:  # a follower dropped: alone again
                m.peers = ()
        for m in group or (self,):
            m.peers = tuple(x for x in group if x is not m)

    def update(self, info: dict[str, Any]) -> None:
        self.info = info
        if self._informed is not None:
            self._informed.set()
        if self.followers:  # those whose loop is closed are dropped
            n = len(self.followers)
            self.followers = [f for f in self.followers if f.tell(f.update, info)]
            if len(self.followers) != n:
                self.regroup()
        self.exists = info.get("exists", False)
        self.max_ongoing = info.get("max_ongoing_requests", 5)
        self.max_queued = info.get("max_queued_requests", -1)
        self.backpressure = info.get("backpressure")
        wanted = {r[0]: r[1] for r in info.get("replicas", ())}
        models = {r[0]: r[2] for r in info.get("replicas", ()) if len(r) > 2}
        for rid in list(self.replicas):
            if rid not in wanted:
                # Requests in flight there finish: the replica drains before it stops.
                self._retire(self.replicas.pop(rid))
        for rid in info.get("dead", ()):
            conn = self.retiring.get(rid)
            if conn is not None:
                conn.abort()
        loop = self.loop = asyncio.get_running_loop()
        for rid, path in wanted.items():
            if rid not in self.replicas:
                conn = ReplicaConn(self, rid, path)
                self.replicas[rid] = conn
                conn.connecting = loop.create_task(conn.connect())
                # A caller's loop may end while it connects (an update that came as `asyncio.run`
                # shut down): the loop's end, not an error worth a line in the user's log.
                conn.connecting._log_destroy_pending = False  # type: ignore[attr-defined]
            self.replicas[rid].models = models.get(rid, ())
        self.failed = info.get("failed", "")
        rr = info.get("request_router")
        if rr is None:
            self.custom = None
        elif self.custom is None or not self.custom.same(rr):
            from flotilla._private.custom_router import CustomRouting

            self.custom = CustomRouting(self, rr)
        if self.custom is not None:
            self.custom.sync(info.get("routing_stats") or {}, info.get("replica_nodes") or {})
            self.custom.wake()
        if not self.exists or (self.failed and not wanted):
            self._fail_queue(self._unavailable())
            return
        self._dispatch()
        # Requests queued before the limits were known: shed what exceeds them now.
        while self.max_queued != -1 and len(self.queue) > self.max_queued:
            fut, _, _ = self.queue.pop()
            if not fut.done():
                fut.set_exception(self.refused(len(self.queue)))

    def _unavailable(self) -> DeploymentUnavailableError:
        d = self.deployment_id
        if self.exists and self.failed:
            return DeploymentUnavailableError(
                f"Deployment '{d.name}' in application '{d.app_name}' is unavailable: it failed to deploy "
                f"and has no replica to serve: {self.failed} (serve.status() has the whole message; deploy "
                "a working version to recover).")
        return DeploymentUnavailableError(
            f"Deployment '{d.name}' in application '{d.app_name}' does not exist (it was "
            "deleted or never deployed)."
        )

    def _connected(self, conn: ReplicaConn) -> None:
        if self.replicas.get(conn.id) is not conn:
            conn.close()
        elif not conn.retired:  # a draining replica may say `Drain` before we get here
            self.ready.append(conn)
            if self.custom is not None:
                self.custom.wake()
            self._dispatch()

    def _retire(self, conn: ReplicaConn) -> None:
        """Choose `conn` no more; close it once nothing is in flight on it."""
        conn.retired = True
        self.retiring[conn.id] = conn
        if conn in self.ready:
            self.ready.remove(conn)
        conn.maybe_close()

    def _drop(self, conn: ReplicaConn) -> None:
        if conn in self.ready:
            self.ready.remove(conn)
        if self.replicas.get(conn.id) is conn:
            del self.replicas[conn.id]
        if self.retiring.get(conn.id) is conn:
            del self.retiring[conn.id]
        if self.custom is not None:
            self.custom.wake()
        if self.queue:
            self._dispatch()

    def fail_all(self, err: BaseException) -> None:
        """Fail every request waiting here and in the followers (the cluster is gone)."""
        self._fail_queue(err)
        for f in self.followers:
            f.tell(f._fail_queue, err)

    def _fail_queue(self, err: BaseException) -> None:
        if self.custom is not None:
            self.custom.fail(err)
        while self.queue:
            fut, _, _ = self.queue.popleft()
            if not fut.done():
                fut.set_exception(err)

    def conns(self) -> list[ReplicaConn]:
        """Every open connection: to replicas chosen and retiring."""
        return [*self.replicas.values(), *self.retiring.values()]

    def close(self) -> None:
        for conn in self.conns():
            conn.close()
        self.replicas.clear()
        self.retiring.clear()
        self.ready.clear()

    # ---- choosing a replica -------------------------------------------------------------
    def _load(self, r: ReplicaConn) -> int:
        """Requests this process has on replica `r`: this router's and its `peers'` (read
        from their threads: each router only changes its own counts), so the process admits
        what one router would."""
        n = r.in_flight
        for m in self.peers:
            if m.held:
                c = m.replicas.get(r.id)
                if c is not None:
                    n += c.in_flight
        return n

    def _others_waiting(self) -> bool:
        """Requests wait in a peer (they go first)."""
        for m in self.peers:  # noqa: SIM110 (a loop: any() over a generator costs 2.5x per call)
            if m.queue:
                return True
        return False

    def _peers_busy(self) -> bool:
        """A peer holds a slot or has requests waiting: choices count the process's loads."""
        for m in self.peers:  # noqa: SIM110 (as above)
            if m.held or m.queue:
                return True
        return False

    def _nudge(self) -> None:
        """`_dispatch` on this router's own loop, asked from another router's thread."""
        loop = self.loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # its loop is closed
                loop.call_soon_threadsafe(self._dispatch)

    def _loads(self) -> Callable[[ReplicaConn], int]:
        """How a replica's load is read now: this router's own count, or with a busy peer,
        the process's (`_load`)."""
        return self._load if self.peers and self._peers_busy() else _IN_FLIGHT

    def _pick(self, head: bool = False, ahead: bool = True) -> ReplicaConn | None:
        ready = self.ready
        n = len(ready)
        limit = self.max_ongoing
        load = self._loads()
        if n == 1:
            r = ready[0]
            if load(r) < limit:
                return r
        elif n == 0:
            return None
        else:
            a, b = random.sample(ready, 2)
            r = a if load(a) <= load(b) else b
            if load(r) < limit:
                return r
            r = min(ready, key=load)
            if load(r) < limit:
                return r
        return self._queue_ahead(r, head) if ahead else None

    def _queue_ahead(self, r: ReplicaConn, head: bool = False) -> ReplicaConn | None:
        """`r` (the least loaded replica, at its limit) if it may take one more request to
        wait in its own queue: when the router is fast enough for that wait to be short
        (`_ahead`), within max_queued_requests, which counts those requests too. For a request
        first in line: a new one when the queue is empty, or the queue's `head` (counted
        already)."""
        if self._load(r) >= self.max_ongoing + self._ahead() or r.draining:
            return None
        if self.max_queued != -1 and not head and self.queued() >= self.max_queued:
            return None
        return r

    def _ahead(self, now: float | None = None) -> int:
        """How many requests past max_ongoing_requests one replica may hold: REPLICA_QUEUE_S
        of the router's throughput per replica since the last time (worked out at most every
        0.1 s: requests that stop finishing, blocked or slow, stop it within 0.1 s), at most
        REPLICA_QUEUE_MAX."""
        if now is None:
            now = time.monotonic()
        dt = now - self._ahead_t
        if dt >= 0.1:
            self._ahead_n = ahead_for((self._finished - self._ahead_done) / dt, len(self.ready), REPLICA_QUEUE_S)
            self._ahead_t, self._ahead_done = now, self._finished
        return self._ahead_n

    def queued(self) -> int:
        """Requests waiting for a slot: in this router's queue, and sent ahead to replicas
        at their limit (waiting in theirs)."""
        limit = self.max_ongoing
        waiting = self.custom.waiting if self.custom is not None else 0
        loads = map(self._loads(), self.ready)
        queues = len(self.queue) + sum(len(m.queue) for m in self.peers)
        return queues + waiting + sum(n - limit for n in loads if n > limit)

    def _pick_for_model(self, model_id: str, ahead: bool = False, head: bool = False) -> ReplicaConn | None:
        """A replica that already holds `model_id` and has room, the least loaded first;
        `ahead`: or one at its limit that may take a request into its own queue."""
        best, least = None, 0
        load = self._loads()
        for r in self.ready:
            if model_id in r.models:
                n = load(r)
                if best is None or n < least:
                    best, least = r, n
        if best is None or least < self.max_ongoing:
            return best
        return self._queue_ahead(best, head) if ahead else None

    def _choose(self, model_id: str, head: bool = False, ahead: bool = True) -> ReplicaConn | None:
        """A replica for a request (`head`: the queue's first); `ahead`: it may wait in a
        replica's own queue (not a WebSocket session, which holds its slot for its life)."""
        if not model_id:
            return self._pick(head, ahead)
        r = self._pick_for_model(model_id)
        if r is not None:
            return r
        if any(model_id in c.models and not c.ready for c in self.replicas.values()):
            return None  # its replica is still connecting: wait a moment for it
        ready = self.ready
        # As Ray: a model no replica holds goes to the replica with room holding the fewest
        # models (then the least busy), so models spread instead of evicting each other.
        loads = {c: n for c, n in zip(ready, map(self._loads(), ready), strict=True)}
        room = [c for c in ready if loads[c] < self.max_ongoing]
        if room:
            return min(room, key=lambda c: (len(c.models), loads[c]))
        r = min(ready, key=loads.__getitem__) if ready else None
        if not ahead:
            return None
        return self._pick_for_model(model_id, True, head) or (self._queue_ahead(r, head) if r is not None else None)

    async def acquire(self, model_id: str = "", front: bool = False, ahead: bool = True,
                      req: tuple[Any, ...] | None = None) -> ReplicaConn:
        """A replica with a slot reserved for the caller (or, `ahead`, a place in the queue
        of a replica at its limit); waits in FIFO order if none.

        `front`: the request was rejected by a draining replica; it goes first in line.
        `req`: (method, args, kwargs, meta, kind) for a custom request router's `PendingRequest`.
        """
        if self.info is None:  # which router decides (built-in or custom) is not known yet
            await self._first_update()
        if self.custom is not None:
            return await self.custom.acquire(model_id, req)
        if not self.queue and not (self.peers and self._others_waiting()):
            r = self._choose(model_id, False, ahead)
            if r is not None:
                r.in_flight += 1
                self.held += 1
                return r
        if self.exists is False or (self.failed and not self.replicas):
            raise self._unavailable()
        if self.max_queued != -1 and not front and (queued := self.queued()) >= self.max_queued:
            raise self.refused(queued)
        loop = self.loop
        if loop is None:  # queued before the first update
            loop = self.loop = asyncio.get_running_loop()
        fut: asyncio.Future[ReplicaConn] = loop.create_future()
        entry = (fut, model_id, ahead)
        if front:
            self.queue.appendleft(entry)
        else:
            self.queue.append(entry)
        if self.peers and self._peers_busy():  # a slot a peer freed before it saw this queue
            self._dispatch()
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
            raise self._cold_timeout() from None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result())
            else:
                try:
                    self.queue.remove(entry)
                except ValueError:
                    pass
            raise

    async def _first_update(self) -> None:
        """Wait (bounded, as for a first replica) for the controller's first word on the deployment."""
        if self._informed is None:
            self._informed = asyncio.Event()
        try:
            await asyncio.wait_for(self._informed.wait(), self.cold_start_timeout_s)
        except TimeoutError:
            raise self._cold_timeout() from None

    def _cold_timeout(self) -> DeploymentUnavailableError:
        d = self.deployment_id
        return DeploymentUnavailableError(
            f"No replica of deployment '{d.name}' in application '{d.app_name}' became "
            f"available within {self.cold_start_timeout_s:g}s; it may be starting slowly or "
            "failing to start (see serve.status())."
        )

    def drain_rate(self) -> float:
        """Requests finished per second, recently (a 1 s window, smoothed)."""
        now = time.monotonic()
        dt = now - self._rate_t
        if dt >= 1.0:
            rate = (self._finished - self._rate_done) / dt
            self._rate = rate if self._rate == 0 else 0.5 * self._rate + 0.5 * rate
            self._rate_done = self._finished
            self._rate_t = now
        elif self._rate == 0 and dt > 0 and self._finished > self._rate_done:
            return (self._finished - self._rate_done) / dt
        return self._rate

    def refused(self, queued: int) -> BackPressureError:
        """The error of a request refused with `queued` requests waiting: its HTTP status and
        Retry-After from the deployment's `backpressure_config`, where it has one."""
        own = self.backpressure
        if not own:
            return BackPressureError(queued, self.max_queued)
        return BackPressureError(queued, self.max_queued, own.get("status_code", 503), own.get("retry_after_s"))

    def retry_after_s(self) -> int:
        """Seconds after which the queue should have room again (for Retry-After)."""
        rate = self.drain_rate()
        if rate <= 0:
            return 1
        return max(1, math.ceil(len(self.queue) / rate))

    def release(self, r: ReplicaConn) -> None:
        self._finished += 1
        r.in_flight -= 1
        self.held -= 1
        if self.custom is not None:
            self.custom.released(r)
        if r.retired:
            r.maybe_close()
        if self.queue:
            self._dispatch()
        for m in self.peers:  # the slot may be what a peer's queue waits for
            if m.queue:
                m._nudge()

    def _dispatch(self) -> None:
        while self.queue:
            fut, model_id, ahead = self.queue[0]
            r = self._choose(model_id, True, ahead)
            if r is None:
                return
            self.queue.popleft()
            if fut.done():
                continue
            r.in_flight += 1
            self.held += 1
            fut.set_result(r)


    # ---- requests ---------------------------------------------------------------------
    @staticmethod
    def _send(r: ReplicaConn, msg: tuple[Any, ...], reply: Any = None) -> tuple[int, Any]:
        """Send one request on `r` (slot held); returns its tag and what its first reply
        message goes to: `reply` (a `DirectCall`), else a new future. A replica that is gone
        or draining before the request was sent counts as a rejection: the request never
        started, so the caller retries it elsewhere."""
        if not r.ready or r.draining:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            fut.set_result(_REJECTED)
            return 0, fut
        if reply is None:
            reply = r.router.loop.create_future()  # type: ignore[union-attr]  # set by the update that made `r`
        tag = r.next_id()
        proto = r.proto
        proto.send(tag, msg)
        r.pending[tag] = reply
        if proto.transport.is_closing():  # type: ignore[union-attr]  # the write failed: the replica is gone
            if r.unsent is None:
                r.unsent = []
            r.unsent.append(tag)
        return tag, reply

    def _send_held(self, r: ReplicaConn, msg: tuple[Any, ...], reply: Any = None) -> tuple[int, Any]:
        """`_send`; if the message cannot go (it does not pickle, or is over the frame limit),
        its slot is freed before the error reaches the caller."""
        try:
            return self._send(r, msg, reply)
        except BaseException:
            self.release(r)
            raise

    @staticmethod
    def _abandon(r: ReplicaConn, tag: int, fut: asyncio.Future[Any]) -> None:
        """The caller was cancelled while waiting for the reply to `tag`: cancel it there."""
        if r.pending.pop(tag, None) is not None:
            r.proto.send(tag, Cancel())
        elif fut.done() and not fut.cancelled() and fut.result().__class__ is Channel:
            fut.result().cancel()

    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: Any,
                   parent: dict[str, Any] | None = None, front: bool = False) -> Any:
        """One request; `parent`: the meta of the request being served that made this call
        (a replica's user code), whose downstream time it adds to; `front`: it was rejected
        by a draining replica already, so it goes first in line."""
        model = meta.get("multiplexed_model_id", "") if meta else ""
        req = (method, args, kwargs, meta, "call") if self.custom is not None or self.info is None else None
        args, kwargs = wire_args(args, kwargs)
        msg = Call(method, args, kwargs, meta)
        ta = t0 = time.perf_counter()
        queued = 0.0
        try:
            while True:
                r = await self.acquire(model, front, True, req)
                queued += time.perf_counter() - ta
                if queued > trace.QUEUED_S:  # the replica counts it in latency and queue delay
                    if meta is None:
                        meta = {}
                        msg = Call(method, args, kwargs, meta)
                    meta[trace.ROUTER_QUEUE_KEY] = queued
                try:
                    tag, fut = self._send_held(r, msg)
                except ResponsePending as e:  # (its slot is free again)
                    await e.settled()
                    ta = time.perf_counter()
                    continue
                try:
                    reply = await fut
                except asyncio.CancelledError:
                    self._abandon(r, tag, fut)
                    raise
                finally:
                    self.release(r)
                cls = reply.__class__
                if cls is Rejected:
                    front = True
                    ta = time.perf_counter()
                    continue
                break
        finally:
            if trace.ON:
                if parent is not None:
                    parent[trace.DOWNSTREAM_KEY] = parent.get(trace.DOWNSTREAM_KEY, 0.0) + (time.perf_counter() - t0)
                self._traced(meta, t0, queued)
        return reply_value(reply)

    def call_direct(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: Any,
                    out: asyncio.Future[Any], on_done: Callable[[asyncio.Future[Any]], None]) -> DirectCall | None:
        """`call` for a caller blocked on another thread, sent now if a replica has a slot and
        none waits (else None, nothing done): its reply settles `out` and calls `on_done(out)`
        the moment it arrives, with no task and no turn of the loop in between. A draining
        replica's rejection goes on as a `call` first in line. Raises if it cannot be sent."""
        if self.queue or self.custom is not None or (self.peers and self._others_waiting()):
            return None
        r = self._choose(meta.get("multiplexed_model_id", "") if meta else "", False, True)
        if r is None or not r.ready or r.draining:  # (`_send` would answer Rejected)
            return None
        wargs, wkwargs = wire_args(args, kwargs)
        r.in_flight += 1
        self.held += 1
        d = DirectCall(self, r, (method, args, kwargs, meta), out, on_done)
        try:
            d.tag = self._send_held(r, Call(method, wargs, wkwargs, meta), d)[0]
        except ResponsePending:  # a response among the arguments has to end first: as `call`
            return None
        return d

    def _direct_reply(self, d: DirectCall, reply: Any) -> None:
        self.release(d.r)
        out = d.out
        if reply.__class__ is Rejected:  # the replica drains: the call goes on as any other
            method, args, kwargs, meta = d.call
            retry = d.retry = asyncio.ensure_future(self.call(method, args, kwargs, meta, None, True), loop=out.get_loop())
            retry.add_done_callback(d.retried)
            return
        if trace.ON:
            self._traced(d.call[3], d.t0, 0.0)
        try:
            out.set_result(reply_value(reply))
        except Exception as e:
            out.set_exception(e)
        d.settle()

    async def broadcast(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: Any) -> list[Any]:
        """The call on every replica the router knows, at once (past `max_ongoing_requests` and
        the queue: a control-plane call); each replica's result or exception, in replica order.
        Waits (bounded, as a call does) for a first replica if there is none and for the
        connections still being made; a replica that drains before it gets the call is left out."""
        r = await self.acquire()
        self.release(r)
        joining = [c.connecting for c in self.replicas.values() if c.connecting is not None and not c.connecting.done()]
        if joining:  # replicas the router knows of and is still connecting to: wait for them
            await asyncio.wait(joining, timeout=self.cold_start_timeout_s)
        args, kwargs = wire_args(args, kwargs)
        msg = Call(method, args, kwargs, meta)
        sent: list[tuple[ReplicaConn, int, asyncio.Future[Any]]] = []
        for conn in list(self.ready):
            if conn.draining:
                continue
            conn.in_flight += 1
            self.held += 1
            tag, fut = self._send_held(conn, msg)
            sent.append((conn, tag, fut))
        out: list[Any] = []
        try:
            for _, _, fut in sent:
                try:
                    reply = await fut
                except asyncio.CancelledError:
                    for c, t, f in sent:
                        if not f.done():
                            self._abandon(c, t, f)
                    raise
                cls = reply.__class__
                if cls is Ok:
                    out.append(reply.result)
                elif cls is Err:
                    out.append(local_error(reply))
                elif cls is Failed:
                    out.append(reply.error)
                elif cls is not Rejected:
                    out.append(RaySystemError(f"unexpected reply {cls.__name__} to a call"))
        finally:
            for conn, _, _ in sent:
                self.release(conn)
        return out

    async def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: Any) -> AsyncIterator[Any]:
        """Yield the items of a generator method, as the replica produces them."""
        model = meta.get("multiplexed_model_id", "") if meta else ""
        req = (method, args, kwargs, meta, "stream") if self.custom is not None or self.info is None else None
        args, kwargs = wire_args(args, kwargs)
        msg = Stream(method, args, kwargs, meta)
        front = False
        ta = t0 = time.perf_counter()
        queued = 0.0
        try:
            while True:
                r = await self.acquire(model, front, True, req)
                queued += time.perf_counter() - ta
                ch: Channel | None = None
                done = False
                try:
                    if not r.ready or r.draining:
                        front = True
                        ta = time.perf_counter()
                        continue
                    tag = r.next_id()
                    ch = r.stream_channel(tag)
                    r.proto.send(tag, msg)
                    r.pending[tag] = ch
                    while True:
                        m = await ch.get()
                        cls = m.__class__
                        if cls is Yield:
                            yield m.item
                        elif cls is End:
                            done = True
                            return
                        elif cls is Rejected:
                            done = True
                            front = True
                            ta = time.perf_counter()
                            break
                        else:
                            done = True
                            raise _stream_error(m)
                finally:
                    if ch is not None and not done:
                        ch.cancel()  # the consumer stopped early: stop the generator there
                    self.release(r)
        finally:  # the stream's whole life, consumer included: not added to a parent's downstream
            if trace.ON:
                self._traced(meta, t0, queued)

    async def http(self, scope: dict[str, Any], body: bytes, meta: Any, traced: bool = True) -> HttpFull | Channel:
        """Send an HTTP request: a whole response, or a `Channel` of a streaming one (whose
        `start` holds status and headers, followed by Chunk... End, or Abort/Failed).
        `traced=False`: the caller records the call (the proxy, with its request's figures;
        the time queued here is in `meta` when over `trace.QUEUED_S`)."""
        model = meta.get("multiplexed_model_id", "") if meta else ""
        msg = Http(scope, oob(body), meta)
        front = False
        ta = t0 = time.perf_counter()
        queued = 0.0
        try:
            while True:
                r = await self.acquire(model, front, True, ("__call__", (), {}, meta, "http")
                                       if self.custom is not None or self.info is None else None)
                queued += time.perf_counter() - ta
                if queued > trace.QUEUED_S and meta is not None:
                    meta[trace.ROUTER_QUEUE_KEY] = queued
                tag, fut = self._send_held(r, msg)
                try:
                    reply = await fut
                except asyncio.CancelledError:
                    self.release(r)
                    self._abandon(r, tag, fut)
                    raise
                cls = reply.__class__
                if cls is Channel:  # a streaming response holds its slot until it ends
                    reply.on_end(functools.partial(self.release, r))
                    return reply  # type: ignore[no-any-return]
                self.release(r)
                if cls is HttpFull:
                    return reply  # type: ignore[no-any-return]
                if cls is Rejected:
                    front = True
                    ta = time.perf_counter()
                    continue
                raise _stream_error(reply)
        finally:
            if traced and trace.ON:
                self._traced(meta, t0, queued)


    async def websocket(self, scope: dict[str, Any], meta: Any) -> WsLink:
        """Open a WebSocket on one replica: the link holds its first reply message (`first`)
        and the replica's slot until the socket ends (End, Err, Failed, or a cancel)."""
        model = meta.get("multiplexed_model_id", "") if meta else ""
        msg = WsOpen(scope, meta)
        front = False
        while True:
            r = await self.acquire(model, front, False, ("__call__", (), {}, meta, "ws")
                                   if self.custom is not None or self.info is None else None)
            if not r.ready or r.draining:
                self.release(r)
                front = True
                continue
            tag = r.next_id()
            ch = r.stream_channel(tag)
            proto = r.proto
            link = WsLink(ch, functools.partial(_send_in, proto, tag), proto)
            ch.on_credit = link.give
            proto.send(tag, msg)
            r.pending[tag] = ch
            try:
                first = await ch.get()
            except asyncio.CancelledError:
                ch.cancel()
                self.release(r)
                raise
            if first.__class__ is Rejected:
                self.release(r)
                front = True
                continue
            ch.on_end(functools.partial(self.release, r))
            link.first = first
            return link


def _send_in(proto: FrameProtocol, tag: int, message: dict[str, Any]) -> None:
    proto.send(tag, WsIn(message))


class WsLink:
    """The client side of one WebSocket carried to a replica: `ch` holds the replica's
    messages (credited back as taken); `send_in` forwards a client message, at most
    `STREAM_WINDOW` `websocket.receive` messages ahead of the replica's WsCredit."""

    __slots__ = ("_send", "_waiter", "avail", "ch", "first", "proto")

    def __init__(self, ch: Channel, send: Callable[[dict[str, Any]], None], proto: Any) -> None:
        self.ch = ch
        self._send = send
        self.proto = proto
        self.avail = STREAM_WINDOW
        self._waiter: asyncio.Future[None] | None = None
        self.first: Any = None

    def give(self, n: int) -> None:
        self.avail += n
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def send_in(self, message: dict[str, Any]) -> None:
        if message["type"] == "websocket.receive":
            while self.avail <= 0:
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter
            self.avail -= 1
        self._send(message)
        if self.proto.paused:
            await self.proto.drained()


def _stream_error(msg: Any) -> BaseException:
    """The exception for a message that ends a request badly."""
    cls = msg.__class__
    if cls is Err:
        return local_error(msg)
    if cls is Failed:
        return msg.error  # type: ignore[no-any-return]
    if cls is Abort:
        return RaySystemError(f"the stream broke in the replica: {msg.reason}")
    return RaySystemError(f"unexpected reply {cls.__name__}")
