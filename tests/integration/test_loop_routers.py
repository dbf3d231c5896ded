"""Handle calls made on a caller's own event loop run there, through that loop's router
(looprouter.py): no thread hop. What that must not break: loops that stop or close (replicas
waiting for their DrainAck), `result()` on the loop, scale from zero, and serve.shutdown."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any

import pytest

from flotilla import serve
from flotilla._private import looprouter
from flotilla._private.client import Runtime
from flotilla.serve.exceptions import BackPressureError, RequestCancelledError
from flotilla.serve.schema import DeploymentID
from tests.conftest import wait_for

pytestmark = pytest.mark.slow


@serve.deployment(graceful_shutdown_timeout_s=30, max_ongoing_requests=100)
class Version:
    def __init__(self, v: str = "v1") -> None:
        self.v = v
        self.cancelled: list[str] = []

    async def get(self) -> str:
        return self.v

    async def slow(self, s: float, key: str = "") -> str:
        try:
            await asyncio.sleep(s)
        except asyncio.CancelledError:
            self.cancelled.append(key)
            raise
        return "slow"

    def seen_cancelled(self) -> list[str]:
        return self.cancelled


def _followers(app: str, name: str = "Version") -> list[looprouter.Follower]:
    dep = DeploymentID(name, app)
    return [f for f in Runtime.get_or_start().loop_routers.all() if f.deployment_id == dep]


def test_calls_on_a_driver_loop_go_through_that_loops_router(url: str) -> None:
    h = serve.run(Version.bind(), name="onloop", route_prefix=None)

    async def main() -> tuple[list[str], bool]:
        got = [await h.get.remote() for _ in range(20)]
        got += await asyncio.gather(*(h.get.remote() for _ in range(50)))
        loop = asyncio.get_running_loop()
        return got, any(f.home is loop and f.replicas for f in _followers("onloop"))

    got, here = asyncio.run(main())
    assert got == ["v1"] * 70 and here
    # the loop is closed now: its follower is cut off and forgotten
    wait_for(lambda: not _followers("onloop"), 10, what="the closed loop's router forgotten")


def test_a_driver_loop_is_polled_for_fast_replies_only(url: str) -> None:
    h = serve.run(Version.bind(), name="polled", route_prefix=None)

    async def main() -> tuple[int, int, int, bool]:
        await h.get.remote()
        f = next(f for f in _followers("polled") if f.home is asyncio.get_running_loop())
        if f.wait.max_s == 0:
            return -1, 0, 0, False
        polled = f.polled
        assert [await h.get.remote() for _ in range(200)] == ["v1"] * 200
        fast = f.polled - polled
        for _ in range(10):  # 20 ms calls: the usual wait passes the limit, polling stops
            assert await h.slow.remote(0.02) == "slow"
        polled = f.polled
        for _ in range(5):
            assert await h.slow.remote(0.02) == "slow"
        return fast, f.polled - polled, f._open, f._polling

    fast, slow, still_open, polling = asyncio.run(main())
    if fast == -1:
        pytest.skip("this process may use one CPU only: nothing is polled there")
    assert fast > 100 and slow == 0 and still_open == 0 and not polling  # (a hiccup may skip a few)


def test_a_closed_driver_loop_does_not_hold_up_a_redeploy(url: str) -> None:
    """A replica drains only once every connection acked: one from a loop that is gone must
    not make it wait for graceful_shutdown_timeout_s (30 s here)."""
    h = serve.run(Version.bind(), name="closed", route_prefix=None)

    async def main() -> str:
        return await h.get.remote()

    assert asyncio.run(main()) == "v1"
    t0 = time.monotonic()
    serve.run(Version.bind("v2"), name="closed", route_prefix=None)
    assert h.get.remote().result(timeout_s=10) == "v2"
    serve.delete("closed")
    assert time.monotonic() - t0 < 10


def test_a_stopped_loop_parks_its_connections_and_resumes(url: str) -> None:
    h = serve.run(Version.bind(), name="parked", route_prefix=None)
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(_get(h)) == "v1"
        wait_for(lambda: any(f.parked for f in _followers("parked")), 10, what="the stopped loop's router parked")
        serve.run(Version.bind("v2"), name="parked", route_prefix=None)
        wait_for(lambda: serve.status().applications["parked"].deployments["Version"].replica_states == {"RUNNING": 1},
                 10, what="v1 drained (no DrainAck owed by the parked loop)")
        assert loop.run_until_complete(_get(h)) == "v2"  # the same loop again: connects anew
        assert not any(f.parked for f in _followers("parked"))
    finally:
        loop.close()


async def _get(h: serve.DeploymentHandle) -> str:
    return await h.get.remote()  # type: ignore[no-any-return]


def test_result_on_the_loop_that_made_the_call(url: str) -> None:
    h = serve.run(Version.bind(), name="blocking", route_prefix=None)

    async def main() -> None:
        assert h.get.remote().result(timeout_s=10) == "v1"  # not started here yet: runs elsewhere
        r = h.slow.remote(2.0)

        async def block() -> None:
            await asyncio.sleep(0.1)  # r runs in main's task on this loop: blocking it would deadlock
            with pytest.raises(RuntimeError, match=r"should not be called from within an `asyncio` event loop\. Use `await response` instead"):
                r.result(timeout_s=10)

        t = asyncio.create_task(block())
        assert await r == "slow"
        await t
        r2 = h.slow.remote(0.2)
        await asyncio.sleep(0)  # not awaited at once: it went to flotilla's loop, so waiting blocks, no more
        assert r2.result(timeout_s=10, _skip_asyncio_check=True) == "slow"  # Ray's keyword, accepted

    asyncio.run(main())


def test_fire_and_forget_from_a_loop_that_ends_still_runs(url: str) -> None:
    h = serve.run(Version.bind(), name="forget", route_prefix=None)

    async def main() -> list[serve.DeploymentResponse]:
        return [h.get.remote() for _ in range(5)]  # the loop ends before they start

    assert [r.result(timeout_s=10) for r in asyncio.run(main())] == ["v1"] * 5


def test_a_call_sent_before_its_loop_ends_still_finishes(url: str) -> None:
    """As in Ray, a call outlives the loop it was made on: one not awaited at once runs on
    flotilla's loop, so asyncio.run ending does not cancel it in the replica."""
    h = serve.run(Version.bind(), name="outlives", route_prefix=None)

    async def main() -> serve.DeploymentResponse:
        r = h.slow.remote(0.3, "left")
        await asyncio.sleep(0.1)  # sent and running in the replica when the loop ends
        return r

    assert asyncio.run(main()).result(timeout_s=10) == "slow"
    assert h.seen_cancelled.remote().result(timeout_s=10) == []


@serve.deployment(
    autoscaling_config={"min_replicas": 0, "max_replicas": 1, "upscale_delay_s": 0, "metrics_interval_s": 0.1},
)
class Lazy:
    async def __call__(self) -> str:
        return "up"


def test_a_call_on_a_driver_loop_scales_a_deployment_up_from_zero(url: str) -> None:
    h = serve.run(Lazy.bind(), name="zero-loop", route_prefix=None)
    wait_for(lambda: serve.status().applications["zero-loop"].deployments["Lazy"].replica_states == {}, 20,
             what="no replica")

    async def main() -> str:
        return await asyncio.wait_for(_call(h), 30)  # type: ignore[no-any-return]

    assert asyncio.run(main()) == "up"


async def _call(h: serve.DeploymentHandle) -> object:
    return await h.remote()


def test_a_loop_in_another_thread_keeps_calling_across_a_redeploy(url: str) -> None:
    h = serve.run(Version.bind(), name="thread-loop", route_prefix=None)
    seen: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    async def caller() -> None:
        while not stop.is_set():
            try:
                seen.append(await h.get.remote())
            except BaseException as e:
                errors.append(e)
                return

    t = threading.Thread(target=lambda: asyncio.run(caller()))
    t.start()
    try:
        wait_for(lambda: len(seen) > 20, 20, what="calls from the thread's loop")
        serve.run(Version.bind("v2"), name="thread-loop", route_prefix=None)
        wait_for(lambda: seen[-1] == "v2", 20, what="calls reach the new version")
    finally:
        stop.set()
        t.join(20)
    assert not t.is_alive() and errors == []


def test_cancel_while_it_is_awaited_on_its_loop(url: str) -> None:
    """Awaited where it was made, the call runs in the awaiting task: cancel() reaches the
    replica, the awaiter gets RequestCancelledError and goes on (its task not left cancelled)."""
    h = serve.run(Version.bind(), name="inline-cancel", route_prefix=None)

    async def main() -> None:
        r = h.slow.remote(30, "awaited")

        async def cancel_soon() -> None:
            await asyncio.sleep(0.2)
            r.cancel()

        c = asyncio.create_task(cancel_soon())
        with pytest.raises(RequestCancelledError):
            await r
        await c
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        assert r.cancelled()
        with pytest.raises(RequestCancelledError):
            await r  # awaited again
        assert await h.get.remote() == "v1"

    asyncio.run(main())
    wait_for(lambda: "awaited" in h.seen_cancelled.remote().result(timeout_s=10), 10,
             what="the replica's call cancelled")


def test_one_response_awaited_by_several_tasks_and_a_thread(url: str) -> None:
    h = serve.run(Version.bind(), name="shared-await", route_prefix=None)

    async def main() -> list[object]:
        r = h.slow.remote(0.3)

        async def waiter() -> object:
            return await r

        loop = asyncio.get_running_loop()
        from_thread = loop.run_in_executor(None, lambda: r.result(timeout_s=10))
        return [*(await asyncio.gather(waiter(), waiter(), waiter())), await from_thread]

    assert asyncio.run(main()) == ["slow"] * 4


@serve.deployment(graceful_shutdown_timeout_s=30)
class Counter:
    def __init__(self) -> None:
        self.stopped: list[str] = []

    async def count(self, n: int, key: str = "") -> Any:
        try:
            for i in range(n):
                yield i
                if n > 10_000:
                    await asyncio.sleep(0.01)
        except (asyncio.CancelledError, GeneratorExit):
            self.stopped.append(key)
            raise

    def seen_stopped(self) -> list[str]:
        return self.stopped


def test_a_stream_iterated_on_a_driver_loop_runs_there(url: str) -> None:
    h = serve.run(Counter.bind(), name="loop-stream", route_prefix=None).options(stream=True)

    async def main() -> tuple[list[int], bool]:
        got = [i async for i in h.count.remote(5000)]
        loop = asyncio.get_running_loop()
        return got, any(f.home is loop for f in _followers("loop-stream", "Counter"))

    got, here = asyncio.run(main())
    assert got == list(range(5000)) and here


def test_cancel_a_stream_on_a_driver_loop(url: str) -> None:
    h = serve.run(Counter.bind(), name="loop-stream-cancel", route_prefix=None)
    hs = h.options(stream=True)

    async def main() -> list[int]:
        gen = hs.count.remote(1_000_000, "cancelled")
        got = []
        assert not gen.cancelled()
        with pytest.raises(RequestCancelledError):
            async for i in gen:
                got.append(i)
                if i == 3:
                    gen.cancel()
        assert gen.cancelled()
        return got

    assert asyncio.run(main()) == [0, 1, 2, 3]
    wait_for(lambda: "cancelled" in h.seen_stopped.remote().result(timeout_s=10), 10,
             what="the replica's generator stopped")


def test_a_loop_that_ends_mid_stream_stops_the_replicas_generator(url: str) -> None:
    h = serve.run(Counter.bind(), name="loop-stream-ends", route_prefix=None)
    hs = h.options(stream=True)

    async def main() -> list[int]:
        got = []
        async for i in hs.count.remote(1_000_000, "abandoned"):
            got.append(i)
            if len(got) == 2:
                return got  # the generator is left open; asyncio.run closes it
        return got

    assert asyncio.run(main()) == [0, 1]
    wait_for(lambda: "abandoned" in h.seen_stopped.remote().result(timeout_s=10), 10,
             what="the replica's generator stopped")
    t0 = time.monotonic()
    serve.delete("loop-stream-ends")  # nothing owed by the closed loop: no 30 s drain
    assert time.monotonic() - t0 < 10


@serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
class Held:
    async def __call__(self, s: float = 0.6) -> str:
        await asyncio.sleep(s)
        return "done"


def test_the_routers_of_one_process_admit_together(url: str) -> None:
    """A call awaited at once runs through the loop's router, the others through the runtime's
    (or the lane's): together they admit what Ray's one router does, max_ongoing_requests on
    the replica and max_queued_requests waiting, and the rest is refused (BackPressureError)."""
    h = serve.run(Held.bind(), name="held", route_prefix=None)

    async def later_one_awaited_at_once() -> list[str]:
        first = h.remote()  # not awaited at once: the runtime's router
        await asyncio.sleep(0.1)
        second = h.remote()
        await asyncio.sleep(0.1)
        out = []
        try:  # awaited at once: this loop's router, which must count the two above
            out.append(await h.remote())
        except BackPressureError:
            out.append("refused")
        return [*out, await first, await second]

    assert asyncio.run(later_one_awaited_at_once()) == ["refused", "done", "done"]

    async def first_one_awaited_at_once() -> list[str]:
        calls = [h.remote(0.3) for _ in range(6)]
        out = []
        for c in calls:  # the first runs on this loop's router, the rest on the runtime's
            try:
                out.append(await c)
            except BackPressureError:
                out.append("refused")
        return out

    assert asyncio.run(first_one_awaited_at_once()) == ["done", "done"] + ["refused"] * 4
    sync = [h.remote(0.3) for _ in range(6)]  # the main thread's lane and the runtime's router
    got = []
    for c in sync:
        try:
            got.append(c.result(timeout_s=30))
        except BackPressureError:
            got.append("refused")
    assert got == ["done", "done"] + ["refused"] * 4
    routers = [Runtime.current().router(DeploymentID("Held", "held")), *_followers("held", "Held")]
    wait_for(lambda: all(r.held == 0 for r in routers), 10, what="every router's slots given back")


def test_short_lived_loops_leave_nothing_behind(url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Each `asyncio.run` makes one call (on the runtime's loop while the loop's own router
    connects) and ends: connections cut short by the loop's end are neither logged as
    destroyed tasks nor raise from the closed loop (pytest turns that into an error)."""
    h = serve.run(Version.bind(), name="short", route_prefix=None)

    async def one() -> object:
        return await h.get.remote()

    for _ in range(20):
        assert asyncio.run(one()) == "v1"
    gc.collect()
    assert "Task was destroyed" not in caplog.text


@serve.deployment
class Marker:
    def mark(self, path: str) -> str:
        with open(path, "w") as f:
            f.write("called")
        return "marked"


def test_a_call_goes_out_while_its_caller_blocks_its_own_loop(url: str, tmp_path: Any) -> None:
    """Ray's router runs on its own loop, so a call made on an async driver's loop goes out even
    if that loop then blocks in sync code (a test's `wait_for_condition`, say); flotilla's
    waited for the loop to turn (forever, if the wait was for the call)."""
    h = serve.run(Marker.bind(), name="blocked", route_prefix=None)
    mark = tmp_path / "mark"

    async def main() -> tuple[bool, str]:
        resp = h.mark.remote(str(mark))
        deadline = time.monotonic() + 10
        while not mark.exists() and time.monotonic() < deadline:  # blocks this loop, as a sync wait does
            time.sleep(0.01)
        return mark.exists(), await resp

    assert asyncio.run(main()) == (True, "marked")

    async def many() -> list[str]:  # and calls awaited at once still run on the caller's loop
        return [await h.mark.remote(str(tmp_path / f"m{i}")) for i in range(20)]

    assert asyncio.run(many()) == ["marked"] * 20
