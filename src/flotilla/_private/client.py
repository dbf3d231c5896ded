"""The per-process runtime: the control connection to the head, and routers for handles.

In the driver it owns a daemon thread running an event loop; in replica and proxy
processes it rides on their own loop. `Runtime.current()` is the process-wide instance.

The control connection (`HeadLink`) outlives the head: when it drops, it is made again, with
backoff, to the same `head.sock` (the keeper restarts the head); routers keep the replica sets
they know meanwhile and resubscribe once it is back. Control calls made while the head is away
wait for it, up to `FLOTILLA_HEAD_WAIT_S` (10 s), then raise `HeadUnavailableError`. In the
driver, the death of the keeper (the session) makes every call raise `ClusterGoneError` at once.
On a Ray cluster (`start_detached`) there is no keeper: the head runs in the detached controller
actor, reached over authenticated TCP, and the link's loss makes the driver ask Ray whether
that actor lives; if not, `ClusterGoneError` names it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import math
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar

from flotilla._private import logtail, session
from flotilla._private.hop import Inbox
from flotilla._private.looprouter import LoopRouters
from flotilla._private.router import Router
from flotilla._private.transport import Handler, PeerClosedError, RpcPeer, connect_addr
from flotilla.serve.schema import DeploymentID

if TYPE_CHECKING:
    from flotilla._private.lane import Lane

logger = logging.getLogger("flotilla")

HEAD_START_TIMEOUT_S = 30.0
#: On the Ray backend the head starts (or joins) Ray first, which takes seconds.
RAY_HEAD_START_TIMEOUT_S = 120.0
REPORT_PERIOD_S = 0.2
#: Default of `FLOTILLA_HEAD_WAIT_S`: how long a control call waits for a head that is away.
HEAD_WAIT_S = 10.0
RECONNECT_FIRST_S = 0.02
RECONNECT_MAX_S = 0.2
HELLO_TIMEOUT_S = 10.0


def head_wait_s() -> float:
    try:
        return float(os.environ.get("FLOTILLA_HEAD_WAIT_S", HEAD_WAIT_S))
    except ValueError:
        return HEAD_WAIT_S


class HeadUnavailableError(RuntimeError):
    """The head is away (being restarted) and did not come back within the wait."""


class ClusterGoneError(RuntimeError):
    """The session is over: its keeper process (or, on a Ray cluster, the controller actor)
    exited, and everything with it."""


class HeadLink:
    """The control connection to the head, made again (with backoff) whenever it drops.

    `hello(peer)` runs on each new connection before anyone else may use it (a replica or the
    proxy tells a restarted head who it is); `on_up` callbacks run after each reconnection
    (resubscribing). `call` waits for the head while it is away, bounded, and asks again when
    the head dies during a call: every control operation is idempotent.
    """

    def __init__(self, path: str, handler: Handler, name: str = "head",
                 hello: Callable[[RpcPeer], Awaitable[None]] | None = None) -> None:
        self.path = path
        self.handler = handler
        self.name = name
        self.hello = hello
        self.peer: RpcPeer | None = None
        self.up = asyncio.Event()
        self.on_up: list[Callable[[], Awaitable[None]]] = []
        self.down_since: float | None = None
        self.gone: str = ""  # why the cluster is gone for good ("" while it lives)
        self.closed = False
        self.reconnects = 0
        self._task: asyncio.Task[None] | None = None
        self.on_down: Callable[[], None] | None = None  # called when the connection drops
        self.away = "being restarted by the keeper"  # why the head is away, for HeadUnavailableError

    async def connect(self) -> RpcPeer:
        """The first connection (raises OSError if the head does not listen)."""
        peer = RpcPeer(self.handler, name=self.name)
        await connect_addr(self.path, peer)
        self._attach(peer)
        return peer

    def _attach(self, peer: RpcPeer) -> None:
        self.peer = peer
        self.down_since = None
        self.up.set()
        peer.on_close(lambda: self._lost(peer))

    def _lost(self, peer: RpcPeer) -> None:
        if peer is not self.peer:
            return
        self.peer = None
        self.up.clear()
        if self.closed or self.gone:
            self.up.set()  # wake waiting calls: they raise
            return
        self.down_since = time.monotonic()
        logger.warning("lost the connection to the head; reconnecting")
        self._task = asyncio.get_running_loop().create_task(self._reconnect())
        if self.on_down is not None:
            self.on_down()

    async def _reconnect(self) -> None:
        delay = RECONNECT_FIRST_S
        while not self.closed and not self.gone:
            peer = RpcPeer(self.handler, name=self.name)
            try:
                await connect_addr(self.path, peer)
                if self.hello is not None:
                    await asyncio.wait_for(self.hello(peer), HELLO_TIMEOUT_S)
                if peer.closed:
                    raise PeerClosedError("closed during hello")
            except Exception as e:  # not listening yet (OSError), gone again, or a hello that failed
                if not isinstance(e, (OSError, TimeoutError)):
                    logger.warning("reconnecting to the head: %r; trying again", e)
                peer.close()
                await asyncio.sleep(delay)
                delay = min(RECONNECT_MAX_S, delay * 2)
                continue
            away = time.monotonic() - (self.down_since or time.monotonic())
            self.reconnects += 1
            self._attach(peer)
            logger.info("reconnected to the head after %.2fs", away)
            for cb in list(self.on_up):
                try:
                    await cb()
                except Exception:
                    logger.exception("after reconnecting to the head")
            return

    def fail(self, why: str) -> None:
        """The cluster is gone: every waiting and future call raises ClusterGoneError."""
        self.gone = why
        self.up.set()
        if self._task is not None:
            self._task.cancel()

    def describe_away(self, waited: float) -> str:
        away = time.monotonic() - self.down_since if self.down_since is not None else 0.0
        return (
            f"the flotilla head is not answering: it is away ({self.away}) "
            f"for {away:.1f}s; waited {waited:g}s (FLOTILLA_HEAD_WAIT_S). Replicas keep serving "
            "meanwhile; retry later, or see head.log in the session's logs."
        )

    async def call(self, op: str, *args: Any, wait_s: float | None = None) -> Any:
        """Call the head; while it is away wait for it (up to `wait_s`, default
        `FLOTILLA_HEAD_WAIT_S`; math.inf: as long as it takes) and ask again."""
        wait = head_wait_s() if wait_s is None else wait_s
        deadline: float | None = None
        while True:
            if self.gone:
                raise ClusterGoneError(self.gone)
            if self.closed:
                raise PeerClosedError(f"the connection to the {self.name} was closed")
            peer = self.peer
            if peer is None or peer.closed:
                if deadline is None:
                    deadline = time.monotonic() + wait
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HeadUnavailableError(self.describe_away(wait))
                try:
                    await asyncio.wait_for(self.up.wait(), None if math.isinf(left) else left)
                except TimeoutError:
                    pass
                continue
            try:
                return await peer.call(op, *args)
            except PeerClosedError:
                continue  # the head died during the call: wait for the next one, ask again

    def notify(self, op: str, *args: Any) -> None:
        """Fire and forget; dropped while the head is away."""
        peer = self.peer
        if peer is not None and not peer.closed:
            peer.notify(op, *args)

    def close(self) -> None:
        self.closed = True
        if self._task is not None:
            self._task.cancel()
        if self.peer is not None:
            self.peer.close()


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()


class Runtime:
    _instance: ClassVar[Runtime | None] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop, link: HeadLink) -> None:
        self.loop = loop
        self.inbox = Inbox(loop)  # work for the loop from other threads (handle calls)
        self.link = link
        link.on_up.append(self._resubscribe)
        self.routers: dict[DeploymentID, Router] = {}
        self.loop_routers = LoopRouters(self)  # routers on callers' own loops (handle calls)
        self.lane: Lane | None = None  # the main thread's own loop for its sync calls (`lane.Lane`), made at first use
        self.lane_ok = True  # sync calls may use a lane (a driver; not a proxy's or replica's runtime)
        self.listeners: dict[Any, list[Any]] = {}
        self.splits: dict[str, Any] = {}  # traffic splits that split handles follow (handle.py)
        self.thread: threading.Thread | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.session_dir = ""
        self.logtail: logtail.LogTail | None = None  # replicas' output on this driver's stderr
        self.resources: dict[str, float] = {}
        self.metrics_port = 0
        self.dashboard_url: str | None = None  # the head's dashboard and REST API, if it runs one
        self.cold_start_timeout_s = float(os.environ.get("FLOTILLA_COLD_START_TIMEOUT_S", "60"))
        self._report_wake: asyncio.Event | None = None
        self._reporter: asyncio.Task[None] | None = None
        self.head_pid = 0
        self.backend = "local"
        self.dead = ""  # why the cluster is gone ("" while it lives)
        self._closing = False
        self._keeper_fd: int | None = None
        self.actor: Any = None  # the detached controller actor (a Ray cluster), or None
        self.actor_desc = ""
        self._watching = False
        #: The record of the cluster this driver attached to (`attach_cluster`), or None.
        self.attached: dict[str, Any] | None = None
        #: A driver's metrics pusher (its handles' counters), made with its first router;
        #: False in a proxy or replica, which push their own.
        self._pusher: Any = None
        self.driver = True  # False in a proxy's or replica's runtime (`attach`)

    # ---- construction -----------------------------------------------------------------
    @classmethod
    def current(cls) -> Runtime:
        rt = cls._instance
        if rt is None:
            raise RuntimeError("flotilla is not initialized: call flotilla.init() or serve.run() first")
        if rt.dead:
            raise ClusterGoneError(rt.dead)
        return rt

    @classmethod
    def get_or_start(cls) -> Runtime:
        rt = cls._instance
        if rt is not None:
            if rt.dead:
                raise ClusterGoneError(rt.dead)
            return rt
        forked = cls._forked_from
        if forked is not None:  # a forked child of a driver: it joins its parent's cluster
            with cls._lock:
                if cls._instance is None:
                    if not forked:
                        raise RuntimeError(
                            "this process was forked from a flotilla driver on the Ray backend, and Ray "
                            "cannot be used across a fork: start it with multiprocessing's 'spawn' (or "
                            "'forkserver') start method, or call flotilla.init(address=...) in it first.")
                    cls.attach_cluster(forked)
            return cls.current()
        from flotilla import init

        init(**(cls._reinit or {}))
        return cls.current()

    @classmethod
    def existing(cls) -> Runtime | None:
        """This process's runtime, or None; in a forked child of a driver, its parent's cluster,
        joined at this first use (`get_or_start`)."""
        rt = cls._instance
        if rt is None and cls._forked_from is not None:
            return cls.get_or_start()
        return rt

    #: `init` arguments for the next implicit start: after `serve.shutdown()` stopped the
    #: controller actor of a Ray cluster, `serve.run` starts a new one on the same cluster.
    _reinit: ClassVar[dict[str, Any] | None] = None
    #: In a forked child of a driver: its parent's cluster (`attach_cluster`'s record), which
    #: its first handle call joins; {} where it cannot (the Ray backend). None: not forked.
    _forked_from: ClassVar[dict[str, Any] | None] = None

    def _fork_record(self) -> dict[str, Any]:
        """What a forked child needs to join this process's cluster ({}: it cannot). A child
        of a replica or proxy joins as a driver through the head address its parent uses."""
        if not self.driver:
            from flotilla._private.keeper import keeper_from_env

            keeper = keeper_from_env()
            return {"sock": self.link.path, "session_dir": self.session_dir, "resources": self.resources,
                    "keeper_pid": keeper[0] if keeper else None, "namespace": "(the parent process's)"}
        if self.attached is not None:
            return dict(self.attached)
        if self.backend != "local" or self.process is None or self.actor is not None:
            return {}
        return {"sock": self.link.path, "session_dir": self.session_dir, "resources": self.resources,
                "metrics_port": self.metrics_port, "dashboard_url": self.dashboard_url, "pid": self.head_pid,
                "keeper_pid": self.process.pid, "namespace": "(the parent process's)"}

    def _inherited_fds(self) -> list[int]:
        """The descriptors of this runtime's connections and pipes (the keeper's, the head's,
        the replicas'), as a forked child sees them."""
        fds: list[int] = []
        protos = [c.proto for r in [*self.routers.values(), *self.loop_routers.all()] for c in r.conns()]
        if self.link.peer is not None:
            protos.append(self.link.peer.proto)
        for proto in protos:
            t = proto.transport
            with contextlib.suppress(Exception):
                sock = t.get_extra_info("socket") if t is not None else None
                if sock is not None:
                    fds.append(sock.fileno())
        if self.process is not None:
            fds += [f.fileno() for f in (self.process.stdin, self.process.stdout) if f is not None and not f.closed]
        if self._keeper_fd is not None:
            fds.append(self._keeper_fd)
        return [fd for fd in fds if fd >= 0]

    @classmethod
    def attach(cls, loop: asyncio.AbstractEventLoop, link: HeadLink) -> Runtime:
        """Use in replica/proxy processes: share their loop and control connection."""
        rt = cls(loop, link)
        rt._pusher = False  # the process pushes its metrics itself
        rt.lane_ok = False
        rt.driver = False
        cls._instance = rt
        return rt

    @classmethod
    def start_local(cls, resources: dict[str, float], metrics_port: int = 0,
                    ray: dict[str, Any] | None = None, dashboard: dict[str, Any] | None = None,
                    log_to_driver: bool | None = None) -> Runtime:
        """Start this session's keeper (which starts the head) and connect to the head.

        `ray`: the Ray backend's `ray.init` options (the head joins or starts Ray; replicas are
        actors); None: the local backend. `dashboard`: where the head serves the dashboard
        ({"host", "port", "fallback": take a free port when `port` is taken}); None: nowhere."""
        session_dir = session.create()
        cfg: dict[str, Any] = {"session_dir": session_dir, "resources": resources, "metrics_port": metrics_port}
        if dashboard is not None:
            cfg["dashboard"] = dashboard
        if ray is not None:
            cfg.update(backend="ray", ray=ray)
        log = open(os.path.join(session_dir, "logs", "head.log"), "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "flotilla._private.keeper", json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
        log.close()
        session.record_head(session_dir, proc.pid)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], HEAD_START_TIMEOUT_S if ray is None else RAY_HEAD_START_TIMEOUT_S)
        line = proc.stdout.readline() if ready else b""
        if not line:
            proc.kill()
            if ray is not None:
                raise RuntimeError(
                    f"the flotilla head did not start or join Ray (address={ray.get('address')!r}) within "
                    f"{RAY_HEAD_START_TIMEOUT_S:g}s; see {session_dir}/logs/head.log"
                )
            raise RuntimeError(
                f"the flotilla head process did not start; see {session_dir}/logs/head.log"
            )
        info = json.loads(line)
        if "error" in info:  # the head could not start or join Ray; the session is over
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            session.finish(session_dir)
            raise RuntimeError(f"{info['error']} (see {session.logs_root()})")
        if info.get("secret"):  # the Ray backend: routers here reach replicas over TCP
            from flotilla._private import auth

            auth.set_cluster_secret(bytes.fromhex(info["secret"]))
        loop = new_event_loop()
        link = HeadLink(info["sock"], lambda peer, op, args: rt._on_head_call(peer, op, args), name="head")
        rt = cls(loop, link)
        rt.process = proc
        rt.session_dir = session_dir
        if ray is None and logtail.enabled(log_to_driver):
            rt.logtail = logtail.LogTail(os.path.join(session_dir, "logs")).start()
        rt.resources = info["resources"]
        rt.metrics_port = info.get("metrics_port", 0)
        rt.dashboard_url = info.get("rest_url") or None
        rt.head_pid = info.get("pid", 0)
        rt.backend = info.get("backend", "local")
        rt.thread = threading.Thread(target=loop.run_forever, name="flotilla-loop", daemon=True)
        rt.thread.start()
        asyncio.run_coroutine_threadsafe(link.connect(), loop).result(10)
        if hasattr(os, "pidfd_open"):
            rt._keeper_fd = os.pidfd_open(proc.pid)
            loop.call_soon_threadsafe(loop.add_reader, rt._keeper_fd, rt._keeper_gone)
        cls._instance = rt
        atexit.register(_shutdown_at_exit)
        return rt

    @classmethod
    def attach_cluster(cls, info: dict[str, Any]) -> Runtime:
        """Attach this driver to a running cluster (`flotilla start`; `cluster.resolve`): connect
        to its head's socket and watch its keeper. The cluster outlives this driver."""
        loop = new_event_loop()
        link = HeadLink(info["sock"], lambda peer, op, args: rt._on_head_call(peer, op, args), name="head")
        rt = cls(loop, link)
        rt.attached = info
        rt.session_dir = info["session_dir"]
        rt.resources = info.get("resources", {})
        rt.metrics_port = info.get("metrics_port", 0)
        rt.dashboard_url = info.get("dashboard_url") or None
        rt.head_pid = info.get("pid", 0)
        rt.thread = threading.Thread(target=loop.run_forever, name="flotilla-loop", daemon=True)
        rt.thread.start()
        try:
            asyncio.run_coroutine_threadsafe(link.connect(), loop).result(10)
        except BaseException as e:
            rt._stop_loop()
            raise ConnectionError(
                f"could not connect to the flotilla cluster of namespace {info.get('namespace')!r} "
                f"({info['sock']}): {e}") from None
        if hasattr(os, "pidfd_open") and info.get("keeper_pid"):
            try:
                rt._keeper_fd = os.pidfd_open(int(info["keeper_pid"]))
            except OSError:
                rt._keeper_fd = None
            if rt._keeper_fd is not None:
                loop.call_soon_threadsafe(loop.add_reader, rt._keeper_fd, rt._keeper_gone)
        cls._instance = rt
        atexit.register(_shutdown_at_exit)
        return rt

    @classmethod
    def start_detached(cls, ray: dict[str, Any], metrics_port: int = 0) -> Runtime:
        """Join the Ray cluster, get or create the detached controller actor (`ray_controller`),
        and connect to its head over authenticated TCP."""
        from flotilla._private import auth, ray_controller

        try:
            actor, info = ray_controller.attach(ray, metrics_port)
        except BaseException:
            ray_controller.release()
            raise
        auth.set_cluster_secret(bytes.fromhex(info["secret"]))
        loop = new_event_loop()
        link = HeadLink(info["tcp_addr"], lambda peer, op, args: rt._on_head_call(peer, op, args), name="head")
        rt = cls(loop, link)
        rt.actor = actor
        rt.actor_desc = ray_controller.describe(ray_controller.namespace(ray))
        rt.session_dir = info.get("session_dir", "")
        rt.resources = info["resources"]
        rt.metrics_port = info.get("metrics_port", 0)
        rt.dashboard_url = info.get("rest_url") or None
        rt.head_pid = info.get("pid", 0)
        rt.backend = "ray"
        rt.thread = threading.Thread(target=loop.run_forever, name="flotilla-loop", daemon=True)
        rt.thread.start()
        try:
            asyncio.run_coroutine_threadsafe(link.connect(), loop).result(10)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            auth.set_cluster_secret(None)
            ray_controller.release()
            raise
        link.on_down = rt._watch_controller
        link.away = f"its connection dropped; {rt.actor_desc} is asked whether it lives"
        cls._instance = rt
        atexit.register(_shutdown_at_exit)
        return rt

    def _watch_controller(self) -> None:
        """The head link dropped (a Ray cluster): ask Ray, until it is back, whether the
        controller actor still lives; if not, the cluster is gone."""
        if self._watching or self.actor is None:
            return
        self._watching = True

        def watch() -> None:
            from flotilla._private import ray_controller

            try:
                while not self._closing and not self.dead and self.link.peer is None:
                    why = ray_controller.alive(self.actor, timeout=5.0)
                    if why:
                        self.loop.call_soon_threadsafe(self._controller_gone, why)
                        return
                    time.sleep(0.5)
            finally:
                self._watching = False

        threading.Thread(target=watch, name="flotilla-controller-watch", daemon=True).start()

    def _controller_gone(self, why: str) -> None:
        if self._closing or self.dead:
            return
        self.dead = (
            f"the flotilla cluster is gone: its controller, {self.actor_desc}, died or was stopped "
            f"(serve.shutdown() from a driver, or ray.kill), and its applications, replicas and proxies "
            f"with it. Ray says: {why}. Call flotilla.shutdown(), then flotilla.init() (or serve.run()) "
            "to start a new one."
        )
        self._fail_all()

    # ---- the head comes and goes; the keeper is the session ------------------------------------
    async def _resubscribe(self) -> None:
        """After reconnecting: learn the new head's pid, and every value we watch, again."""
        if self._report_wake is not None:
            self._report_wake.set()
        keys = {("deployment", d.app_name, d.name) for d in self.routers} | set(self.listeners)
        calls = [self.link.call("hello")] + [self.link.call("subscribe", k) for k in keys]
        results = await asyncio.gather(*calls, return_exceptions=True)
        if isinstance(results[0], dict):
            self.head_pid = results[0].get("pid", 0)
        for key, value in zip(keys, results[1:], strict=True):
            if isinstance(value, BaseException):
                logger.warning("could not resubscribe to %s: %r", key, value)
            else:
                self.on_update(key, value)

    def _keeper_gone(self) -> None:
        """The keeper exited: the session is over, with every process in it."""
        if self._keeper_fd is not None:
            self.loop.remove_reader(self._keeper_fd)
            os.close(self._keeper_fd)
            self._keeper_fd = None
        if self._closing:
            return
        pid = self.process.pid if self.process is not None else (self.attached or {}).get("keeper_pid", "?")
        self.dead = (
            f"the flotilla cluster is gone: its keeper process (pid {pid}) exited, and every "
            f"process of the session with it; see {session.logs_root()}. Call flotilla.init() "
            "(or serve.run()) after flotilla.shutdown() to start a new one."
        )
        self._fail_all()

    def _fail_all(self) -> None:
        logger.error("%s", self.dead)
        self.link.fail(self.dead)
        err = ClusterGoneError(self.dead)
        for r in self.routers.values():
            r.fail_all(err)

    # ---- control plane ----------------------------------------------------------------
    def _on_head_call(self, peer: RpcPeer, op: str, args: tuple[Any, ...]) -> Any:
        if op == "update":
            self.on_update(*args)
            return None
        raise ValueError(f"unknown op {op!r}")

    def on_update(self, key: Any, value: Any) -> None:
        if key[0] == "deployment":
            router = self.routers.get(DeploymentID(key[2], key[1]))
            if router is not None:
                router.update(value)
        for cb in self.listeners.get(key, ()):
            cb(value)

    def in_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def call_head(self, op: str, *args: Any, timeout: float | None = 60.0, wait_s: float | None = None) -> Any:
        """Call the head from a thread that is not the runtime's loop; blocks.

        While the head is away, waits for it up to `wait_s` (default `FLOTILLA_HEAD_WAIT_S`),
        then raises HeadUnavailableError; raises ClusterGoneError at once when the session is over.
        """
        if self.dead:
            raise ClusterGoneError(self.dead)
        if self.in_loop():
            return self._call_head_aside(op, args, timeout)
        wait = head_wait_s() if wait_s is None else wait_s
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(self.link.call(op, *args, wait_s=wait), self.loop)
        try:
            return fut.result(None if timeout is None else timeout + wait)
        except PeerClosedError:
            raise HeadUnavailableError(self.link.describe_away(wait)) from None

    def _start_pusher(self) -> None:
        """A driver's metrics (what its handles sent) to the head, as a replica's go."""
        from flotilla._private import metrics

        self._pusher = False
        if metrics.enabled():
            self._pusher = metrics.Pusher(metrics.STORE, self.link, self.router_gauges)
            self._pusher.start()

    def router_gauges(self) -> None:
        """Before a metrics push: every router's finished calls folded, and
        `ray_serve_num_ongoing_requests_at_replicas` (what each router, its followers on
        callers' loops included, has on replicas now) and `ray_serve_request_router_queue_len`
        (what waits in them for a replica)."""
        from flotilla._private import trace

        self.fold_calls()
        for dep, r in list(self.routers.items()):
            n = sum(c.in_flight for c in list(r.replicas.values()))
            n += sum(c.in_flight for f in list(r.followers) for c in list(f.replicas.values()))
            key = (dep.name, dep.app_name, trace.CALLER)
            trace.STORE.set("ray_serve_num_ongoing_requests_at_replicas", key, float(n))
            waiting = len(r.queue) + sum(len(f.queue) for f in list(r.followers))
            trace.STORE.set("ray_serve_request_router_queue_len", key, float(waiting))

    def _call_head_aside(self, op: str, args: tuple[Any, ...], timeout: float | None) -> Any:
        """`call_head` from the runtime's own loop (a replica's constructor or async method,
        where Ray Serve allows blocking serve calls too): over a connection of its own, made,
        used and closed by a helper thread while this loop waits for it."""
        path = self.link.path

        async def once() -> Any:
            peer = RpcPeer(None, name="head")
            try:
                await asyncio.wait_for(connect_addr(path, peer), HELLO_TIMEOUT_S)
            except OSError:  # TimeoutError too
                raise HeadUnavailableError(self.link.describe_away(0.0)) from None
            try:
                return await asyncio.wait_for(peer.call(op, *args), timeout)
            except PeerClosedError:
                raise HeadUnavailableError(self.link.describe_away(0.0)) from None
            finally:
                peer.close()

        with ThreadPoolExecutor(1, thread_name_prefix="flotilla-head-call") as pool:
            return pool.submit(asyncio.run, once()).result()

    async def subscribe(self, key: Any, cb: Any = None) -> Any:
        if cb is not None:
            self.listeners.setdefault(key, []).append(cb)
        value = await self.link.call("subscribe", key, wait_s=math.inf)
        if cb is not None:
            cb(value)
        return value

    def fold_calls(self) -> None:
        """Every router's finished calls into the metrics and trace ring now (a trace lookup)."""
        for r in list(self.routers.values()):
            r.fold_calls()

    def router(self, dep: DeploymentID) -> Router:
        """The router for `dep` (create on first use); call on the runtime's loop."""
        r = self.routers.get(dep)
        if r is None:
            if self._pusher is None:
                self._start_pusher()
            r = self.routers[dep] = Router(dep, self._on_router_wait, self.cold_start_timeout_s)
            if self._reporter is None:
                self._report_wake = asyncio.Event()
                self._reporter = self.loop.create_task(self._report_load())

            async def sub() -> None:
                try:
                    key = ("deployment", dep.app_name, dep.name)
                    r.update(await self.link.call("subscribe", key, wait_s=self.cold_start_timeout_s))
                except Exception as e:  # head away too long, or the cluster gone
                    r.fail_all(e)

            r.subscription = self.loop.create_task(sub())
        return r

    def _on_router_wait(self, cold: bool) -> None:
        if cold and self._report_wake is not None:
            self._report_wake.set()  # a deployment at zero replicas: tell the autoscaler now

    async def _report_load(self) -> None:
        """Tell the head how many requests wait in this process's routers (autoscaling)."""
        assert self._report_wake is not None
        last: dict[tuple[str, str, str], int] = {}
        while not self._closing and not self.dead:
            try:
                await asyncio.wait_for(self._report_wake.wait(), REPORT_PERIOD_S)
            except TimeoutError:
                pass
            self._report_wake.clear()
            if self.link.peer is None:
                last.clear()  # a new head knows nothing: tell it everything once it is back
                continue
            changed = {}
            for dep, r in self.routers.items():
                key = ("deployment", dep.app_name, dep.name)
                n = len(r.queue) + sum(len(f.queue) for f in r.followers)
                if last.get(key, 0) != n:
                    changed[key] = n
            if changed:
                last.update(changed)
                self.link.notify("router_load", changed)

    # ---- shutdown ---------------------------------------------------------------------
    def stop_controller(self, timeout: float = 60.0) -> None:
        """`serve.shutdown()` on a Ray cluster: end the head, kill the controller actor, and
        disconnect (everything it owned dies with it)."""
        from flotilla._private import ray_controller

        if self.actor is None:
            return
        with contextlib.suppress(Exception):
            if not self.dead:
                self.call_head("shutdown", timeout=timeout, wait_s=min(2.0, head_wait_s()))
        self._closing = True
        self.link.closed = True
        ray_controller.stop(self.actor, timeout)
        self.shutdown()

    def shutdown(self, timeout: float = 30.0) -> None:
        if self.actor is not None:  # a Ray cluster: disconnect; the controller actor stays
            self._close_detached()
            return
        if self.attached is not None:  # a running cluster (`flotilla start`): disconnect only
            self._closing = True
            self.link.closed = True
            self._stop_loop()
            self.attached = None
            return
        proc = self.process
        if proc is None:
            return
        if self.logtail is not None:
            self.logtail.stop()  # after what they printed last
        self._closing = True
        asked = False
        if not self.dead and proc.poll() is None:
            try:
                self.call_head("shutdown", timeout=timeout, wait_s=min(2.0, head_wait_s()))
                asked = True
            except Exception:
                pass
        self.link.closed = True  # the head goes now: do not reconnect
        try:
            if asked:  # the head drains, exits, and the keeper ends the session: let it finish
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout)
            if proc.stdin:
                proc.stdin.close()  # else (or if that took too long) the session ends at once
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        finally:
            if proc.stdout:
                proc.stdout.close()
        session.finish(self.session_dir)  # the keeper has exited: keep the logs, drop the folder
        if self.backend == "ray":
            from flotilla._private import auth

            auth.set_cluster_secret(None)

        self._stop_loop()
        self.process = None

    def _close_detached(self) -> None:
        from flotilla._private import auth

        self._closing = True
        self.link.closed = True
        self._stop_loop()
        auth.set_cluster_secret(None)
        self.actor = None

    def _stop_loop(self) -> None:
        async def close() -> None:
            if self._keeper_fd is not None:
                self.loop.remove_reader(self._keeper_fd)
                os.close(self._keeper_fd)
                self._keeper_fd = None
            if self._reporter is not None:
                self._reporter.cancel()
                await asyncio.gather(self._reporter, return_exceptions=True)
            if self._pusher:
                self._pusher.stop()  # a last push of what changed
            for r in self.routers.values():
                r.close()
            self.loop_routers.close()
            self.link.close()
            await asyncio.sleep(0)
            self.loop.stop()

        if self.loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(close(), self.loop)
        if self.thread is not None:
            self.thread.join(5)
        if not self.loop.is_running():
            self.loop.close()
        self.lane_ok = False
        if self.lane is not None:  # after `loop_routers.close()` told its followers to close
            self.lane.close()


#: Runtimes a forked child inherited, kept for good: nothing of theirs is ever finalized.
_INHERITED: list[Runtime] = []


def _after_fork_in_child() -> None:
    """In a process forked from a driver, replica or proxy, whose runtime has no threads
    here: drop the child's references to its connections and to the keeper's pipe (else the
    parent's cluster would outlive the parent while the child lives, and replicas would wait
    on a connection nobody serves), forget it, and let the child's first handle call join the
    parent's cluster as a driver of its own (`get_or_start`). Each descriptor is pointed at
    /dev/null rather than closed, so whatever of the old runtime closes it later closes
    nothing of the child's."""
    Runtime._lock = threading.Lock()
    rt = Runtime._instance
    if rt is None:
        return
    Runtime._instance = None
    _INHERITED.append(rt)
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_RDWR)
        try:
            for fd in rt._inherited_fds():
                with contextlib.suppress(OSError):
                    os.dup2(null, fd)
        finally:
            os.close(null)
    Runtime._forked_from = rt._fork_record()
    from flotilla._private.metrics import STORE

    for series in STORE.values.values():  # the parent's figures are the parent's to report
        series.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _shutdown_at_exit() -> None:
    rt = Runtime._instance
    if rt is not None and (rt.process is not None or rt.actor is not None or rt.attached is not None):
        Runtime._instance = None
        rt.shutdown(timeout=15)
