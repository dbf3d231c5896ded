"""Admission limits: `max_ongoing_requests` in the replica (`Replica._acquire/_release`) and
in the router (its per-replica in-flight limit), and the stream credit window (`_Window`).

The replica is the real `Replica` class, run in this process: its data-plane server on a
Unix socket, user code set directly (no head, no zygote), and a real `Router` in front of
it. The user code is async, so it runs on the test's event loop and can be gated with
events, which makes every step deterministic.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from flotilla._private.protocol import STREAM_WINDOW
from flotilla._private.replica import Replica, _Window
from flotilla._private.router import Router
from flotilla.serve.schema import DeploymentID
from tests.unit.aio import Net, settle, until

pytestmark = pytest.mark.timeout(10)


class Recorder:
    """User code that records how many of its calls run at once; each waits for its gate."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.started: list[int] = []
        self.finished: list[int] = []
        self.cancelled: list[int] = []
        self.gates: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self.produced = 0

    async def work(self, i: int) -> tuple[int, int]:
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.started.append(i)
        try:
            await self.gates[i].wait()
        except asyncio.CancelledError:
            self.cancelled.append(i)
            raise
        finally:
            self.running -= 1
        self.finished.append(i)
        return i, id(self)

    async def gen(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            self.produced = i + 1
            yield i


class Env:
    def __init__(self, net: Net) -> None:
        self.net = net
        self.replicas: list[Replica] = []
        self.routers: list[Router] = []

    async def replica(self, name: str, max_ongoing: int) -> tuple[Replica, Recorder]:
        rep = Replica({"replica_id": name, "deployment": "d", "app": "a"})
        rep.obj = Recorder()
        rep.max_ongoing = max_ongoing
        rep.metrics = False
        rep.args["sock_path"] = self.net.sock(name)
        rep.server = await asyncio.get_running_loop().create_unix_server(rep._make_conn, rep.args["sock_path"])
        self.replicas.append(rep)
        return rep, rep.obj

    async def router(self, reps: list[Replica], max_ongoing: int, max_queued: int = -1) -> Router:
        router = Router(DeploymentID("d", "a"), cold_start_timeout_s=2.0)
        self.routers.append(router)
        await self.update(router, reps, max_ongoing, max_queued)
        return router

    async def update(self, router: Router, reps: list[Replica], max_ongoing: int, max_queued: int = -1) -> None:
        router.update({
            "exists": True,
            "max_ongoing_requests": max_ongoing,
            "max_queued_requests": max_queued,
            "replicas": [(r.replica_id, r.args["sock_path"], ()) for r in reps],
        })
        tasks = [c.connecting for c in router.replicas.values() if c.connecting is not None]
        await asyncio.wait_for(asyncio.gather(*tasks), 1)

    def close(self) -> None:
        for router in self.routers:
            router.close()
        for rep in self.replicas:
            if rep.server is not None:
                rep.server.close()
            if rep.pool is not None:
                rep.pool.shutdown(wait=False)
            rep.health_pool.shutdown(wait=False)


def run(net: Net, body: Callable[[Env], Awaitable[None]]) -> None:
    async def main() -> None:
        env = Env(net)
        try:
            await body(env)
        finally:
            env.close()

    net.run(main())


def work(router: Router, i: int) -> asyncio.Future[Any]:
    return asyncio.ensure_future(router.call("work", (i,), {}, None))


async def result(fut: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(fut, 1)


# ---- the replica's limit -------------------------------------------------------------------


def test_replica_runs_at_most_max_ongoing_requests(net: Net) -> None:
    async def body(env: Env) -> None:
        rep, obj = await env.replica("r", max_ongoing=2)
        router = await env.router([rep], max_ongoing=10)  # the router lets all through
        calls = [work(router, i) for i in range(5)]
        await until(lambda: len(rep.waiters) == 3, what="3 waiting in the replica")
        await settle()
        assert obj.started == [0, 1] and obj.running == 2 and rep.ongoing == 2
        # a finished request hands its slot to the first in line
        obj.gates[0].set()
        assert await result(calls[0]) == (0, id(obj))
        await until(lambda: len(obj.started) == 3)
        assert obj.started == [0, 1, 2] and rep.ongoing == 2 and len(rep.waiters) == 2
        # out of order: any release starts the next in arrival order
        obj.gates[2].set()
        await result(calls[2])
        await until(lambda: len(obj.started) == 4)
        assert obj.started == [0, 1, 2, 3]
        for i in (1, 3, 4):
            obj.gates[i].set()
        await result(asyncio.gather(*calls))
        assert obj.started == [0, 1, 2, 3, 4] and obj.peak == 2
        assert rep.ongoing == 0 and not rep.waiters and not rep.tasks

    run(net, body)


def test_replica_limit_holds_across_routers(net: Net) -> None:
    async def body(env: Env) -> None:
        rep, obj = await env.replica("r", max_ongoing=3)
        routers = [await env.router([rep], max_ongoing=3) for _ in range(3)]
        calls = [work(routers[i % 3], i) for i in range(9)]
        await until(lambda: len(rep.waiters) == 6, what="6 waiting in the replica")
        assert obj.running == 3
        for i in range(9):
            obj.gates[i].set()
        await result(asyncio.gather(*calls))
        assert obj.peak == 3 and sorted(obj.started) == list(range(9))
        assert rep.ongoing == 0

    run(net, body)


def test_router_limits_what_it_sends_to_one_replica(net: Net) -> None:
    async def body(env: Env) -> None:
        rep, obj = await env.replica("r", max_ongoing=10)
        router = await env.router([rep], max_ongoing=2)
        calls = [work(router, i) for i in range(5)]
        await until(lambda: obj.running == 2)
        await until(lambda: len(router.queue) == 3)
        await settle()
        assert obj.started == [0, 1] and not rep.waiters and rep.ongoing == 2
        assert router.replicas["r"].in_flight == 2
        obj.gates[1].set()
        await result(calls[1])
        await until(lambda: len(obj.started) == 3)
        assert obj.started == [0, 1, 2] and len(router.queue) == 2
        for i in range(5):
            obj.gates[i].set()
        await result(asyncio.gather(*calls))
        assert obj.peak == 2 and obj.started == [0, 1, 2, 3, 4]
        assert router.replicas["r"].in_flight == 0

    run(net, body)


def test_cancel_a_request_waiting_in_the_replica(net: Net) -> None:
    async def body(env: Env) -> None:
        rep, obj = await env.replica("r", max_ongoing=1)
        router = await env.router([rep], max_ongoing=10)
        first, waiting = work(router, 0), work(router, 1)
        await until(lambda: len(rep.waiters) == 1)
        waiting.cancel()
        await until(lambda: not rep.waiters and len(rep.tasks) == 1, what="the waiter to go")
        assert rep.ongoing == 1
        obj.gates[0].set()
        await result(first)
        await until(lambda: rep.ongoing == 0)
        obj.gates[2].set()
        assert await result(work(router, 2)) == (2, id(obj))
        assert obj.started == [0, 2]  # the cancelled one never ran

    run(net, body)


def test_cancel_a_running_request_frees_its_slot(net: Net) -> None:
    async def body(env: Env) -> None:
        rep, obj = await env.replica("r", max_ongoing=1)
        router = await env.router([rep], max_ongoing=10)
        running, waiting = work(router, 0), work(router, 1)
        await until(lambda: len(rep.waiters) == 1)
        running.cancel()
        await until(lambda: obj.started == [0, 1], what="the waiting request to start")
        assert obj.cancelled == [0] and rep.ongoing == 1 and not rep.waiters
        obj.gates[1].set()
        assert await result(waiting) == (1, id(obj))
        await until(lambda: rep.ongoing == 0)
        assert obj.peak == 1

    run(net, body)


def test_limit_raised_in_place_starts_waiting_requests(net: Net) -> None:
    async def body(env: Env) -> None:
        rep, obj = await env.replica("r", max_ongoing=1)
        router = await env.router([rep], max_ongoing=10)
        calls = [work(router, i) for i in range(4)]
        await until(lambda: len(rep.waiters) == 3)
        await rep._update_config({"max_ongoing_requests": 3})
        await until(lambda: obj.running == 3)
        assert obj.started == [0, 1, 2] and len(rep.waiters) == 1 and rep.ongoing == 3
        obj.gates[0].set()
        await result(calls[0])
        await until(lambda: len(obj.started) == 4)
        assert obj.running == 3
        for i in range(4):
            obj.gates[i].set()
        await result(asyncio.gather(*calls))
        assert obj.peak == 3 and rep.ongoing == 0

    run(net, body)


def test_limit_lowered_in_place_holds_new_requests(net: Net) -> None:
    async def body(env: Env) -> None:
        rep, obj = await env.replica("r", max_ongoing=3)
        router = await env.router([rep], max_ongoing=10)
        calls = [work(router, i) for i in range(4)]
        await until(lambda: len(rep.waiters) == 1)
        await rep._update_config({"max_ongoing_requests": 2})
        # nothing running is stopped, but nothing starts until fewer than 2 run
        obj.gates[0].set()
        await result(calls[0])
        await settle()
        try:
            assert obj.running == 2 and obj.started == [0, 1, 2] and len(rep.waiters) == 1
        finally:
            for i in range(4):
                obj.gates[i].set()
            await result(asyncio.gather(*calls))

    run(net, body)


def test_drain_rejects_waiting_requests_and_they_run_elsewhere(net: Net) -> None:
    async def body(env: Env) -> None:
        a, obj_a = await env.replica("a", max_ongoing=1)
        b, obj_b = await env.replica("b", max_ongoing=1)
        router = await env.router([a], max_ongoing=5)
        running, waiting = work(router, 0), work(router, 1)
        await until(lambda: len(a.waiters) == 1)
        await env.update(router, [a, b], max_ongoing=5)
        drain = asyncio.ensure_future(a._drain(0.05, 2.0))
        # the request waiting in a was never started: rejected there, retried on b
        await until(lambda: obj_b.started == [1], what="the rejected request to run on b")
        obj_b.gates[1].set()
        assert await result(waiting) == (1, id(obj_b))
        # what runs in a finishes, then a's drain ends
        assert not drain.done()
        obj_a.gates[0].set()
        assert await result(running) == (0, id(obj_a))
        await result(drain)
        assert obj_a.started == [0] and a.ongoing == 0
        assert all(p in a.acked for p in a.conns)
        # new requests go to b only
        obj_b.gates[2].set()
        assert await result(work(router, 2)) == (2, id(obj_b))

    run(net, body)


def test_connection_made_while_draining_is_told_to_drain(net: Net) -> None:
    async def body(env: Env) -> None:
        rep, _ = await env.replica("r", max_ongoing=1)
        rep.draining = True  # as if accepted just before the listener closed
        router = await env.router([rep], max_ongoing=1)
        conn = next(iter(router.replicas.values()), None)
        await until(lambda: conn is None or conn.draining, timeout=0.3, what="Drain at the router")

    run(net, body)


# ---- stream credit ----------------------------------------------------------------------------


def test_window_blocks_without_credit_and_resumes_on_credit() -> None:
    async def main() -> None:
        w = _Window()
        for _ in range(STREAM_WINDOW):
            await asyncio.wait_for(w.take(), 1)  # within the window: no wait
        assert w.avail == 0
        t = asyncio.ensure_future(w.take())
        await settle()
        assert not t.done()
        w.give(1)
        await asyncio.wait_for(t, 1)
        assert w.avail == 0
        w.give(3)
        for _ in range(3):
            await asyncio.wait_for(w.take(), 1)
        t = asyncio.ensure_future(w.take())
        await settle()
        assert not t.done()
        w.give(2)  # more than one waiter needs: the rest stays
        await asyncio.wait_for(t, 1)
        assert w.avail == 1

    asyncio.run(main())


def test_stream_waits_for_the_consumer(net: Net) -> None:
    n = STREAM_WINDOW * 3

    async def body(env: Env) -> None:
        rep, obj = await env.replica("r", max_ongoing=1)
        router = await env.router([rep], max_ongoing=1)
        gen = router.stream("gen", (n,), {}, None)
        assert await result(gen.__anext__()) == 0
        await until(lambda: rep.windows and next(iter(rep.windows.values())).avail == 0, what="no credit left")
        await settle()
        # a window's worth sent; the next item is made and waits for credit
        assert obj.produced == STREAM_WINDOW + 1
        window = next(iter(rep.windows.values()))
        half = STREAM_WINDOW // 2
        for i in range(1, half - 1):
            assert await result(gen.__anext__()) == i
        await settle()
        assert obj.produced == STREAM_WINDOW + 1  # under half a window taken: no credit yet
        assert await result(gen.__anext__()) == half - 1  # half a window taken: credit
        await until(lambda: obj.produced == STREAM_WINDOW + half + 1, what="more items")
        await until(lambda: window.avail == 0)
        await settle()
        assert obj.produced == STREAM_WINDOW + half + 1
        rest = [x async for x in gen]
        assert rest == list(range(half, n))
        assert obj.produced == n
        await until(lambda: rep.ongoing == 0 and not rep.windows)

    run(net, body)
