"""The router against fake replicas: small Unix-socket servers in this process that speak
the data-plane protocol (`protocol.py` messages over `transport.FrameProtocol`), answering
as each test tells them. The router itself is the real one, with real connections.

Covered: replica choice (power of two choices, never over `max_ongoing_requests`), FIFO
queueing and dispatch on release, shedding (`BackPressureError`), cancelling a queued and an
in-flight request, reject-and-retry and `Drain`, a replica dying mid-request (its connection
dropped, or the controller saying so), and `Router.update` adding and removing replicas.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from flotilla._private import trace
from flotilla._private.errors import error_reply
from flotilla._private.protocol import (
    STREAM_WINDOW,
    Call,
    Cancel,
    Chunk,
    Credit,
    Drain,
    DrainAck,
    End,
    Http,
    HttpFull,
    HttpStart,
    Ok,
    Rejected,
    Stream,
    Yield,
)
from flotilla._private.router import Channel, ReplicaConn, Router, ahead_for
from flotilla._private.transport import FrameProtocol
from flotilla.exceptions import ActorDiedError, RaySystemError
from flotilla.serve.exceptions import BackPressureError, DeploymentUnavailableError
from flotilla.serve.schema import DeploymentID
from tests.unit.aio import Net, settle, until

pytestmark = pytest.mark.timeout(10)


def _explode() -> Any:
    raise RuntimeError("this reply cannot be unpickled")


class Unloadable:
    def __reduce__(self) -> Any:
        return (_explode, ())


@dataclass
class Req:
    """A request a fake replica received; the test answers it."""

    rep: FakeReplica
    proto: FrameProtocol
    tag: int
    msg: Any

    @property
    def arg(self) -> Any:
        return self.msg.args[0] if self.msg.args else None

    def reply(self, *msgs: Any) -> None:
        for m in msgs:
            self.proto.send(self.tag, m)


Auto = Callable[["Req"], Any]


class _Proto(FrameProtocol):
    def __init__(self, rep: FakeReplica) -> None:
        super().__init__(lambda tag, msg: None)
        self.rep = rep

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.rep.draining:  # a draining replica tells each new connection at once
            self.send(0, Drain())


class FakeReplica:
    """A replica's data-plane end: records requests, answers when told (or via `auto`)."""

    def __init__(self, rid: str, path: str, auto: Auto | None = None, models: tuple[str, ...] = ()) -> None:
        self.id = rid
        self.path = path
        self.auto = auto
        self.models = models
        self.requests: list[Req] = []
        self.control: list[tuple[int, Any]] = []  # Cancel, Credit, DrainAck
        self.conns: list[FrameProtocol] = []
        self.lost = 0
        self.draining = False
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> FakeReplica:
        self.server = await asyncio.get_running_loop().create_unix_server(self._make, self.path)
        return self

    def _make(self) -> FrameProtocol:
        proto = _Proto(self)
        proto.on_message = lambda tag, msg: self._on(proto, tag, msg)
        proto.on_close = self._closed
        self.conns.append(proto)
        return proto

    def _closed(self, exc: BaseException | None) -> None:
        self.lost += 1

    def _on(self, proto: FrameProtocol, tag: int, msg: Any) -> None:
        if type(msg) in (Cancel, Credit, DrainAck):
            self.control.append((tag, msg))
            return
        req = Req(self, proto, tag, msg)
        self.requests.append(req)
        if self.auto is not None:
            self.auto(req)

    def entry(self) -> tuple[str, str, tuple[str, ...]]:
        return (self.id, self.path, self.models)

    async def nth(self, n: int) -> Req:
        """The n-th request (0-based) this replica received, waiting for it if need be."""
        await until(lambda: len(self.requests) > n, what=f"request #{n} at {self.id}")
        return self.requests[n]

    def args(self) -> list[Any]:
        return [r.arg for r in self.requests]

    def drain(self) -> None:
        """Like a replica told to stop: listen no more, tell every router `Drain`."""
        self.draining = True
        assert self.server is not None
        self.server.close()
        for p in self.conns:
            p.send(0, Drain())

    def kill(self) -> None:
        """Die: stop listening and drop every connection."""
        assert self.server is not None
        self.server.close()
        for p in self.conns:
            p.close()

    def controls(self, cls: type) -> list[tuple[int, Any]]:
        return [(t, m) for t, m in self.control if type(m) is cls]


def answer_ok(req: Req) -> None:
    req.reply(Ok((req.rep.id, req.arg)))


def reject(req: Req) -> None:
    req.reply(Rejected())


def info(reps: list[FakeReplica], max_ongoing: int = 2, max_queued: int = -1, exists: bool = True) -> dict[str, Any]:
    """What the controller publishes for a deployment (see `Controller` "replicas")."""
    return {
        "exists": exists,
        "max_ongoing_requests": max_ongoing,
        "max_queued_requests": max_queued,
        "replicas": [r.entry() for r in reps],
    }


async def connected(router: Router) -> None:
    tasks = [c.connecting for c in router.replicas.values() if c.connecting is not None]
    await asyncio.wait_for(asyncio.gather(*tasks), 1)


async def make_router(reps: list[FakeReplica], **kw: Any) -> Router:
    router = Router(DeploymentID("d", "app"), cold_start_timeout_s=kw.pop("cold_start_timeout_s", 2.0))
    router.update(info(reps, **kw))
    await connected(router)
    return router


def call(router: Router, arg: Any, meta: Any = None) -> asyncio.Future[Any]:
    return asyncio.ensure_future(router.call("m", (arg,), {}, meta))


def run(net: Net, body: Callable[[Callable[..., Awaitable[FakeReplica]]], Awaitable[None]]) -> None:
    """Run `body(replica)` in a fresh loop; `await replica(name, auto=..., models=...)` starts one."""

    async def main() -> None:
        started: list[FakeReplica] = []

        async def replica(name: str, auto: Auto | None = None, models: tuple[str, ...] = ()) -> FakeReplica:
            rep = await FakeReplica(name, net.sock(name), auto, models).start()
            started.append(rep)
            return rep

        try:
            await body(replica)
        finally:
            for rep in started:
                if rep.server is not None:
                    rep.server.close()

    net.run(main())


async def result(fut: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(fut, 1)


# ---- choosing a replica -----------------------------------------------------------------------


def loads_router(loads: list[int], limit: int) -> Router:
    router = Router(DeploymentID("d", "app"))
    router.max_ongoing = limit
    for i, n in enumerate(loads):
        c = ReplicaConn(router, f"r{i}", "/nonexistent")
        c.in_flight = n
        router.ready.append(c)
    return router


def picks(router: Router, n: int = 300) -> list[str | None]:
    out = []
    for _ in range(n):
        r = router._pick()
        out.append(None if r is None else r.id)
    return out


def test_pick_none_when_no_replica_or_all_full() -> None:
    assert picks(loads_router([], 2), 5) == [None] * 5
    assert picks(loads_router([2], 2), 5) == [None] * 5
    assert picks(loads_router([1], 2), 5) == ["r0"] * 5
    assert picks(loads_router([2, 2, 2], 2), 50) == [None] * 50


def test_pick_two_replicas_is_least_loaded() -> None:
    assert set(picks(loads_router([3, 1], 5))) == {"r1"}
    assert set(picks(loads_router([0, 4], 5))) == {"r0"}


def test_pick_power_of_two_choices() -> None:
    random.seed(7)
    got = picks(loads_router([0, 2, 3], 5), 600)
    # the most loaded is never the lesser of two; the least loaded always wins its pairs
    assert "r2" not in got
    assert got.count("r0") > got.count("r1") > 0


def test_pick_skips_full_replicas() -> None:
    random.seed(3)
    # a random pair of two full replicas falls back to the least loaded one with room
    assert set(picks(loads_router([4, 4, 2, 4], 4))) == {"r2"}
    assert set(picks(loads_router([4, 1, 4], 4))) == {"r1"}


def grouped(lead_loads: list[int], other_loads: list[int], limit: int) -> tuple[Router, Router]:
    """A lead and one follower of the same deployment, each with its own counts per replica."""
    lead, other = loads_router(lead_loads, limit), loads_router(other_loads, limit)
    lead.held, other.held = sum(lead_loads), sum(other_loads)
    other.replicas = {c.id: c for c in other.ready}
    lead.replicas = {c.id: c for c in lead.ready}
    lead.followers = [other]
    lead.regroup()
    return lead, other


@pytest.mark.parametrize(("lead", "other", "limit", "picked"), [
    ([0], [1], 1, {None}),  # the follower's call fills the only slot, for both routers
    ([1], [0], 1, {None}),
    ([0], [0], 2, {"r0"}),
    ([1, 0], [0, 1], 2, {"r0", "r1"}),  # 1 + 0 against 0 + 1: each replica holds 1
    ([0, 1], [2, 0], 2, {"r1"}),  # r0 holds 2 (full), r1 holds 1
    ([0, 0, 2], [0, 2, 0], 2, {"r0"}),  # the one empty replica of three
    ([1, 1], [1, 1], 2, {None}),
])
def test_the_routers_of_a_process_pick_by_their_loads_together(
        lead: list[int], other: list[int], limit: int, picked: set[str | None]) -> None:
    random.seed(5)
    a, b = grouped(lead, other, limit)
    assert a.peers == (b,) and b.peers == (a,)
    assert a._peers_busy() == (sum(other) > 0) and b._peers_busy() == (sum(lead) > 0)
    assert set(picks(a, 60)) == picked and set(picks(b, 60)) == picked
    a.followers = []
    a.regroup()  # alone again: its own counts only
    assert a.peers == () and a._load(a.ready[0]) == lead[0]


def test_queued_counts_what_the_peers_queue_and_send_ahead() -> None:
    a, b = grouped([3], [1], 2)  # 4 on a replica whose limit is 2: 2 sent ahead
    a.max_queued = b.max_queued = 5
    assert a.queued() == b.queued() == 2
    b.queue.append((None, "", True))  # type: ignore[arg-type]  # a waiting request (only counted here)
    assert a.queued() == 3 and a._others_waiting() and not b._others_waiting()


def test_acquire_fills_replicas_evenly_up_to_the_limit(net: Net) -> None:
    async def body(replica: Any) -> None:
        a, b = await replica("a"), await replica("b")
        router = await make_router([a, b], max_ongoing=3)
        got = [await result(router.acquire()) for _ in range(6)]
        assert sorted(c.id for c in got) == ["a", "a", "a", "b", "b", "b"]
        assert [c.in_flight for c in router.ready] == [3, 3]
        waiting = asyncio.ensure_future(router.acquire())
        await settle()
        assert not waiting.done() and len(router.queue) == 1
        freed = got[4]
        router.release(freed)
        assert await result(waiting) is freed
        assert freed.in_flight == 3 and not router.queue
        router.close()

    run(net, body)


# ---- queueing and shedding ----------------------------------------------------------------


def test_requests_queue_fifo_and_dispatch_on_release(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = await make_router([a], max_ongoing=2)
        calls = [call(router, i) for i in range(6)]
        await a.nth(1)
        await until(lambda: len(router.queue) == 4, what="4 queued")
        await settle()
        assert a.args() == [0, 1]  # never more than max_ongoing_requests at the replica
        for i in range(6):
            (await a.nth(i)).reply(Ok(i * 10))
            assert await result(calls[i]) == i * 10
            if i + 2 < 6:
                await a.nth(i + 2)  # the next in line went out on release
            assert len(a.requests) == min(i + 3, 6)
            assert router.replicas["a"].in_flight == min(2, 5 - i)
        assert a.args() == list(range(6))
        assert not router.queue
        router.close()

    run(net, body)


def test_queued_requests_go_to_a_replica_that_connects_later(net: Net) -> None:
    async def body(replica: Any) -> None:
        router = Router(DeploymentID("d", "app"))
        router.update(info([]))
        calls = [call(router, i) for i in range(3)]
        await settle()
        assert len(router.queue) == 3
        a = await replica("a", auto=answer_ok)
        router.update(info([a], max_ongoing=5))
        assert await result(asyncio.gather(*calls)) == [("a", 0), ("a", 1), ("a", 2)]
        router.close()

    run(net, body)


def test_no_replica_within_cold_start_timeout(net: Net) -> None:
    async def body(replica: Any) -> None:
        router = Router(DeploymentID("d", "app"), cold_start_timeout_s=0.05)
        router.update(info([]))
        with pytest.raises(DeploymentUnavailableError, match=r"became available within 0\.05s"):
            await result(call(router, 1))
        assert not router.queue

    run(net, body)


def test_shed_beyond_max_queued_requests(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = await make_router([a], max_ongoing=1, max_queued=2)
        calls = [call(router, i) for i in range(3)]
        await a.nth(0)
        await until(lambda: len(router.queue) == 2)
        with pytest.raises(BackPressureError) as info_:
            await result(call(router, 3))
        assert info_.value.num_queued_requests == 2 and info_.value.max_queued_requests == 2
        for i in range(3):
            (await a.nth(i)).reply(Ok(i))
        assert await result(asyncio.gather(*calls)) == [0, 1, 2]
        assert a.args() == [0, 1, 2]
        router.close()

    run(net, body)


def test_max_queued_zero_sheds_whatever_would_wait(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = await make_router([a], max_ongoing=1, max_queued=0)
        first = call(router, 0)
        await a.nth(0)
        with pytest.raises(BackPressureError):
            await result(call(router, 1))
        a.requests[0].reply(Ok("done"))
        assert await result(first) == "done"
        router.close()

    run(net, body)


def test_update_sheds_what_was_queued_beyond_a_new_limit(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = await make_router([a], max_ongoing=1)
        calls = [call(router, i) for i in range(5)]
        await a.nth(0)
        await until(lambda: len(router.queue) == 4)
        router.update(info([a], max_ongoing=1, max_queued=1))
        await settle()
        for c in calls[2:]:  # the newest are shed
            with pytest.raises(BackPressureError):
                await result(c)
        a.requests[0].reply(Ok(0))
        (await a.nth(1)).reply(Ok(1))
        assert await result(asyncio.gather(*calls[:2])) == [0, 1]
        assert a.args() == [0, 1]
        router.close()

    run(net, body)


def test_deployment_deleted_fails_the_queue(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = await make_router([a], max_ongoing=1)
        first, queued = call(router, 0), call(router, 1)
        await a.nth(0)
        await until(lambda: len(router.queue) == 1)
        router.update(info([], exists=False))
        with pytest.raises(DeploymentUnavailableError, match="does not exist"):
            await result(queued)
        with pytest.raises(DeploymentUnavailableError):
            await result(call(router, 2))
        # what was in flight still finishes: the replica drains before it stops
        a.requests[0].reply(Ok("last"))
        assert await result(first) == "last"
        await until(lambda: a.lost == 1, what="the connection to close")
        router.close()

    run(net, body)


# ---- cancelling -------------------------------------------------------------------------------


def test_cancel_a_queued_request(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = await make_router([a], max_ongoing=1)
        first, queued = call(router, 0), call(router, 1)
        await a.nth(0)
        await until(lambda: len(router.queue) == 1)
        queued.cancel()
        await settle()
        assert not router.queue
        later = call(router, 2)
        a.requests[0].reply(Ok(0))
        assert await result(first) == 0
        (await a.nth(1)).reply(Ok(2))
        assert await result(later) == 2
        assert a.args() == [0, 2]  # the cancelled one never left the router
        assert not a.controls(Cancel)
        assert router.replicas["a"].in_flight == 0
        router.close()

    run(net, body)


def test_cancel_an_in_flight_request(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = await make_router([a], max_ongoing=1)
        c = call(router, 0)
        req = await a.nth(0)
        c.cancel()
        await until(lambda: a.controls(Cancel), what="Cancel at the replica")
        assert a.controls(Cancel) == [(req.tag, Cancel())]
        conn = router.replicas["a"]
        assert conn.in_flight == 0 and not conn.pending
        req.reply(Ok("too late"))  # a reply after the cancel is ignored
        c2 = call(router, 1)
        (await a.nth(1)).reply(Ok("next"))
        assert await result(c2) == "next"
        router.close()

    run(net, body)


def test_stream_stopped_early_sends_cancel(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = await make_router([a], max_ongoing=1)
        gen = router.stream("g", (), {}, None)
        first = asyncio.ensure_future(gen.__anext__())
        req = await a.nth(0)
        assert type(req.msg) is Stream
        req.reply(Yield(1), Yield(2))
        assert await result(first) == 1
        await gen.aclose()
        await until(lambda: a.controls(Cancel), what="Cancel at the replica")
        assert a.controls(Cancel) == [(req.tag, Cancel())]
        assert router.replicas["a"].in_flight == 0 and not router.replicas["a"].pending
        router.close()

    run(net, body)


def test_stream_items_and_credit(net: Net) -> None:
    n = STREAM_WINDOW * 2 + 5

    def stream(req: Req) -> None:
        req.reply(*(Yield(i) for i in range(n)), End())

    async def body(replica: Any) -> None:
        a = await replica("a", auto=stream)

        async def consume() -> list[Any]:
            return [x async for x in router.stream("g", (), {}, None)]

        router = await make_router([a], max_ongoing=1)
        assert await result(consume()) == list(range(n))
        tag = a.requests[0].tag
        # every half window taken is credited back
        await until(lambda: len(a.controls(Credit)) == n // (STREAM_WINDOW // 2))
        assert all(c == (tag, Credit(STREAM_WINDOW // 2)) for c in a.controls(Credit))
        assert not a.controls(Cancel)
        assert router.replicas["a"].in_flight == 0
        router.close()

    run(net, body)


# ---- replies -----------------------------------------------------------------------------------


def test_error_and_undecodable_replies(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = await make_router([a], max_ongoing=1)
        c = call(router, 0)
        (await a.nth(0)).reply(error_reply(ValueError("boom")))
        with pytest.raises(ValueError, match="boom"):
            await result(c)
        c = call(router, 1)
        (await a.nth(1)).reply(Ok(Unloadable()))
        with pytest.raises(RaySystemError, match="could not be decoded"):
            await result(c)  # fails, does not hang
        assert router.replicas["a"].in_flight == 0
        c = call(router, 2)
        (await a.nth(2)).reply(Yield("not an answer to a call"))
        with pytest.raises(RaySystemError, match="unexpected reply Yield"):
            await result(c)
        c = call(router, 3)
        (await a.nth(3)).reply(Ok("fine"))
        assert await result(c) == "fine"
        router.close()

    run(net, body)


def test_undecodable_stream_item_fails_the_stream(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = await make_router([a], max_ongoing=1)

        async def consume() -> list[Any]:
            return [x async for x in router.stream("g", (), {}, None)]

        c = asyncio.ensure_future(consume())
        req = await a.nth(0)
        req.reply(Yield(1), Yield(Unloadable()), Yield(3))
        with pytest.raises(RaySystemError, match="could not be decoded"):
            await result(c)
        await until(lambda: a.controls(Cancel))
        assert a.controls(Cancel) == [(req.tag, Cancel())]
        router.close()

    run(net, body)


def test_http_whole_and_streaming(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = await make_router([a], max_ongoing=2)
        whole = asyncio.ensure_future(router.http({"type": "http"}, b"body", None))
        (await a.nth(0)).reply(HttpFull(201, [], b"made"))
        assert await result(whole) == HttpFull(201, [], b"made")
        streaming = asyncio.ensure_future(router.http({"type": "http"}, b"", None))
        (await a.nth(1)).reply(HttpStart(200, [(b"a", b"b")]), Chunk(b"1"), Chunk(b"2"), End())
        ch = await result(streaming)
        assert isinstance(ch, Channel) and ch.start == HttpStart(200, [(b"a", b"b")])
        assert [await result(ch.get()) for _ in range(3)] == [Chunk(b"1"), Chunk(b"2"), End()]
        assert not router.replicas["a"].pending
        router.close()

    run(net, body)


def test_streaming_http_holds_its_slot_until_the_stream_ends(net: Net) -> None:
    """As in Ray, a streaming response counts against max_ongoing_requests until it ends."""

    async def body(replica: Any) -> None:
        a = await replica("a")
        router = await make_router([a], max_ongoing=1)
        conn = router.replicas["a"]
        first = asyncio.ensure_future(router.http({"type": "http"}, b"", None))
        (await a.nth(0)).reply(HttpStart(200, []), Chunk(b"1"))
        ch = await result(first)
        assert isinstance(ch, Channel) and conn.in_flight == 1
        second = asyncio.ensure_future(router.http({"type": "http"}, b"", None))
        await asyncio.sleep(0)
        assert len(a.requests) == 1 and not second.done(), "the second waits for the stream's slot"
        (await a.nth(0)).reply(End())
        assert [await result(ch.get()) for _ in range(2)] == [Chunk(b"1"), End()]
        (await a.nth(1)).reply(HttpStart(200, []))
        ch2 = await result(second)
        assert isinstance(ch2, Channel) and conn.in_flight == 1
        ch2.cancel()  # the consumer gives up: the slot comes back too
        assert conn.in_flight == 0
        await until(lambda: a.controls(Cancel), what="the replica told to stop the stream")
        router.close()

    run(net, body)


def test_multiplexed_model_goes_to_the_replica_holding_it(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a", auto=answer_ok)
        b = await replica("b", auto=answer_ok, models=("m1",))
        router = await make_router([a, b], max_ongoing=5)
        meta = {"multiplexed_model_id": "m1"}
        got = await result(asyncio.gather(*(call(router, i, meta) for i in range(5))))
        assert {rid for rid, _ in got} == {"b"}
        # with b full, a request for the model takes any replica with room
        a.auto = b.auto = None
        held = [call(router, i, meta) for i in range(6)]
        await b.nth(9)
        await a.nth(0)
        assert len(b.requests) == 10 and len(a.requests) == 1
        for r in [*a.requests, *b.requests[5:]]:
            r.reply(Ok(r.rep.id))
        assert sorted(await result(asyncio.gather(*held))) == ["a"] + ["b"] * 5
        router.close()

    run(net, body)


# ---- reject-and-retry, drain -------------------------------------------------------------------


def test_rejected_request_is_retried_on_another_replica(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        b = await replica("b", auto=answer_ok)
        router = await make_router([a], max_ongoing=1)
        c = call(router, 0)
        req = await a.nth(0)
        router.update(info([a, b], max_ongoing=1))
        await connected(router)
        # a drains, and rejects what it had not started
        a.drain()
        req.reply(Rejected())
        assert await result(c) == ("b", 0)
        await until(lambda: a.controls(DrainAck), what="DrainAck")
        assert a.controls(DrainAck) == [(0, DrainAck())]
        # the router closes its connection to a once nothing is in flight there
        await until(lambda: a.lost == 1, what="the connection to a to close")
        assert "a" not in router.replicas or router.replicas["a"].retired
        assert await result(call(router, 1)) == ("b", 1)
        router.close()

    run(net, body)


@pytest.mark.parametrize("first", ["task", "direct"])
def test_rejected_request_goes_first_in_line(net: Net, first: str) -> None:
    """Also for a call sent without a task (`call_direct`): its retry is a `call`, first in line."""

    async def body(replica: Any) -> None:
        a, b = await replica("a"), await replica("b")
        router = await make_router([a], max_ongoing=1)
        seen: list[asyncio.Future[Any]] = []
        r0 = call(router, 0) if first == "task" else direct(router, 0, seen)[1]
        at_a = await a.nth(0)
        router.update(info([a, b], max_ongoing=1))
        await connected(router)
        q1 = call(router, 1)
        at_b = await b.nth(0)
        q2 = call(router, 2)
        await until(lambda: len(router.queue) == 1)
        a.drain()
        at_a.reply(Rejected())
        await until(lambda: len(router.queue) == 2, what="the rejected request back in the queue")
        at_b.reply(Ok("q1"))
        assert await result(q1) == "q1"
        (await b.nth(1)).reply(Ok("r0"))
        (await b.nth(2)).reply(Ok("q2"))
        assert b.args() == [1, 0, 2]  # the rejected request went before the one waiting
        assert await result(asyncio.gather(r0, q2)) == ["r0", "q2"]
        assert seen == ([] if first == "task" else [r0])
        router.close()

    run(net, body)


def test_draining_replica_finishes_what_it_started(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        b = await replica("b", auto=answer_ok)
        router = await make_router([a], max_ongoing=3)
        held = [call(router, i) for i in range(2)]
        await a.nth(1)
        router.update(info([a, b], max_ongoing=3))
        await connected(router)
        a.drain()
        await until(lambda: a.controls(DrainAck), what="DrainAck")
        conn_a = router.replicas["a"]
        assert conn_a.retired and conn_a.draining and conn_a not in router.ready
        # new requests go to b only, even with a's slots free
        got = await result(asyncio.gather(*(call(router, i) for i in range(10, 20))))
        assert {rid for rid, _ in got} == {"b"}
        assert len(a.requests) == 2 and a.lost == 0
        # a's requests still complete; then the router lets go of a
        a.requests[0].reply(Ok("a0"))
        assert await result(held[0]) == "a0"
        await settle()
        assert a.lost == 0
        a.requests[1].reply(Ok("a1"))
        assert await result(held[1]) == "a1"
        await until(lambda: a.lost == 1, what="the connection to a to close")
        router.close()

    run(net, body)


def test_drain_of_the_only_replica_waits_for_a_new_one(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = await make_router([a], max_ongoing=1)
        c = call(router, 0)
        req = await a.nth(0)
        a.drain()
        req.reply(Rejected())
        await until(lambda: len(router.queue) == 1, what="the request back in the queue")
        assert len(a.requests) == 1  # not sent to the draining replica again
        b = await replica("b", auto=answer_ok)
        router.update(info([a, b], max_ongoing=1))
        assert await result(c) == ("b", 0)
        router.close()

    run(net, body)


# ---- replica death -----------------------------------------------------------------------------


def test_replica_dies_mid_request(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = await make_router([a], max_ongoing=2)
        started = [call(router, i) for i in range(2)]
        queued = call(router, 2)
        await a.nth(1)
        await until(lambda: len(router.queue) == 1)
        a.kill()
        for c in started:
            with pytest.raises(ActorDiedError, match="died while handling 2 request"):
                await result(c)
        # the request that never left the router does not fail: it waits for a replica
        await settle()
        assert not queued.done() and len(router.queue) == 1
        assert "a" not in router.replicas and not router.ready
        b = await replica("b", auto=answer_ok)
        router.update(info([b], max_ongoing=2))
        assert await result(queued) == ("b", 2)
        assert len(a.requests) == 2
        router.close()

    run(net, body)


def test_a_request_written_to_a_replica_already_gone_goes_to_another(net: Net) -> None:
    """Its write failed (the replica's end was closed before the router heard of it): the request
    never reached it, so it is sent elsewhere instead of failing with ActorDiedError."""
    import socket as socket_module

    async def body(replica: Any) -> None:
        a = await replica("a")
        b = await replica("b")
        router = await make_router([a, b], max_ongoing=1)
        first = call(router, 0)  # takes one replica's only slot
        held = await until_any(a, b)
        gone = b if held is a else a
        # the other replica's end goes away at once, before the router's loop hears of it
        for p in gone.conns:
            raw = socket_module.socket(fileno=p.transport.get_extra_info("socket").fileno())
            raw.shutdown(socket_module.SHUT_RDWR)
            raw.detach()
        second = call(router, 1)  # only the gone one has a free slot: written there, refused
        await settle()
        assert not second.done()  # not failed: waiting for a slot
        held.requests[0].reply(Ok((held.id, 0)))
        assert await result(first) == (held.id, 0)
        req = await held.nth(1)
        req.reply(Ok((held.id, 1)))
        assert await result(second) == (held.id, 1)
        assert gone.requests == []
        router.close()

    run(net, body)


async def until_any(*reps: FakeReplica) -> FakeReplica:
    await until(lambda: any(r.requests for r in reps), what="a request at either replica")
    return next(r for r in reps if r.requests)


def test_stream_fails_when_its_replica_dies(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = await make_router([a], max_ongoing=1)
        gen = router.stream("g", (), {}, None)
        first = asyncio.ensure_future(gen.__anext__())
        (await a.nth(0)).reply(Yield("x"))
        assert await result(first) == "x"
        a.kill()
        with pytest.raises(ActorDiedError):
            await result(gen.__anext__())
        router.close()

    run(net, body)


def test_replica_the_controller_says_died_fails_its_requests_at_once(net: Net) -> None:
    """A replica on a vanished node: its connection stays open, the controller lists it dead."""

    async def body(replica: Any) -> None:
        a = await replica("a")  # never answers, never closes
        b = await replica("b", auto=answer_ok)
        router = await make_router([a], max_ongoing=2)
        on_a = [call(router, i) for i in range(2)]
        await a.nth(1)
        router.update(info([b], max_ongoing=2))  # removed: what runs there may still finish
        await settle()
        assert not any(f.done() for f in on_a) and a.lost == 0
        router.update({**info([b], max_ongoing=2), "dead": ["a"]})
        for f in on_a:
            with pytest.raises(ActorDiedError, match=r"Replica a of deployment .* died while handling 2 request"):
                await result(f)
        await until(lambda: a.lost == 1)
        assert not router.retiring
        assert await result(call(router, 9)) == ("b", 9)
        router.update({**info([b], max_ongoing=2), "dead": ["a"]})  # told again: nothing to do
        router.close()

    run(net, body)


def test_replica_removed_and_dead_in_one_update(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        b = await replica("b", auto=answer_ok)
        router = await make_router([a], max_ongoing=1)
        on_a = call(router, 0)
        await a.nth(0)
        router.update({**info([b], max_ongoing=1), "dead": ["a"]})
        with pytest.raises(ActorDiedError):
            await result(on_a)
        assert await result(call(router, 1)) == ("b", 1)
        await until(lambda: a.lost == 1)
        router.close()

    run(net, body)


def test_unreachable_replica_is_dropped(net: Net) -> None:
    async def body(replica: Any) -> None:
        b = await replica("b", auto=answer_ok)
        ghost = FakeReplica("ghost", net.sock("ghost"))  # never started: nothing listens
        router = await make_router([ghost, b], max_ongoing=1)
        assert list(router.replicas) == ["b"]
        assert await result(asyncio.gather(*(call(router, i) for i in range(4)))) == [("b", i) for i in range(4)]
        router.close()

    run(net, body)


# ---- updates ------------------------------------------------------------------------------------


def test_update_adds_and_removes_replicas(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        b = await replica("b")
        router = await make_router([a], max_ongoing=1)
        on_a = call(router, 0)
        await a.nth(0)
        router.update(info([a, b], max_ongoing=1))
        await connected(router)
        assert sorted(c.id for c in router.ready) == ["a", "b"]
        on_b = call(router, 1)  # a is full: b takes it
        await b.nth(0)
        assert b.args() == [1]
        # a is removed while its request runs: the request still completes
        router.update(info([b], max_ongoing=1))
        assert list(router.replicas) == ["b"] and [c.id for c in router.ready] == ["b"]
        b.auto = answer_ok
        b.requests[0].reply(Ok(("b", 1)))
        assert await result(on_b) == ("b", 1)
        got = await result(asyncio.gather(*(call(router, i) for i in range(2, 6))))
        assert got == [("b", i) for i in range(2, 6)]
        assert len(a.requests) == 1 and a.lost == 0
        a.requests[0].reply(Ok("a done"))
        assert await result(on_a) == "a done"
        await until(lambda: a.lost == 1, what="the removed replica's connection to close")
        # an update that lists the same replicas again changes nothing
        conn_b = router.replicas["b"]
        router.update(info([b], max_ongoing=1))
        assert router.replicas["b"] is conn_b
        router.close()

    run(net, body)


def test_removed_idle_replica_is_closed_at_once(net: Net) -> None:
    async def body(replica: Any) -> None:
        a, b = await replica("a"), await replica("b")
        router = await make_router([a, b])
        router.update(info([b]))
        await until(lambda: a.lost == 1)
        assert list(router.replicas) == ["b"]
        router.close()
        await until(lambda: b.lost == 1)

    run(net, body)


def test_update_raises_max_ongoing_and_dispatches(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = await make_router([a], max_ongoing=1)
        calls = [call(router, i) for i in range(3)]
        await a.nth(0)
        await until(lambda: len(router.queue) == 2)
        router.update(info([a], max_ongoing=3))
        await a.nth(2)  # the queue went out at once
        assert not router.queue
        for r in a.requests:
            r.reply(Ok(r.arg))
        assert await result(asyncio.gather(*calls)) == [0, 1, 2]
        router.close()

    run(net, body)


def test_call_message_shape(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a", auto=answer_ok)
        router = await make_router([a])
        meta = {"request_id": "x"}
        await result(router.call("m", (1, 2), {"k": 3}, meta))
        assert a.requests[0].msg == Call("m", (1, 2), {"k": 3}, meta)
        router.close()

    run(net, body)


def test_replica_draining_when_the_router_connects(net: Net) -> None:
    """A replica that says `Drain` as soon as the router connects (it began draining before
    the router heard of it) gets nothing, and a request waiting for it keeps waiting."""

    async def body(replica: Any) -> None:
        d = await replica("d")
        d.draining = True  # still listening, but answers every new connection with Drain
        router = Router(DeploymentID("d", "app"), cold_start_timeout_s=2.0)
        router.update(info([]))
        waiting = call(router, 0)
        await settle()
        router.update(info([d], max_ongoing=1))
        await connected(router)
        await until(lambda: d.controls(DrainAck), what="DrainAck")
        await until(lambda: d.lost == 1, what="the connection to d to close")
        await settle()
        assert not waiting.done() and len(router.queue) == 1
        assert d.requests == [] and not router.ready
        b = await replica("b", auto=answer_ok)
        router.update(info([b], max_ongoing=1))
        assert await result(waiting) == ("b", 0)
        assert d.requests == []
        router.close()

    run(net, body)


def test_finished_calls_reach_the_ring_and_queue_histogram_in_a_batch(net: Net) -> None:
    """A call's trace event and router_queue figure are kept, not made, on the request path:
    `fold_calls` (FOLD_S after the first of a batch, or a trace lookup) makes them; a
    parent's downstream time is added at once; `http(..., traced=False)` keeps nothing."""
    async def body(replica: Any) -> None:
        a = await replica("a", auto=lambda r: r.reply(HttpFull(200, [], b"")) if isinstance(r.msg, Http) else answer_ok(r))
        router = await make_router([a])
        hist = router._queue_hist
        n = random.getrandbits(48)  # ids of this run (the ring is the process's)
        before = hist[2]
        parent: dict[str, Any] = {}
        assert await result(router.call("m", (1,), {}, {"request_id": f"fold-call-1-{n}"}, parent)) == ("a", 1)
        assert parent[trace.DOWNSTREAM_KEY] > 0
        assert trace.RING.find(f"fold-call-1-{n}") == [] and hist[2] == before
        router.fold_calls()
        [e] = trace.RING.find(f"fold-call-1-{n}")
        assert e[1:4] == ["call", "app", "d"] and e[5] > 0 and abs(e[6] - time.time()) < 5
        assert hist[2] == before + 1
        assert await result(router.call("m", (2,), {}, {"request_id": f"fold-call-2-{n}"})) == ("a", 2)
        deadline = time.monotonic() + 5 * trace.FOLD_S + 2
        while not trace.RING.find(f"fold-call-2-{n}"):  # folded by its timer
            assert time.monotonic() < deadline, "never folded"
            await asyncio.sleep(0.01)
        http = asyncio.ensure_future(router.http({"type": "http"}, b"", {"request_id": f"fold-http-{n}"}, False))
        assert await result(http) == HttpFull(200, [], b"")
        router.fold_calls()
        assert trace.RING.find(f"fold-http-{n}") == [] and hist[2] == before + 2
        router.close()

    run(net, body)


# ---- sending ahead: a replica at its limit may hold a few more in its own queue ----------------


def ahead(router: Router, n: int) -> Router:
    """Pin how many requests past max_ongoing_requests each replica may hold (as the router's
    throughput would set it)."""
    router._ahead_n, router._ahead_t = n, float("inf")
    return router


@pytest.mark.parametrize(
    ("rate", "replicas", "queue_s", "want"),
    [
        (0.0, 1, 0.005, 0),  # no throughput known yet: Ray's strict rule
        (150.0, 1, 0.005, 0),  # slow requests: less than one request of work in 5 ms
        (1000.0, 1, 0.005, 5),
        (20000.0, 1, 0.005, 32),  # capped
        (4000.0, 4, 0.005, 5),  # the rate is shared between the replicas
        (20000.0, 1, 0.0, 0),  # FLOTILLA_REPLICA_QUEUE_MS=0: off
    ],
)
def test_how_far_ahead_follows_the_throughput(rate: float, replicas: int, queue_s: float, want: int) -> None:
    assert ahead_for(rate, replicas, queue_s) == want


def test_pick_sends_ahead_only_when_every_replica_is_at_its_limit() -> None:
    random.seed(5)
    assert set(picks(ahead(loads_router([2, 1], 2), 3))) == {"r1"}  # room first
    assert set(picks(ahead(loads_router([2, 3], 2), 3))) == {"r0"}  # then the least loaded
    assert set(picks(ahead(loads_router([5, 5], 2), 3))) == {None}  # each holds its 3 extra
    assert set(picks(ahead(loads_router([2, 2], 2), 0))) == {None}  # nothing ahead: strict


def test_requests_sent_ahead_wait_in_the_replica_and_count_as_queued(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = ahead(await make_router([a], max_ongoing=1), 2)
        calls = [call(router, i) for i in range(5)]
        await a.nth(2)
        await until(lambda: len(router.queue) == 2, what="2 queued in the router")
        assert a.args() == [0, 1, 2]  # one in its slot, two ahead; the rest wait here
        assert router.ready[0].in_flight == 3 and router.queued() == 4
        for i in range(5):
            (await a.nth(i)).reply(Ok(i))
            assert await result(calls[i]) == i
        assert a.args() == [0, 1, 2, 3, 4]  # FIFO: the queue's head went ahead as slots freed
        router.close()

    run(net, body)


def test_max_queued_requests_counts_what_was_sent_ahead(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = ahead(await make_router([a], max_ongoing=1, max_queued=2), 5)
        calls = [call(router, i) for i in range(3)]
        await a.nth(2)
        assert router.queued() == 2 and not router.queue
        with pytest.raises(BackPressureError) as info_:
            await result(call(router, 3))
        assert info_.value.num_queued_requests == 2
        for i in range(3):
            (await a.nth(i)).reply(Ok(i))
        assert await result(asyncio.gather(*calls)) == [0, 1, 2]
        router.close()

    run(net, body)


def test_a_draining_replica_is_not_sent_ahead() -> None:
    router = ahead(loads_router([2], 2), 3)
    router.ready[0].draining = True
    assert router._pick() is None


def test_a_websocket_session_is_never_sent_ahead(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = ahead(await make_router([a], max_ongoing=1), 3)
        first = await result(router.acquire())
        session = asyncio.ensure_future(router.acquire("", False, False))  # as `websocket` asks
        await settle()
        assert not session.done() and len(router.queue) == 1
        router.release(first)  # a real slot: the session takes it
        assert await result(session) is first and first.in_flight == 1
        router.close()

    run(net, body)


def test_sending_ahead_stops_within_a_tenth_of_a_second_once_requests_stop_finishing() -> None:
    router = loads_router([2], 2)
    t = 1000.0
    router._ahead_t = t
    router._finished = 2000  # 20k requests/s finished over the last 0.1 s
    assert router._ahead(t + 0.1) == 32
    assert router._ahead(t + 0.15) == 32  # worked out at most every 0.1 s
    router._finished += 30  # then they slow down: 300/s, 1.5 requests per 5 ms
    assert router._ahead(t + 0.21) == 1
    assert router._ahead(t + 0.32) == 0  # and block: none finished in the last 0.1 s


# ---- direct calls: sent at once for a caller blocked on another thread -------------------------


def direct(router: Router, arg: Any, seen: list[asyncio.Future[Any]]) -> tuple[Any, asyncio.Future[Any]]:
    """`Router.call_direct` as `DeploymentResponse._start_direct` makes it; `seen` collects
    each `on_done`."""
    out = asyncio.get_running_loop().create_future()
    return router.call_direct("m", (arg,), {}, {"request_id": f"r{arg}"}, out, seen.append), out


def test_a_direct_call_settles_as_its_reply_arrives_with_no_turn_of_the_loop(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = await make_router([a], max_ongoing=1)
        seen: list[asyncio.Future[Any]] = []
        d, out = direct(router, 7, seen)
        assert d is not None
        req = await a.nth(0)
        assert req.msg.meta == {"request_id": "r7"}
        conn = router.replicas["a"]
        assert conn.in_flight == 1 and conn.pending == {req.tag: d}
        settled: list[bool] = []
        conn.proto.on_message = lambda tag, msg: (conn._on_message(tag, msg), settled.append(out.done()))
        req.reply(Ok("seven"))
        await until(lambda: seen, what="on_done")
        assert settled == [True]  # in the same callback that delivered the reply
        assert seen == [out] and out.result() == "seven"
        assert conn.in_flight == 0 and not conn.pending
        router.close()

    run(net, body)


def test_a_direct_call_is_not_made_when_it_would_wait(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = await make_router([a], max_ongoing=1)
        seen: list[asyncio.Future[Any]] = []
        first, _ = direct(router, 0, seen)
        assert first is not None
        assert direct(router, 1, seen)[0] is None  # the only replica is full: nothing sent
        queued = call(router, 2)
        await until(lambda: len(router.queue) == 1)
        req = await a.nth(0)
        req.reply(Ok(0))
        assert direct(router, 3, seen)[0] is None  # one waits already: it would jump the queue
        (await a.nth(1)).reply(Ok(2))
        assert await result(queued) == 2 and a.args() == [0, 2]
        empty = Router(DeploymentID("e", "app"))
        assert direct(empty, 4, seen)[0] is None  # no replica known yet
        router.close()

    run(net, body)


def test_a_direct_call_that_cannot_be_sent_frees_its_slot_and_raises(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = await make_router([a], max_ongoing=1)
        out = asyncio.get_running_loop().create_future()
        with pytest.raises(Exception, match="pickle"):
            router.call_direct("m", (threading.Lock(),), {}, None, out, lambda f: None)
        assert router.replicas["a"].in_flight == 0 and not a.requests
        router.close()

    run(net, body)


def test_a_direct_call_carries_errors_and_a_replica_death(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = await make_router([a], max_ongoing=2)
        seen: list[asyncio.Future[Any]] = []
        _, failing = direct(router, 0, seen)
        _, dying = direct(router, 1, seen)
        (await a.nth(0)).reply(error_reply(ValueError("bad input")))
        await until(lambda: len(seen) == 1, what="the error")
        with pytest.raises(ValueError, match="bad input"):
            failing.result()
        await a.nth(1)
        a.kill()
        await until(lambda: len(seen) == 2, what="the death")
        with pytest.raises(ActorDiedError):
            dying.result()
        router.close()

    run(net, body)


def test_a_cancelled_direct_call_is_cancelled_at_its_replica(net: Net) -> None:
    async def body(replica: Any) -> None:
        a = await replica("a")
        router = await make_router([a], max_ongoing=1)
        seen: list[asyncio.Future[Any]] = []
        d, out = direct(router, 0, seen)
        req = await a.nth(0)
        d.cancel()
        assert out.cancelled() and seen == [out]
        await until(lambda: a.controls(Cancel), what="Cancel at the replica")
        assert a.controls(Cancel) == [(req.tag, Cancel())]
        conn = router.replicas["a"]
        assert conn.in_flight == 0 and not conn.pending
        req.reply(Ok("too late"))  # ignored
        d.cancel()  # twice: nothing more
        later = call(router, 1)
        (await a.nth(1)).reply(Ok("next"))
        assert await result(later) == "next" and seen == [out]
        router.close()

    run(net, body)


def test_a_rejected_direct_call_is_cancelled_where_it_waits_again(net: Net) -> None:
    async def body(replica: Any) -> None:
        a, b = await replica("a"), await replica("b")
        router = await make_router([b], max_ongoing=1)
        busy = call(router, 1)
        at_b = await b.nth(0)
        router.update(info([a, b], max_ongoing=1))
        await connected(router)
        seen: list[asyncio.Future[Any]] = []
        d, out = direct(router, 0, seen)  # a is the only replica with room
        at_a = await a.nth(0)
        a.drain()
        at_a.reply(Rejected())
        await until(lambda: d.retry is not None and len(router.queue) == 1, what="the retry in the queue")
        d.cancel()
        await until(lambda: seen, what="the cancelled retry")
        assert out.cancelled() and not router.queue and seen == [out]
        at_b.reply(Ok("busy"))
        assert await result(busy) == "busy" and b.args() == [1]  # the cancelled call never reached b
        router.close()

    run(net, body)
