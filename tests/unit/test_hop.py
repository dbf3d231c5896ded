"""hop.Inbox: calls from other threads run on the loop in order, one wake-up per batch."""

from __future__ import annotations

import asyncio
import threading

import pytest

from flotilla._private.hop import Inbox, inbox_for


class CountingInbox(Inbox):
    __slots__ = ("runs",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.runs = 0

    def run(self) -> None:
        self.runs += 1
        super().run()


def loop_thread() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    return loop, t


def stop(loop: asyncio.AbstractEventLoop, t: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)
    loop.close()


def test_puts_while_the_loop_is_busy_run_in_order_after_one_wake_up() -> None:
    loop, t = loop_thread()
    try:
        box = CountingInbox(loop)
        busy, free = threading.Event(), threading.Event()
        loop.call_soon_threadsafe(lambda: (busy.set(), free.wait(10)))
        assert busy.wait(10)
        got: list[int] = []
        for i in range(1000):
            box.put(got.append, i)
        done = threading.Event()
        box.put(done.set)
        free.set()
        assert done.wait(10)
        assert got == list(range(1000))
        assert box.runs == 1
    finally:
        stop(loop, t)


def test_puts_from_several_threads_all_run_each_once() -> None:
    loop, t = loop_thread()
    try:
        box = Inbox(loop)
        got: list[tuple[int, int]] = []

        def producer(k: int) -> None:
            for i in range(2000):
                box.put(got.append, (k, i))

        threads = [threading.Thread(target=producer, args=(k,)) for k in range(4)]
        for p in threads:
            p.start()
        for p in threads:
            p.join(10)
        done = threading.Event()
        box.put(done.set)
        assert done.wait(10)
        assert sorted(got) == [(k, i) for k in range(4) for i in range(2000)]
        for k in range(4):  # each thread's items in its own order
            assert [i for kk, i in got if kk == k] == list(range(2000))
    finally:
        stop(loop, t)


def test_a_failing_item_does_not_stop_the_ones_after_it(caplog: pytest.LogCaptureFixture) -> None:
    loop, t = loop_thread()
    try:
        box = Inbox(loop)
        done = threading.Event()
        box.put(lambda: 1 / 0)
        box.put(done.set)
        assert done.wait(10)
        assert "ZeroDivisionError" in caplog.text
    finally:
        stop(loop, t)


def test_a_closed_loop_refuses_and_the_inbox_is_not_left_armed() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    box = Inbox(loop)
    with pytest.raises(RuntimeError):
        box.put(print)
    with pytest.raises(RuntimeError):  # tried again, not silently queued
        box.put(print)


def test_inbox_for_is_one_per_thread_and_loop() -> None:
    async def two() -> tuple[Inbox, Inbox]:
        loop = asyncio.get_running_loop()
        return inbox_for(loop), inbox_for(loop)

    a, b = asyncio.run(two())
    assert a is b
    c, _ = asyncio.run(two())
    assert c is not a  # a new loop gets its own
