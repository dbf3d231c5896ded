"""The head process: controller, proxy manager and the control socket.

Started by `flotilla.init()` as `python -m flotilla._private.headboot CONFIG_JSON`. It prints
one JSON line ({"sock": ..., "resources": ...}) when ready. It shuts everything down on the
`shutdown` call or SIGTERM (draining replicas, as `serve.shutdown` does), or at once when its
stdin closes (the driver exited); after a clean exit the session folder is removed and its
logs kept (`session.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any

from flotilla._private import logrotate, session
from flotilla._private.supervisor import Process, ZygoteSupervisor
from flotilla._private.transport import RpcPeer, serve_unix
from flotilla.serve.schema import ProxyStatus

logger = logging.getLogger("flotilla.head")

PROXY_START_TIMEOUT_S = 30.0
PROXY_STOP_TIMEOUT_S = 3.0
#: How long a graceful shutdown (SIGTERM, `shutdown`) may drain replicas before killing them.
SHUTDOWN_DRAIN_TIMEOUT_S = 30.0


class ProxyManager:
    """Starts the HTTP proxy process, and restarts it if it dies."""

    def __init__(self, head: Head) -> None:
        self.head = head
        self.status: ProxyStatus | None = None
        self.options: dict[str, Any] | None = None
        self.proc: Process | None = None
        self.peer: RpcPeer | None = None
        self.url = ""
        self._ready: asyncio.Future[str] | None = None
        self.stopping = False
        self.shared: Any = None  # listener.SharedListener for direct ingress

    async def start(self, options: dict[str, Any]) -> str:
        if self.options is not None and self.status in (ProxyStatus.HEALTHY, ProxyStatus.STARTING):
            if options != self.options:
                logger.warning("HTTP proxy already running with %s; ignoring new options %s", self.options, options)
            if self._ready is not None:
                return await asyncio.shield(self._ready)
            return self.url
        self.options = options
        if options.get("direct_ingress"):
            from flotilla._private import listener

            host = options.get("host", "127.0.0.1")
            try:
                sock = listener.bind_tcp(host, int(options.get("port", 8000)))
            except OSError as e:
                self.options = None
                raise RuntimeError(
                    f"direct ingress could not listen on {host}:{options.get('port', 8000)}: {e.strerror}. "
                    "Pass another port, e.g. serve.start(http_options={'port': 8001, 'direct_ingress': True})."
                ) from None
            self.shared = listener.SharedListener(sock, os.path.join(self.head.session_dir, "http.fd.sock"))
            await self.shared.start()
            self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.shared.port}"
            self.status = ProxyStatus.HEALTHY
            self._ready = None
            logger.info("direct ingress: replicas will accept on %s themselves", self.url)
            return self.url
        return await self._launch()

    @property
    def direct(self) -> dict[str, Any] | None:
        """Options for direct-ingress replicas (with the shared socket's `fd_sock`), or None."""
        if not (self.options and self.options.get("direct_ingress")) or self.shared is None:
            return None
        return {**self.options, "fd_sock": self.shared.path}

    async def _launch(self) -> str:
        assert self.options is not None
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self.status = ProxyStatus.STARTING
        log = os.path.join(self.head.session_dir, "logs", "proxy.log")
        args = dict(self.options, head_sock=self.head.sock, session_dir=self.head.session_dir)
        self.proc = await self.head.supervisor.start("proxy", log, args, self.on_exit)
        try:
            return await asyncio.wait_for(asyncio.shield(self._ready), PROXY_START_TIMEOUT_S)
        except TimeoutError:
            self.status = ProxyStatus.UNHEALTHY
            raise RuntimeError(f"the HTTP proxy did not start within {PROXY_START_TIMEOUT_S}s; see {log}") from None

    def ready(self, peer: RpcPeer, url: str) -> None:
        self.peer = peer
        self.url = url
        self.status = ProxyStatus.HEALTHY
        logger.info("HTTP proxy ready at %s (pid %s)", url, self.proc.pid if self.proc else None)
        peer.on_close(self._gone)
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(url)

    def failed(self, message: str) -> None:
        self.status = ProxyStatus.UNHEALTHY
        self.options = None
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(RuntimeError(message))

    def on_exit(self, proc: Process) -> None:
        if proc is self.proc:
            self._gone()

    def _gone(self) -> None:
        if self.stopping or self.status is not ProxyStatus.HEALTHY:
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(RuntimeError("the HTTP proxy exited during start-up; see logs/proxy.log"))
            return
        logger.warning("HTTP proxy (%r) died; restarting it", self.proc)
        self.status = ProxyStatus.STARTING
        self.peer = None
        self._relaunch_task = asyncio.get_running_loop().create_task(self._relaunch())

    async def _relaunch(self) -> None:
        try:
            await self._launch()
        except Exception:
            logger.exception("could not restart the HTTP proxy")

    async def stop(self) -> None:
        self.stopping = True
        proc, self.proc = self.proc, None
        if proc is not None:
            await self.head.supervisor.stop(proc, PROXY_STOP_TIMEOUT_S)
        if self.shared is not None:
            self.shared.close()
            self.shared = None
        self.options = None
        self.status = None
        self.stopping = False


class Head:
    def __init__(self, cfg: dict[str, Any], zygote: Any = None) -> None:
        self._zygote = zygote
        self.cfg = cfg
        self.metrics_port = 0
        self.session_dir: str = cfg["session_dir"]
        self.sock = os.path.join(self.session_dir, "head.sock")
        self.resources: dict[str, float] = cfg["resources"]
        self.supervisor = ZygoteSupervisor()
        self.proxy = ProxyManager(self)
        self.controller: Any = None
        self.done = asyncio.Event()
        self._load_peers: set[int] = set()
        self._shutdown_task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # Start the zygote first: it preloads the framework while this process imports the
        # controller (pydantic and friends).
        await self.supervisor.adopt(self._zygote)
        from flotilla._private.controller import Controller
        from flotilla._private.resources import ResourcePool

        self.controller = Controller(self.session_dir, self.sock, ResourcePool(self.resources), self.supervisor)
        self.controller.proxy = self.proxy
        server = await serve_unix(self.sock, lambda: RpcPeer(self.handle, name="client"))
        os.chmod(self.sock, 0o600)
        controller_task = loop.create_task(self.controller.run())
        from flotilla._private.metrics import serve_metrics

        try:
            metrics_server, self.metrics_port = await serve_metrics(
                "127.0.0.1", int(self.cfg.get("metrics_port") or 0), self.gather_metrics
            )
        except OSError as e:
            logger.warning("metrics endpoint: port %s unavailable (%s); using a free port", self.cfg.get("metrics_port"), e)
            metrics_server, self.metrics_port = await serve_metrics("127.0.0.1", 0, self.gather_metrics)
        loop.add_reader(0, self._stdin_readable)
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        sys.stdout.write(json.dumps({"sock": self.sock, "resources": self.resources, "metrics_port": self.metrics_port}) + "\n")
        sys.stdout.flush()
        await self.done.wait()
        controller_task.cancel()
        loop.remove_reader(0)
        loop.remove_signal_handler(signal.SIGTERM)
        await self.controller.kill_all()
        await self.proxy.stop()
        await self.supervisor.close()
        server.close()
        metrics_server.close()

    async def gather_metrics(self) -> bytes:
        """Prometheus text for every process: head, proxy and each running replica."""
        from flotilla._private.metrics import render
        c = self.controller
        calls = []
        if self.proxy.peer is not None and not self.proxy.peer.closed:
            calls.append(self.proxy.peer.call("metrics"))
        for r in list(c.replicas.values()):
            if r.peer is not None and r.state.routable:
                calls.append(r.peer.call("metrics"))
        results = await asyncio.gather(*(asyncio.wait_for(x, 5) for x in calls), return_exceptions=True)
        snaps = [c.metrics_snapshot()] + [x for x in results if isinstance(x, dict)]
        return render(snaps)

    def _stdin_readable(self) -> None:
        try:
            data = os.read(0, 4096)
        except OSError:
            data = b""
        if not data:
            logger.info("driver is gone; shutting down")
            self._start_shutdown(graceful=False)

    def _on_sigterm(self) -> None:
        logger.info("SIGTERM: draining every replica, then exiting")
        self._start_shutdown(graceful=True)

    def _start_shutdown(self, graceful: bool) -> None:
        if self._shutdown_task is None or (not graceful and not self.done.is_set()):
            self._shutdown_task = asyncio.get_running_loop().create_task(self._shutdown(graceful))

    async def _shutdown(self, graceful: bool = True) -> None:
        if graceful:
            await self.proxy.stop()
            await self.controller.shutdown(SHUTDOWN_DRAIN_TIMEOUT_S)
        self.done.set()

    async def handle(self, peer: RpcPeer, op: str, args: tuple[Any, ...]) -> Any:
        c = self.controller
        if op == "subscribe":
            return c.subscribe(peer, args[0])
        if op == "router_load":
            if id(peer) not in self._load_peers:
                self._load_peers.add(id(peer))

                def forget() -> None:
                    c.autoscaler.forget_peer(id(peer))
                    self._load_peers.discard(id(peer))

                peer.on_close(forget)
            return c.autoscaler.report_router_load(id(peer), args[0])
        if op == "replica_register":
            return c.register(peer, *args)
        if op == "replica_ready":
            return c.replica_ready(*args)
        if op == "replica_models":
            return c.replica_models(*args)
        if op == "replica_failed":
            return c.replica_failed(*args)
        if op == "deploy_app":
            return c.deploy_app(*args)
        if op == "wait_app":
            return await c.wait_app(*args)
        if op == "delete_app":
            return c.delete_app(*args)
        if op == "wait_deleted":
            return await c.wait_deleted(*args)
        if op == "status":
            return c.status()
        if op == "available_resources":
            return c.pool.available()
        if op == "app_info":
            app = c.apps.get(args[0])
            if app is None or app.deleting:
                return None
            return {"ingress": app.ingress, "route_prefix": app.route_prefix}
        if op == "start_http":
            return await self.proxy.start(args[0])
        if op == "http_url":
            return self.proxy.url if self.proxy.status is ProxyStatus.HEALTHY else None
        if op == "proxy_ready":
            return self.proxy.ready(peer, *args)
        if op == "proxy_failed":
            return self.proxy.failed(*args)
        if op == "serve_shutdown":
            await self.proxy.stop()
            await c.shutdown()
            return None
        if op == "shutdown":
            self._start_shutdown(graceful=True)
            return None
        raise ValueError(f"unknown op {op!r}")


def main(zygote: Any = None) -> None:
    """Run the head until shutdown; `zygote`: the fork server `headboot` started (or None)."""
    cfg = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logrotate.rotate_own_log((2,))  # stderr is logs/head.log (stdout is the pipe to the driver)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import uvloop

        uvloop.run(Head(cfg, zygote).run())
    except ImportError:  # pragma: no cover
        asyncio.run(Head(cfg, zygote).run())
    logger.info("head exiting; session folder %s removed, logs kept under %s", cfg["session_dir"], session.logs_root())
    session.finish(cfg["session_dir"])


if __name__ == "__main__":
    main()
