"""The per-process runtime: the control connection to the head, and routers for handles.

In the driver it owns a daemon thread running an event loop; in replica and proxy
processes it rides on their own loop. `Runtime.current()` is the process-wide instance.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import select
import subprocess
import sys
import threading
from concurrent.futures import Future
from typing import Any, ClassVar

from flotilla._private import session
from flotilla._private.router import Router
from flotilla._private.transport import PeerClosedError, RpcPeer, connect_unix
from flotilla.serve.schema import DeploymentID

logger = logging.getLogger("flotilla")

HEAD_START_TIMEOUT_S = 30.0
REPORT_PERIOD_S = 0.2


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()


class Runtime:
    _instance: ClassVar[Runtime | None] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop, head: RpcPeer) -> None:
        self.loop = loop
        self.head = head
        self.routers: dict[DeploymentID, Router] = {}
        self.listeners: dict[Any, list[Any]] = {}
        self.thread: threading.Thread | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.session_dir = ""
        self.resources: dict[str, float] = {}
        self.metrics_port = 0
        self.cold_start_timeout_s = float(os.environ.get("FLOTILLA_COLD_START_TIMEOUT_S", "60"))
        self._report_wake: asyncio.Event | None = None
        self._reporter: asyncio.Task[None] | None = None

    # ---- construction -----------------------------------------------------------------
    @classmethod
    def current(cls) -> Runtime:
        rt = cls._instance
        if rt is None:
            raise RuntimeError("flotilla is not initialized: call flotilla.init() or serve.run() first")
        return rt

    @classmethod
    def get_or_start(cls) -> Runtime:
        rt = cls._instance
        if rt is not None:
            return rt
        from flotilla import init

        init()
        return cls.current()

    @classmethod
    def attach(cls, loop: asyncio.AbstractEventLoop, head: RpcPeer) -> Runtime:
        """Use in replica/proxy processes: share their loop and control connection."""
        rt = cls(loop, head)
        cls._instance = rt
        return rt

    @classmethod
    def start_local(cls, resources: dict[str, float], metrics_port: int = 0) -> Runtime:
        """Start a head process for this driver and connect to it."""
        session_dir = session.create()
        cfg = {"session_dir": session_dir, "resources": resources, "metrics_port": metrics_port}
        log = open(os.path.join(session_dir, "logs", "head.log"), "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "flotilla._private.headboot", json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
        log.close()
        session.record_head(session_dir, proc.pid)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], HEAD_START_TIMEOUT_S)
        line = proc.stdout.readline() if ready else b""
        if not line:
            proc.kill()
            raise RuntimeError(
                f"the flotilla head process did not start; see {session_dir}/logs/head.log"
            )
        info = json.loads(line)
        loop = new_event_loop()
        head = RpcPeer(None, name="head")
        rt = cls(loop, head)
        head._handler = rt._on_head_call
        rt.process = proc
        rt.session_dir = session_dir
        rt.resources = info["resources"]
        rt.metrics_port = info.get("metrics_port", 0)
        rt.thread = threading.Thread(target=loop.run_forever, name="flotilla-loop", daemon=True)
        rt.thread.start()
        asyncio.run_coroutine_threadsafe(connect_unix(info["sock"], head), loop).result(10)
        cls._instance = rt
        atexit.register(_shutdown_at_exit)
        return rt

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

    def call_head(self, op: str, *args: Any, timeout: float | None = 60.0) -> Any:
        """Call the head from a thread that is not the runtime's loop; blocks."""
        if self.in_loop():
            raise RuntimeError(
                "this serve API call blocks; it cannot run on the event loop of a replica. "
                "Call it from a thread (e.g. a sync method) instead."
            )

        async def go() -> Any:
            return await self.head.call(op, *args)

        fut: Future[Any] = asyncio.run_coroutine_threadsafe(go(), self.loop)
        try:
            return fut.result(timeout)
        except PeerClosedError:
            raise RuntimeError("the flotilla head process is gone") from None

    async def subscribe(self, key: Any, cb: Any = None) -> Any:
        if cb is not None:
            self.listeners.setdefault(key, []).append(cb)
        value = await self.head.call("subscribe", key)
        if cb is not None:
            cb(value)
        return value

    def router(self, dep: DeploymentID) -> Router:
        """The router for `dep` (create on first use); call on the runtime's loop."""
        r = self.routers.get(dep)
        if r is None:
            r = self.routers[dep] = Router(dep, self._on_router_wait, self.cold_start_timeout_s)
            if self._reporter is None:
                self._report_wake = asyncio.Event()
                self._reporter = self.loop.create_task(self._report_load())

            async def sub() -> None:
                try:
                    r.update(await self.head.call("subscribe", ("deployment", dep.app_name, dep.name)))
                except Exception as e:  # head gone
                    r._fail_queue(e)

            r.subscription = self.loop.create_task(sub())
        return r

    def _on_router_wait(self, cold: bool) -> None:
        if cold and self._report_wake is not None:
            self._report_wake.set()  # a deployment at zero replicas: tell the autoscaler now

    async def _report_load(self) -> None:
        """Tell the head how many requests wait in this process's routers (autoscaling)."""
        assert self._report_wake is not None
        last: dict[tuple[str, str, str], int] = {}
        while not self.head.closed:
            try:
                await asyncio.wait_for(self._report_wake.wait(), REPORT_PERIOD_S)
            except TimeoutError:
                pass
            self._report_wake.clear()
            changed = {}
            for dep, r in self.routers.items():
                key = ("deployment", dep.app_name, dep.name)
                n = len(r.queue)
                if last.get(key, 0) != n:
                    changed[key] = n
            if changed:
                last.update(changed)
                self.head.notify("router_load", changed)

    # ---- shutdown ---------------------------------------------------------------------
    def shutdown(self, timeout: float = 30.0) -> None:
        proc = self.process
        if proc is None:
            return
        try:
            self.call_head("shutdown", timeout=timeout)
        except Exception:
            pass
        try:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        finally:
            if proc.stdout:
                proc.stdout.close()
        session.finish(self.session_dir)  # the head has exited: keep its logs, drop the folder

        async def close() -> None:
            if self._reporter is not None:
                self._reporter.cancel()
                await asyncio.gather(self._reporter, return_exceptions=True)
            for r in self.routers.values():
                r.close()
            self.head.close()
            await asyncio.sleep(0)
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(close(), self.loop)
        if self.thread is not None:
            self.thread.join(5)
        if not self.loop.is_running():
            self.loop.close()
        self.process = None


def _shutdown_at_exit() -> None:
    rt = Runtime._instance
    if rt is not None and rt.process is not None:
        Runtime._instance = None
        rt.shutdown(timeout=15)
