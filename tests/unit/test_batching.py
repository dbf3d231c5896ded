"""Unit tests for flotilla.serve.batching (@serve.batch and batched_caller)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import inspect
import math
import threading

import cloudpickle
import pytest

from flotilla.serve.batching import BatchResultError, BatchStats, batch, batched_caller
from flotilla.serve.exceptions import ConfigError, RayServeException

LONG = 5.0  # a wait timeout no passing test may sit out


class Boom(Exception):
    pass


async def until(predicate, steps: int = 1000) -> None:
    """Yield to the loop until ``predicate()`` holds (no wall-clock sleeping)."""
    for _ in range(steps):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


# -- flushing -------------------------------------------------------------------------------
def test_full_batch_runs_at_once_without_waiting_for_the_timeout():
    calls = []

    @batch(max_batch_size=4, batch_wait_timeout_s=LONG)
    async def double(xs):
        calls.append(list(xs))
        return [x * 2 for x in xs]

    async def main():
        loop = asyncio.get_running_loop()
        start = loop.time()
        out = await asyncio.gather(*(double(i) for i in range(4)))
        return out, loop.time() - start

    out, elapsed = asyncio.run(main())
    assert out == [0, 2, 4, 6]
    assert calls == [[0, 1, 2, 3]]
    assert elapsed < 1.0


def test_partial_batch_runs_after_the_timeout_from_its_first_item():
    timeout = 0.03
    called_at = []

    @batch(max_batch_size=10, batch_wait_timeout_s=timeout)
    async def ident(xs):
        called_at.append((asyncio.get_running_loop().time(), list(xs)))
        return xs

    async def main():
        start = asyncio.get_running_loop().time()
        assert await asyncio.gather(ident(1), ident(2), ident(3)) == [1, 2, 3]
        return start

    start = asyncio.run(main())
    assert len(called_at) == 1
    when, items = called_at[0]
    assert items == [1, 2, 3]
    assert timeout <= when - start < timeout + 0.15


def test_results_go_to_the_right_caller_in_submission_order():
    seen = []

    @batch(max_batch_size=2, batch_wait_timeout_s=LONG)
    async def tag(xs):
        seen.append(list(xs))
        return [f"r{x}" for x in xs]

    async def main():
        return await asyncio.gather(*(tag(x) for x in [5, 3, 9, 1]))

    assert asyncio.run(main()) == ["r5", "r3", "r9", "r1"]
    assert seen == [[5, 3], [9, 1]]


def test_several_args_and_kwargs_become_one_list_each():
    got = []

    @batch(max_batch_size=3, batch_wait_timeout_s=LONG)
    async def combine(a, b, *, scale=1):
        got.append((a, b, scale))
        return [f"{x}{y}{s}" for x, y, s in zip(a, b, scale, strict=True)]

    @batch(max_batch_size=2, batch_wait_timeout_s=LONG)
    async def plain(a, b, scale=7):
        got.append((a, b, scale))
        return [x + y for x, y in zip(a, b, strict=True)]

    async def main():
        mixed = await asyncio.gather(
            combine(1, 2, scale=3), combine(a=4, b=5, scale=6), combine(7, b=8)
        )
        same = await asyncio.gather(plain(1, 2), plain(3, 4))
        styles = await asyncio.gather(plain(1, 2), plain(a=3, b=4))
        return mixed, same + styles

    mixed, same = asyncio.run(main())
    assert mixed == ["123", "456", "781"]
    assert got[0] == ([1, 4, 7], [2, 5, 8], [3, 6, 1])  # missing kwarg filled with its default
    assert same == [3, 7, 3, 7]
    assert got[1] == ([1, 3], [2, 4], 7)  # nobody passed scale: Ray leaves the default alone
    assert got[2] == ([1, 3], [2, 4], 7)  # positional and keyword spellings line up


# -- failures -------------------------------------------------------------------------------
def test_an_exception_reaches_every_caller_and_the_queue_keeps_working():
    fail = [True]

    @batch(max_batch_size=3, batch_wait_timeout_s=LONG)
    async def flaky(xs):
        if fail[0]:
            raise Boom("bad batch")
        return xs

    errors = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        first = await asyncio.gather(*(flaky(i) for i in range(3)), return_exceptions=True)
        fail[0] = False
        second = await asyncio.gather(*(flaky(i) for i in range(3)))
        await until(lambda: flaky.batch_queue.stats().running == 0)
        gc.collect()  # a batch task that died with an unretrieved error would be reported here
        return first, second

    first, second = asyncio.run(main())
    assert all(isinstance(err, Boom) and str(err) == "bad batch" for err in first)
    assert second == [0, 1, 2]
    assert errors == []


def test_a_result_of_the_wrong_length_or_type_is_a_clear_error():
    @batch(max_batch_size=3, batch_wait_timeout_s=LONG)
    async def short(xs):
        return xs[:-1]

    @batch(max_batch_size=2, batch_wait_timeout_s=LONG)
    async def nothing(xs):
        return None

    async def main():
        a = await asyncio.gather(*(short(i) for i in range(3)), return_exceptions=True)
        b = await asyncio.gather(nothing(1), nothing(2), return_exceptions=True)
        return a, b

    wrong_length, not_a_list = asyncio.run(main())
    for err in wrong_length:
        assert isinstance(err, BatchResultError) and isinstance(err, ValueError)
        assert isinstance(err, RayServeException)
        assert "expected length 3, got 2" in str(err)
    for err in not_a_list:
        assert isinstance(err, TypeError) and "expected length 2" in str(err)
        assert "NoneType" in str(err)


# -- cancellation ---------------------------------------------------------------------------
def test_a_caller_cancelled_before_batching_is_skipped():
    seen = []

    @batch(max_batch_size=3, batch_wait_timeout_s=LONG)
    async def echo(xs):
        seen.append(list(xs))
        return [x.upper() for x in xs]

    async def main():
        queue = echo.batch_queue
        a, b = asyncio.create_task(echo("a")), asyncio.create_task(echo("b"))
        await until(lambda: queue.stats().queued == 2)
        b.cancel()
        c, d = asyncio.create_task(echo("c")), asyncio.create_task(echo("d"))
        results = await asyncio.wait_for(asyncio.gather(a, c, d), 1.0)
        with pytest.raises(asyncio.CancelledError):
            await b
        return results, queue.stats()

    results, stats = asyncio.run(main())
    assert results == ["A", "C", "D"]
    assert seen == [["a", "c", "d"]]  # b neither ran nor counted towards the full batch
    assert stats.skipped == 1 and stats.items == 3 and stats.queued == 0


def test_the_wait_starts_at_the_first_item_that_is_still_wanted():
    timeout = 0.05
    called_at = []

    @batch(max_batch_size=10, batch_wait_timeout_s=timeout)
    async def ident(xs):
        called_at.append(asyncio.get_running_loop().time())
        return xs

    async def main():
        loop = asyncio.get_running_loop()
        early = asyncio.create_task(ident("early"))
        await until(lambda: ident.batch_queue.stats().queued == 1)
        early.cancel()
        await asyncio.sleep(timeout / 2)  # lets time pass; not used to synchronise
        arrived = loop.time()
        assert await ident("late") == "late"
        return arrived

    arrived = asyncio.run(main())
    assert len(called_at) == 1 and called_at[0] - arrived >= timeout
    assert ident.batch_queue.stats().skipped == 1


def test_a_caller_cancelled_mid_batch_does_not_break_the_others():
    started, release = asyncio.Event, asyncio.Event  # created inside the loop below
    errors = []

    async def main():
        nonlocal started, release
        started, release = asyncio.Event(), asyncio.Event()
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))

        @batch(max_batch_size=3, batch_wait_timeout_s=LONG)
        async def slow(xs):
            started.set()
            await release.wait()
            return [x * 10 for x in xs]

        tasks = [asyncio.create_task(slow(i)) for i in range(3)]
        await started.wait()
        tasks[1].cancel()
        release.set()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        after = await asyncio.gather(*(slow(i) for i in range(3)))
        return done, after

    done, after = asyncio.run(main())
    assert done[0] == 0 and done[2] == 20
    assert isinstance(done[1], asyncio.CancelledError)
    assert after == [0, 10, 20]
    assert errors == []


# -- streaming ------------------------------------------------------------------------------
def test_async_generator_streams_each_caller_its_own_elements():
    async def collect(gen):
        return [x async for x in gen]

    async def main():
        release = asyncio.Event()

        @batch(max_batch_size=3, batch_wait_timeout_s=LONG)
        async def count(limits):
            for step in range(max(limits)):
                yield [step if step < n else StopIteration for n in limits]
                if step == 1:
                    await release.wait()

        gens = [count(1), count(3), count(2)]
        assert all(inspect.isasyncgen(g) for g in gens)
        tasks = [asyncio.create_task(collect(g)) for g in gens]
        short = await asyncio.wait_for(tasks[0], 1.0)  # ended while the batch is still going
        assert not tasks[1].done()
        release.set()
        return short, await tasks[1], await tasks[2]

    assert asyncio.run(main()) == ([0], [0, 1, 2], [0, 1])


def test_streaming_errors_reach_every_open_stream():
    class Chat:
        @batch(max_batch_size=2, batch_wait_timeout_s=LONG)
        async def reply(self, prompts):
            yield [f"{p}!" for p in prompts]
            yield [StopIteration(), "more"]  # an instance works as the sentinel too
            raise Boom("model crashed")

    async def collect(gen):
        out = []
        try:
            async for x in gen:
                out.append(x)
        except Boom as err:
            out.append(err)
        return out

    async def main():
        chat = Chat()
        return await asyncio.gather(collect(chat.reply("hi")), collect(chat.reply("yo")))

    first, second = asyncio.run(main())
    assert first == ["hi!"]
    assert second[:2] == ["yo!", "more"] and isinstance(second[2], Boom)


def test_a_stream_batch_stops_once_every_caller_is_done_or_gone():
    async def main():
        closed = asyncio.Event()

        @batch(max_batch_size=2, batch_wait_timeout_s=LONG)
        async def endless(xs):
            try:
                step = 0
                while True:
                    yield [StopIteration if x == "stop" else step for x in xs]
                    step += 1
                    await asyncio.sleep(0)
            finally:
                closed.set()

        stopper, quitter = endless("stop"), endless("go")
        async for value in quitter:
            assert value == 0
            break  # the caller walks away mid-stream
        await quitter.aclose()
        assert [x async for x in stopper] == []
        await asyncio.wait_for(closed.wait(), 1.0)

    asyncio.run(main())


# -- concurrency and tuning -----------------------------------------------------------------
@pytest.mark.parametrize("concurrency", [1, 2])
def test_max_concurrent_batches_bounds_overlapping_batches(concurrency):
    async def main():
        active, peak, gate = [0], [0], asyncio.Event()

        @batch(max_batch_size=1, batch_wait_timeout_s=0, max_concurrent_batches=concurrency)
        async def work(xs):
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            if active[0] == 2:
                gate.set()
            if concurrency == 2:
                await gate.wait()  # only returns if a second batch runs alongside this one
            else:
                await asyncio.sleep(0)
            active[0] -= 1
            return xs

        out = await asyncio.wait_for(asyncio.gather(*(work(i) for i in range(4))), 1.0)
        return out, peak[0], work.batch_queue.stats()

    out, peak, stats = asyncio.run(main())
    assert out == [0, 1, 2, 3]
    assert peak == concurrency
    assert stats.batches == 4 and stats.largest_batch == 1 and stats.running == 0


class Model:
    def __init__(self, name, size=None):
        self.name, self.sizes = name, []
        if size is not None:
            self.handle.set_max_batch_size(size)

    @batch(max_batch_size=10, batch_wait_timeout_s=LONG)
    async def handle(self, xs):
        self.sizes.append(len(xs))
        return [(self.name, x) for x in xs]


def test_setters_and_getters_tune_a_live_queue():
    async def main():
        model = Model("m", size=2)
        assert model.handle.get_max_batch_size() == 2
        assert model.handle._get_max_batch_size() == 2  # Ray's private spelling
        four = await asyncio.wait_for(asyncio.gather(*(model.handle(i) for i in range(4))), 1.0)

        first = asyncio.create_task(model.handle(7))
        await until(lambda: model.handle.batch_queue.stats().queued == 1)
        model.handle.set_max_batch_size(1)
        await asyncio.to_thread(model.handle.set_batch_wait_timeout_s, 0.0)  # from a thread
        assert (model.handle.get_max_batch_size(), model.handle.get_batch_wait_timeout_s()) == (1, 0.0)
        await asyncio.sleep(0.05)
        assert not first.done()  # as Ray's: the batch being formed keeps size 2 and its long wait
        pair = await asyncio.wait_for(asyncio.gather(first, model.handle(8)), 1.0)
        lone = await asyncio.wait_for(model.handle(9), 1.0)  # the next batch: one item, no wait
        return four, pair, lone, model.sizes

    four, pair, lone, sizes = asyncio.run(main())
    assert four == [("m", i) for i in range(4)]
    assert pair == [("m", 7), ("m", 8)] and lone == ("m", 9)
    assert sizes == [2, 2, 2, 1]


def test_methods_get_one_queue_and_one_set_of_settings_per_instance():
    async def main():
        a, b = Model("a"), Model("b")
        a.handle.set_max_batch_size(2)
        b.handle.set_max_batch_size(3)
        out = await asyncio.wait_for(
            asyncio.gather(a.handle(1), b.handle(2), a.handle(3), b.handle(4), b.handle(5)), 1.0
        )
        assert a.handle.batch_queue is not b.handle.batch_queue
        assert Model("c").handle.get_max_batch_size() == 10
        return out, a.sizes, b.sizes

    out, a_sizes, b_sizes = asyncio.run(main())
    assert out == [("a", 1), ("b", 2), ("a", 3), ("b", 4), ("b", 5)]
    assert a_sizes == [2] and b_sizes == [3]
    # Looks like an ordinary async method to the runtime.
    assert inspect.iscoroutinefunction(Model("x").handle)
    assert inspect.iscoroutinefunction(Model.handle)
    assert list(inspect.signature(Model("x").handle).parameters) == ["xs"]


def test_decorator_forms_and_any_async_callable():
    @batch
    async def bare(xs):
        return xs

    @batch()
    async def empty(xs):
        return xs

    class Deployment:
        async def __call__(self, xs):
            return [x + 100 for x in xs]

    dep = Deployment()
    bound = batch(max_batch_size=2, batch_wait_timeout_s=LONG)(dep.__call__)
    obj = batch(max_batch_size=2, batch_wait_timeout_s=LONG)(dep)
    assert bare.get_max_batch_size() == 10 and bare.get_batch_wait_timeout_s() == 0.01
    assert empty.get_max_batch_size() == 10
    assert batch(max_batch_size=4.0)(bare.__wrapped__).get_max_batch_size() == 4

    async def main():
        return (
            await bare(1),
            await asyncio.wait_for(asyncio.gather(bound(1), bound(2)), 1.0),
            await asyncio.wait_for(asyncio.gather(obj(3), obj(4)), 1.0),
        )

    assert asyncio.run(main()) == (1, [101, 102], [103, 104])


def test_a_function_queue_survives_moving_to_a_new_event_loop():
    @batch(max_batch_size=2, batch_wait_timeout_s=LONG)
    async def inc(xs):
        return [x + 1 for x in xs]

    async def main():
        return await asyncio.wait_for(asyncio.gather(inc(1), inc(2)), 1.0)

    assert asyncio.run(main()) == [2, 3]
    assert asyncio.run(main()) == [2, 3]
    assert inc.batch_queue.stats().batches == 2


def test_batched_functions_and_classes_pickle_even_after_use():
    class Local:
        @batch(max_batch_size=2, batch_wait_timeout_s=LONG)
        async def handle(self, xs):
            return [-x for x in xs]

    @batch(max_batch_size=2, batch_wait_timeout_s=LONG)
    async def neg(xs):
        return [-x for x in xs]

    async def main(fn, cls):
        inst = cls()
        return await asyncio.wait_for(
            asyncio.gather(fn(1), fn(2), inst.handle(3), inst.handle(4)), 1.0
        )

    assert asyncio.run(main(neg, Local)) == [-1, -2, -3, -4]
    fn2, cls2 = cloudpickle.loads(cloudpickle.dumps((neg, Local)))
    assert asyncio.run(main(fn2, cls2)) == [-1, -2, -3, -4]


# -- batched_caller -------------------------------------------------------------------------
def test_batched_caller_runs_sync_functions_in_an_executor():
    threads = []

    def predict(batch_):
        threads.append(threading.get_ident())
        return [x * 3 for x in batch_]

    call = batched_caller(predict, max_batch_size=3, batch_wait_timeout_s=LONG)

    async def main():
        return await asyncio.wait_for(asyncio.gather(call(1), call(2), call(3)), 1.0)

    assert asyncio.run(main()) == [3, 6, 9]
    assert threads and threads[0] != threading.get_ident()
    stats = call.batch_queue.stats()
    assert isinstance(stats, BatchStats)
    assert (stats.batches, stats.items, stats.largest_batch, stats.queued) == (1, 3, 3, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.batches = 5  # type: ignore[misc]


def test_batched_caller_with_async_functions_and_timeouts():
    seen = []

    async def predict(batch_):
        seen.append(list(batch_))
        return [str(x) for x in batch_]

    call = batched_caller(predict, max_batch_size=8, batch_wait_timeout_s=0.01)

    async def main():
        start = asyncio.get_running_loop().time()
        out = await asyncio.gather(call(1), call(2))
        return out, asyncio.get_running_loop().time() - start

    out, elapsed = asyncio.run(main())
    assert out == ["1", "2"] and seen == [[1, 2]]
    assert 0.01 <= elapsed < 0.2


# -- bad arguments --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": -3}, "max_batch_size"),
        ({"max_batch_size": 2.5}, "max_batch_size"),
        ({"max_batch_size": "4"}, "max_batch_size"),
        ({"max_batch_size": True}, "max_batch_size"),
        ({"batch_wait_timeout_s": -0.1}, "batch_wait_timeout_s"),
        ({"batch_wait_timeout_s": "0.1"}, "batch_wait_timeout_s"),
        ({"batch_wait_timeout_s": math.nan}, "batch_wait_timeout_s"),
        ({"max_concurrent_batches": 0}, "max_concurrent_batches"),
        ({"max_concurrent_batches": 1.5}, "max_concurrent_batches"),
    ],
)
def test_bad_options_fail_at_decoration_time(options, name):
    async def fn(xs):
        return xs

    for make in (lambda: batch(**options), lambda: batch(fn, **options)):
        with pytest.raises(ConfigError, match=name) as info:
            make()
        assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_sync_functions_and_other_misuse_are_rejected():
    def sync(xs):
        return xs

    with pytest.raises(TypeError, match="async def"):
        batch(sync)
    with pytest.raises(TypeError, match="async def"):
        batch(max_batch_size=2)(sync)
    with pytest.raises(TypeError, match="keyword"):
        batch(8)  # type: ignore[arg-type]

    @batch
    async def ok(xs):
        return xs

    with pytest.raises(ConfigError, match="max_batch_size"):
        ok.set_max_batch_size(0)
    with pytest.raises(ConfigError, match="batch_wait_timeout_s"):
        ok.set_batch_wait_timeout_s(-1)
    assert ok.get_max_batch_size() == 10

    async def gen(xs):
        yield xs

    with pytest.raises(ConfigError, match="max_batch_size"):
        batched_caller(sync, 0, 0.01)
    with pytest.raises(TypeError):
        batched_caller(gen, 2, 0.01)
    with pytest.raises(TypeError):
        batched_caller(42, 2, 0.01)  # type: ignore[arg-type]


# -- adaptive wait (batch_latency_target_s) -------------------------------------------------
@pytest.mark.parametrize(
    ("case", "args", "want"),
    [
        ("no arrivals expected: go at once", (0.05, 1, 8, 0.0, 0.001, 0.001), 0.0),
        ("full: go at once", (0.05, 8, 8, 1000.0, 0.001, 0.001), 0.0),
        ("the batch alone overruns the target", (0.01, 4, 8, 1000.0, 0.02, 0.0), 0.0),
        # room = 0.05 - 0.01 - 0.001*2 = 0.038; w = 0.038 / (1 + 0.001*100) = 0.0345...; fill = 6/100
        ("waits what the target leaves", (0.05, 2, 8, 100.0, 0.01, 0.001), 0.038 / 1.1),
        # fast arrivals fill the batch before the target would force it out
        ("no longer than filling takes", (0.05, 2, 8, 1000.0, 0.001, 0.0), 6 / 1000),
        ("a rare arrival is not worth waiting for", (0.01, 1, 1000, 50.0, 0.0, 0.0), 0.0),
        ("never beyond the target", (0.01, 1, 1000, 150.0, 0.0, 0.0), 0.01),
    ],
)
def test_adaptive_wait(case, args, want):
    from flotilla.serve.batching import adaptive_wait

    assert adaptive_wait(*args) == pytest.approx(want), case


def test_a_lone_request_does_not_wait_with_a_latency_target():
    @batch(max_batch_size=8, batch_wait_timeout_s=LONG, batch_latency_target_s=LONG)
    async def double(xs):
        return [2 * x for x in xs]

    async def main():
        loop = asyncio.get_running_loop()
        t = loop.time()
        assert await double(1) == 2
        assert await double(2) == 4  # one at a time: nothing more is expected
        return loop.time() - t

    assert asyncio.run(main()) < 1.0  # not LONG
    assert double.get_batch_latency_target_s() == LONG


def test_a_burst_is_batched_within_the_target_and_the_wait_is_recorded():
    from flotilla.serve.batching import BATCH_WAIT_S

    sizes = []

    @batch(max_batch_size=16, batch_latency_target_s=0.2)
    async def double(xs):
        sizes.append(len(xs))
        await asyncio.sleep(0.001)
        return [2 * x for x in xs]

    async def one(x):
        result = await double(x)
        return result, BATCH_WAIT_S.get()

    async def main():
        for _ in range(3):  # learn the arrival rate and the cost
            await asyncio.gather(*(one(i) for i in range(16)))
        return await asyncio.gather(*(one(i) for i in range(16)))

    out = asyncio.run(main())
    assert [r for r, _ in out] == [2 * i for i in range(16)]
    assert max(sizes) == 16
    assert all(0 <= w < 0.2 for _, w in out)
    assert BATCH_WAIT_S.get() == 0.0  # set in the callers' contexts only


def test_bad_latency_target_is_a_config_error():
    for bad in (0, -1, "fast", float("nan")):
        with pytest.raises(ConfigError, match="batch_latency_target_s"):
            batch(batch_latency_target_s=bad)


# -- batch_size_fn (Ray 2.60): a batch's size is a function of its items ------------------------
def test_batch_size_fn_sizes_batches_by_their_items_and_sends_one_when_the_next_does_not_fit():
    wait = 0.5
    calls = []

    @batch(max_batch_size=10, batch_wait_timeout_s=wait, batch_size_fn=lambda items: sum(len(x) for x in items))
    async def lengths(xs):
        calls.append((asyncio.get_running_loop().time(), list(xs)))
        return [len(x) for x in xs]

    async def main():
        start = asyncio.get_running_loop().time()
        out = await asyncio.gather(*(lengths(w) for w in ("aaaa", "bbbb", "ccc", "dd", "e")))
        return out, start

    out, start = asyncio.run(main())
    assert out == [4, 4, 3, 2, 1]
    (t1, first), (t2, second) = calls
    assert first == ["aaaa", "bbbb"] and t1 - start < wait / 2  # 4+4+3 > 10: it goes at once
    assert second == ["ccc", "dd", "e"] and t2 - start >= wait - 0.05  # 6 < 10: waits it out


def test_batch_size_fn_batch_that_reaches_the_size_goes_at_once():
    calls = []

    @batch(max_batch_size=6, batch_wait_timeout_s=LONG, batch_size_fn=lambda items: 2 * len(items))
    async def ident(xs):
        calls.append(list(xs))
        return xs

    async def main():
        start = asyncio.get_running_loop().time()
        out = await asyncio.gather(*(ident(i) for i in range(6)))
        return out, asyncio.get_running_loop().time() - start

    out, elapsed = asyncio.run(main())
    assert out == list(range(6))
    assert calls == [[0, 1, 2], [3, 4, 5]]
    assert elapsed < 1.0


def test_batch_size_fn_an_item_over_the_limit_alone_fails_and_the_rest_go_on():
    @batch(max_batch_size=5, batch_wait_timeout_s=0.01, batch_size_fn=lambda items: sum(items))
    async def ident(xs):
        return xs

    async def main():
        return await asyncio.gather(ident(2), ident(9), ident(3), return_exceptions=True)

    a, big, c = asyncio.run(main())
    assert (a, c) == (2, 3)
    assert isinstance(big, RuntimeError) and "greater than max_batch_size" in str(big)


def test_batch_size_fn_that_raises_fails_that_caller_only():
    def size(items):
        if "bad" in items:
            raise ValueError("cannot size 'bad'")
        return len(items)

    @batch(max_batch_size=4, batch_wait_timeout_s=0.01, batch_size_fn=size)
    async def ident(xs):
        return xs

    async def main():
        return await asyncio.gather(ident("a"), ident("bad"), ident("c"), return_exceptions=True)

    a, bad, c = asyncio.run(main())
    assert (a, c) == ("a", "c")
    assert isinstance(bad, ValueError)


def test_batch_size_fn_on_a_method_sees_the_items_not_self():
    seen = []

    class Model:
        @batch(max_batch_size=3, batch_wait_timeout_s=0.01, batch_size_fn=lambda items: seen.append(list(items)) or len(items))
        async def handle(self, xs):
            return [x + 1 for x in xs]

    async def main():
        m = Model()
        return await asyncio.gather(m.handle(1), m.handle(xs=2))

    assert asyncio.run(main()) == [2, 3]
    assert [1, 2] in seen


def test_batch_size_fn_must_be_callable():
    with pytest.raises(TypeError, match="batch_size_fn must be a callable"):
        batch(batch_size_fn=3)


def test_options_by_position_in_rays_order():
    @batch(None, 3, 0.25, 2)
    async def f(xs):
        return xs

    assert f.get_max_batch_size() == 3 and f.get_batch_wait_timeout_s() == 0.25
    assert inspect.signature(batch).parameters["batch_latency_target_s"].kind is inspect.Parameter.KEYWORD_ONLY
