"""Request batching: ``@serve.batch`` and the runtime's deployment-level batching.

Callers submit one item each; a `BatchQueue` calls the user's function once per list of items.
A batch goes out when full (``max_batch_size``) or ``batch_wait_timeout_s`` after its first
item arrived (loop clock), with at most ``max_concurrent_batches`` running; the next batch is
formed when a slot frees up. With ``batch_latency_target_s`` instead, the wait is chosen per
batch (`adaptive_wait`) from the observed arrival rate and batch cost, so that the first
item's wait plus its batch's run time stays within the target: a lone request goes at once,
and under load batches grow as far as the target allows. With ``batch_size_fn`` a batch's size
is that function of its items (tokens, graph nodes, ...) instead of their count: a batch
takes items from the front while their size stays within ``max_batch_size`` and goes at once
when the next one does not fit; an item over the limit alone fails with RuntimeError.
Async generator functions stream: each yield is a list with one
element per caller, and ``StopIteration`` (class or instance) as an element ends that caller's
stream. Queue state lives in the running loop and is created lazily: one queue per function,
one per instance for methods (first parameter ``self``). Cancelled callers are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import math
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MethodType
from typing import Any

from flotilla._private import context
from flotilla.serve.exceptions import ConfigError, RayServeException

__all__ = ["BATCH_WAIT_S", "BatchQueue", "BatchResultError", "BatchStats", "adaptive_wait", "batch", "batched_caller"]

#: Seconds the current request's calls to batched functions waited for their batch to start,
#: added up in the caller's context (the replica reads it as the request's batch-wait stage).
BATCH_WAIT_S: contextvars.ContextVar[float] = contextvars.ContextVar("flotilla_batch_wait_s", default=0.0)
#: Every live queue of this process, for the replica's batch metrics.
QUEUES: weakref.WeakSet[BatchQueue] = weakref.WeakSet()
#: Weight of a new observation in the arrival-rate and batch-cost averages.
_EWMA = 0.2

_VALUE, _DONE, _ERROR = 0, 1, 2  # stream channel message kinds
_RUNTIME = ("_loop", "_pending", "_wake", "_slots", "_worker", "_running")


class BatchResultError(RayServeException, TypeError, ValueError):
    """A batch function returned something other than one result per input item."""


@dataclass(frozen=True, slots=True)
class BatchStats:
    """Read-only snapshot of a `BatchQueue`'s counters."""

    batches: int  # batches handed to the function
    items: int  # items in those batches
    largest_batch: int
    queued: int  # items waiting for a batch now
    running: int  # batches in progress now
    skipped: int  # items dropped because their caller went away before batching


def _check_count(value: Any, name: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # Ray accepts 8.0 for 8
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_timeout(value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or math.isnan(value) or value < 0:
        raise ConfigError(f"batch_wait_timeout_s must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _check_results(results: Any, n: int) -> None:
    sized = hasattr(results, "__len__") and not isinstance(results, str | bytes | Mapping)
    if not sized or len(results) != n:
        got = len(results) if sized else type(results).__name__
        raise BatchResultError(
            f"batch function must return a list with one result per input: "
            f"expected length {n}, got {got}"
        )


def _is_stop(value: Any) -> bool:
    sentinels = (StopIteration, StopAsyncIteration)
    return value is sentinels[0] or value is sentinels[1] or isinstance(value, sentinels)


def _check_size_fn(value: Any) -> Callable[[list[Any]], int] | None:
    if value is not None and not callable(value):
        raise TypeError(f"batch_size_fn must be a callable or None, got {type(value)}")
    return value  # type: ignore[no-any-return]


def _check_target(value: Any) -> float | None:
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or math.isnan(value) or value <= 0:
        raise ConfigError(f"batch_latency_target_s must be a number of seconds > 0, got {value!r}")
    return float(value)


def adaptive_wait(target_s: float, waiting: int, max_batch: int, rate_per_s: float,
                  fixed_s: float, per_item_s: float) -> float:
    """How long the oldest of `waiting` items may wait for more, given a latency target.

    A batch of n items is expected to run `fixed_s + per_item_s * n`; while waiting w seconds,
    `rate_per_s * w` more items arrive (up to `max_batch`). The longest w with
    w + cost(n(w)) <= target, so the oldest item still makes its target; 0 when not even one
    more item is expected within that time, or the batch is full; never more than the target."""
    n = min(waiting, max_batch)
    if n >= max_batch or rate_per_s <= 0:
        return 0.0
    room = target_s - fixed_s - per_item_s * n
    if room <= 0:
        return 0.0
    w = min(room / (1.0 + per_item_s * rate_per_s), target_s)
    if rate_per_s * w < 1.0:
        return 0.0  # not even one more item expected: waiting only adds latency
    return min(w, (max_batch - n) / rate_per_s)  # a full batch goes at once: no longer than filling takes


class _Item:
    __slots__ = ("chan", "closed", "fut", "model", "payload", "started", "t")

    def __init__(self, payload: Any, t: float, fut: Any = None, chan: Any = None) -> None:
        self.payload, self.t, self.fut, self.chan, self.closed = payload, t, fut, chan, False
        self.started = 0.0  # loop time its batch started
        meta = context.request_meta.get()
        self.model = meta.get("multiplexed_model_id", "") if meta else ""  # its caller's model id

    @property
    def gone(self) -> bool:
        """The caller no longer wants a result (cancelled, or its stream was closed)."""
        return self.closed if self.fut is None else self.fut.done()

    def fail(self, exc: BaseException) -> None:
        if self.fut is None:
            if not self.closed:
                self.chan.put_nowait((_ERROR, exc))
        elif not self.fut.done():
            if isinstance(exc, Exception):
                self.fut.set_exception(exc)
            else:
                self.fut.cancel()


class BatchQueue:
    """Gathers single items into lists and runs ``run_batch`` on each list.

    ``run_batch(payloads)`` returns an awaitable of a sequence with one result per payload,
    or, when ``streaming`` is true, an async iterator of such sequences.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Any]], Any],
        *,
        max_batch_size: int = 10,
        batch_wait_timeout_s: float = 0.01,
        max_concurrent_batches: int = 1,
        streaming: bool = False,
        batch_latency_target_s: float | None = None,
        batch_size_fn: Callable[[list[Any]], int] | None = None,
        name: str = "unknown",
    ) -> None:
        """`batch_size_fn`: the size of a list of payloads (else their count). `name`: the
        function's, the `function_name` of Ray's batching metrics."""
        self._run_batch = run_batch
        self.name = name
        #: (size, seconds its first item waited, seconds it ran) per batch since the replica's
        #: last metrics push took them (`take_done`); bounded, for queues no replica reads.
        self._done: list[tuple[int, float, float]] = []
        self._size = _check_size_fn(batch_size_fn)
        self._max = _check_count(max_batch_size, "max_batch_size")
        self._timeout = _check_timeout(batch_wait_timeout_s)
        self._target = _check_target(batch_latency_target_s)
        self._concurrency = _check_count(max_concurrent_batches, "max_concurrent_batches")
        self.streaming = streaming
        self._batches = self._items = self._largest = self._skipped = 0
        # what the adaptive wait learns: arrivals per second, and a batch's fixed and per-item cost
        self._rate = 0.0
        self._fixed_s = self._per_item_s = 0.0
        self._cost_known = False
        #: max_batch_size and batch_wait_timeout_s when the first item came to an empty queue:
        #: the batch it starts keeps them (as Ray's; the setters apply from the next batch)
        self._first_limits = (self._max, self._timeout)
        self._reset()
        QUEUES.add(self)

    def _reset(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[_Item] = deque()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(self._concurrency)
        self._worker: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    def __getstate__(self) -> dict[str, Any]:  # runtime state never travels
        return {k: v for k, v in self.__dict__.items() if k not in _RUNTIME}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def get_max_batch_size(self) -> int:
        """The current ``max_batch_size``."""
        return self._max

    def get_batch_wait_timeout_s(self) -> float:
        """The current ``batch_wait_timeout_s``."""
        return self._timeout

    def set_max_batch_size(self, new_max_batch_size: int) -> None:
        """Change ``max_batch_size``; as Ray's, from the next batch on (the one being formed
        keeps the size it started with)."""
        self._max = _check_count(new_max_batch_size, "max_batch_size")
        self._poke()

    def set_batch_wait_timeout_s(self, new_batch_wait_timeout_s: float) -> None:
        """Change ``batch_wait_timeout_s``; as Ray's, from the next batch on."""
        self._timeout = _check_timeout(new_batch_wait_timeout_s)
        self._poke()

    def get_batch_latency_target_s(self) -> float | None:
        """The latency target the wait adapts to (None: the fixed ``batch_wait_timeout_s``)."""
        return self._target

    def set_batch_latency_target_s(self, target_s: float | None) -> None:
        """Adapt the wait to `target_s` (None: back to the fixed ``batch_wait_timeout_s``)."""
        self._target = _check_target(target_s)
        self._poke()

    def current_wait_s(self, waiting: int = 1, limits: tuple[int, float] | None = None) -> float:
        """How long a batch of `waiting` items would wait now (`limits`: the max_batch_size and
        batch_wait_timeout_s the batch started with; default the current ones)."""
        most, wait = limits or (self._max, self._timeout)
        if self._target is None:
            return wait
        return adaptive_wait(self._target, waiting, most, self._rate, self._fixed_s, self._per_item_s)

    def stats(self) -> BatchStats:
        """A snapshot of this queue's counters."""
        queued = sum(1 for item in self._pending if not item.gone)
        return BatchStats(
            self._batches, self._items, self._largest, queued, len(self._running), self._skipped
        )

    def take_done(self) -> list[tuple[int, float, float]]:
        """The batches finished since the last call: (size, wait s, run s) each."""
        done, self._done = self._done, []
        return done

    def _poke(self) -> None:
        """Make the worker re-read its settings; safe from any thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    async def submit(self, payload: Any) -> Any:
        """Queue one item and wait for its result."""
        loop = self._attach()
        fut = loop.create_future()
        item = _Item(payload, loop.time(), fut=fut)
        self._put(item)
        try:
            return await fut
        finally:
            if item.started:
                BATCH_WAIT_S.set(BATCH_WAIT_S.get() + item.started - item.t)

    def stream(self, payload: Any) -> AsyncIterator[Any]:
        """Queue one item now; iterate the returned generator for its results."""
        loop = self._attach()
        item = _Item(payload, loop.time(), chan=asyncio.Queue())
        self._put(item)
        return self._drain(item)

    @staticmethod
    async def _drain(item: _Item) -> AsyncIterator[Any]:
        try:
            while True:
                kind, value = await item.chan.get()
                if kind == _VALUE:
                    yield value
                elif kind == _DONE:
                    return
                else:
                    raise value
        finally:
            item.closed = True

    def _attach(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._reset()
            self._loop = loop
        if self._worker is None or self._worker.done():
            # A context of its own: not the first caller's request (whose cancellation would
            # otherwise cancel the handle calls every batch makes).
            self._worker = loop.create_task(self._work(), name="flotilla-batch-queue", context=contextvars.Context())
        return loop

    def _put(self, item: _Item) -> None:
        self._pending.append(item)
        if len(self._pending) == 1:
            self._first_limits = (self._max, self._timeout)
        if (len(self._pending) == 1 or len(self._pending) >= self._max or self._target is not None
                or self._size is not None):
            self._wake.set()  # (with a target or a size function, each arrival: re-decide)

    async def _work(self) -> None:
        loop, slots = self._loop, self._slots
        assert loop is not None
        while True:
            await slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                slots.release()
                raise
            task = loop.create_task(self._execute(batch, slots))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_batch(self) -> list[_Item]:
        pending, wake, loop = self._pending, self._wake, self._loop
        assert loop is not None
        # As Ray's: a batch keeps the settings of when its first item came (or of now, when it
        # is already waiting).
        limits: tuple[int, float] | None = (self._max, self._timeout) if pending else None
        while True:
            while pending and pending[0].gone:
                pending.popleft()
                self._skipped += 1
            if not pending:
                wake.clear()
                await wake.wait()
                limits = None
                continue
            if limits is None:
                limits = self._first_limits
            most = limits[0]
            deadline = pending[0].t + self.current_wait_s(len(pending), limits)
            if self._size is None:
                ready = loop.time() >= deadline or self._full(most)
                n = min(most, len(pending))
            else:
                n, full = self._fit(most)
                if not pending:
                    continue
                if n == 0:
                    item = pending.popleft()
                    item.fail(RuntimeError(
                        f"one item's size, {self._size([item.payload])} by batch_size_fn, is greater than "
                        f"max_batch_size={most}: raise max_batch_size or check batch_size_fn"))
                    continue
                ready = full or loop.time() >= deadline
            if ready:
                if self._target is not None:
                    self._learn_rate(n, loop.time() - pending[0].t)
                return [pending.popleft() for _ in range(n)]
            wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await wake.wait()

    def _full(self, most: int) -> bool:
        pending = self._pending
        if len(pending) < most:
            return False
        live = [item for item in pending if not item.gone]
        self._skipped += len(pending) - len(live)
        pending.clear()
        pending.extend(live)
        return len(pending) >= most

    def _fit(self, limit: int) -> tuple[int, bool]:
        """With a `batch_size_fn`: how many items from the front make a batch whose size is at
        most max_batch_size, and whether that batch is full (the next item does not fit, or it
        reached the size). Gone items are dropped first; an item whose size the function
        cannot compute fails with its error. 0 (items pending): the first one alone is over."""
        pending = self._pending
        live = [item for item in pending if not item.gone]
        self._skipped += len(pending) - len(live)
        size = self._size
        assert size is not None
        payloads: list[Any] = []
        kept: list[_Item] = []
        n = 0
        for i, item in enumerate(live):
            payloads.append(item.payload)
            try:
                n = size(payloads)
            except Exception as e:
                payloads.pop()
                item.fail(e)
                continue
            kept.append(item)
            if n >= limit:
                kept.extend(live[i + 1:])
                break
        pending.clear()
        pending.extend(kept)
        if n > limit:
            return len(payloads) - 1, True
        return len(payloads), n == limit

    def _measure(self, items: list[_Item]) -> int:
        """A batch's size: by `batch_size_fn` where there is one (its count if that fails)."""
        if self._size is not None:
            with contextlib.suppress(Exception):
                return self._size([item.payload for item in items])
        return len(items)

    def _learn_rate(self, n: int, waited: float) -> None:
        """Arrivals per second while a batch's first item waited: what waiting gains. (Not the
        overall rate: a client that sends its next request after the reply arrives often but
        never while one waits, and waiting for it only adds latency.)"""
        if waited < 1e-4:
            return
        sample = (n - 1) / waited
        self._rate = sample if not self._rate else (1 - _EWMA) * self._rate + _EWMA * sample

    def _learn_cost(self, n: int, seconds: float) -> None:
        """Fold one batch's run time into the cost model: per item when batches differ in size,
        otherwise as fixed cost (the first batch sets both)."""
        if self._target is None:
            return
        if not self._cost_known:
            self._fixed_s, self._per_item_s, self._cost_known = seconds * 0.5, seconds * 0.5 / n, True
            return
        predicted = self._fixed_s + self._per_item_s * n
        err = seconds - predicted
        # split the error between the two terms in proportion to their share of this batch
        share = (self._per_item_s * n) / predicted if predicted > 0 else 0.5
        self._per_item_s = max(0.0, self._per_item_s + _EWMA * err * share / n)
        self._fixed_s = max(0.0, self._fixed_s + _EWMA * err * (1 - share))

    async def _execute(self, batch: list[_Item], slots: asyncio.Semaphore) -> None:
        """Run `batch`, holding one of the `max_concurrent_batches` slots: as one call, or, when
        its callers asked for different multiplexed models, as one concurrent call per model,
        each seeing its model in `serve.get_multiplexed_model_id()` (as Ray Serve splits)."""
        try:
            live = [item for item in batch if not item.gone]
            self._skipped += len(batch) - len(live)
            if not live:
                return
            first = live[0].model
            if all(item.model == first for item in live):
                await self._run(live)
                return
            groups: dict[str, list[_Item]] = {}
            for item in live:
                groups.setdefault(item.model, []).append(item)
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.create_task(self._run(group)) for group in groups.values()))
        finally:
            slots.release()

    async def _run(self, live: list[_Item]) -> None:
        """One call of the batch function on `live` (non-empty, one model id)."""
        if live[0].model:
            context.request_meta.set({"multiplexed_model_id": live[0].model})
        open_ = [True] * len(live)
        began = waited = 0.0
        agen = None
        try:
            self._batches += 1
            self._items += len(live)
            self._largest = max(self._largest, len(live))
            now = self._loop.time() if self._loop is not None else 0.0
            for item in live:
                item.started = now
            began = time.perf_counter()
            waited = now - live[0].t
            out = self._run_batch([item.payload for item in live])
            if not self.streaming:
                results = await out
                self._learn_cost(len(live), time.perf_counter() - began)
                _check_results(results, len(live))
                for item, result in zip(live, results, strict=True):
                    if not item.fut.done():
                        item.fut.set_result(result)
                return
            agen = out
            async for results in agen:
                _check_results(results, len(live))
                for k, item in enumerate(live):
                    if not open_[k]:
                        continue
                    if item.closed or _is_stop(results[k]):
                        open_[k] = False
                        if not item.closed:
                            item.chan.put_nowait((_DONE, None))  # ends this caller's stream now
                    else:
                        item.chan.put_nowait((_VALUE, results[k]))
                if not any(open_):
                    break  # every caller has finished or gone away
        except BaseException as exc:
            for k, item in enumerate(live):
                if open_[k]:
                    open_[k] = False
                    item.fail(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            if began and len(self._done) < 10_000:
                self._done.append((self._measure(live), waited, time.perf_counter() - began))
            if self.streaming:
                for k, item in enumerate(live):
                    if open_[k] and not item.closed:
                        item.chan.put_nowait((_DONE, None))
                if agen is not None:
                    with contextlib.suppress(Exception):
                        await agen.aclose()


def _async_kind(fn: Any) -> str | None:
    """Classify ``fn``: ``"gen"`` (async generator), ``"coro"`` (coroutine) or None (sync)."""
    routine = inspect.isroutine(fn) or isinstance(fn, functools.partial)
    target = fn if routine else type(fn).__call__
    if inspect.isasyncgenfunction(target):
        return "gen"
    return "coro" if inspect.iscoroutinefunction(target) else None


def _signature(fn: Any) -> inspect.Signature | None:
    with contextlib.suppress(TypeError, ValueError):
        return inspect.signature(fn)
    return None


def _collate(payloads: list[Any], sig: inspect.Signature | None) -> tuple[list[list], dict]:
    """Turn one ``(args, kwargs)`` per caller into one list per argument."""

    def uniform(calls: list[Any]) -> bool:
        args0, kw0 = calls[0]
        return all(len(a) == len(args0) and kw.keys() == kw0.keys() for a, kw in calls)

    if not uniform(payloads):  # e.g. f(1, y=2) and f(x=3, y=4): normalise by the signature
        if sig is None:
            raise TypeError("calls in one batch passed different arguments")
        for fill_defaults in (False, True):
            calls = []
            for args, kwargs in payloads:
                bound = sig.bind(*args, **kwargs)
                if fill_defaults:
                    bound.apply_defaults()
                calls.append((bound.args, bound.kwargs))
            if uniform(calls):
                payloads = calls
                break
        else:
            raise TypeError("calls in one batch must pass the same set of arguments")
    columns = [list(col) for col in zip(*(args for args, _ in payloads), strict=True)]
    return columns, {key: [kw[key] for _, kw in payloads] for key in payloads[0][1]}


def _new_queue(fn: Any, self_arg: tuple, opts: dict[str, Any], streaming: bool) -> BatchQueue:
    sig = _signature(fn)
    if sig is not None and self_arg:
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])

    def run(payloads: list[Any]) -> Any:
        args, kwargs = _collate(payloads, sig)
        return fn(*self_arg, *args, **kwargs)

    size_fn = opts.get("batch_size_fn")
    if size_fn is not None:  # it sees each caller's item (its first argument), as in Ray

        def size(payloads: list[Any]) -> int:
            return size_fn([args[0] if args else next(iter(kwargs.values()), None) for args, kwargs in payloads])

        opts = {**opts, "batch_size_fn": size}
    return BatchQueue(run, streaming=streaming, name=getattr(fn, "__name__", "unknown"), **opts)


def _entry(fn: Any, queue: BatchQueue, skip: int) -> Callable[..., Any]:
    """The function callers call (one item in, one result or stream out), with Ray's tuners."""
    entry: Callable[..., Any]
    if queue.streaming:

        def entry_stream(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            return queue.stream((args[skip:], kwargs))

        entry = entry_stream
    else:

        async def entry_call(*args: Any, **kwargs: Any) -> Any:
            return await queue.submit((args[skip:], kwargs))

        entry = entry_call
    functools.update_wrapper(entry, fn, updated=())
    return _expose(entry, queue)


def _expose(wrapper: Any, queue: BatchQueue) -> Any:
    wrapper.batch_queue = queue
    wrapper.set_max_batch_size = queue.set_max_batch_size
    wrapper.set_batch_wait_timeout_s = queue.set_batch_wait_timeout_s
    wrapper.get_max_batch_size = wrapper._get_max_batch_size = queue.get_max_batch_size
    wrapper.get_batch_wait_timeout_s = queue.get_batch_wait_timeout_s
    wrapper._get_batch_wait_timeout_s = queue.get_batch_wait_timeout_s
    wrapper.set_batch_latency_target_s = queue.set_batch_latency_target_s
    wrapper.get_batch_latency_target_s = queue.get_batch_latency_target_s
    return wrapper


class _BatchedMethod:
    """Descriptor for a batched method: each instance gets its own queue and tuners.

    ``obj.method`` is a bound coroutine function (or async-generator-returning function);
    its ``set_max_batch_size`` etc. tune that instance's queue only.
    """

    def __init__(self, fn: Any, opts: dict[str, Any], streaming: bool) -> None:
        functools.update_wrapper(self, fn, updated=())
        self._fn, self._opts, self._streaming = fn, opts, streaming
        self._key = f"_flotilla_batch_{fn.__name__}_{id(self):x}"
        unbound: Callable[..., Any]
        if streaming:  # what `Class.method` gives: a real function, so inspect sees the kind

            def unbound_stream(obj: Any, /, *args: Any, **kwargs: Any) -> Any:
                return self._entry_for(obj)(obj, *args, **kwargs)

            unbound = unbound_stream
        else:

            async def unbound_call(obj: Any, /, *args: Any, **kwargs: Any) -> Any:
                return await self._entry_for(obj)(obj, *args, **kwargs)

            unbound = unbound_call
        self._unbound = functools.update_wrapper(unbound, fn, updated=())

    def _entry_for(self, obj: Any) -> Callable[..., Any]:
        entry = getattr(obj, "__dict__", {}).get(self._key)
        if entry is None:
            entry = _entry(self._fn, _new_queue(self._fn, (obj,), self._opts, self._streaming), 1)
            try:
                vars(obj)[self._key] = entry
            except TypeError:
                raise TypeError(
                    f"@serve.batch on {self._fn.__qualname__} needs a __dict__"
                ) from None
        return entry

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self._unbound if obj is None else MethodType(self._entry_for(obj), obj)

    def __call__(self, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        return self._unbound(obj, *args, **kwargs)


def batch(
    _func: Callable[..., Any] | None = None,
    /,
    max_batch_size: int = 10,
    batch_wait_timeout_s: float = 0.01,
    max_concurrent_batches: int = 1,
    batch_size_fn: Callable[[list[Any]], int] | None = None,
    *,
    batch_latency_target_s: float | None = None,
) -> Any:
    """Batch calls to an async function or method, like Ray Serve's ``@serve.batch``.

    Use as ``@batch``, ``@batch()`` or ``@batch(max_batch_size=8, ...)`` (the options also
    by position after a None, in Ray's order: ``@batch(None, 8, 0.05)``). Callers pass one
    item and await one result; the function gets one list per argument and returns a list
    of the same length. Async generator functions yield such lists and each caller gets an
    async generator of its own elements. The wrapper has ``set_max_batch_size``,
    ``set_batch_wait_timeout_s`` and matching getters for live tuning (e.g. in
    ``reconfigure``), and ``batch_queue`` for ``stats()``. ``batch_size_fn(items)``, as in
    Ray: a batch's size is that of its items (their count without it), each at most
    ``max_batch_size``; an item over it alone fails with RuntimeError.

    flotilla extra: ``batch_latency_target_s`` replaces the fixed ``batch_wait_timeout_s`` with
    a wait chosen per batch from the observed arrival rate and batch cost, so that an item's
    wait plus its batch's run time stays within the target (see `adaptive_wait`).
    """
    if _func is not None and not callable(_func):
        raise TypeError(
            f"@serve.batch decorates functions or methods (options go by keyword, e.g. "
            f"@serve.batch(max_batch_size=8)), got {_func!r}"
        )
    opts = {
        "max_batch_size": _check_count(max_batch_size, "max_batch_size"),
        "batch_wait_timeout_s": _check_timeout(batch_wait_timeout_s),
        "max_concurrent_batches": _check_count(max_concurrent_batches, "max_concurrent_batches"),
        "batch_latency_target_s": _check_target(batch_latency_target_s),
        "batch_size_fn": _check_size_fn(batch_size_fn),
    }

    def decorate(fn: Callable[..., Any]) -> Any:
        kind = _async_kind(fn)
        if kind is None:
            raise TypeError(
                "functions decorated with @serve.batch must be 'async def' (coroutine or async "
                f"generator); {getattr(fn, '__qualname__', fn)!r} is synchronous"
            )
        sig = _signature(fn) if inspect.isfunction(fn) else None
        if sig is not None and next(iter(sig.parameters), None) == "self":
            return _BatchedMethod(fn, opts, kind == "gen")
        return _entry(fn, _new_queue(fn, (), opts, kind == "gen"), 0)

    return decorate if _func is None else decorate(_func)


def batched_caller(
    fn: Callable[[list[Any]], Any],
    max_batch_size: int,
    batch_wait_timeout_s: float,
    *,
    max_concurrent_batches: int = 1,
    batch_latency_target_s: float | None = None,
) -> Callable[[Any], Awaitable[Any]]:
    """Wrap ``fn(list) -> list`` (sync or async) as an async one-item function with batching.

    Sync functions run in the loop's default executor. The result carries the same tuners as
    ``@batch`` wrappers and ``batch_queue`` (its `BatchQueue`).
    """
    kind = _async_kind(fn) if callable(fn) else "not callable"
    if kind not in (None, "coro"):
        raise TypeError(f"batched_caller needs a function taking a list and returning one: {fn!r}")
    queue = BatchQueue(
        fn if kind == "coro" else functools.partial(_in_executor, fn),
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_timeout_s,
        max_concurrent_batches=max_concurrent_batches,
        batch_latency_target_s=batch_latency_target_s,
        name=getattr(fn, "__name__", "unknown"),
    )

    async def call(item: Any) -> Any:
        return await queue.submit(item)

    return _expose(call, queue)


async def _in_executor(fn: Callable[[list[Any]], Any], items: list[Any]) -> Any:
    result = await asyncio.get_running_loop().run_in_executor(None, fn, items)
    return (await result) if inspect.isawaitable(result) else result
