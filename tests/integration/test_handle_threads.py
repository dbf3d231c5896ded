"""Handle calls from threads and event loops other than the runtime's: every way a response
can be made and then waited for, and cancellation across the hand-over (hop.py's inboxes)."""

from __future__ import annotations

import asyncio
import gc
import pickle
import threading

import pytest

from flotilla import serve
from flotilla.exceptions import GetTimeoutError, TaskCancelledError
from flotilla.serve.exceptions import RayServeException
from tests.conftest import wait_for

pytestmark = pytest.mark.slow


class Boom(Exception):
    pass


@serve.deployment(max_ongoing_requests=200)
class Worker:
    def __init__(self) -> None:
        self.cancelled: list[str] = []

    async def add(self, a: int, b: int = 0) -> int:
        return a + b

    async def slow(self, key: str, s: float) -> str:
        try:
            await asyncio.sleep(s)
        except asyncio.CancelledError:
            self.cancelled.append(key)
            raise
        return key

    def seen_cancelled(self) -> list[str]:
        return self.cancelled

    def fail(self) -> None:
        raise Boom("from the replica")

    async def fail_after(self, s: float) -> None:
        await asyncio.sleep(s)
        raise Boom("late, from the replica")

    async def by_reference(self, wrapped: dict) -> list:
        """Ray's "pass a DeploymentResponse by reference": responses inside a container arrive
        as something to await."""
        out = []
        for ref in wrapped["refs"]:
            try:
                out.append(await ref)
            except Boom as e:
                out.append("Boom" if "from the replica" in str(e) else repr(e))
        return out


@pytest.fixture
def h(url: str) -> serve.DeploymentHandle:
    return serve.run(Worker.bind(), name="threads", route_prefix=None)


def test_64_tasks_on_a_driver_loop_each_get_their_own_answers(h) -> None:
    async def main() -> list[int]:
        async def one(i: int) -> list[int]:
            return [await h.add.remote(i, b=j) for j in range(40)]

        rows = await asyncio.gather(*(one(i) for i in range(64)))
        return [x for row in rows for x in row]

    assert asyncio.run(main()) == [i + j for i in range(64) for j in range(40)]


def test_a_response_made_on_one_loop_is_awaited_on_another(h) -> None:
    made = h.add.remote(1, b=2)  # sync code: no loop

    async def on_a_loop() -> int:
        return await made

    assert asyncio.run(on_a_loop()) == 3

    async def make() -> serve.DeploymentResponse:
        return h.add.remote(3, b=4)

    r = asyncio.run(make())  # made on a loop that is gone before anyone waits
    assert r.result(timeout_s=10) == 7
    assert asyncio.run(on_a_loop()) == 3  # awaited twice, on two loops
    assert asyncio.run(asyncio.wait_for(_await(r), 10)) == 7


async def _await(r: serve.DeploymentResponse) -> object:
    return await r


def test_result_from_a_thread_while_its_loop_waits(h) -> None:
    """A response made on a loop, waited for with result() from another thread."""

    async def main() -> int:
        r = h.add.remote(5, b=5)
        return await asyncio.get_running_loop().run_in_executor(None, lambda: r.result(timeout_s=10))

    assert asyncio.run(main()) == 10


def test_responses_from_a_driver_loop_compose(h) -> None:
    async def main() -> int:
        first = h.add.remote(1, b=1)
        return await h.add.remote(first, b=h.add.remote(10))

    assert asyncio.run(main()) == 12


def test_errors_and_timeouts_keep_their_types_across_the_hand_over(h) -> None:
    async def main() -> None:
        with pytest.raises(Boom, match="from the replica"):
            await h.fail.remote()

    asyncio.run(main())
    with pytest.raises(Boom):
        h.fail.remote().result(timeout_s=10)
    r = h.slow.remote("timeout", 0.5)
    with pytest.raises(GetTimeoutError):
        r.result(timeout_s=0.05)
    assert r.result(timeout_s=10) == "timeout"  # still waitable after a timeout


def test_cancelling_the_awaiting_task_cancels_the_request_in_the_replica(h) -> None:
    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(_await(h.slow.remote("driver-loop", 30)), 0.3)

    asyncio.run(main())
    wait_for(lambda: "driver-loop" in h.seen_cancelled.remote().result(timeout_s=10), 10,
             what="the replica's call cancelled")


def test_cancel_from_sync_code(h) -> None:
    r = h.slow.remote("sync", 30)
    wait_for(lambda: r._task is not None, 10)  # handed over (the replica may not have it yet)
    r.cancel()
    assert r.cancelled()
    with pytest.raises(TaskCancelledError):
        r.result(timeout_s=10)
    wait_for(lambda: "sync" in h.seen_cancelled.remote().result(timeout_s=10), 10,
             what="the replica's call cancelled")


def test_many_threads_block_on_results_at_once(h) -> None:
    errors: list[BaseException] = []

    def caller(k: int) -> None:
        try:
            for j in range(150):
                assert h.add.remote(k, b=j).result(timeout_s=30) == k + j
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_a_call_that_outlives_the_loop_that_made_it_ends_quietly(h, caplog: pytest.LogCaptureFixture) -> None:
    async def make() -> serve.DeploymentResponse:
        return h.slow.remote("orphan", 0.3)

    r = asyncio.run(make())  # that loop is closed before the answer comes
    assert r.result(timeout_s=10) == "orphan"
    assert h.add.remote(1).result(timeout_s=10) == 1  # the runtime loop went past the first's end
    assert "Exception in callback" not in caplog.text and "Traceback" not in caplog.text


def test_a_call_whose_caller_timed_out_ends_quietly_when_its_deployment_goes(
        url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The caller asked for the result and gave up: the call's later failure (its deployment
    deleted while it waited for a slot) is not logged as an exception nobody retrieved."""
    h = serve.run(Worker.options(max_ongoing_requests=1).bind(), name="goes", route_prefix=None)
    busy = h.slow.remote("busy", 1.0)
    r = h.add.remote(1)  # waits in the router behind `busy`
    with pytest.raises(GetTimeoutError):
        r.result(timeout_s=0.2)
    serve.delete("goes")
    wait_for(lambda r=r: r._done, timeout=20)
    del r, busy
    gc.collect()
    assert "never retrieved" not in caplog.text


def test_threads_waiting_on_one_response_made_on_a_loop_all_get_it(h) -> None:
    async def make() -> serve.DeploymentResponse:
        return h.slow.remote("shared", 0.3)

    r = asyncio.run(make())
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(r.result(timeout_s=20))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == ["shared"] * 6


def test_a_call_made_in_sync_code_is_awaited_on_a_loop_before_and_after_it_ends(h) -> None:
    done = h.add.remote(2, b=3)
    assert done.result(timeout_s=10) == 5
    running = h.slow.remote("awaited later", 0.3)

    async def main() -> list[object]:
        return [await done, await running]

    assert asyncio.run(main()) == [5, "awaited later"]


def test_an_argument_that_does_not_pickle_fails_its_call_from_sync_code_only(url: str) -> None:
    h = serve.run(Worker.options(max_ongoing_requests=1).bind(), name="pickles", route_prefix=None)
    assert h.add.remote(1).result(timeout_s=10) == 1  # the router knows its replica: sent at once
    r = h.add.remote(threading.Lock())
    with pytest.raises(TypeError, match="pickle"):
        r.result(timeout_s=10)
    assert [h.add.remote(k).result(timeout_s=10) for k in range(3)] == [0, 1, 2]  # its slot was freed


def test_a_late_failure_after_its_caller_timed_out_is_not_logged(h, caplog: pytest.LogCaptureFixture) -> None:
    assert h.add.remote(1).result(timeout_s=10) == 1
    r = h.fail_after.remote(0.3)
    with pytest.raises(GetTimeoutError):
        r.result(timeout_s=0.05)
    wait_for(lambda r=r: r._done, timeout=10)
    with pytest.raises(Boom, match="late"):
        r.result(timeout_s=1)
    r2 = h.fail_after.remote(0.2)
    with pytest.raises(GetTimeoutError):
        r2.result(timeout_s=0.01)
    wait_for(lambda r2=r2: r2._done, timeout=10)
    del r, r2
    gc.collect()
    assert "never retrieved" not in caplog.text


def test_responses_inside_containers_arrive_as_awaitables(h) -> None:
    """From sync code, from a driver loop (awaited at once and not) and from a replica."""
    refs = [h.add.remote(1, b=2), h.slow.remote("k", 0.2), h.fail.remote()]
    assert h.by_reference.remote({"refs": refs}).result(timeout_s=30) == [3, "k", "Boom"]

    async def main() -> list:
        inner = [h.add.remote(5), h.slow.remote("late", 0.1)]
        first = await h.by_reference.remote({"refs": inner})
        pending = h.by_reference.remote({"refs": [h.add.remote(7)]})
        await asyncio.sleep(0)
        return [first, await pending]

    assert asyncio.run(main()) == [[5, "late"], [7]]
    # outside a call, an unfinished response cannot be pickled: a RayServeException, as Ray's
    r = h.slow.remote("x", 0.5)
    with pytest.raises(RayServeException, match="DeploymentResponse"):
        pickle.dumps(r)
    assert r.result(timeout_s=10) == "x"
