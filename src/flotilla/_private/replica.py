"""The replica process: runs one copy of a deployment's user code.

Started by the zygote (a fork). It listens on its own Unix socket for data-plane frames
from routers, and keeps one control connection to the head: the head hands it the
deployment's code on `replica_register`, asks for health checks and `reconfigure`, and
tells it to drain and stop. When the control connection drops (the head died), it keeps
serving and reconnects; the restarted head re-adopts it (`replica_reattach`, same id). It
exits when told to stop, when a restarted head does not know it, or when the session's keeper
is gone (`zygote.watch_keeper`).

Concurrency: at most `max_ongoing_requests` requests run at once, whatever the number of
routers sending; the rest wait here, in arrival order. Sync user code runs in a thread
pool so it never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import json
import logging
import math
import os
import sys
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from operator import sub as _SUB
from typing import Any, NamedTuple

import cloudpickle

from flotilla._private import (
    asgiroutes,
    context,
    heap,
    http_util,
    logfmt,
    logrotate,
    loopwatch,
    metrics,
    trace,
)
from flotilla._private.awaitable import AwaitableBytes, json_value
from flotilla._private.errors import error_reply
from flotilla._private.metrics import STORE
from flotilla._private.protocol import (
    STREAM_WINDOW,
    Abort,
    Cancel,
    Chunk,
    Credit,
    Drain,
    DrainAck,
    End,
    Http,
    HttpFull,
    HttpStart,
    Ok,
    Rejected,
    Stream,
    WsIn,
    WsOpen,
    Yield,
    oob,
    wire,
)
from flotilla._private.transport import FrameProtocol, RemoteCallError, RpcPeer
from flotilla.exceptions import ActorDiedError, RaySystemError, TaskCancelledError
from flotilla.serve import batching as _batching
from flotilla.serve.exceptions import MethodNotFoundError
from flotilla.serve.schema import DeploymentID, ReplicaContext, ReplicaID, ReplicaRank

logger = logging.getLogger("flotilla.replica")

_SYNC, _ASYNC, _ON_LOOP = 0, 1, 2  # how a user method is invoked
#: Requests' figures reach the metrics, access log and traces this long after the first of a
#: batch (`_fold`): the request path only appends its figures to a list.
FOLD_S = 0.1
#: Items one request keeps on `Replica._done` until `_fold`: arrival, start and end times,
#: batch wait, route (the request's, "" for a call made while serving none), verb (the HTTP
#: method, "WS" or "CALL"), what the access line names (the called method; None: the
#: route), request id, downstream seconds, status.
RECORD_FIELDS = 10
_REJECTED = Rejected()
#: `serve.batching.BATCH_WAIT_S` (seconds the request waited for its batch), where it exists.
_BATCH_WAIT: Any = getattr(_batching, "BATCH_WAIT_S", None)
#: How long a `stats` call waits for the user's record_autoscaling_stats().
CUSTOM_STATS_TIMEOUT_S = 1.0


class _DrainRejection(Exception):
    """A request waiting for a slot when the replica started draining: answer Rejected."""


def _ignore(*args: Any) -> None:
    return None


class _Window:
    """Credit for one stream: items the replica may still send before the caller takes some."""

    __slots__ = ("avail", "waiter")

    def __init__(self) -> None:
        self.avail = STREAM_WINDOW
        self.waiter: asyncio.Future[None] | None = None

    def give(self, n: int) -> None:
        self.avail += n
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def take(self) -> None:
        while self.avail <= 0:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        self.avail -= 1


def _http_mode(fn: Any) -> int:
    if inspect.iscoroutinefunction(fn):
        return _ASYNC
    if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
        return _ON_LOOP
    return _SYNC


def _takes_args(fn: Any) -> bool:
    """Whether an HTTP entry takes the request: one with no parameters at all (`def
    __call__(self)`) is called without it, as Ray Serve does."""
    try:
        return bool(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # no signature to read: pass the request
        return True


def _without_request(fn: Any) -> Any:
    """`fn` called as an HTTP entry that drops the request (its mode stays `fn`'s)."""
    def entry(_request: Any) -> Any:
        return fn()
    return entry


def _make_request_class() -> type:
    from starlette.requests import Request

    class ServeRequest(Request):
        """A Starlette Request whose body has already arrived.

        `await request.json()` works as usual; so does the synchronous `request.json()` that
        the seed articles (and many Ray Serve examples) write: for a JSON object or array the
        result is the parsed value itself, which is also awaitable.
        """

        def body(self):  # type: ignore[override]
            body = self._body
            return body if type(body) is AwaitableBytes else AwaitableBytes(body)

        def json(self):  # type: ignore[override]
            if not hasattr(self, "_json"):
                self._json = json.loads(self._body)
            return json_value(self._json)

    return ServeRequest


_request_class: Any = None


class Built(NamedTuple):
    """A deployment's constructed object: made here, or in the template this replica was forked from."""

    obj: Any
    asgi: Any  # the class's ASGI app (serve.ingress), routes bound to `obj`; None if none
    is_function: bool
    user_config: Any = None  # what reconfigure() was given already (in the template)


def set_replica_context(app: str, deployment: str, tag: str, rank: ReplicaRank | None = None,
                        world_size: int = 1, code_version: str | None = None) -> None:
    """What `serve.get_replica_context()` returns in this process."""
    dep = DeploymentID(deployment, app)
    context.replica_context = ReplicaContext(app_name=app, deployment=deployment, replica_tag=tag,
                                             replica_id=ReplicaID(tag, dep),
                                             rank=rank if rank is not None else ReplicaRank(),
                                             world_size=world_size, code_version=code_version)


def _takes_rank(obj: Any) -> bool:
    """Whether `obj.reconfigure` has a `rank` parameter (then it is given the replica's rank)."""
    fn = getattr(obj, "reconfigure", None)
    if fn is None:
        return False
    try:
        return "rank" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def instantiate(target: Any, init_args: tuple[Any, ...], init_kwargs: dict[str, Any],
                made: list[Any] | None = None) -> Any:
    """Run the deployment's constructor (a class), or take the function as it is: a `Built`,
    or, for an `async def __init__` (as Ray Serve allows), an awaitable of one."""
    if not inspect.isclass(target):
        return Built(target, None, True)
    if inspect.iscoroutinefunction(target.__init__):
        return _instantiate_async(target, init_args, init_kwargs, made)
    obj = target.__new__(target)
    if isinstance(obj, target):  # as Ray Serve: a value `__init__` returns is ignored
        target.__init__(obj, *init_args, **init_kwargs)
    return _built(target, obj)


async def _instantiate_async(target: Any, init_args: tuple[Any, ...], init_kwargs: dict[str, Any],
                             made: list[Any] | None) -> Built:
    obj = target.__new__(target)
    if made is not None:  # the object its `__init__` is building (a stop meanwhile runs its __del__)
        made.append(obj)
    await obj.__init__(*init_args, **init_kwargs)
    built = _built(target, obj)
    return (await built) if inspect.isawaitable(built) else built


def _built(target: Any, obj: Any) -> Any:
    """The `Built` of a constructed object (an awaitable of it when its ASGI app's builder is
    async)."""
    asgi = getattr(target, "__flotilla_asgi_app__", None)
    if asgi is not None:
        from flotilla.serve.asgi import resolve_app

        asgi = resolve_app(asgi, obj)
        if inspect.isawaitable(asgi):
            return _with_app(target, obj, asgi)
    return _bind(target, obj, asgi)


async def _with_app(target: Any, obj: Any, app: Any) -> Built:
    return _bind(target, obj, await app)


def _bind(target: Any, obj: Any, asgi: Any) -> Built:
    if asgi is not None:
        from flotilla.serve.asgi import bind_routes

        bind_routes(asgi, target, obj)
    return Built(obj, asgi, False)


#: Ray's buckets for its batching histograms: sizes and utilization percent.
_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_BATCH_UTILIZATION_BUCKETS = (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 100)


def _ray_batch_metrics(q: Any, labels: tuple[str, str, str]) -> None:
    """Ray's batching metrics for queue `q`: its batches since the last push (size, wait,
    run time, utilization, count) and the items waiting now."""
    if "ray_serve_batches_processed" not in STORE.meta:
        keys = ("deployment", "replica", "application", "function_name")
        for kind, name, doc, buckets in (
            ("histogram", "ray_serve_batch_wait_time_ms", "Time a batch waited to fill, ms.", metrics.LATENCY_MS_BUCKETS),
            ("histogram", "ray_serve_batch_execution_time_ms", "Time the batch function ran, ms.", metrics.LATENCY_MS_BUCKETS),
            ("histogram", "ray_serve_batch_utilization_percent", "Batch size over max_batch_size, percent.",
             _BATCH_UTILIZATION_BUCKETS),
            ("histogram", "ray_serve_actual_batch_size", "Items in each batch (batch_size_fn's size where set).",
             _BATCH_SIZE_BUCKETS),
            ("counter", "ray_serve_batches_processed", "Batches run.", None),
            ("gauge", "ray_serve_batch_queue_length", "Requests waiting in the batch queue.", None),
        ):
            STORE.declare(kind, name, doc, keys, *((buckets,) if buckets else ()))
    key = (*labels, q.name)
    done = q.take_done()
    if done:
        limit = q.get_max_batch_size()
        for size, wait_s, run_s in done:
            STORE.observe("ray_serve_batch_wait_time_ms", key, wait_s * 1000.0)
            STORE.observe("ray_serve_batch_execution_time_ms", key, run_s * 1000.0)
            STORE.observe("ray_serve_batch_utilization_percent", key, size * 100.0 / limit)
            STORE.observe("ray_serve_actual_batch_size", key, float(size))
        STORE.inc("ray_serve_batches_processed", key, len(done))
    STORE.set("ray_serve_batch_queue_length", key, float(q.stats().queued))


class Replica:
    def __init__(self, args: dict[str, Any], prebuilt: Built | None = None) -> None:
        self.args = args
        #: Forked from a `fork_after_init` template: its object is built; only `__post_fork__` runs.
        self.prebuilt = prebuilt
        self.replica_id: str = args["replica_id"]
        self.loop = asyncio.get_running_loop()
        self.obj: Any = None
        self.is_function = False
        self.max_ongoing = 5
        self.ongoing = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        # request key (id of connection, request id) -> (task, connection, request id)
        self.tasks: dict[tuple[int, int], tuple[asyncio.Task[None], Any, int]] = {}
        self.windows: dict[tuple[int, int], _Window] = {}
        self.inboxes: dict[tuple[int, int], Any] = {}  # open websockets' ws.Inbox
        self.methods: dict[str, tuple[Any, int]] = {}
        self.pool: ThreadPoolExecutor | None = None
        self.pool_size = 0
        self.health_pool = ThreadPoolExecutor(1, thread_name_prefix="health")
        self.config_lock = asyncio.Lock()
        self.conns: set[FrameProtocol] = set()
        self.acked: set[FrameProtocol] = set()
        self.draining = False
        #: requests were still running when graceful_shutdown_timeout_s ran out: a call blocked in
        #: a thread cannot be cancelled, so the process exits at once after the stop (as Ray
        #: kills the actor) instead of waiting for its threads
        self.abandoned = False
        self.idle = asyncio.Event()  # set when a request ends or a router acks a drain
        self.server: asyncio.AbstractServer | None = None
        self.direct: Any = None
        self.addr = ""  # "tcp://host:port" when it serves on TCP (a Ray actor)
        self.stopped = asyncio.Event()
        self.link: Any = None  # client.HeadLink
        self.pusher: Any = None  # metrics.Pusher, on the link
        self.phase = "registering"  # then "constructing", "ready", "failed" or "draining"
        self.failure = ""
        self.models: list[str] = []
        self.http_entry: Any = None
        self.http_mode = _SYNC  # how `http_entry` is called: _ASYNC, _ON_LOOP (a generator) or _SYNC
        self.dep_name: str = args["deployment"]
        self.app_name: str = args["app"]
        self.metrics = metrics.enabled()
        self.access = metrics.AccessLog(f"{self.app_name}_{self.dep_name} {self.replica_id}")
        self._batch_seen: dict[int, tuple[int, int]] = {}  # batch queue -> (batches, items) at the last push
        metrics.declare_builtins(STORE)
        STORE.declare("gauge", "ray_serve_replica_processing_queries", "Requests running in a replica.", ("deployment", "replica", "application"))
        STORE.declare("histogram", "ray_serve_user_autoscaling_stats_latency_ms",
                      "Time the user's record_autoscaling_stats() took, ms.", ("deployment", "replica", "application"),
                      metrics.LATENCY_MS_BUCKETS)
        STORE.declare("counter", "ray_serve_record_autoscaling_stats_failed",
                      "record_autoscaling_stats() calls that raised or timed out.",
                      ("deployment", "replica", "application", "exception_name"))
        STORE.declare("gauge", "flotilla_replica_queued_requests", "Requests waiting inside a replica for a slot (max_ongoing_requests).", ("deployment", "replica", "application"))
        self.asgi_app: Any = None
        #: The constructor's run, and the object an async `__init__` is building meanwhile
        self.construct_task: asyncio.Task[None] | None = None
        self.constructing: list[Any] = []
        self.route_templates: list[asgiroutes.Template] | None = None  # the app's (`asgiroutes`)
        self.loopwatch: asyncio.Task[None] | None = None  # Ray's event-loop metrics (`loopwatch`)
        self.config: dict[str, Any] | None = None
        self.lifespan: Any = None
        self.num_requests = 0
        self.logging_config: dict[str, Any] | None = None
        self.user_config: Any = None  # the last one given to reconfigure()
        self.rank = ReplicaRank()  # given at registration, moved by reconfigure when ranks are compacted
        dep_id = DeploymentID(name=self.dep_name, app_name=self.app_name)
        self.latency: trace.LatencyRing | None = None  # kept when the autoscaler may use it
        self._custom_stats: asyncio.Task[Any] | None = None
        self._stages: dict[str, list[Any]] = {}
        self._rq_hist = trace.series(dep_id, "replica_queue")
        #: route (or method) -> its metric labels and latency series, made once each
        self._per_route: dict[str, tuple[tuple[str, ...], list[Any]]] = {}
        #: requests recorded (`_record`) and not yet added to the metrics (`_fold`)
        self._done: list[Any] = []  # flat, RECORD_FIELDS per request
        self._user_hist = trace.series(dep_id, "user_code")

    def _stage(self, stage: str) -> list[Any]:
        h = self._stages.get(stage)
        if h is None:
            h = self._stages[stage] = trace.series(DeploymentID(name=self.dep_name, app_name=self.app_name), stage)
        return h

    def _set_gauges(self) -> None:
        self._fold()  # a push carries every request recorded so far
        from flotilla._private import client

        rt = client.Runtime._instance
        if rt is not None:
            rt.router_gauges()  # the calls its code makes
        labels = (self.dep_name, self.replica_id, self.app_name)
        STORE.set("ray_serve_replica_processing_queries", labels, float(self.ongoing))
        STORE.set("flotilla_replica_queued_requests", labels, float(len(self.waiters)))
        if "flotilla.serve.batching" in sys.modules:
            self._batch_gauges(labels)
        metrics.record_auth_failures(STORE, "replica")

    def _batch_gauges(self, labels: tuple[str, str, str]) -> None:
        """`flotilla_batch_fill_ratio` (items per batch over max_batch_size, since the last push)
        and `flotilla_batch_wait_s` (the wait a batch would get now), over this process's
        batch queues; nothing until a batch ran."""
        from flotilla.serve.batching import QUEUES

        batches = items = 0
        capacity = 0.0
        waits = []
        for q in list(QUEUES):
            _ray_batch_metrics(q, labels)
            st = q.stats()
            seen = self._batch_seen.get(id(q), (0, 0))
            self._batch_seen[id(q)] = (st.batches, st.items)
            batches += st.batches - seen[0]
            items += st.items - seen[1]
            capacity += (st.batches - seen[0]) * q.get_max_batch_size()
            if st.batches:
                waits.append(q.current_wait_s())
        if not waits:
            return
        if "flotilla_batch_fill_ratio" not in STORE.meta:
            STORE.declare("gauge", "flotilla_batch_fill_ratio", "Items per batch over max_batch_size, "
                          "over the batches since the last push (1 = full).", ("deployment", "replica", "application"))
            STORE.declare("gauge", "flotilla_batch_wait_s", "The wait a new batch would get now (fixed "
                          "batch_wait_timeout_s, or adapted to batch_latency_target_s); the longest of the replica's queues.",
                          ("deployment", "replica", "application"))
        if batches:
            STORE.set("flotilla_batch_fill_ratio", labels, items / capacity)
        STORE.set("flotilla_batch_wait_s", labels, max(waits))

    def _apply_logging(self, config: dict[str, Any] | None) -> None:
        """Level and encoding of this process's log lines, and its access log (LoggingConfig)."""
        self.logging_config = config
        # as Ray's: the deployment is named `<app>_<deployment>` in log lines
        component = f"{self.app_name}_{self.dep_name}"
        ctx = {"application": self.app_name, "deployment": component, "replica": self.replica_id,
               "component_name": "replica"}
        logfmt.configure(config, component, self.replica_id, f"replica {self.replica_id}", ctx)
        self.access.configure(config, ctx)

    # ---- start-up -------------------------------------------------------------------
    async def run(self) -> None:
        args = self.args
        tcp_host = args.get("tcp_host")
        if tcp_host:  # a Ray actor: authenticated TCP on the node's own address, a free port
            from flotilla._private.auth import cluster_secret
            from flotilla._private.transport import serve_tcp

            server = self.server = await serve_tcp(tcp_host, 0, self._make_conn, cluster_secret())
            port = server.sockets[0].getsockname()[1]
            self.addr = f"tcp://{f'[{tcp_host}]' if ':' in tcp_host else tcp_host}:{port}"
        else:
            server = self.server = await self.loop.create_unix_server(self._make_conn, args["sock_path"])
            self.addr = ""
        from flotilla._private import client

        self.link = client.HeadLink(args["head_sock"], self._control, name="head", hello=self._hello)
        await self.link.connect()
        client.Runtime.attach(self.loop, self.link)
        trace.CALLER = self.replica_id  # the `handle` label of the calls its code makes
        self.pusher = metrics.Pusher(STORE, self.link, self._set_gauges)
        self.pusher.start()
        if metrics.enabled():
            self.loopwatch = loopwatch.start(self.loop, "replica", self.dep_name, self.app_name)
        register: tuple[Any, ...] = (self.replica_id, os.getpid())
        if self.addr:
            register += (self.addr, args.get("node_id", ""))
        spec = await self.link.call("replica_register", *register, wait_s=math.inf)
        self.phase = "constructing"
        began = time.perf_counter()
        self.construct_task = self.loop.create_task(self._construct(spec))
        try:
            await self.construct_task
        except BaseException as e:
            if not self.draining:
                tb = "".join(traceback.format_exception(e))
                logger.error("constructor failed:\n%s", tb)
                await self._failed(tb)
                return
        if self.draining:  # told to stop while constructing: `_drain` finishes that stop
            await self.stopped.wait()
            self.pusher.stop()
            server.close()
            return
        if self.asgi_app is not None:
            self.route_templates = asgiroutes.templates(self.asgi_app)
        if args.get("direct"):
            from flotilla._private.direct import DirectIngress

            self.direct = DirectIngress(self, args["direct"])
            try:
                await self.direct.start()
            except OSError as e:
                msg = f"direct ingress could not get the listening socket for port {args['direct']['port']}: {e}"
                logger.error(msg)
                await self._failed(msg)
                return
        init_s = time.perf_counter() - began
        logger.info("replica %s ready (pid %d)", self.replica_id, os.getpid())
        self.phase = "ready"
        await self.link.call("replica_ready", self.replica_id, init_s, self.route_templates, wait_s=math.inf)
        await self.stopped.wait()
        self._fold()
        self.pusher.stop()
        if self.direct is not None:
            await self.direct.stop()
        server.close()
        if not self.addr:
            with contextlib.suppress(OSError):
                os.unlink(args["sock_path"])
        if self.abandoned:  # in a Ray actor too: its worker process goes, as ray.kill does it
            self.access.flush()
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(0)

    async def _failed(self, why: str) -> None:
        self.phase = "failed"
        self.failure = why
        await self.link.call("replica_failed", self.replica_id, why, wait_s=math.inf)

    async def _hello(self, peer: RpcPeer) -> None:
        """A restarted head: tell it who we are and where we are, so it re-adopts us."""
        if self.phase == "registering":
            return  # no code yet: the replica_register call is simply asked again
        try:
            await peer.call("replica_reattach", self.replica_id, os.getpid(), self.phase, self.failure, self.models,
                            self.route_templates)
        except RemoteCallError as e:
            self._unknown(e)
        except RuntimeError as e:  # the head's refusal, as raised there
            self._unknown(e)

    def _exit_for(self, e: BaseException) -> None:
        """The user's code raised SystemExit or KeyboardInterrupt: exit (its answer sent first);
        the controller replaces this replica and the requests still on it fail, as when a Ray
        actor's worker exits."""
        logger.error("user code raised %s%r; the replica exits", type(e).__name__, e.args)
        self.loop.call_later(0.01, self.stopped.set)

    def _unknown(self, e: BaseException) -> None:
        logger.error("the restarted head does not know this replica (%s); draining and exiting", e)
        if self.phase in ("ready", "draining"):
            cfg = self.config or {}
            self.loop.create_task(self._control(None, "stop", (
                cfg.get("graceful_shutdown_wait_loop_s", 2.0), cfg.get("graceful_shutdown_timeout_s", 20.0))))
        else:
            self.stopped.set()

    async def _construct(self, spec: dict[str, Any]) -> None:
        cfg = self.config = spec["config"]
        ac = cfg.get("autoscaling_config") or {}
        if ac.get("target_latency_ms") or ac.get("target_queue_delay_ms") or ac.get("policy"):
            self.latency = trace.LatencyRing()
        self._apply_logging(cfg.get("logging_config"))
        self.max_ongoing = cfg["max_ongoing_requests"]
        self.pool_size = max(2, self.max_ongoing)
        self.pool = ThreadPoolExecutor(self.pool_size, thread_name_prefix="replica")
        self.loop.set_default_executor(self.pool)
        context.on_models_changed = self._models_changed
        rank = spec.get("rank")
        self.rank = ReplicaRank(*rank) if rank is not None else ReplicaRank()
        set_replica_context(self.app_name, self.dep_name, self.replica_id, self.rank, spec.get("world_size", 1),
                            spec.get("version"))
        built = self.prebuilt
        if built is None:
            target = cloudpickle.loads(spec["def_bytes"])
            init_args, init_kwargs = cloudpickle.loads(spec["args_bytes"])
            built = instantiate(target, init_args, init_kwargs, self.constructing)
            if inspect.isawaitable(built):
                built = await built
        obj = self.obj = built.obj
        self.constructing.clear()
        self.is_function = built.is_function
        assert context.replica_context is not None
        context.replica_context.servable_object = obj
        if built.asgi is not None:
            self.asgi_app = built.asgi
            http_util.add_unavailable_handlers(built.asgi)
            lifespan = getattr(getattr(built.asgi, "router", None), "lifespan_context", None)
            if lifespan is not None:
                self.lifespan = lifespan(built.asgi)
                await self.lifespan.__aenter__()
        if self.prebuilt is not None:
            hook = getattr(obj, "__post_fork__", None)
            if hook is not None:
                result = hook()
                if inspect.isawaitable(result):
                    await result
        user_config = self.user_config = cfg.get("user_config")
        if ((user_config is not None and (self.prebuilt is None or user_config != self.prebuilt.user_config))
                or (not self.is_function and _takes_rank(obj))):
            await self._reconfigure(user_config)
        entry = self._ingress_callable(cfg)
        self.http_mode = _http_mode(entry)
        self.http_entry = entry if entry is None or _takes_args(entry) else _without_request(entry)
        await self._first_health_check(cfg.get("health_check_timeout_s", 30.0))

    async def _check_health(self) -> None:
        """The deployment's `check_health()`, if it has one."""
        fn = getattr(self.obj, "check_health", None)
        if fn is not None:
            if inspect.iscoroutinefunction(fn):
                await fn()
            else:  # its own thread: a saturated user pool must not fail the check
                ctx = contextvars.copy_context()
                await self.loop.run_in_executor(self.health_pool, functools.partial(ctx.run, fn))

    async def _first_health_check(self, timeout_s: float) -> None:
        """As Ray Serve: a replica is not ready before its health check passed once; failing
        it is failing to start."""
        try:
            await asyncio.wait_for(self._check_health(), timeout_s)
        except TimeoutError:
            raise RuntimeError(f"The replica's first health check did not finish within "
                               f"health_check_timeout_s={timeout_s:g}s.") from None
        except Exception as e:
            raise RuntimeError(f"The replica's first health check failed: {type(e).__name__}: {e}") from e

    def _ingress_callable(self, cfg: dict[str, Any]) -> Any:
        fn = self.obj if self.is_function else getattr(self.obj, "__call__", None)  # noqa: B004
        if fn is None:
            return None
        if cfg.get("max_batch_size"):
            from flotilla.serve.batching import batched_caller

            fn = batched_caller(fn, cfg["max_batch_size"], cfg.get("batch_wait_timeout_s", 0.0),
                                batch_latency_target_s=cfg.get("batch_latency_target_s"))
            self.methods["__call__"] = (fn, _ASYNC)
        return fn

    def _models_changed(self, model_ids: list[str]) -> None:
        self.models = list(model_ids)
        if self.link is not None:
            self.link.notify("replica_models", self.replica_id, self.models)

    async def _reconfigure(self, user_config: Any) -> None:
        """The class's `reconfigure(user_config)`, with `rank=` too where it takes one."""
        fn = getattr(self.obj, "reconfigure", None)
        if fn is None:
            raise RuntimeError(
                "user_config was given but the deployment class defines no reconfigure(self, config)"
            )
        await self._invoke(fn, (user_config,), {"rank": self.rank} if _takes_rank(self.obj) else {})

    async def _invoke(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if inspect.iscoroutinefunction(fn):
            return await fn(*args, **kwargs)
        ctx = contextvars.copy_context()
        result = await self.loop.run_in_executor(self.pool, functools.partial(ctx.run, fn, *args, **kwargs))
        if inspect.isawaitable(result):
            result = await result
        return result

    # ---- control plane ----------------------------------------------------------------
    async def _control(self, peer: RpcPeer | None, op: str, args: tuple[Any, ...]) -> Any:
        if op == "update":
            from flotilla._private import client

            client.Runtime.current().on_update(*args)
            return None
        if op == "health":
            await self._check_health()
            return self.ongoing
        if op == "update_config":
            async with self.config_lock:
                await self._update_config(args[0])
            return None
        if op == "stats":
            out: dict[str, Any] = {"ongoing": self.ongoing, "queued": len(self.waiters), "requests": self.num_requests}
            if self.latency is not None and args:
                out["latency_ms"], out["queue_delay_ms"], out["samples"] = self.latency.p95(float(args[0]))
            if args and hasattr(self.obj, "record_autoscaling_stats"):
                out["custom"] = await self._record_autoscaling_stats()
            return out
        if op == "routing_stats":
            fn = getattr(self.obj, "record_routing_stats", None)
            if fn is None:
                return None
            got = await self._invoke(fn, (), {})
            if not isinstance(got, dict):
                raise TypeError(f"record_routing_stats() must return a dict, not {type(got).__name__}")
            return got
        if op == "trace":
            from flotilla._private import client

            self._fold()
            client.Runtime.current().fold_calls()
            return trace.RING.find(str(args[0]))
        if op == "stop":
            await self._drain(*args)
            if self.pusher is not None:
                self.pusher.push()  # the final counts, to the head before the answer to `stop`
            self.loop.call_later(0.01, self.stopped.set)
            return None
        raise ValueError(f"unknown control op {op!r}")

    async def _record_autoscaling_stats(self) -> dict[str, float] | None:
        """The user's `record_autoscaling_stats()` (sync or async): {metric name: value}.
        One call at a time; one that fails or is not a dict of numbers is logged, None."""
        if self._custom_stats is None or self._custom_stats.done():
            self._custom_stats = self.loop.create_task(self._invoke(self.obj.record_autoscaling_stats, (), {}))
        labels = (self.dep_name, self.replica_id, self.app_name)
        began = time.perf_counter()
        try:
            got = await asyncio.wait_for(asyncio.shield(self._custom_stats), CUSTOM_STATS_TIMEOUT_S)
            STORE.observe("ray_serve_user_autoscaling_stats_latency_ms", labels, (time.perf_counter() - began) * 1000.0)
            return {str(k): float(v) for k, v in dict(got).items()}
        except Exception as e:
            if not isinstance(e, TimeoutError):
                logger.warning("record_autoscaling_stats() failed: %r", e)
            STORE.inc("ray_serve_record_autoscaling_stats_failed", (*labels, type(e).__name__))
            return None

    async def _update_config(self, light: dict[str, Any]) -> None:
        """Apply a new `max_ongoing_requests`, `logging_config` and `user_config` in place."""
        if light.get("logging_config") != self.logging_config:
            self._apply_logging(light.get("logging_config"))
        n = light["max_ongoing_requests"]
        if n != self.max_ongoing:
            self.max_ongoing = n
            if max(2, n) != self.pool_size:
                old, self.pool_size = self.pool, max(2, n)
                self.pool = ThreadPoolExecutor(self.pool_size, thread_name_prefix="replica")
                self.loop.set_default_executor(self.pool)
                if old is not None:
                    old.shutdown(wait=False)
            while self.waiters and self.ongoing < self.max_ongoing:
                self.ongoing += 1
                fut = self.waiters.popleft()
                if not fut.done():
                    fut.set_result(None)
                else:
                    self.ongoing -= 1
        user_config = light.get("user_config")
        rank = light.get("rank")
        moved = False
        if rank is not None:
            new = ReplicaRank(*rank)
            moved = new.parts != self.rank.parts
            self.rank = new
            ctx = context.replica_context
            if ctx is not None:
                ctx.rank = new
                ctx.world_size = light.get("world_size", ctx.world_size)
        if (user_config is not None and user_config != self.user_config) or (moved and _takes_rank(self.obj)):
            await self._reconfigure(user_config)
        self.user_config = user_config

    async def _drain(self, wait_loop_s: float, timeout_s: float) -> None:
        """Stop taking work, let what runs finish (up to `timeout_s`), then clean up.

        Routers are told `Drain` on every connection; each answers `DrainAck` after the last
        request it sent here. Requests that arrive meanwhile, and those still waiting for a
        slot, are answered `Rejected` (the router retries them elsewhere), so nothing that
        reached this replica is lost, whatever the timing of the controller's updates.
        """
        if self.draining:
            await self.stopped.wait()  # a second stop (a restarted head): the first one finishes
            return
        self.draining = True
        if self.construct_task is not None and not self.construct_task.done():
            await self._stop_constructing()
            return
        self.phase = "draining"
        if self.server is not None:
            self.server.close()
        if self.direct is not None:
            await self.direct.drain()
        for proto in list(self.conns):
            proto.send(0, Drain())
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(_DrainRejection())
        deadline = time.monotonic() + timeout_s
        while self.ongoing or any(p not in self.acked for p in self.conns) or (
            self.direct is not None and self.direct.open_connections()
        ):
            left = deadline - time.monotonic()
            if left <= 0:
                logger.warning("graceful shutdown timed out after %ss with %d requests ongoing", timeout_s, self.ongoing)
                self.abandoned = self.ongoing > 0
                break
            self.idle.clear()
            try:
                await asyncio.wait_for(self.idle.wait(), min(max(wait_loop_s, 0.01), left))
            except TimeoutError:
                pass
        for task, proto, tag in list(self.tasks.values()):  # an ActorDiedError, as Ray's killed replica gives
            proto.send(tag, error_reply(ActorDiedError(
                f"Replica {self.replica_id} stopped before the request finished "
                f"(graceful_shutdown_timeout_s={timeout_s})."
            )))
            task.cancel()
        if self.lifespan is not None:
            try:
                await self.lifespan.__aexit__(None, None, None)
            except Exception:
                logger.exception("ASGI lifespan shutdown failed")
        await self._del(self.obj)

    async def _stop_constructing(self) -> None:
        """Stopped before its constructor finished (as Ray's): cancel an async `__init__` and
        run `__del__` of the object it was building."""
        self.phase = "draining"
        task = self.construct_task
        assert task is not None
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await self._del(self.obj if self.obj is not None else (self.constructing or [None])[0])

    @staticmethod
    async def _del(obj: Any) -> None:
        """The user's `__del__` (sync or async), once, at a graceful stop."""
        fn = getattr(type(obj), "__del__", None) if obj is not None else None
        if fn is not None:
            try:
                result = fn(obj)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("__del__ raised")

    # ---- data plane -------------------------------------------------------------------
    def _make_conn(self) -> FrameProtocol:
        proto = FrameProtocol(_ignore)
        proto.coalesce = True
        proto.on_message = functools.partial(self._on_request, proto)
        proto.on_close = functools.partial(self._conn_lost, proto)
        proto.on_bad_frame = functools.partial(self._bad_request, proto)
        proto.on_connect = functools.partial(self._conn_made, proto)
        self.conns.add(proto)
        return proto

    def _conn_made(self, proto: FrameProtocol) -> None:
        if self.draining:  # a router that connects late learns at once
            proto.send(0, Drain())

    def _conn_lost(self, proto: FrameProtocol, exc: BaseException | None) -> None:
        """The caller's process is gone: nobody will read the replies, free the slots."""
        self.conns.discard(proto)
        self.acked.discard(proto)
        pid = id(proto)
        for key, (task, _, _) in list(self.tasks.items()):
            if key[0] == pid:
                task.cancel()
        self.idle.set()

    def _bad_request(self, proto: FrameProtocol, tag: int, err: BaseException) -> None:
        proto.send(tag, error_reply(RaySystemError(
            f"Replica {self.replica_id} could not decode the request: {type(err).__name__}: {err}"
        )))

    def _on_request(self, proto: FrameProtocol, tag: int, msg: Any) -> None:
        cls = msg.__class__
        if cls is Cancel:
            entry = self.tasks.get((id(proto), tag))
            if entry is not None:
                entry[0].cancel()
        elif cls is Credit:
            w = self.windows.get((id(proto), tag))
            if w is not None:
                w.give(msg.n)
        elif cls is DrainAck:
            self.acked.add(proto)
            self.idle.set()
        elif cls is WsIn:
            self.ws_feed((id(proto), tag), msg.message)
        elif self.draining:
            proto.send(tag, _REJECTED)
        else:
            key = (id(proto), tag)
            self.tasks[key] = (self.loop.create_task(self._handle(proto, tag, msg, key)), proto, tag)

    def ws_feed(self, key: tuple[int, int], message: dict[str, Any]) -> None:
        """A client message for an open websocket (dropped once it has ended)."""
        inbox = self.inboxes.get(key)
        if inbox is not None:
            inbox.push(message)

    async def _acquire(self) -> None:
        if self.ongoing < self.max_ongoing and not self.waiters:
            self.ongoing += 1
            return
        fut = self.loop.create_future()
        self.waiters.append(fut)
        try:
            await fut  # the slot is handed over by _release
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release()
            else:
                try:
                    self.waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def _release(self) -> None:
        if self.ongoing <= self.max_ongoing:  # else the limit was lowered: shrink first
            while self.waiters:
                fut = self.waiters.popleft()
                if not fut.done():
                    fut.set_result(None)
                    return
        self.ongoing -= 1

    async def _handle(self, proto: Any, tag: int, msg: Any, key: tuple[int, int]) -> None:
        t_in = time.perf_counter()
        while True:
            try:
                await self._acquire()
                break
            except asyncio.CancelledError:
                self.tasks.pop(key, None)
                return
            except _DrainRejection:
                if isinstance(proto, FrameProtocol):
                    self.tasks.pop(key, None)
                    proto.send(tag, _REJECTED)
                    return
                # A direct-ingress request: its client is connected here; serve it anyway.
        self.num_requests += 1
        t0 = time.perf_counter()
        status: Any = "OK"
        cls = msg.__class__
        meta = msg.meta
        if meta is None:  # a driver's call: a meta all the same, to keep the calls it makes
            meta = {}
        context.request_meta.set(meta)
        try:
            if cls is Http:
                status = await self._handle_http(proto, tag, key, msg.scope, msg.body)
                return
            if cls is WsOpen:
                from flotilla._private import ws

                status = await ws.serve(self, proto, tag, key, msg.scope)
                return
            method = msg.method
            fn, mode = self.methods.get(method) or self._resolve(method)
            if mode == _ASYNC:
                result = await fn(*msg.args, **msg.kwargs)
            elif mode == _ON_LOOP:
                result = fn(*msg.args, **msg.kwargs)
            else:
                result = await self._invoke(fn, msg.args, msg.kwargs)
            if cls is Stream:
                await self._stream(proto, tag, key, result, _shown(method, fn))
                return
            if inspect.isgenerator(result) or inspect.isasyncgen(result) or hasattr(result, "__aiter__"):
                raise TypeError(
                    f"Method '{_shown(method, fn)}' returned a generator. You must use `handle.options(stream=True)` "
                    "to call generators on a deployment."
                )
            try:
                proto.send(tag, Ok(wire(result)))
            except Exception as e:
                raise TypeError(f"the return value of '{method}' could not be pickled: {e!r}") from e
            if proto.paused:
                await proto.drained()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                status = "CANCELLED"  # (the calls it made are cancelled below)
            else:  # raised by something it awaited, the request not cancelled: answer, never hang
                status = "ERROR"
                proto.send(tag, error_reply(TaskCancelledError(
                    f"The request to replica {self.replica_id} ended with asyncio.CancelledError raised by "
                    "code it awaited (a task or future cancelled there), not by a cancellation of the request."
                )))
        except BaseException as e:
            status = "ERROR"
            if isinstance(e, Exception):
                proto.send(tag, error_reply(e))
            else:  # sys.exit() or an interrupt in the user's code: the replica exits, as a Ray actor's worker
                proto.send(tag, error_reply(ActorDiedError(
                    f"Replica {self.replica_id}'s code raised {type(e).__name__}{e.args!r} (sys.exit() or an "
                    "interrupt): the replica exits and is replaced.")))
                self._exit_for(e)
        finally:
            self.tasks.pop(key, None)
            self.windows.pop(key, None)
            self._release()
            if self.draining:
                self.idle.set()
            if context.SPAWNED in meta:  # calls it made, not over: cancelled with the request (as
                task = asyncio.current_task()  # Ray's), also when its code caught the cancellation
                if task is not None and task.cancelling():
                    context.cancel_spawned(meta)
            if self.metrics:
                self._record(msg, meta, status, t0, t_in)
            elif self.latency is not None:  # latency targets work with FLOTILLA_METRICS=0 too
                self._latency(meta, time.perf_counter(), t0, t_in)

    def _latency(self, meta: Any, t1: float, t0: float, t_in: float) -> None:
        """Into the latency window: from arrival at the router to now, and the queue delay
        (the router's wait, which rides in `meta`, plus the wait here until `t0`)."""
        q = meta.get(trace.ROUTER_QUEUE_KEY, 0.0) * 1000.0 if meta else 0.0
        self.latency.add(t1, q + (t1 - t_in) * 1000.0, q + (t0 - t_in) * 1000.0)  # type: ignore[union-attr]

    def _record(self, msg: Any, meta: Any, status: Any, t0: float, t_in: float) -> None:
        """Keep one request's times for `_fold`, RECORD_FIELDS strings and numbers on a flat
        list (no object outlives the request, so its record never wakes the garbage
        collector); only the latency window (when a latency target uses it) takes them at
        once. BATCH_WAIT_S needs no reset: each request's task starts from the connection's
        context, where it is never set."""
        t1 = time.perf_counter()
        if self.latency is not None:
            self._latency(meta, t1, t0, t_in)
        cls = msg.__class__
        http = cls is Http or cls is WsOpen
        if http:
            verb = msg.scope.get("method", "GET") if cls is Http else "WS"
            name = None  # the route
        else:
            verb, name = "CALL", msg.method
        if meta is None:
            route, rid, ds_s = "", None, 0.0
        else:  # a call made while serving a request has that request's route, as in Ray
            route, rid, ds_s = meta.get("route", ""), meta.get("request_id"), meta.get(trace.DOWNSTREAM_KEY, 0.0)
        done = self._done
        done += (t_in, t0, t1, _BATCH_WAIT.get() if _BATCH_WAIT is not None else 0.0, route, verb, name, rid,
                 ds_s, status)
        if len(done) == RECORD_FIELDS:
            self.loop.call_later(FOLD_S, self._fold)

    def _fold(self) -> None:
        """The metrics, access log lines and trace events of the requests recorded since the
        last fold, off the request path, each series looked up once per route."""
        done, self._done = self._done, []
        if not done:
            return
        to_wall = time.time() - time.perf_counter()
        cols = metrics.columns(done, RECORD_FIELDS)
        if not self._fold_columns(cols, to_wall):
            self._fold_rows(cols, to_wall)
        self.access.flush()

    def _fold_rows(self, columns: list[list[Any]], to_wall: float) -> None:
        """`_fold` a request at a time: any mix of routes, stages and statuses."""
        per_route = self._per_route
        observe, buckets = metrics.observe_into, trace.BUCKETS
        rq_hist, user_hist = self._rq_hist, self._user_hist
        counts: dict[tuple[str, ...], int] = {}
        errors: dict[tuple[str, ...], int] = {}
        access = self.access
        events: list[tuple[Any, ...]] = []
        app, dep, replica_id = self.app_name, self.dep_name, self.replica_id
        for t_in, t0, t1, bw, route, verb, name, rid, ds_s, status in zip(*columns, strict=True):
            # Stages: waiting for a slot here, then the handler's time split into batch wait,
            # downstream handle calls (capped: concurrent calls overlap) and the rest (user code).
            ms = (t1 - t0) * 1000.0
            rq = (t0 - t_in) * 1000.0
            bw *= 1000.0
            user = ms - bw
            ds = 0.0
            now = to_wall + t1
            if ds_s:
                ds = min(ds_s * 1000.0, max(0.0, user))
                user -= ds
            user = max(0.0, user)
            if rid is not None:
                events.append((rid, "replica", app, dep, replica_id, rq, bw, user, ds, (t1 - t_in) * 1000.0, now))
            labels, hist = per_route.get(route) or self._route_entry(route)
            counts[labels] = counts.get(labels, 0) + 1
            observe(hist, metrics.LATENCY_MS_BUCKETS, ms)
            observe(rq_hist, buckets, rq)
            observe(user_hist, buckets, user)
            if ds:
                observe(self._stage("downstream"), buckets, ds)
            if bw:
                observe(self._stage("batch_wait"), buckets, bw)
            if metrics.is_error(status):
                errors[labels] = errors.get(labels, 0) + 1
            access.keep(now, rid or "-", f"{verb} {route if name is None else name}", status, ms)
        trace.RING.extend(events)
        for labels, n in counts.items():
            STORE.inc("ray_serve_deployment_request_counter", labels, n)
        for labels, n in errors.items():
            STORE.inc("ray_serve_deployment_error_counter", labels, n)

    def _fold_columns(self, columns: list[list[Any]], to_wall: float) -> bool:
        """`_fold` of the common batch (one route, every request with an id, no batch wait,
        no downstream calls, no errors) a column at a time, each step one C loop over the
        batch; False, having done nothing, for any other batch."""
        t_in, t0, t1, bw, route, verb, name, rid, ds_s, status = columns
        if (any(bw) or any(ds_s) or None in rid or route.count(route[0]) != len(route)
                or verb.count(verb[0]) != len(verb) or name.count(name[0]) != len(name)):
            return False
        if any(map(metrics.is_error, set(status))):
            return False
        labels, hist = self._route_entry(route[0])
        took = [x * 1000.0 for x in map(_SUB, t1, t0)]  # ms, in arrival order
        waited = [x * 1000.0 for x in map(_SUB, t0, t_in)]
        total = [x * 1000.0 for x in map(_SUB, t1, t_in)]
        now = [to_wall + x for x in t1]
        buckets = trace.BUCKETS
        took_sorted = sorted(took)
        metrics.observe_sorted(hist, buckets, took_sorted)
        metrics.observe_sorted(self._user_hist, buckets, took_sorted)  # all of it is user code here
        metrics.observe_sorted(self._rq_hist, buckets, sorted(waited))
        STORE.inc("ray_serve_deployment_request_counter", labels, len(t1))
        app, dep, replica_id = self.app_name, self.dep_name, self.replica_id
        trace.RING.columns(rid, lambda i: (
            rid[i], "replica", app, dep, replica_id, waited[i], 0.0, took[i], 0.0, total[i], now[i]))
        self.access.keep_columns(now, rid, f"{verb[0]} {route[0] if name[0] is None else name[0]}", status, took)
        return True

    def _route_entry(self, route: str) -> tuple[tuple[str, ...], list[Any]]:
        """The metric labels and latency series of `route` (made once)."""
        entry = self._per_route.get(route)
        if entry is None:
            labels = (self.dep_name, self.replica_id, route, self.app_name)
            entry = self._per_route[route] = (
                labels, STORE.series("ray_serve_deployment_processing_latency_ms", labels))
        return entry

    def _resolve(self, method: str) -> tuple[Any, int]:
        if method.startswith("grpc"):  # the gRPC ingress: `grpc:<Method>` / `grpcs:<Method>`
            from flotilla._private import grpc_replica

            if grpc_replica.is_grpc(method):
                entry = self.methods[method] = grpc_replica.bind(self, method, _ASYNC, _ON_LOOP)
                return entry
        if self.is_function:
            if method != "__call__":
                raise MethodNotFoundError(f"Tried to call a method '{method}' that does not exist: function "
                                          f"deployment '{self.args['deployment']}' has only __call__.")
            fn = self.obj
        else:
            fn = getattr(self.obj, method, None)
            if fn is None or not callable(fn):
                have = sorted(n for n in dir(self.obj) if (not n.startswith("_") or n == "__call__")
                              and callable(getattr(self.obj, n, None)))
                raise MethodNotFoundError(f"Tried to call a method '{method}' that does not exist in deployment "
                                          f"'{self.args['deployment']}'. Available methods: {have}.")
        if inspect.iscoroutinefunction(fn):
            mode = _ASYNC
        elif inspect.isasyncgenfunction(fn) or hasattr(fn, "batch_queue"):
            mode = _ON_LOOP  # returns an async iterator; must be created on the loop
        else:
            mode = _SYNC
        entry = (fn, mode)
        self.methods[method] = entry
        return entry

    async def _stream(self, proto: Any, tag: int, key: tuple[int, int], result: Any, method: str) -> None:
        """Send a generator's items, never more than the caller's credit ahead."""
        window = self.windows[key] = _Window()
        if inspect.isasyncgen(result) or hasattr(result, "__aiter__"):
            async for item in result:
                await window.take()
                proto.send(tag, Yield(wire(item)))
                if proto.paused:
                    await proto.drained()
        elif inspect.isgenerator(result):
            async for item in self.sync_items(result):
                await window.take()
                proto.send(tag, Yield(wire(item)))
                if proto.paused:
                    await proto.drained()
        else:
            raise TypeError(f"Called method '{method}' with `handle.options(stream=True)` but it did not "
                            "return a generator.")
        proto.send(tag, End())

    async def sync_items(self, gen: Any) -> Any:
        """The items of a sync generator, each produced in the thread pool (user code may block),
        in the request's context (its id for `get_request_context`, logging and handle calls)."""
        sentinel = object()
        ctx = contextvars.copy_context()
        while True:
            item = await self.loop.run_in_executor(self.pool, functools.partial(ctx.run, next, gen, sentinel))
            if item is sentinel:
                return
            yield item

    async def _handle_http(self, proto: Any, tag: int, key: tuple[int, int], scope: dict[str, Any], body: bytes) -> int:
        """Run the HTTP ingress for one request; returns the status code sent."""
        from starlette.responses import Response

        if body.__class__ is not AwaitableBytes:  # a large body arrives as one (transport.py)
            body = AwaitableBytes(body)
        global _request_class
        if _request_class is None:
            _request_class = _make_request_class()
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # until the request is cancelled
            return {"type": "http.disconnect"}

        if self.asgi_app is not None:
            return await self._send_asgi_response(proto, tag, key, self.asgi_app, scope, receive)
        fn = self.http_entry
        try:
            if fn is None:
                raise TypeError(
                    f"deployment '{self.args['deployment']}' has no __call__ to handle HTTP requests"
                )
            request = _request_class(scope, receive)
            request._body = body
            mode = self.http_mode
            if mode == _ASYNC:
                result = await fn(request)
            elif mode == _ON_LOOP:
                result = fn(request)  # a generator: streamed below
            else:
                result = await self._invoke(fn, (request,), {})
            if inspect.isasyncgen(result) or inspect.isgenerator(result):
                from starlette.responses import StreamingResponse

                result = StreamingResponse(result)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            raise
        except Exception as e:
            refused = http_util.unavailable(e)
            if refused is not None:  # a call of its own was refused: the request is too, as Ray's
                logger.warning("request %s %s failed: %s", scope.get("method"), scope.get("path"), e)
                proto.send(tag, HttpFull(*refused))
                return refused[0]
            logger.exception("request %s %s failed", scope.get("method"), scope.get("path"))
            proto.send(tag, HttpFull(*http_util.plain(500, "Internal Server Error")))
            return 500
        if isinstance(result, Response) or (callable(result) and hasattr(result, "body_iterator")):
            return await self._send_asgi_response(proto, tag, key, result, scope, receive)
        try:
            status, headers, payload = http_util.encode_result(result)
        except Exception:
            logger.exception("could not encode the return value as JSON")
            proto.send(tag, HttpFull(*http_util.plain(500, "Internal Server Error")))
            return 500
        proto.send(tag, HttpFull(status, headers, oob(payload)))
        if proto.paused:
            await proto.drained()
        return status

    async def _send_asgi_response(
        self, proto: Any, tag: int, key: tuple[int, int], response: Any, scope: dict[str, Any], receive: Any
    ) -> int:
        """Run an ASGI callable (a Response, or the user's app) and forward what it sends.

        A body sent in several parts streams (HttpStart, Chunk..., End) within the caller's
        credit; if the app fails after the response started, Abort tells the caller to break
        the HTTP response off instead of ending it cleanly.
        """
        state: dict[str, Any] = {"streaming": False, "done": False, "status": 500, "headers": []}

        async def send(message: dict[str, Any]) -> None:
            t = message["type"]
            if t == "http.response.start":
                state["status"] = message["status"]
                state["headers"] = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
            elif t == "http.response.body":
                if state["done"]:
                    return
                chunk = message.get("body", b"")
                more = message.get("more_body", False)
                if not state["streaming"]:
                    if not more:
                        state["done"] = True
                        proto.send(tag, HttpFull(state["status"], state["headers"], oob(chunk)))
                        return
                    state["streaming"] = True
                    self.windows[key] = _Window()
                    proto.send(tag, HttpStart(state["status"], state["headers"]))
                if chunk:
                    await self.windows[key].take()
                    proto.send(tag, Chunk(bytes(chunk)))
                if not more:
                    state["done"] = True
                    proto.send(tag, End())
                if proto.paused:
                    await proto.drained()

        try:
            await response(scope, receive, send)
        except Exception as e:
            logger.exception("response failed")
            if not state["streaming"]:
                if not state["done"]:
                    proto.send(tag, HttpFull(*http_util.plain(500, "Internal Server Error")))
                return 500
            if not state["done"]:
                proto.send(tag, Abort(f"{type(e).__name__}: {e}"))
            return 500
        if not state["done"]:
            if state["streaming"]:
                proto.send(tag, Abort("the application returned before it finished the response"))
            else:
                proto.send(tag, HttpFull(*http_util.plain(500, "Internal Server Error")))
            return 500
        return int(state["status"])


def _shown(method: str, fn: Any) -> str:
    """The name errors give a called method: a function deployment's own name, as Ray's."""
    if method == "__call__" and inspect.isfunction(fn):
        return str(fn.__name__)
    return method


def _add_request_id(record: logging.LogRecord) -> bool:
    meta = context.request_meta.get()
    if meta is None:
        record.request_id = "-"
    else:
        record.request_id = meta.get("request_id", "-")
        record.route = meta.get("route", "")
    return True


def setup_process(args: dict[str, Any], *, in_actor: bool = False, own_log: bool = True, forked: bool = False) -> None:
    """Environment, import path, working folder and logging of the process a replica runs in.

    In a Ray actor (`in_actor`) the worker process is Ray's: the driver's import path is added
    to (not replaced), the working folder is changed only when it exists here and the
    deployment has no `runtime_env` working_dir, and the log is rotated only when it is the
    replica's own file (`own_log`), not Ray's worker log. `forked`: from a template, whose log
    handlers this process replaces with its own."""
    os.environ.update(args.get("env", {}))
    heap.keep_freed()  # after the deployment's env_vars, which may set FLOTILLA_KEEP_FREED_MB
    if in_actor:
        for p in reversed(args.get("sys_path", [])):
            if p not in sys.path and os.path.isdir(p):
                sys.path.insert(0, p)
    else:
        sys.path[:] = args.get("sys_path", sys.path)
    cwd = args.get("cwd")
    if cwd and not (in_actor and args.get("has_working_dir")):
        try:
            os.chdir(cwd)
        except OSError:
            pass
    if forked:
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s replica {args['replica_id']} [%(request_id)s] %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_add_request_id)
    if own_log:
        logrotate.rotate_own_log()


def run_loop(args: dict[str, Any], prebuilt: Built | None = None) -> None:
    """Run the replica on a new (uv)loop in this thread until it exits."""
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run

    async def amain() -> None:
        await Replica(args, prebuilt).run()

    runner(amain())


def main(args: dict[str, Any]) -> None:
    """Entry point in the forked child."""
    setup_process(args)
    run_loop(args)


def main_forked(args: dict[str, Any], built: Built) -> None:
    """Entry point in a child of a `fork_after_init` template: `built` is the template's object."""
    setup_process(args, forked=True)
    run_loop(args, built)
