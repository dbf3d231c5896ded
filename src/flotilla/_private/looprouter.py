"""Routers on the caller's own event loop, so that an async caller's handle calls take no
thread hop (a driver running asyncio, a web app calling deployments).

The runtime's router of a deployment (on the runtime's loop) is the one the head updates. A
handle call made on another running loop and awaited there at once (or a stream iterated there)
goes through a `Follower` on that loop instead: its own connections to the replicas, the
replica set forwarded to it by the runtime's router.
Request, reply and routing all happen on the caller's thread.

A loop that stops (`asyncio.run` returned, or a kept loop between `run_until_complete` calls)
cannot answer its replicas, and a draining replica waits for every connection's `DrainAck`.
So the runtime's loop checks the followers' loops (`CHECK_S`): a follower on a closed loop is
cut off and forgotten; one on a stopped loop with nothing in flight is parked (its sockets shut
down, so replicas see them go) and reconnects when its loop calls through it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from flotilla._private import trace
from flotilla._private.poll import ReplyWait
from flotilla._private.router import Router
from flotilla.serve.schema import DeploymentID

if TYPE_CHECKING:
    from flotilla._private.client import Runtime

#: How often the runtime's loop looks at the loops its followers run on.
CHECK_S = 0.25


CUT, PARK, KEEP = "cut", "park", "keep"


def fate(closed: bool, running: bool, parked: bool, idle_with_connections: bool) -> str:
    """What becomes of a follower, from its loop's state: CUT off and forgotten (the loop is
    closed), PARK (stopped, with connections and nothing in flight), else KEEP."""
    if closed:
        return CUT
    if not running and not parked and idle_with_connections:
        return PARK
    return KEEP


class Follower(Router):
    """A router on a caller's loop, fed the replica set by the runtime's router (`lead`)."""

    def __init__(self, rt: Runtime, dep: DeploymentID, home: asyncio.AbstractEventLoop) -> None:
        super().__init__(dep, self._waiting, rt.cold_start_timeout_s)
        self.rt = rt
        self.lead: Router | None = None  # set on the runtime's loop (`LoopRouters._follow`)
        self.loop = home  # fixed: a follower lives and dies with its caller's loop
        self.parked = False
        self.pumped = False  # on a `lane.Lane`'s loop, whose pump turns it: never parked
        self.wait = ReplyWait()  # of `call_polled`'s callers
        self._open = 0  # `call_polled` calls not answered yet
        self._poll_until = 0.0  # perf_counter: the loop is polled until then while calls are open
        self._polling = False
        self.polled = 0  # `call_polled` calls for which the loop was polled

    @property
    def home(self) -> asyncio.AbstractEventLoop:
        """The caller's loop it runs on."""
        assert self.loop is not None
        return self.loop

    async def call_polled(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: Any) -> Any:
        """`call`, the caller's loop kept polling (never blocked in its selector) while the
        reply is expected soon (`poll`): one callback, called again at each turn, until every
        such call is answered or its time is up; other work on the loop runs as usual."""
        began = time.perf_counter()
        budget = self.wait.budget()
        if budget:
            self.polled += 1
            self._open += 1
            self._poll_until = max(self._poll_until, began + budget)
            if not self._polling:
                self._polling = True
                self.home.call_soon(self._poll)
        try:
            return await self.call(method, args, kwargs, meta)
        finally:
            if budget:
                self._open -= 1
            self.wait.waited(time.perf_counter() - began)

    def _poll(self) -> None:
        if self._open and time.perf_counter() < self._poll_until:
            self.home.call_soon(self._poll)
        else:
            self._polling = False

    def _waiting(self, cold: bool) -> None:
        if cold:  # no replica at all: the autoscaler hears of it now (`Runtime._on_router_wait`)
            self.rt.inbox.put(self.rt._on_router_wait, cold)

    def fold_calls(self) -> None:
        """Finished calls go to the runtime's loop, where every metric of this process is kept."""
        done, self._calls = self._calls, []
        if done:
            self.rt.inbox.put(trace.calls_done, self._queue_hist, self.deployment_id, done)

    def idle(self) -> bool:
        return not self.queue and all(c.in_flight == 0 and not c.pending for c in self.conns())

    def tell(self, fn: Any, *args: Any) -> bool:
        """Run `fn(*args)` on the follower's loop; False if that loop is closed."""
        try:
            self.home.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:
            return False

    def sever(self) -> None:
        """Shut its sockets down from another thread (its loop is stopped or closed): the
        replicas see the connections end; the transports go with their loop."""
        for c in self.conns():
            t = c.proto.transport
            if t is None:
                continue
            with contextlib.suppress(Exception):
                s = t.get_extra_info("socket")
                if s is not None:
                    dup = socket.socket(fileno=os.dup(s.fileno()))
                    try:
                        dup.shutdown(socket.SHUT_RDWR)
                    finally:
                        dup.close()

    def resume(self) -> None:
        """On its loop, after parking: drop the shut connections, connect again."""
        self.parked = False
        self.close()
        info = self.lead.info if self.lead is not None else None
        if info is not None:
            self.update(info)


class LoopRouters:
    """The followers of this process, by loop and deployment."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.by_loop: dict[asyncio.AbstractEventLoop, dict[DeploymentID, Follower]] = {}
        self.lock = threading.Lock()  # parking (the runtime's loop) against use (the caller's)
        self._checker: asyncio.Task[None] | None = None

    def get(self, loop: asyncio.AbstractEventLoop, dep: DeploymentID) -> Follower:
        """The follower of `dep` on `loop`, the caller's running loop. Under the lock: `_check`
        parks a follower only while its loop is stopped, checked under the same lock."""
        with self.lock:
            routers = self.by_loop.get(loop)
            f = routers.get(dep) if routers is not None else None
            if f is None:
                f = self.by_loop.setdefault(loop, {})[dep] = Follower(self.rt, dep, loop)
                self.rt.inbox.put(self._follow, f)
            elif f.parked:
                f.resume()
            return f

    # ---- on the runtime's loop ----------------------------------------------------------
    def _follow(self, f: Follower) -> None:
        lead = self.rt.router(f.deployment_id)
        f.lead = lead
        lead.followers.append(f)
        lead.regroup()
        if lead.info is not None:
            f.tell(f.update, lead.info)
        if self._checker is None:
            self._checker = self.rt.loop.create_task(self._check())

    async def _check(self) -> None:
        while self.by_loop:
            await asyncio.sleep(CHECK_S)
            with self.lock:
                for loop in list(self.by_loop):
                    closed, running = loop.is_closed(), loop.is_running()
                    for f in list(self.by_loop[loop].values()):
                        what = fate(closed, running, f.parked or f.pumped, bool(f.conns()) and f.idle())
                        if what == CUT:
                            f.sever()
                            if f.lead is not None:
                                with contextlib.suppress(ValueError):
                                    f.lead.followers.remove(f)
                                f.lead.regroup()
                        elif what == PARK:
                            f.parked = True
                            f.sever()
                    if closed:
                        del self.by_loop[loop]
        self._checker = None

    def all(self) -> list[Follower]:
        return [f for routers in list(self.by_loop.values()) for f in list(routers.values())]

    def close(self) -> None:
        """Close every follower (serve.shutdown): on its loop, or cut off if that is closed."""
        with self.lock:
            for f in self.all():
                if not f.tell(f.close):
                    f.sever()
            self.by_loop.clear()
        if self._checker is not None:
            self._checker.cancel()
