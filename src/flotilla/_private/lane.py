"""A blocking caller's own event loop, so `handle.remote(...).result()` from a driver's main
thread takes no thread hop.

The runtime's loop runs on its own thread; a sync call through it costs two cross-thread
wake-ups (caller to loop, loop to caller: about 45 us on a VM). The main thread's plain
calls go instead through `Follower`s on a private loop that nobody runs between calls:
`remote()` writes the request at once (`Router.call_direct` needs no turn of the loop) and
`result()` turns the loop until the reply is in, on the caller's own thread.

Whoever turns the loop holds `Lane.lock`. Between calls a pump thread turns it every
PUMP_S while no caller does (and at once when asked: `put`, an await from another loop),
so replies nobody waits for yet, a draining replica's messages and replica-set changes are
handled; `remote()` takes the lock from the pump (its turn ends at once), and `result()`
that finds it taken waits on the response's latch (released by whoever turns the loop).
A call with no free slot waits in its follower's queue, as a task of the lane's loop.
Only a follower with no connected replica (a cold start) sends the call to the runtime's
loop instead. FLOTILLA_SYNC_LANE=0 sends every sync call through the runtime's loop.

`result()` of a call expected back soon polls the loop before it blocks (`poll`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from flotilla._private.poll import ReplyWait
from flotilla.serve.schema import DeploymentID

if TYPE_CHECKING:
    from flotilla._private.client import Runtime
    from flotilla._private.looprouter import Follower
    from flotilla._private.router import DirectCall

#: How often the pump turns an idle lane's loop (seconds), and the longest it turns it at once.
PUMP_S = 0.05
#: A loop not turned for this long is turned once before a call is sent (seconds): a
#: replica that died or drains meanwhile is known before one is chosen.
STALE_S = 0.002
#: How long `remote()` turns the loop for a new follower's first connection before it falls
#: back to the runtime's loop (the runtime's router has a ready replica by then).
WARM_S = 1.0


def enabled() -> bool:
    return os.environ.get("FLOTILLA_SYNC_LANE", "1") != "0"


class Lane:
    """The main thread's private loop and its followers (one per `Runtime`)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.loop = asyncio.SelectorEventLoop()  # not the policy's: a uvloop pays for signals per turn
        self.lock = threading.Lock()
        self.closed = False
        #: reply futures of calls sent here and not settled yet
        self.pending: set[asyncio.Future[Any]] = set()
        self._wanted = 0  # callers waiting for the lock (the pump leaves it to them)
        self._yield: asyncio.Future[None] | None = None  # set: the pump's turn ends now
        self._turned = 0.0  # time.monotonic() of the end of the last turn of the loop
        self._followers: dict[DeploymentID, Follower] = {}  # never parked or cut while the lane lives
        self.wait = ReplyWait()  # of `drive`'s callers
        self.polls = 0  # `drive`s that polled before blocking
        self.caught = 0  # ... and found the reply while polling
        self._wake = threading.Event()
        self._pump = threading.Thread(target=self._run_pump, name="flotilla-lane", daemon=True)
        self._pump.start()

    # ---- the caller's side (under `lock`) -------------------------------------------------
    def send(self, dep: DeploymentID, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: Any,
             on_done: Any) -> tuple[DirectCall | None, asyncio.Future[Any]] | None:
        """Send a plain call through this lane's follower of `dep`: its DirectCall (None if
        it waits in the follower's queue, as a task of the lane's loop) and its outcome
        future, whose settling calls `on_done(it)`; None, nothing done, if the lane is closed
        or its follower has no connected replica (the runtime's loop takes the call). Raises
        if the call cannot be sent (its arguments do not pickle)."""
        if not self._take():
            return None
        try:
            if self.closed:
                return None
            if time.monotonic() - self._turned > STALE_S:  # what came since (a replica gone, a drain) first
                self._run(asyncio.sleep(0))
            f = self._follower(dep)
            if f is None:
                return None
            out = self.loop.create_future()
            d = f.call_direct(method, args, kwargs, meta, out, on_done)
            if d is None:  # no free slot, or others wait: in line in this follower, as `await` would be
                out = self.loop.create_task(f.call(method, args, kwargs, meta))
                out.add_done_callback(on_done)
                self._run(asyncio.sleep(0))  # in line (or refused) before the next call
            self.pending.add(out)
            out.add_done_callback(self.pending.discard)
            return d, out
        finally:
            self.lock.release()

    def _take(self) -> bool:
        """The lock, from the pump if it turns the loop now (its turn ends at once); False if
        not had within 5 s."""
        if self.lock.acquire(blocking=False):
            return True
        self._wanted += 1
        try:
            with contextlib.suppress(RuntimeError):  # closed
                self.loop.call_soon_threadsafe(self._yield_turn)
            return self.lock.acquire(timeout=5)
        finally:
            self._wanted -= 1

    def _yield_turn(self) -> None:
        y = self._yield
        if y is not None and not y.done():
            y.set_result(None)

    def _follower(self, dep: DeploymentID) -> Follower | None:
        """The lane's follower of `dep`, connected (turning the loop up to WARM_S for a new
        one's connections), or None."""
        f = self._followers.get(dep)
        if f is None:
            f = self._followers[dep] = self.rt.loop_routers.get(self.loop, dep)
            f.pumped = True
        if not f.ready:
            lead = self.rt.routers.get(dep)
            if lead is None or not lead.ready:  # nothing to connect to yet: the runtime's loop waits
                return None
            self._turn_until(lambda: bool(f.ready), WARM_S)
            if not f.ready:
                return None
        return f

    def drive(self, out: asyncio.Future[Any], timeout: float | None) -> bool:
        """Turn the loop on this thread until `out` is settled or `timeout` passed; False,
        having done nothing, if another thread turns it, this is not the main thread (which
        never waits for another's turn to end) or a loop runs here (`result()` inside a
        coroutine): then wait for the latch."""
        if (threading.current_thread() is not threading.main_thread() or asyncio._get_running_loop() is not None
                or not self.lock.acquire(blocking=False)):
            return False
        try:
            if self.closed:
                return False
            if out.done():  # in already: only its callbacks to run, no wait to note
                self._run(out)
                return True
            began = time.perf_counter()
            waiter, timer = out, None
            if timeout is not None:  # settled by `out` or the timeout (no task)
                waiter = self.loop.create_future()
                timer = self.loop.call_later(timeout, _settle, waiter)
                out.add_done_callback(functools.partial(_settle, waiter))
            budget = self.wait.budget()
            try:
                self._run(self._poll(out, waiter, began + budget) if budget else waiter)
            except BaseException:
                if not waiter.done():  # an interrupt while waiting
                    raise
            finally:
                if timer is not None:
                    timer.cancel()
            self.wait.waited(time.perf_counter() - began)
            return True
        finally:
            self.lock.release()

    async def _poll(self, out: asyncio.Future[Any], waiter: asyncio.Future[Any], until: float) -> None:
        """Turn the loop without blocking until `waiter` is settled or `until` (perf_counter),
        then wait for it."""
        self.polls += 1
        while not waiter.done() and time.perf_counter() < until:
            await asyncio.sleep(0)
        if out.done():
            self.caught += 1
        await waiter

    def _turn_until(self, done: Any, timeout: float) -> None:
        """Turn the loop until `done()` or `timeout` (checked each millisecond)."""
        async def wait() -> None:
            end = self.loop.time() + timeout
            while not done() and self.loop.time() < end:
                await asyncio.sleep(min(0.001, max(0.0, end - self.loop.time())))

        self._run(wait())

    def _run(self, aw: Any) -> None:
        """`run_until_complete(aw)`, noting when the loop last turned."""
        try:
            self.loop.run_until_complete(aw)
        finally:
            self._turned = time.monotonic()

    # ---- any thread -------------------------------------------------------------------
    def put(self, fn: Any, *args: Any) -> None:
        """Run `fn(*args)` on the lane's loop at its next turn, and turn it now."""
        self.loop.call_soon_threadsafe(fn, *args)
        self._wake.set()

    def close(self) -> None:
        """After the runtime's loop told the followers to close: run that, close the loop."""
        self.closed = True
        self._wake.set()
        if not self.lock.acquire(timeout=5):
            return
        try:
            if not self.loop.is_closed():
                with contextlib.suppress(Exception):  # closed connections fail what is in flight
                    self._turn_until(lambda: not self.pending, 1.0)
                self.loop.close()
        finally:
            self.lock.release()

    # ---- the pump thread ------------------------------------------------------------
    def _run_pump(self) -> None:
        while True:
            self._wake.wait(PUMP_S)
            self._wake.clear()
            if self.closed:
                return
            if self._wanted or not self.lock.acquire(blocking=False):
                continue  # a caller turns it, or is about to
            try:
                if self.closed:
                    return
                self._run(self._pump_turn())
            except Exception:  # a turn never takes the pump down
                pass
            finally:
                self.lock.release()
            if self.pending:
                self._wake.set()  # turn again soon, after a caller had its chance at the lock

    async def _pump_turn(self) -> None:
        """One turn of the pump: until a pending call settles, a caller wants the lock, or
        PUMP_S passed."""
        if not self.pending or self._wanted:
            await asyncio.sleep(0)
            return
        y = self._yield = self.loop.create_future()
        try:
            await asyncio.wait([*self.pending, y], timeout=PUMP_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._yield = None


def for_caller(rt: Runtime) -> Lane | None:
    """The lane of a sync call made on this thread now, or None (the runtime's loop takes it):
    only a driver's main thread has one."""
    if not rt.lane_ok or threading.current_thread() is not threading.main_thread():
        return None
    lane = rt.lane
    if lane is None:
        if not enabled():
            rt.lane_ok = False
            return None
        lane = rt.lane = Lane(rt)
    return lane


def _settle(waiter: asyncio.Future[None], *_: Any) -> None:
    if not waiter.done():
        waiter.set_result(None)
