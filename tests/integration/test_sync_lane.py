"""The main thread's lane (`_private/lane.py`): its sync calls go through a follower on a
private loop that `result()` turns on the caller's own thread; a pump turns it between calls,
so nothing sent there waits for its caller to come back."""

from __future__ import annotations

import os
import threading
import time

import pytest

import flotilla
from flotilla import serve
from flotilla._private.client import Runtime
from flotilla.exceptions import GetTimeoutError, TaskCancelledError
from tests.conftest import running_cluster, wait_for

pytestmark = pytest.mark.slow


class Boom(Exception):
    pass


@serve.deployment(max_ongoing_requests=50, graceful_shutdown_timeout_s=60)
class Keeper:
    def __init__(self, tag: str = "v1") -> None:
        self.tag = tag
        self.marks: list[str] = []

    async def mark(self, key: str) -> str:
        self.marks.append(key)
        return key

    def marks_seen(self) -> list[str]:
        return self.marks

    async def echo(self, x: object) -> object:
        return x

    async def slow(self, s: float) -> str:
        import asyncio

        await asyncio.sleep(s)
        return self.tag

    def pid(self) -> int:
        return os.getpid()

    def fail(self) -> None:
        raise Boom("from the replica")


def _lane_followers(dep_name: str) -> list:
    rt = Runtime.current()
    assert rt.lane is not None, "the main thread's sync calls made no lane"
    return [f for d, f in rt.loop_routers.by_loop.get(rt.lane.loop, {}).items() if d.name == dep_name]


def _from_another_thread(fn):
    """`fn()` on a thread of its own (its sync calls go through the runtime's loop)."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(30)
    return out[0]


def test_main_thread_calls_go_through_the_lane_and_keep_their_outcomes(url: str) -> None:
    h = serve.run(Keeper.bind(), name="lane", route_prefix=None)
    assert [h.mark.remote(str(i)).result(timeout_s=10) for i in range(50)] == [str(i) for i in range(50)]
    followers = _lane_followers("Keeper")
    assert len(followers) == 1 and followers[0].ready  # connected, on the lane's loop
    rt = Runtime.current()
    assert not rt.lane.loop.is_running() and not rt.lane.pending  # nobody turns it between calls
    with pytest.raises(Boom, match="from the replica"):
        h.fail.remote().result(timeout_s=10)
    r = h.slow.remote(0.5)
    with pytest.raises(GetTimeoutError, match=r"within 0\.05s"):  # the timeout asked for
        r.result(timeout_s=0.05)
    assert r.result(timeout_s=10) == "v1"  # still waitable after a timeout
    # another thread's calls take the runtime's loop, and see the same replica
    assert _from_another_thread(lambda: h.pid.remote().result(timeout_s=10)) == h.pid.remote().result(timeout_s=10)


def test_result_polls_for_a_fast_reply_and_blocks_for_a_slow_one(url: str) -> None:
    h = serve.run(Keeper.bind(), name="lane", route_prefix=None)
    h.mark.remote("warm").result(timeout_s=10)
    lane = Runtime.current().lane
    assert lane is not None
    if lane.wait.max_s == 0:
        pytest.skip("this process may use one CPU only: result() never polls there")
    caught = lane.caught
    assert [h.mark.remote(str(i)).result(timeout_s=10) for i in range(300)] == [str(i) for i in range(300)]
    assert lane.caught > caught  # some fast replies came in while result() polled
    # calls that take 20 ms: after a few the usual wait is above the limit, and nobody polls
    for _ in range(10):
        assert h.slow.remote(0.02).result(timeout_s=10) == "v1"
    assert lane.wait.usual_s > lane.wait.max_s
    polls = lane.polls
    for _ in range(5):
        assert h.slow.remote(0.02).result(timeout_s=10) == "v1"
    assert lane.polls == polls
    # a timeout shorter than the poll ends it: the call stays waitable
    lane.wait.usual_s = 0.0001
    r = h.slow.remote(0.3)
    t0 = time.monotonic()
    with pytest.raises(GetTimeoutError):
        r.result(timeout_s=0.0001)
    assert time.monotonic() - t0 < 0.2
    assert r.result(timeout_s=10) == "v1"
    # FLOTILLA_HANDLE_POLL_US=0 (read when the lane is made): never polls
    lane.wait.max_s = 0.0
    lane.wait.usual_s = 0.0
    polls = lane.polls
    assert [h.mark.remote(str(i)).result(timeout_s=10) for i in range(50)] == [str(i) for i in range(50)]
    assert lane.polls == polls


def test_large_payloads_through_and_around_the_lane(url: str) -> None:
    h = serve.run(Keeper.bind(), name="lane", route_prefix=None)
    assert h.mark.remote("warm").result(timeout_s=10) == "warm"
    big = os.urandom(3 << 20)
    r = h.echo.remote(big)  # a large argument: through the runtime's loop (uvloop writes it as it is)
    assert r._lane is None and r.result(timeout_s=30) == big
    # inside a container it is not looked for: it goes through the lane, written a part at a
    # time (asyncio's transport would join the parts and copy the rest again), intact both ways
    r = h.echo.remote({"payload": big, "more": [big[:1000], bytearray(big[-5000:])]})
    assert r._lane is not None
    got = r.result(timeout_s=30)
    assert got["payload"] == big and got["more"][0] == big[:1000] and got["more"][1] == bytearray(big[-5000:])
    assert h.mark.remote("after").result(timeout_s=10) == "after"  # the connection is in step


def test_a_call_nobody_waits_for_is_sent_at_once_and_its_reply_taken_by_the_pump(url: str) -> None:
    h = serve.run(Keeper.bind(), name="lane", route_prefix=None)
    h.mark.remote("warm").result(timeout_s=10)
    rt = Runtime.current()
    sent = time.monotonic()
    fired = h.mark.remote("fire-and-forget")  # never waited for by this thread
    assert fired._lane is rt.lane  # it went through the lane
    wait_for(lambda: "fire-and-forget" in _from_another_thread(lambda: h.marks_seen.remote().result(timeout_s=10)),
             timeout=10, what="the call to reach the replica")
    assert time.monotonic() - sent < 5
    wait_for(lambda: fired._done and not rt.lane.pending, timeout=5, what="the pump to take the reply")


def test_awaiting_and_cancelling_a_lane_call(url: str) -> None:
    import asyncio

    h = serve.run(Keeper.bind(), name="lane", route_prefix=None)
    # serve.run returns once the replica runs; the driver's routers connect to it after (on
    # the Ray backend a TCP handshake): until then a call goes through the runtime's loop
    h.mark.remote("warm").result(timeout_s=10)
    made = h.mark.remote("awaited")
    assert made._lane is not None

    async def on_a_loop() -> str:
        return await made

    assert asyncio.run(asyncio.wait_for(on_a_loop(), 10)) == "awaited"
    later = h.mark.remote("blocking a loop")

    async def result_on_a_loop() -> str:  # blocks this loop while it waits, as documented
        return later.result(timeout_s=10)

    assert asyncio.run(result_on_a_loop()) == "blocking a loop"
    r = h.slow.remote(30)
    assert r._lane is not None
    r.cancel()
    with pytest.raises(TaskCancelledError):
        r.result(timeout_s=10)


def test_a_redeploy_is_not_held_up_by_an_idle_lane_connection(url: str) -> None:
    """The old replica drains: it waits for every connection to acknowledge, the lane's
    too, whose loop nobody turns while the main thread is in `serve.run`."""
    h = serve.run(Keeper.bind("v1"), name="lane", route_prefix=None)
    old = h.pid.remote().result(timeout_s=10)
    assert _lane_followers("Keeper")
    t0 = time.monotonic()
    h = serve.run(Keeper.bind("v2"), name="lane", route_prefix=None)
    wait_for(lambda: not _alive(old), timeout=15, what="the old replica to exit")
    assert time.monotonic() - t0 < 15  # not its 60 s graceful_shutdown_timeout_s
    assert h.slow.remote(0).result(timeout_s=10) == "v2"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_shutdown_settles_a_call_in_flight_on_the_lane() -> None:
    with running_cluster(num_cpus=2):
        h = serve.run(Keeper.options(graceful_shutdown_timeout_s=0.5).bind(), name="lane", route_prefix=None)
        h.mark.remote("warm").result(timeout_s=10)
        r = h.slow.remote(30)
        assert r._lane is not None
        finished = h.slow.remote(0.2)  # ends while its replica drains: answered, not lost
    assert finished.result(timeout_s=5) == "v1"
    # the cluster is gone: the call cut off by the drain's end fails, at once, not after 30 s
    t0 = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - whichever error the closed connection gives
        r.result(timeout_s=20)
    assert time.monotonic() - t0 < 10
    assert not flotilla.is_initialized()
