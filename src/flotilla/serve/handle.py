"""`DeploymentHandle`: call a deployment's replicas directly, from any process.

`handle.remote(...)` returns at once with a `DeploymentResponse`; get its value with
`.result(timeout_s=...)` from sync code, or `await response` from async code. Responses
can be passed as arguments to other `.remote()` calls; they are resolved first.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import functools
import random
import threading
from collections.abc import Awaitable, Coroutine, Generator
from dataclasses import dataclass, replace
from typing import Any, NoReturn

from flotilla._private import args as _args
from flotilla._private.client import Runtime
from flotilla._private.context import new_request_id, request_meta, spawned
from flotilla._private.hop import Inbox, inbox_for
from flotilla._private.lane import Lane, for_caller
from flotilla._private.looprouter import Follower
from flotilla._private.protocol import ResponsePending
from flotilla._private.router import DirectCall
from flotilla.exceptions import ActorDiedError, GetTimeoutError
from flotilla.serve.exceptions import RayServeException, RequestCancelledError
from flotilla.serve.schema import DeploymentID

__all__ = ["DeploymentBroadcastResponse", "DeploymentHandle", "DeploymentResponse", "DeploymentResponseGenerator",
           "SplitHandle"]


@dataclass(frozen=True)
class _HandleOptions:
    method_name: str = "__call__"
    multiplexed_model_id: str = ""
    stream: bool = False
    session_id: str = ""


async def _resolve_args(args: tuple[Any, ...], kwargs: dict[str, Any],
                        target: DeploymentID) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments with each response among them replaced by its result. A replica that died
    before finishing one fails the call with a RayServeException naming both deployments (as
    Ray's), so the caller tells it from a death of the replica its own call went to."""
    try:
        args = tuple([await a if isinstance(a, DeploymentResponse) else a for a in args])
        kwargs = {k: (await v if isinstance(v, DeploymentResponse) else v) for k, v in kwargs.items()}
    except ActorDiedError as e:
        raise RayServeException(
            f"Request to deployment '{target.name}' failed because an upstream replica died before finishing "
            f"the call whose result is one of its arguments: {e}") from e
    return args, kwargs


def _plain(parent: Any, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """A call that may run on its caller's own loop (`looprouter`): not made while serving a
    request, to a deployment (not a traffic split), no response among its arguments."""
    return parent is None and target.__class__ is DeploymentID and not _has_response(args, kwargs)


def _has_response(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    for a in args:
        if isinstance(a, DeploymentResponse):
            return True
    return any(isinstance(v, DeploymentResponse) for v in kwargs.values()) if kwargs else False


#: `.result()` where waiting would block the loop the call runs on (Ray's words first).
_SYNC_ON_LOOP = ("Sync methods should not be called from within an `asyncio` event loop. Use `await response` "
                 "instead (DeploymentResponse.result() cannot wait on the loop that runs the call).")
_OPTIONS = ("method_name", "multiplexed_model_id", "stream", "session_id", "use_new_handle_api")
#: Ray's private or newer `options()` keywords: accepted, with a warning, and ignored.
_RAY_PRIVATE_OPTIONS = {
    "_prefer_local_routing": "the router does not choose replicas by node",
    "_router_cls": "flotilla has one router",
    "_by_reference": "arguments and results always travel by value (large buffers out of band)",
    "request_serialization": "requests are always pickled (cloudpickle, protocol 5)",
    "response_serialization": "responses are always pickled (cloudpickle, protocol 5)",
}


class DeploymentHandle:
    """A client for one deployment. Picklable: pass it to other deployments."""

    __slots__ = ("_dep", "_inited", "_methods", "_opts")

    def __init__(self, deployment_name: str, app_name: str = "default", _options: _HandleOptions | None = None) -> None:
        self._dep = DeploymentID(deployment_name, app_name)
        self._opts = _options or _HandleOptions()
        self._methods: dict[str, DeploymentHandle] | None = None  # `handle.<method>`, made once each
        self._inited = False  # Ray's `is_initialized`: set by `remote`, `options`, `broadcast`, `_init`

    @property
    def deployment_name(self) -> str:
        return self._dep.name

    @property
    def app_name(self) -> str:
        return self._dep.app_name

    @property
    def deployment_id(self) -> DeploymentID:
        return self._dep

    def options(
        self,
        *,
        method_name: str | None = None,
        multiplexed_model_id: str | None = None,
        stream: bool | None = None,
        use_new_handle_api: bool | None = None,
        session_id: str | None = None,
        **ray_private: Any,
    ) -> DeploymentHandle:
        """A handle with some call options changed (the original is unchanged). A keyword
        that Ray's `options()` does not have either raises TypeError, as there.
        `session_id` rides with each call: a custom request router reads it as
        `pending_request.metadata.session_id` (session affinity), the replica's code as
        `serve.context._get_serve_request_context().session_id`."""
        if ray_private:
            _args.check("DeploymentHandle.options", ray_private, _OPTIONS, _RAY_PRIVATE_OPTIONS)
        changes: dict[str, Any] = {}
        if method_name is not None:
            changes["method_name"] = method_name
        if multiplexed_model_id is not None:
            changes["multiplexed_model_id"] = multiplexed_model_id
        if stream is not None:
            changes["stream"] = stream
        if session_id is not None:
            changes["session_id"] = session_id
        self._inited = True
        h = DeploymentHandle(self._dep.name, self._dep.app_name, replace(self._opts, **changes))
        h._inited = True
        return h

    def __getattr__(self, name: str) -> DeploymentHandle:
        if name.startswith("_"):
            raise AttributeError(name)
        methods = self._methods
        if methods is None:
            methods = self._methods = {}
        h = methods.get(name)
        if h is None:
            h = methods[name] = self.options(method_name=name)
        return h

    def remote(self, *args: Any, **kwargs: Any) -> DeploymentResponse | DeploymentResponseGenerator:
        """Send one request; returns immediately."""
        rt = Runtime.get_or_start()
        self._inited = True
        opts = self._opts
        parent = request_meta.get()
        meta: dict[str, Any]
        if parent is not None and "request_id" in parent:  # a call made while serving a request
            rid = parent["request_id"]
            route = parent.get("route")
            meta = {"request_id": rid, "route": route} if route else {"request_id": rid}
        else:
            rid = new_request_id()
            meta = {"request_id": rid}
        if opts.multiplexed_model_id:
            meta["multiplexed_model_id"] = opts.multiplexed_model_id
        if opts.session_id:
            meta["session_id"] = opts.session_id
        target = self._target()
        call: DeploymentResponse | DeploymentResponseGenerator
        if opts.stream:
            call = DeploymentResponseGenerator(rt, target, opts.method_name, args, kwargs, meta,
                                               follow=_plain(parent, target, args, kwargs))
        elif (loop := asyncio._get_running_loop()) is not None and loop is not rt.loop and _plain(parent, target, args, kwargs):
            # made on a loop of the caller's: the call runs there, through that loop's router
            call = DeploymentResponse._on_loop(rt, loop, target, opts.method_name, args, kwargs, meta, rid)  # type: ignore[arg-type]
        elif loop is None and _plain(parent, target, args, kwargs):  # from sync code: sent at once there
            call = DeploymentResponse._blocking(rt, target, opts.method_name, args, kwargs, meta, rid)  # type: ignore[arg-type]
        else:
            # `parent`: the serving request's meta, which adds up the time of its downstream calls.
            call = DeploymentResponse(rt, _call(rt, target, opts.method_name, args, kwargs, meta, parent), rid, loop)
        if parent is not None:
            spawned(parent, call)
        return call

    def broadcast(self, method_name: str, *args: Any, **kwargs: Any) -> DeploymentBroadcastResponse:
        """Call `method_name` on every replica of the deployment at once (as Ray 2.60's
        `handle.broadcast`): for control-plane calls such as a cache reset, not the request
        path (it passes by the queue and `max_queued_requests`). The call is sent now, to the
        replicas ready now; `.results()` collects one result per replica."""
        rt = Runtime.get_or_start()
        self._inited = True
        meta = {"request_id": new_request_id()}
        return DeploymentBroadcastResponse(asyncio.run_coroutine_threadsafe(
            _broadcast(rt, self._target(), method_name, args, kwargs, meta), rt.loop))

    @property
    def is_initialized(self) -> bool:
        """Whether this handle was used (`remote`, `options`, `broadcast`) or `_init`ed."""
        return self._inited

    def running_replicas_populated(self) -> bool:
        """Whether this process's router for the deployment knows a ready replica."""
        rt = Runtime._instance
        router = rt.routers.get(self._dep) if rt is not None and self._inited else None
        return router is not None and bool(router.ready)

    def _init(self, **kwargs: Any) -> None:
        """Start routing to the deployment now (Ray's `_init`; its options are accepted). Once
        only, before the handle is used, as in Ray."""
        if self._inited:
            raise RuntimeError(
                "Handle has already been initialized: a handle is initialized by its first "
                "`.remote()`, `.options()` or `.broadcast()`, or by `_init()`; call `_init()` once, before those.")
        self._inited = True
        self._warm_up()

    def shutdown(self) -> None:
        """Accepted for Ray compatibility: routers are shared by every handle to a deployment
        in a process and end with `serve.shutdown()` / the process."""

    async def shutdown_async(self) -> None:
        """`shutdown`, awaitable."""

    def _target(self) -> DeploymentID | str:
        """Where calls go: the deployment (a traffic split's name for a `SplitHandle`)."""
        return self._dep

    def _warm_up(self) -> None:
        """Create the router now so the first call does not wait for the replica set."""
        rt = Runtime.get_or_start()
        rt.loop.call_soon_threadsafe(rt.router, self._dep)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (DeploymentHandle, (self._dep.name, self._dep.app_name, self._opts))

    def __repr__(self) -> str:
        return f"DeploymentHandle(deployment='{self._dep.name}', app='{self._dep.app_name}')"


class SplitHandle(DeploymentHandle):
    """A handle to a traffic split (`serve.set_traffic`): each call goes to the ingress of one
    of the split's applications, drawn at random by weight; it follows weight changes."""

    __slots__ = ("_split",)

    def __init__(self, split_name: str, _options: _HandleOptions | None = None) -> None:
        super().__init__("", split_name, _options)
        self._split = split_name

    def options(self, **kwargs: Any) -> SplitHandle:
        h = SplitHandle(self._split, super().options(**kwargs)._opts)
        h._inited = True
        return h

    def _target(self) -> DeploymentID | str:
        return self._split

    def _warm_up(self) -> None:
        pass

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (SplitHandle, (self._split, self._opts))

    def __repr__(self) -> str:
        return f"SplitHandle(traffic_split='{self._split}')"


class _SplitState:
    """What a process knows of one traffic split: pushed by the head, read per call."""

    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.exists = False
        self.error: BaseException | None = None
        self.deps: list[DeploymentID] = []
        self.cum: list[float] = []

    def update(self, value: dict[str, Any]) -> None:
        deps, cum, total = [], [], 0.0
        for app, ingress, _prefix, weight in value.get("variants", ()):
            if weight > 0:
                total += weight
                deps.append(DeploymentID(ingress, app))
                cum.append(total)
        self.exists, self.deps, self.cum = bool(value.get("exists")), deps, cum
        self.ready.set()

    def pick(self, name: str) -> DeploymentID:
        from flotilla.serve.exceptions import DeploymentUnavailableError, RayServeException

        if not self.exists:
            raise RayServeException(f"Traffic split '{name}' does not exist.")
        if not self.deps:
            raise DeploymentUnavailableError(
                f"Traffic split '{name}' has no application to send to: none of its applications "
                "with a weight above 0 exists now.")
        i = bisect.bisect_right(self.cum, random.random() * self.cum[-1])
        return self.deps[min(i, len(self.deps) - 1)]


async def _split_target(rt: Runtime, name: str) -> DeploymentID:
    st = rt.splits.get(name)
    if st is None:
        st = rt.splits[name] = _SplitState()

        async def sub() -> None:
            try:
                await rt.subscribe(("split", name), st.update)
            except Exception as e:
                st.error = e
                st.ready.set()

        rt.loop.create_task(sub())
    if not st.ready.is_set():
        await st.ready.wait()
    if st.error is not None and not st.exists:
        raise st.error
    return st.pick(name)


async def _call(rt: Runtime, dep: DeploymentID | str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: Any,
                parent: dict[str, Any] | None = None) -> Any:
    if dep.__class__ is str:  # a traffic split: pick its application for this call
        dep = await _split_target(rt, dep)  # type: ignore[arg-type]
    if _has_response(args, kwargs):
        args, kwargs = await _resolve_args(args, kwargs, dep)  # type: ignore[arg-type]
    return await rt.router(dep).call(method, args, kwargs, meta, parent)  # type: ignore[arg-type]


async def _broadcast(rt: Runtime, dep: DeploymentID | str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                     meta: Any) -> list[Any]:
    if dep.__class__ is str:
        dep = await _split_target(rt, dep)  # type: ignore[arg-type]
    if _has_response(args, kwargs):
        args, kwargs = await _resolve_args(args, kwargs, dep)  # type: ignore[arg-type]
    return await rt.router(dep).broadcast(method, args, kwargs, meta)  # type: ignore[arg-type]


#: An argument this large (bytes, or anything with `nbytes`: a numpy array, a tensor) sends its
#: call through the runtime's uvloop, whose writes take the buffer as it is, not the lane's.
LANE_MAX_ARG_BYTES = 1 << 20


def _bulky(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether an argument itself (not one inside a container) holds LANE_MAX_ARG_BYTES or more."""
    for a in (*args, *kwargs.values()) if kwargs else args:
        n = len(a) if a.__class__ is bytes or a.__class__ is bytearray else getattr(a, "nbytes", 0)
        if n.__class__ is int and n >= LANE_MAX_ARG_BYTES:
            return True
    return False


def _check_timeout(timeout_s: float | None) -> None:
    if timeout_s is not None and timeout_s < 0:
        raise ValueError(f"timeout_s={timeout_s} is negative; give None (no limit) or a number of seconds >= 0.")


class DeploymentBroadcastResponse:
    """The results of one `handle.broadcast()` call: one per replica it reached, each its
    method's return value or the exception it raised (in no particular order)."""

    def __init__(self, fut: concurrent.futures.Future[list[Any]]) -> None:
        self._fut = fut

    @staticmethod
    def _outcome(got: list[Any], return_exceptions: bool) -> list[Any]:
        if not return_exceptions:
            for x in got:
                if isinstance(x, BaseException):
                    raise x
        return list(got)

    def results(self, *, timeout_s: float | None = None, return_exceptions: bool = False) -> list[Any]:
        """Every replica's result, waiting up to `timeout_s` (TimeoutError after). The first
        exception a replica raised is raised, unless `return_exceptions`: then it is in the list."""
        if asyncio._get_running_loop() is not None:
            raise RuntimeError("results() would block this thread's running event loop; "
                               "use `await response.results_async()` there.")
        _check_timeout(timeout_s)
        try:
            got = self._fut.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"The broadcast's results did not all arrive within {timeout_s}s.") from None
        return self._outcome(got, return_exceptions)

    async def results_async(self, *, timeout_s: float | None = None, return_exceptions: bool = False) -> list[Any]:
        """`results`, awaited."""
        _check_timeout(timeout_s)
        try:
            got = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._fut)), timeout_s)
        except TimeoutError:
            raise TimeoutError(f"The broadcast's results did not all arrive within {timeout_s}s.") from None
        return self._outcome(got, return_exceptions)


class DeploymentResponse:
    """The future result of one `handle.remote()` call.

    The call runs as a task on the runtime's event loop. Made on that loop (a replica's code),
    the response is that task. Made on another thread, the call reaches the loop through the
    runtime's `Inbox` and its outcome comes back without a per-call thread hop: to the
    caller's own loop in batches, through that loop's inbox (`await`), or to a blocked
    `result()` through a lock. A plain call made on a caller's own running loop (`_on_loop`)
    and awaited there at once runs in the awaiting task instead, through the loop's router
    (`looprouter`): no thread hop at all. Not awaited by the loop's next turn, it goes to the
    runtime's loop like any other, so that it outlives the caller's loop as Ray's calls do.
    """

    __slots__ = ("_back", "_box", "_by_user", "_cancel", "_direct", "_fut", "_home", "_inline_task",
                 "_lane", "_latch", "_local", "_made", "_make", "_request_id", "_rt", "_task")
    _task: asyncio.Task[Any] | None
    _fut: asyncio.Future[Any] | None
    _back: Inbox | None
    _latch: threading.Lock | None

    def __init__(self, rt: Runtime, coro: Coroutine[Any, Any, Any], request_id: str,
                 loop: asyncio.AbstractEventLoop | None) -> None:
        """`loop`: the running loop of the caller (None from sync code)."""
        self._blank(rt, request_id)
        self._local = loop is rt.loop
        if self._local:
            self._task = rt.loop.create_task(coro)
            self._task.add_done_callback(_seen)
            return
        if loop is None:
            latch = threading.Lock()
            latch.acquire()
            self._latch = latch
        else:
            fut = self._fut = loop.create_future()
            self._back = inbox_for(loop)
            fut.add_done_callback(self._caller_done)
        try:
            rt.inbox.put(self._start, coro)
        except BaseException:
            coro.close()
            raise

    def _blank(self, rt: Runtime, request_id: str) -> None:
        self._rt = rt
        self._request_id = request_id
        self._home: asyncio.AbstractEventLoop | None = None  # the caller's loop it runs on (`_on_loop`)
        self._make: tuple[Any, ...] | None = None  # that call's target and arguments, until it starts there
        self._made: Inbox | None = None  # that loop's inbox, counting the call until it goes (`_gone`)
        self._box: Inbox | Lane = rt.inbox  # the inbox of the loop that runs the call
        self._inline_task: asyncio.Task[Any] | None = None  # the task it runs in (`_inline`)
        self._task = None
        self._fut = None  # the caller's loop's view of the outcome
        self._back = None  # the caller's loop's inbox
        self._latch = None  # held until done, for result()
        self._local = False  # made on the runtime's loop
        self._cancel = False
        self._by_user = False  # cancel() was called: waiting raises RequestCancelledError
        self._direct: DirectCall | None = None  # sent by `_start_direct`, no task of its own
        self._lane: Lane | None = None  # sent through the caller's lane: `_task` is on its loop

    @classmethod
    def _blocking(cls, rt: Runtime, dep: DeploymentID, method: str, args: tuple[Any, ...],
                  kwargs: dict[str, Any], meta: Any, request_id: str) -> DeploymentResponse:
        """A plain call made from sync code: sent now through the main thread's lane when it
        can (`lane`: `result()` then turns the lane's loop itself), else the runtime's loop
        sends it the moment it gets it (`_start_direct`) and its reply releases `result()`
        the moment it arrives."""
        self = cls.__new__(cls)
        self._blank(rt, request_id)
        latch = self._latch = threading.Lock()
        latch.acquire()
        lane = for_caller(rt)
        if lane is not None and not _bulky(args, kwargs):
            try:
                sent = lane.send(dep, method, args, kwargs, meta, self._finished)
            except Exception:  # it cannot be sent (its arguments do not pickle): the runtime's
                sent = None  # loop tries again, and settles it with that error
            if sent is not None:
                self._direct, self._task = sent  # type: ignore[assignment]
                self._lane = self._box = lane
                return self
        rt.inbox.put(self._start_direct, dep, method, args, kwargs, meta)
        return self

    @classmethod
    def _on_loop(cls, rt: Runtime, home: asyncio.AbstractEventLoop, dep: DeploymentID, method: str,
                 args: tuple[Any, ...], kwargs: dict[str, Any], meta: Any, request_id: str) -> DeploymentResponse:
        """A call made on `home`, a running loop of the caller's: awaited there before the
        loop's next turn, it runs in the awaiting task (`_inline`); else on the runtime's loop."""
        self = cls.__new__(cls)
        self._blank(rt, request_id)
        self._home = home
        self._make = (dep, method, args, kwargs, meta)
        box = self._box = self._made = inbox_for(home)
        box.unstarted += 1
        home.call_soon(self._hand_off)
        _UNCLAIMED[id(self)] = self
        if _Stuck.armed is not rt:
            _Stuck.arm(rt)
        return self

    def _gone(self) -> None:
        """On its loop's thread: the call no longer waits for its turn there (it started, or
        went to the runtime's loop)."""
        made = self._made
        if made is not None:
            self._made = None
            made.unstarted -= 1

    def _hand_off(self) -> None:
        """On the caller's loop, the call not awaited at once: it goes to the runtime's loop
        (where a loop that ends, `asyncio.run` returning, does not cancel it), its outcome
        coming back to this loop as a sync-made call's does."""
        self._gone()
        home = self._home
        if self._make is None or home is None:  # running in the task that awaited it, or diverted
            return
        fut = self._fut = home.create_future()
        self._back = inbox_for(home)
        fut.add_done_callback(self._caller_done)
        self._divert()

    async def _run_home(self, router: Follower) -> Any:
        """The call, in the task on `_home` that awaited it at once, through that loop's router."""
        _, method, args, kwargs, meta = self._make  # type: ignore[misc]
        self._make = None  # started here: it stays here
        self._gone()
        return await router.call_polled(method, args, kwargs, meta)

    def _divert(self) -> bool:
        """Run the call on the runtime's loop instead of its caller's, where it has not started
        (not awaited at once, or `result()` would block that loop). False if it has started
        there."""
        if self._make is None or not _claim(self):
            return self._inline_task is None  # else the watch (`_Stuck`) sent it to the runtime's loop
        if asyncio._get_running_loop() is self._home:
            self._gone()  # (from another thread: its scheduled `_hand_off` does it)
        self._to_runtime()
        return True

    def _to_runtime(self) -> None:
        """Claimed (`_claim`) before it started: it runs on the runtime's loop."""
        make = self._make
        assert make is not None
        self._make = self._home = None
        self._box = self._rt.inbox
        if self._latch is None:
            with _LATCH_MADE:
                if self._latch is None:
                    latch = threading.Lock()
                    latch.acquire()
                    self._latch = latch
        self._rt.inbox.put(self._start, _call(self._rt, *make))

    # ---- on the runtime's loop ----------------------------------------------------------
    def _start_direct(self, dep: DeploymentID, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                      meta: Any) -> None:
        """Send a `_blocking` call now, no task (`Router.call_direct`); a call that has to wait
        for a replica, or was cancelled already, runs as a task instead."""
        rt = self._rt
        if not self._cancel:
            out = rt.loop.create_future()
            try:
                d = rt.router(dep).call_direct(method, args, kwargs, meta, out, self._finished)  # type: ignore[arg-type]
            except Exception as e:  # it could not be sent (its arguments do not pickle)
                self._task = out  # type: ignore[assignment]
                out.set_exception(e)
                self._finished(out)  # type: ignore[arg-type]
                return
            if d is not None:
                self._direct = d
                self._task = out  # type: ignore[assignment]
                return
        self._start(_call(rt, dep, method, args, kwargs, meta))

    def _start(self, coro: Coroutine[Any, Any, Any]) -> None:
        t = self._task = self._rt.loop.create_task(coro)
        if self._cancel:
            t.cancel()
        t.add_done_callback(self._finished)

    @property
    def _done(self) -> bool:
        t = self._task
        return t is not None and t.done()

    def _finished(self, t: asyncio.Task[Any]) -> None:  # after `t.done()` reads True
        latch = self._latch
        if latch is not None:
            latch.release()
        _seen(t)  # a response dropped unread fails quietly, as Ray's (whoever asks still gets the error)
        if self._fut is not None:
            _post(self._back, self._fut, t)  # type: ignore[arg-type]

    def _watch(self, fut: asyncio.Future[Any], back: Inbox) -> None:
        if self._task is None and self._home is not None:
            self._hand_off()
        t = self._task
        if t is None:  # diverted (`_divert`): watch it where it runs now
            self._box.put(self._watch, fut, back)
        elif t.done():
            _post(back, fut, t)
        else:
            t.add_done_callback(functools.partial(_post, back, fut))

    def _cancel_task(self) -> None:
        t = self._task
        if t is None:
            return
        if self._direct is not None:
            self._direct.cancel()
            return
        if self._inline_task is not None:  # running in the task that awaits it (`_inline`)
            if not t.done():
                self._inline_task.cancel()
        else:
            t.cancel()

    # ---- the caller's side --------------------------------------------------------------
    def _caller_done(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() and not self._done:  # the awaiting task was cancelled: so is the call
            self._cancel_call()

    def result(self, *, timeout_s: float | None = None, _skip_asyncio_check: bool = False) -> Any:
        """Block until the result is ready (from sync code only). `_skip_asyncio_check`
        (Ray's): accepted; waiting on a running loop raises only where it would deadlock."""
        if self._local:
            raise RuntimeError(_SYNC_ON_LOOP)
        home = self._home
        if (home is not None and not self._done and (asyncio._get_running_loop() is home or home.is_closed())
                and not self._divert()):
            if home.is_closed():
                raise RuntimeError(
                    "the event loop this call was made on (and runs on) was closed before it finished")
            raise RuntimeError(_SYNC_ON_LOOP)
        lane = self._lane
        wait_s = timeout_s
        if lane is not None and not self._done and lane.drive(self._task, timeout_s):  # type: ignore[arg-type]
            wait_s = 0.0  # turned the loop for all of it: any wait is over
        if not self._done:
            latch = self._latch
            if latch is None:  # made on an event loop, waited for here: one latch for all waiters
                with _LATCH_MADE:
                    latch = self._latch
                    if latch is None:
                        latch = threading.Lock()
                        latch.acquire()
                        self._latch = latch
            if not self._done:  # checked again: `_finished` may have missed the new latch
                if not latch.acquire(timeout=-1 if wait_s is None else max(0.0, wait_s)):
                    raise GetTimeoutError(f"Did not get a result within {timeout_s}s.")
                latch.release()  # open for other waiters
        t = self._task
        assert t is not None
        if t.cancelled():
            raise RequestCancelledError(self._request_id)
        return t.result()

    def __await__(self):  # type: ignore[no-untyped-def]
        if (self._task is None and self._make is not None and not self._cancel
                and asyncio._get_running_loop() is self._home and asyncio.current_task() is not None):
            router = self._rt.loop_routers.get(self._home, self._make[0])
            # The call runs here unless the loop's router has no replica connected yet while
            # other calls made on this loop wait for their turn (they go to the runtime's loop
            # then): the calls are admitted in the order they were made.
            if (router.ready or self._made.unstarted <= 1) and _claim(self):  # type: ignore[union-attr]
                return (yield from self._inline(router))
        try:
            return (yield from self._awaitable().__await__())
        except asyncio.CancelledError:
            if self._by_user:  # cancel() was called, not the awaiting task cancelled
                raise RequestCancelledError(self._request_id) from None
            raise

    def _inline(self, router: Follower) -> Generator[Any, None, Any]:
        """Awaited on its loop before it started there: the call runs in the awaiting task
        itself, no task of its own; `_task` is a future with the outcome for anyone else."""
        fut: asyncio.Future[Any] = self._home.create_future()  # type: ignore[union-attr]
        self._task = fut  # type: ignore[assignment]
        waiter = self._inline_task = asyncio.current_task()
        try:
            result = yield from self._run_home(router).__await__()
        except asyncio.CancelledError:
            fut.cancel()
            self._finished(fut)  # type: ignore[arg-type]
            if self._by_user:  # cancel() cancelled the awaiting task to reach the call
                waiter.uncancel()  # type: ignore[union-attr]
                raise RequestCancelledError(self._request_id) from None
            raise
        except Exception as e:
            fut.set_exception(e)
            fut.exception()  # the awaiting task has it: not "never retrieved"
            self._finished(fut)  # type: ignore[arg-type]
            raise
        except BaseException:
            fut.cancel()
            self._finished(fut)  # type: ignore[arg-type]
            raise
        fut.set_result(result)
        self._finished(fut)  # type: ignore[arg-type]
        return result

    def _awaitable(self) -> Awaitable[Any]:
        loop = asyncio.get_running_loop()
        if self._lane is not None:  # sent through a lane: watched there, its pump turning it now
            watched = loop.create_future()
            self._lane.put(self._watch, watched, inbox_for(loop))
            return watched
        home = self._home
        if home is not None:
            if loop is not home:
                there = loop.create_future()  # awaited on another loop than the one it runs on
                self._box.put(self._watch, there, inbox_for(loop))
                return there
            if self._task is not None:  # it ran in the task that awaited it first
                return self._task
            self._hand_off()  # not to run inline (no task awaits it, or cancelled): diverted
        fut = self._fut
        if fut is not None and fut.get_loop() is loop:
            return fut
        if loop is self._rt.loop:
            if self._task is None:  # its hand-over is still queued: run it now
                self._rt.inbox.run()
            return self._task  # type: ignore[return-value]
        fut = loop.create_future()  # made elsewhere, awaited on this loop
        self._rt.inbox.put(self._watch, fut, inbox_for(loop))
        return fut

    @property
    def request_id(self) -> str:
        """The id this call carries (the serving request's, for a call made while serving one;
        else one made for it): `serve.get_request_context().request_id` in the replica."""
        return self._request_id

    def cancel(self) -> None:
        """Cancel the request: it is not sent if it has not been yet, and the replica stops
        working on it if it started. Waiting for it then raises `RequestCancelledError`."""
        if not self._done:
            self._by_user = True
        self._cancel_call()

    def _over(self) -> bool:
        return self._done

    def _cancel_call(self) -> None:
        """Cancel the call, not as the caller's cancel(): also when the awaiting task or the
        request that made it (`context.cancel_spawned`) was cancelled."""
        if self._local:
            self._task.cancel()  # type: ignore[union-attr]
            return
        if self._cancel or self._done:
            return
        self._cancel = True
        try:
            self._box.put(self._cancel_task)
        except RuntimeError:  # its loop is closed: the call went with it
            pass

    def cancelled(self) -> bool:
        t = self._task
        return self._cancel or bool(t is not None and t.done() and t.cancelled())

    async def _to_object_ref(self) -> Any:
        _no_object_refs()

    def _to_object_ref_sync(self, _timeout_s: float | None = None, _allow_running_in_asyncio_loop: bool = False) -> Any:
        _no_object_refs()

    def __reduce__(self) -> tuple[Any, ...]:
        """Passed inside another call's arguments (Ray's "by reference"): it travels as its
        outcome, to be awaited there; a router that meets one without an outcome yet waits
        for it and sends again (`ResponsePending`)."""
        t = self._task
        if t is None or not t.done():
            raise ResponsePending(self)
        if t.cancelled():
            return (SettledResponse, (None, RequestCancelledError(self._request_id)))
        e = t.exception()
        return (SettledResponse, (t.result(), None) if e is None else (None, e))


class SettledResponse:
    """What a `DeploymentResponse` passed inside a list, dict or other value of a call's
    arguments arrives as: awaiting it gives the response's result, or raises its error (as
    awaiting the ObjectRef Ray Serve passes does). A response passed as an argument itself
    arrives as its result."""

    __slots__ = ("_error", "_value")

    def __init__(self, value: Any, error: BaseException | None) -> None:
        self._value = value
        self._error = error

    def __await__(self) -> Generator[Any, None, Any]:
        yield from ()
        if self._error is not None:
            raise self._error
        return self._value

    def result(self, timeout_s: float | None = None) -> Any:
        """The value (it is here already; `timeout_s` is accepted for symmetry)."""
        if self._error is not None:
            raise self._error
        return self._value

    def __reduce__(self) -> tuple[Any, ...]:
        return (SettledResponse, (self._value, self._error))


#: Serialises making a latch late (several threads may call result() on one response).
_LATCH_MADE = threading.Lock()
#: Calls made on a caller's running loop that have not started there (`_on_loop`), by id.
#: Whoever takes one out (`_claim`) runs it: its loop (the task awaiting it, or its hand-off
#: to the runtime's loop) or the watch on the runtime's loop (`_Stuck`). dict.pop is atomic.
_UNCLAIMED: dict[int, DeploymentResponse] = {}


def _claim(resp: DeploymentResponse) -> bool:
    return _UNCLAIMED.pop(id(resp), None) is not None


class _Stuck:
    """The watch for calls whose caller's loop stopped turning before they started there (the
    caller blocks it in sync code: `time.sleep`, a sync wait for the call's effect): the
    runtime's loop looks every LOOK_S while such calls exist and sends those that were
    already waiting at its previous look, as Ray's router, on a loop of its own, would have.
    Armed by the first call after a quiet spell: one wake-up of the runtime's loop then."""

    LOOK_S = 0.05
    armed: Runtime | None = None  # the runtime whose loop looks next
    seen: list[tuple[int, DeploymentResponse]] = []

    @classmethod
    def arm(cls, rt: Runtime) -> None:
        cls.armed = rt
        try:
            rt.inbox.put(cls.look, rt)
        except RuntimeError:  # the runtime's loop is closed
            cls.armed = None

    @classmethod
    def look(cls, rt: Runtime) -> None:
        for key, resp in cls.seen:
            if _UNCLAIMED.get(key) is resp and _claim(resp):
                try:
                    resp._to_runtime()
                except RuntimeError:  # its runtime's loop is closed: the call went with it
                    pass
        cls.armed = None  # first: a call made from now on arms again (a look too many is harmless)
        cls.seen = list(_UNCLAIMED.items())
        if cls.seen:
            cls.armed = rt
            rt.loop.call_later(cls.LOOK_S, cls.look, rt)


def _no_object_refs() -> NoReturn:
    """Ray's `_to_object_ref*`: a Ray ObjectRef of the call's result. flotilla's replies do not
    go through Ray's object store (on the Ray backend either), so there is none to give."""
    raise RuntimeError(
        "Converting DeploymentResponses to ObjectRefs is not supported by flotilla: results travel "
        "over flotilla's own transport, not Ray's object store. Await the response (or call "
        ".result()) and pass the value, or pass the DeploymentResponse itself to another handle call.")


def _seen(t: asyncio.Task[Any]) -> None:
    """Mark the exception of a finished call as retrieved, so asyncio does not log it as "never
    retrieved" when the task goes (a response nobody reads, or one whose caller timed out);
    `result()` still raises it."""
    if not t.cancelled():
        t.exception()


def _post(back: Inbox, fut: asyncio.Future[Any], t: asyncio.Task[Any]) -> None:
    try:
        back.put(_settle, fut, t)
    except RuntimeError:  # the caller's loop is closed: nobody waits there any more
        pass


def _settle(fut: asyncio.Future[Any], t: asyncio.Task[Any]) -> None:
    """On the caller's loop: give `fut` the outcome of the finished task `t`."""
    if fut.done():
        return
    if t.cancelled():
        fut.cancel()
        return
    e = t.exception()
    if e is None:
        fut.set_result(t.result())
    else:
        fut.set_exception(e)
        fut.exception()  # read by whoever awaits it; not "never retrieved" when nobody does


class DeploymentResponseGenerator:
    """The items of a streaming call (`handle.options(stream=True)`), iterable sync or async."""

    def __init__(self, rt: Runtime, dep: DeploymentID | str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: Any,
                 follow: bool = False) -> None:
        self._rt = rt
        self._agen: Any = None
        self._start = (dep, method, args, kwargs, meta)
        self._request_id: str = meta["request_id"]  # `remote()` always gives one
        self._cancelled = False
        #: The item being waited for, for cancel(): the waiting task (on the runtime's loop or
        #: `_home`) or the concurrent future of the hand-over (from another thread or loop).
        self._pending: Any = None
        #: Iterated first with `async for` on a loop of the caller's (not made while serving a
        #: request; a plain deployment, no response among the arguments): the stream runs
        #: there, through that loop's router (`looprouter`), this loop being `_home`.
        self._follow = follow
        self._home: asyncio.AbstractEventLoop | None = None

    def _gen(self) -> Any:
        if self._agen is None:
            dep, method, args, kwargs, meta = self._start
            rt = self._rt

            async def agen() -> Any:
                target = (await _split_target(rt, dep)) if isinstance(dep, str) else dep
                a, k = (await _resolve_args(args, kwargs, target)) if _has_response(args, kwargs) else (args, kwargs)
                async for item in rt.router(target).stream(method, a, k, meta):
                    yield item

            self._agen = agen()
        return self._agen

    def __aiter__(self) -> DeploymentResponseGenerator:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        # TypeError, what pickling an object that cannot be pickled raises (Ray's error here)
        raise TypeError(
            "Streaming deployment handle results cannot be passed to downstream handle calls (as in Ray "
            "Serve): iterate the stream here and pass its items, or pass the handle and let the "
            "downstream deployment make the streaming call.")

    def result(self, *, timeout_s: float | None = None, _skip_asyncio_check: bool = False) -> Any:
        """Not for streams (as in Ray Serve): always raises TypeError."""
        raise TypeError("a streaming response has no result(): iterate it, `for item in response` "
                        "(outside a deployment) or `async for item in response` (inside one)")

    async def __anext__(self) -> Any:
        if self._cancelled:
            raise RequestCancelledError(self._request_id)
        loop = asyncio.get_running_loop()
        if loop is self._rt.loop or loop is self._home or (self._follow and self._agen is None):
            if self._agen is None and loop is not self._rt.loop:
                dep, method, args, kwargs, meta = self._start
                self._home = loop
                self._agen = self._rt.loop_routers.get(loop, dep).stream(method, args, kwargs, meta)  # type: ignore[arg-type]
            me = self._pending = asyncio.current_task()
            try:
                return await self._gen().__anext__()
            except asyncio.CancelledError:
                if self._cancelled and me is not None and me.uncancel() == 0:  # by cancel(), not the caller's
                    raise RequestCancelledError(self._request_id) from None
                raise
            finally:
                self._pending = None
        self._not_home()
        cf = self._pending = asyncio.run_coroutine_threadsafe(self._gen().__anext__(), self._rt.loop)
        try:
            return await asyncio.wrap_future(cf)
        except asyncio.CancelledError:
            if self._cancelled and cf.cancelled():
                raise RequestCancelledError(self._request_id) from None
            raise
        finally:
            self._pending = None

    def __iter__(self) -> DeploymentResponseGenerator:
        return self

    def _not_home(self) -> None:
        if self._home is not None:
            raise RuntimeError(
                "this streaming response is being iterated with `async for` on another event loop "
                "(where it runs); iterate it there")

    def __next__(self) -> Any:
        if self._rt.in_loop():
            raise RuntimeError("Sync methods should not be called from within an `asyncio` event loop. Use "
                               "`async for` or `await response.__anext__()` instead.")
        self._not_home()
        if self._cancelled:
            raise RequestCancelledError(self._request_id)
        cf = self._pending = asyncio.run_coroutine_threadsafe(self._gen().__anext__(), self._rt.loop)
        try:
            return cf.result()
        except StopAsyncIteration:
            raise StopIteration from None
        except concurrent.futures.CancelledError:
            raise RequestCancelledError(self._request_id) from None
        finally:
            self._pending = None

    @property
    def request_id(self) -> str:
        """The id this call carries, as `DeploymentResponse.request_id`."""
        return self._request_id

    def cancel(self) -> None:
        """Cancel the stream: the replica's generator stops, and the next item (or the one
        being waited for) raises `RequestCancelledError`."""
        if self._cancelled:
            return
        self._cancelled = True
        pending = self._pending
        loop = self._home or self._rt.loop  # where it runs
        try:
            if pending is None:
                if self._agen is not None:  # between items: close it where it stopped
                    asyncio.run_coroutine_threadsafe(self._agen.aclose(), loop)
            elif not isinstance(pending, asyncio.Task):
                pending.cancel()  # the hand-over's future: thread-safe, cancels the wait on the loop
            elif asyncio._get_running_loop() is loop:
                pending.cancel()  # suspended in __anext__ (it is not running: this code is)
            else:
                loop.call_soon_threadsafe(self._cancel_wait, pending)
        except RuntimeError:  # its loop is closed: the stream was closed with it
            pass

    def cancelled(self) -> bool:
        """Whether `cancel()` was called (or the request that made this stream was cancelled)."""
        return self._cancelled

    async def _to_object_ref_gen(self) -> Any:
        _no_object_refs()

    def _to_object_ref_gen_sync(self, _timeout_s: float | None = None,
                                _allow_running_in_asyncio_loop: bool = False) -> Any:
        _no_object_refs()

    def _over(self) -> bool:
        return self._cancelled

    _cancel_call = cancel  # the request that made this stream was cancelled (`context.cancel_spawned`)

    def _cancel_wait(self, task: asyncio.Task[Any]) -> None:
        if self._pending is task:  # still waiting for that item: not somewhere else by now
            task.cancel()
