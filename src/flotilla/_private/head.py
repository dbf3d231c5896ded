"""The head process: controller, proxy manager and the control socket.

Started by the session's keeper as `python -m flotilla._private.headboot CONFIG_JSON`. It
prints one JSON line ({"sock": ..., "resources": ..., "pid": ...}) when ready. It shuts
everything down on the `shutdown` call or SIGTERM (draining replicas, as `serve.shutdown`
does), or at once when its stdin closes (the driver exited), and then exits with code 0: the
keeper ends the session. Any other exit is a crash: the keeper starts a new head, which loads
the checkpoint (`checkpoint.py`), re-adopts the live replicas and the proxy, takes the HTTP
port back from the keeper, binds the same `head.sock` and metrics port, and reconciles.

On a Ray cluster the head runs instead on a thread of the detached controller actor
(`ray_controller.py`, `in_actor`): no keeper, stdin or signal handlers; the ready line's
content goes to `on_ready`, and the actor's `serve.shutdown` (the `shutdown` call) ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from flotilla._private import checkpoint, frontdoor, logrotate, session
from flotilla._private.keeper import Backoff, KeeperLink
from flotilla._private.supervisor import Process, ZygoteSupervisor
from flotilla._private.transport import RpcPeer, serve_unix
from flotilla.serve.schema import ProxyStatus

logger = logging.getLogger("flotilla.head")

PROXY_START_TIMEOUT_S = 30.0
PROXY_STOP_TIMEOUT_S = 3.0
#: Control operations whose effect is checkpointed before they are answered.
_DURABLE = frozenset({"deploy_app", "delete_app", "set_traffic", "start_canary", "delete_traffic", "set_shadow", "delete_shadow", "start_http", "serve_shutdown", "replica_register",
                      "replica_reattach", "proxy_reattach", "proxy_ready"})
#: The first restart of a dead proxy waits this long; repeated crashes back off to 5 s.
PROXY_FIRST_RESTART_S = 0.05
#: How long a graceful shutdown (SIGTERM, `shutdown`) may drain replicas before killing them.
SHUTDOWN_DRAIN_TIMEOUT_S = 30.0


def _disabled(options: dict[str, Any]) -> bool:
    return options.get("location") in ("Disabled", "NoServer")


def _last_line(path: str) -> str:
    """The last non-empty line of a log file (the cause of a crash, usually)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


#: The default number of proxy processes is half the cores, at most this many.
MAX_DEFAULT_PROXIES = 8


def default_num_proxies(cores: int) -> int:
    """Proxy processes sharing the HTTP port by default: one up to 3 cores, then one per two
    cores (a proxy spends about as much CPU per request as the replica it forwards to)."""
    return max(1, min(MAX_DEFAULT_PROXIES, cores // 2))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class ExtraProxy:
    """One more proxy process on the HTTP port (`num_proxies` > 1), started after the first one
    is serving: it accepts on the same listening socket (the kernel spreads the connections) and
    is restarted with backoff when it dies, like the first one."""

    def __init__(self, manager: ProxyManager, index: int) -> None:
        self.m = manager
        self.index = index
        self.proc: Process | None = None
        self.peer: RpcPeer | None = None
        self.status = ProxyStatus.STARTING
        self.backoff = Backoff(first=PROXY_FIRST_RESTART_S)
        self.message = ""
        self.stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def log(self) -> str:
        return self.m.log_path(f"proxy-{self.index}.log")

    def launch_soon(self, delay: float = 0.0) -> None:
        self._task = asyncio.get_running_loop().create_task(self._launch(delay))

    async def _launch(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        if self.stopping or self.m.options is None:
            return
        self.status = ProxyStatus.STARTING
        try:
            self.proc = await self.m.head.supervisor.start("proxy", self.log, self.m.proxy_args(), self.on_exit)
        except Exception as e:
            self.status = ProxyStatus.UNHEALTHY
            self.message = f"could not start HTTP proxy {self.index}: {e}"
            logger.error("%s", self.message)
            self.launch_soon(self.backoff.failed())
            return
        self.backoff.started()
        self.m.head.checkpoint_soon()

    def adopt(self, pid: int, ticks: Any) -> bool:
        """A restarted head: take over the previous head's process; False if it is gone."""
        self.proc = self.m.head.supervisor.adopt(pid, "proxy", ticks, self.on_exit)
        return self.proc is not None

    def ready(self, peer: RpcPeer) -> None:
        self.peer = peer
        if self.status is not ProxyStatus.HEALTHY:
            logger.info("HTTP proxy %d ready (pid %s)", self.index, self.proc.pid if self.proc else None)
        self.status = ProxyStatus.HEALTHY
        self.message = ""
        peer.on_close(lambda: self._peer_closed(peer))
        self.m.head.checkpoint_soon()

    def on_exit(self, proc: Process) -> None:
        if proc is not self.proc:
            return
        self.proc = None
        self.peer = None
        if self.stopping or self.m.options is None:
            return
        self.status = ProxyStatus.STARTING
        delay = self.backoff.failed()
        cause = proc.ending
        if cause != self.message:
            logger.warning("HTTP proxy %d (pid %d) is gone: %s; restarting it in %.2fs", self.index, proc.pid, cause, delay)
        self.message = cause
        self.launch_soon(delay)

    def _peer_closed(self, peer: RpcPeer) -> None:
        if peer is not self.peer:
            return
        self.peer = None
        if self.proc is not None and not self.stopping:
            self.m.head.supervisor.kill(self.proc)  # a proxy without its head link: replace it

    def expire_adopted(self) -> None:
        if self.proc is not None and self.peer is None and self.status is ProxyStatus.STARTING:
            logger.warning("HTTP proxy %d (pid %d) did not reconnect to the restarted head; replacing it",
                           self.index, self.proc.pid)
            self.m.head.supervisor.kill(self.proc)

    async def stop(self) -> None:
        self.stopping = True
        if self._task is not None:
            self._task.cancel()
        proc, self.proc = self.proc, None
        if proc is not None:
            await self.m.head.supervisor.stop(proc, PROXY_STOP_TIMEOUT_S)


class ProxyManager:
    """Holds the HTTP port, runs the proxy process on it, and restarts the proxy if it dies.

    The head binds the listening socket itself and hands it to the keeper, so the port outlives
    the proxy process and the head: connections made while the proxy is being restarted wait in
    the socket's backlog instead of being refused. The proxy (like direct-ingress replicas)
    fetches a duplicate of it over a Unix socket in the session folder (`listener.py`).

    On the Ray backend with location "EveryNode" (the default) `fleet` runs a proxy actor on
    every other node (`ray_proxies.ProxyFleet`), on the same port: the head's socket then has
    SO_REUSEPORT too, and `statuses()` is keyed by Ray node id.
    """

    def __init__(self, head: Head) -> None:
        self.head = head
        self.status: ProxyStatus | None = None
        self.options: dict[str, Any] | None = None
        self.proc: Process | None = None
        self.peer: RpcPeer | None = None
        self.url = ""
        self._ready: asyncio.Future[str] | None = None
        self.stopping = False
        self.shared: Any = None  # listener.SharedListener: the HTTP port, proxy or direct ingress
        self.backoff = Backoff(first=PROXY_FIRST_RESTART_S)
        self.restarts = 0
        self.message = ""  # why the last start failed ("" after a success)
        self._restarting_since: float | None = None
        self._relaunch_task: asyncio.Task[None] | None = None
        self._first_start = False  # serve.start is waiting: a crash now is its error, not retried
        self.fleet: Any = None  # ray_proxies.ProxyFleet: the other nodes' proxies (Ray backend)
        self._fleet_stop: asyncio.Task[None] | None = None
        self.extras: list[ExtraProxy] = []  # proxies 1.. on the same port (`num_proxies`)

    async def start(self, options: dict[str, Any]) -> str:
        """Start the proxy (or direct ingress) with `options`; returns its URL, "" if disabled."""
        if self.options is not None and _disabled(self.options):
            return ""  # until serve.shutdown(): serve.run's implicit start() changes nothing
        if _disabled(options):
            self.options = options
            logger.info("HTTP proxy disabled (location=%s): applications answer handles only", options.get("location"))
            return ""
        if self.options is not None and self.status in (ProxyStatus.HEALTHY, ProxyStatus.STARTING):
            if options != self.options:
                logger.warning("HTTP proxy already running with %s; ignoring new options %s",
                               frontdoor.redact(self.options), frontdoor.redact(options))
            if self._ready is not None:
                return await asyncio.shield(self._ready)
            return self.url
        direct = bool(options.get("direct_ingress"))
        if direct and self.head.backend == "ray":
            raise RuntimeError(
                "direct ingress is not available on the Ray backend yet: replicas run on Ray's "
                "nodes and cannot share this machine's listening socket; use the proxy"
            )
        frontdoor.ssl_context(options)  # a bad TLS file fails serve.start here, naming it
        self.options = options
        host, port = options.get("host", "127.0.0.1"), int(options.get("port", 8000))
        from flotilla._private import listener

        try:
            sock = listener.bind_tcp(host, port, reuse_port=self.head.backend == "ray", claim=True)
        except OSError as e:
            self.options = None
            extra = ", 'direct_ingress': True" if direct else ""
            raise RuntimeError(
                f"{'direct ingress' if direct else 'the HTTP proxy'} could not listen on {host}:{port}: "
                f"{e.strerror}. Pass another port, e.g. serve.start(http_options={{'port': {port + 1}{extra}}})."
            ) from None
        await self._hold(sock)
        self.url = f"{frontdoor.scheme(options)}://{f'[{host}]' if ':' in host else host}:{self.shared.port}"
        self.head.checkpoint_soon()
        if direct:
            self.status = ProxyStatus.HEALTHY
            self._ready = None
            logger.info("direct ingress: replicas will accept on %s themselves", self.url)
            return self.url
        self._first_start = True
        self._start_fleet()
        url = await self._launch()
        self._start_extras()
        return url

    def wanted(self) -> int:
        """How many proxy processes share the port: `num_proxies`, else half the cores this
        process may use (and at most the cluster's CPUs), at most MAX_DEFAULT_PROXIES."""
        if self.options is None or self.options.get("direct_ingress") or self.head.backend != "local":
            return 1  # the Ray backend has one per node (the fleet); direct ingress none
        n = self.options.get("num_proxies")
        if n:
            return int(n)
        cores = _cores()
        cpus = self.head.resources.get("CPU")
        return default_num_proxies(min(cores, int(cpus)) if cpus else cores)

    def _start_extras(self) -> None:
        for i in range(len(self.extras) + 1, self.wanted()):
            x = ExtraProxy(self, i)
            self.extras.append(x)
            x.launch_soon()

    def _extra(self, pid: int | None) -> ExtraProxy | None:
        if pid is None:
            return None
        for x in self.extras:
            if x.proc is not None and x.proc.pid == pid:
                return x
        return None

    def peers(self) -> dict[str, RpcPeer]:
        """The live proxies' head connections, by name ("proxy", "proxy-1", ...)."""
        out = {"proxy": self.peer} if self.peer is not None else {}
        out.update({f"proxy-{x.index}": x.peer for x in self.extras if x.peer is not None})
        return out

    def log_path(self, name: str) -> str:
        assert self.options is not None
        folder = (self.options.get("logging_config") or {}).get("logs_dir")
        log = os.path.join(folder or os.path.join(self.head.session_dir, "logs"), name)
        os.makedirs(os.path.dirname(log), exist_ok=True)
        return log

    def proxy_args(self) -> dict[str, Any]:
        assert self.options is not None and self.shared is not None
        args = dict(self.options, head_sock=self.head.sock, session_dir=self.head.session_dir,
                    fd_sock=self.shared.path, url=self.url)
        if self.head.secret is not None:  # the Ray backend: replicas are reached over TCP
            args["secret"] = self.head.secret.hex()  # on the zygote's stdin pipe, nowhere else
            args["node_id"] = self.head.node_id
        return args

    def _start_fleet(self) -> None:
        """Ray backend, location "EveryNode": a proxy actor on each of the other nodes."""
        if self.head.backend != "ray" or self.options is None or self.options.get("location") != "EveryNode":
            return
        from flotilla._private.ray_proxies import ProxyFleet

        assert self.head.secret is not None and self.shared is not None
        tag = os.path.basename(self.head.session_dir.rstrip("/"))
        self.fleet = ProxyFleet(self.head.node_id, self.head.tcp_addr, self.head.secret, tag,
                                dict(self.options, port=self.shared.port, url=self.url))
        self.fleet.start()

    async def _stop_fleet(self) -> None:
        fleet, self.fleet = self.fleet, None
        if fleet is not None:
            await fleet.stop()

    def statuses(self) -> dict[str, ProxyStatus]:
        """`serve.status().proxies`: "head" (the local backend) or node id -> status. With
        several proxy processes on the port, "head" is HEALTHY once all of them are."""
        status = self.status
        if status is ProxyStatus.HEALTHY:
            for x in self.extras:
                if x.status is not ProxyStatus.HEALTHY:
                    status = x.status
                    break
        out = {} if status is None else {self.head.node_id or "head": status}
        if self.fleet is not None:
            out.update(self.fleet.statuses())
        return out

    def node_ready(self, peer: RpcPeer, *args: Any) -> None:
        if self.fleet is None:
            raise RuntimeError("no HTTP proxies run on other nodes")
        self.fleet.ready(peer, *args)

    async def _hold(self, sock: Any) -> None:
        from flotilla._private import listener

        self.shared = listener.SharedListener(sock, os.path.join(self.head.session_dir, "http.fd.sock"))
        await self.shared.start()
        self.head.keeper.hold("http", sock)

    @property
    def direct(self) -> dict[str, Any] | None:
        """Options for direct-ingress replicas (with the shared socket's `fd_sock`), or None."""
        if not (self.options and self.options.get("direct_ingress")) or self.shared is None:
            return None
        return {**self.options, "fd_sock": self.shared.path}

    def checkpoint(self) -> dict[str, Any] | None:
        if self.options is None:
            return None
        proc = self.proc
        return {"options": self.options, "url": self.url,
                "pid": proc.pid if proc is not None else None, "ticks": proc.ticks if proc is not None else None,
                "extras": [[x.proc.pid, x.proc.ticks] if x.proc is not None else None for x in self.extras]}

    async def _launch(self) -> str:
        assert self.options is not None and self.shared is not None
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self.status = ProxyStatus.STARTING
        log = self.log_path("proxy.log")
        self.proc = await self.head.supervisor.start("proxy", log, self.proxy_args(), self.on_exit)
        self.backoff.started()
        self.head.checkpoint_soon()
        try:
            return await asyncio.wait_for(asyncio.shield(self._ready), PROXY_START_TIMEOUT_S)
        except TimeoutError:
            self.status = ProxyStatus.UNHEALTHY
            if self.proc is not None:
                self.head.supervisor.kill(self.proc)  # its exit starts another attempt
            raise RuntimeError(f"the HTTP proxy did not start within {PROXY_START_TIMEOUT_S}s; see {log}") from None

    def ready(self, peer: RpcPeer, url: str, pid: int | None = None, reattached: bool = False) -> None:
        x = self._extra(pid)
        if x is not None:
            x.ready(peer)
            return
        self._first_start = False
        self.peer = peer
        self.url = url
        self.status = ProxyStatus.HEALTHY
        self.message = ""
        pid = self.proc.pid if self.proc else None
        if self._restarting_since is not None:
            logger.info("HTTP proxy restarted (pid %s) in %.0f ms, serving %s", pid,
                        (time.monotonic() - self._restarting_since) * 1000, url)
            self._restarting_since = None
        elif not reattached:
            logger.info("HTTP proxy ready at %s (pid %s)", url, pid)
        peer.on_close(lambda: self._peer_closed(peer))
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(url)
        self.head.checkpoint_soon()

    def reattach(self, peer: RpcPeer, pid: int, url: str) -> None:
        """The proxy of the previous head reconnected to this (restarted) head."""
        x = self._extra(pid)
        if x is not None:
            logger.info("HTTP proxy %d (pid %d) reconnected", x.index, pid)
            x.ready(peer)
            return
        if self.proc is None or self.proc.pid != pid:
            raise RuntimeError(f"process {pid} is not this head's HTTP proxy")
        logger.info("HTTP proxy (pid %d) reconnected", pid)
        self.ready(peer, url, reattached=True)

    def failed(self, message: str, pid: int | None = None) -> None:
        x = self._extra(pid)
        if x is not None:  # it exits next, and is restarted
            x.message = message
            logger.error("HTTP proxy %d could not start: %s", x.index, message)
            return
        self.status = ProxyStatus.UNHEALTHY
        self.message = message
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(RuntimeError(message))

    def on_exit(self, proc: Process) -> None:
        if proc is not self.proc:
            return  # an earlier proxy: already replaced
        self.proc = None
        self.peer = None
        log = os.path.join(self.head.session_dir, "logs", "proxy.log")
        cause = proc.ending
        if self.status is ProxyStatus.STARTING:
            last = _last_line(log)
            cause = f"the HTTP proxy exited during start-up ({cause}){': ' + last if last else ''}; see {log}"
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(RuntimeError(cause))
                self._ready.exception()
        if self.stopping or self.options is None:
            return
        if self._first_start:  # serve.start gets this error; nothing is retried or held
            self._first_start = False
            logger.error("%s", cause)
            self.status = ProxyStatus.UNHEALTHY
            self.message = cause
            self.options = None
            self.shared.close()
            self.shared = None
            self.head.keeper.drop("http")
            self.head.checkpoint_soon()
            if self.fleet is not None:
                self._fleet_stop = asyncio.get_running_loop().create_task(self._stop_fleet())
            return
        self.status = ProxyStatus.STARTING
        delay = self.backoff.failed()
        self.restarts += 1
        if self._restarting_since is None:
            self._restarting_since = time.monotonic()
        if cause != self.message:
            logger.warning("HTTP proxy (pid %d) is gone: %s; restarting it in %.2fs", proc.pid, cause, delay)
        self.message = cause
        self._relaunch_task = asyncio.get_running_loop().create_task(self._relaunch(delay))

    def _peer_closed(self, peer: RpcPeer) -> None:
        if peer is not self.peer:
            return
        self.peer = None
        if self.proc is not None and not self.stopping:
            self.head.supervisor.kill(self.proc)  # a proxy without its head link: replace it

    async def _relaunch(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.stopping or self.options is None:
            return
        try:
            await self._launch()
        except Exception as e:
            cause = str(e)
            if cause != self.message:
                logger.error("could not restart the HTTP proxy: %s", cause)
            self.message = cause

    async def restore(self, saved: dict[str, Any] | None, fd: int | None) -> None:
        """A restarted head: take the HTTP port back from the keeper, re-adopt the proxy."""
        if saved is not None and _disabled(saved["options"]):
            self.options = saved["options"]
        if saved is None or fd is None:
            if fd is not None:
                os.close(fd)
                self.head.keeper.drop("http")
            return
        import socket

        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        self.options = saved["options"]
        self.url = saved["url"]
        await self._hold(sock)
        if self.options.get("direct_ingress"):
            self.status = ProxyStatus.HEALTHY
            return
        self.status = ProxyStatus.STARTING
        self._ready = asyncio.get_running_loop().create_future()
        proc = None
        if saved.get("pid"):
            proc = self.head.supervisor.adopt(saved["pid"], "proxy", saved["ticks"], self.on_exit)
        if proc is None:
            logger.info("the HTTP proxy (pid %s) is gone; starting a new one", saved.get("pid"))
            self._restarting_since = time.monotonic()
            self._relaunch_task = asyncio.get_running_loop().create_task(self._relaunch(0.0))
        else:
            self.proc = proc
        for i, entry in enumerate(saved.get("extras") or [], start=1):
            x = ExtraProxy(self, i)
            self.extras.append(x)
            if entry is None or not x.adopt(entry[0], entry[1]):
                x.launch_soon()
        self._start_extras()  # as many as wanted now

    def expire_adopted(self) -> None:
        for x in self.extras:
            x.expire_adopted()
        if self.proc is not None and self.peer is None and self.status is ProxyStatus.STARTING and self._restarting_since is None:
            logger.warning("the HTTP proxy (pid %d) did not reconnect to the restarted head; replacing it", self.proc.pid)
            self.head.supervisor.kill(self.proc)

    async def stop(self) -> None:
        self.stopping = True
        if self._relaunch_task is not None:
            self._relaunch_task.cancel()
        proc, self.proc = self.proc, None
        extras, self.extras = self.extras, []
        stops = [x.stop() for x in extras]
        if proc is not None:
            stops.append(self.head.supervisor.stop(proc, PROXY_STOP_TIMEOUT_S))
        await asyncio.gather(*stops, self._stop_fleet())
        if self.shared is not None:
            self.shared.close()
            self.shared = None
            self.head.keeper.drop("http")
        self.options = None
        self.status = None
        self.stopping = False
        self.head.checkpoint_soon()


class Head:
    def __init__(self, cfg: dict[str, Any], zygote: Any = None) -> None:
        self._zygote = zygote
        self.cfg = cfg
        self.metrics_port = 0
        self.session_dir: str = cfg["session_dir"]
        self.sock = os.path.join(self.session_dir, "head.sock")
        self.resources: dict[str, float] = cfg["resources"]
        self.backend: str = cfg.get("backend", "local")
        self.secret: bytes | None = None
        self.supervisor: Any
        self.tcp_addr = ""
        self.node_id = ""  # the Ray node this head runs on (Ray backend)
        self.ready_out: Any = sys.stdout  # where the ready line goes (the pipe to the keeper)
        #: In a Ray actor (`ray_controller`): no keeper, stdin or signals; `on_ready` gets the
        #: ready line's content (with the TCP address and secret) instead of the pipe.
        self.in_actor = bool(cfg.get("in_actor"))
        self.on_ready: Any = None
        if self.backend == "ray":
            from flotilla._private import auth
            from flotilla._private.ray_supervisor import RaySupervisor

            self.secret = auth.new_secret()
            self.supervisor = RaySupervisor(self.secret, self.session_dir)
        else:
            self.supervisor = ZygoteSupervisor()
        self.keeper = KeeperLink(cfg.get("keeper_fd"))
        self.held: dict[str, int] = {k: int(v) for k, v in cfg.get("held", {}).items()}
        self.ckpt = checkpoint.Checkpoint(self.session_dir)
        self._ckpt_pending = False
        self._ckpt_error = ""
        self.proxy = ProxyManager(self)
        self.controller: Any = None
        self.done = asyncio.Event()
        self._load_peers: set[int] = set()
        self._shutdown_task: asyncio.Task[None] | None = None
        from flotilla._private.metrics import Aggregate

        self.pushed = Aggregate()  # what the proxy and the replicas push (`metrics_push`)
        self._push_keys: dict[RpcPeer, int] = {}
        self._next_push_key = 0
        self._rendered: tuple[int, dict[str, Any], bytes] | None = None
        self.namespace: str = cfg.get("namespace") or "default"
        self.detached = bool(cfg.get("detached"))  # `flotilla start`: outlives every driver
        self.deployer: Any = None  # applies config files (`_private/deployer.py`)
        self.rest: Any = None  # the REST API and dashboard (`_private/rest.py`), when asked for
        self.rest_url = ""
        self.sampler: Any = None  # the dashboard's series (`dashboard.Sampler`), with the REST API
        self.token: str | None = cfg.get("token")

    def _fail_start(self, message: str) -> None:
        """Before the ready line: tell whoever started the cluster why it cannot, then stop."""
        logger.error("%s", message)
        self.ready_out.write(json.dumps({"error": message}) + "\n")
        self.ready_out.flush()
        self.done.set()

    def cluster_info(self) -> dict[str, Any]:
        """Where this cluster is (`cluster.json`, the registry record, GET /api/flotilla/cluster)."""
        from flotilla._private.keeper import keeper_from_env

        keeper = keeper_from_env() or (0, None)
        return {
            "namespace": self.namespace, "session_dir": self.session_dir, "sock": self.sock,
            "keeper_pid": keeper[0], "keeper_ticks": keeper[1], "pid": os.getpid(),
            "resources": self.resources, "metrics_port": self.metrics_port,
            "metrics_url": f"http://127.0.0.1:{self.metrics_port}/metrics",
            "dashboard_url": self.rest_url, "http_url": self.proxy.url if self.proxy.status is ProxyStatus.HEALTHY else None,
            "detached": self.detached, "logs": os.path.join(self.session_dir, "logs"),
        }

    def _write_records(self) -> None:
        info = self.cluster_info()
        path = os.path.join(self.session_dir, "cluster.json")
        with open(path + ".tmp", "w") as f:
            json.dump(info, f)
        os.replace(path + ".tmp", path)
        if self.detached and not self.in_actor:
            from flotilla._private import cluster

            cluster.write_record(dict(info, token=self.token))

    async def _start_rest(self) -> None:
        from flotilla._private import dashboard, rest

        opts = self.cfg["dashboard"]
        host, port = opts.get("host", "127.0.0.1"), int(opts.get("port", 8265))
        self.rest = rest.RestServer(_rest_routes(self), self.token if host not in rest.LOOPBACK else None)
        try:
            port = await self.rest.start(host, port)
        except OSError as e:
            if not opts.get("fallback"):
                raise
            logger.info("dashboard: port %s unavailable (%s); using a free port", port, e.strerror or e)
            port = await self.rest.start(host, 0)
        if self.sampler is None:
            self.sampler = dashboard.Sampler(self)
            self._dashboard_task = asyncio.get_running_loop().create_task(self.sampler.run())
        reach = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        self.rest_url = f"http://{f'[{reach}]' if ':' in reach else reach}:{port}"
        logger.info("dashboard and REST API at %s%s", self.rest_url, " (token required)" if self.rest.token else "")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # Start the zygote first: it preloads the framework while this process imports the
        # controller (pydantic and friends).
        if self._zygote is not None:
            await self.supervisor.use_zygote(self._zygote)
        from flotilla._private.controller import REATTACH_TIMEOUT_S, Controller
        from flotilla._private.resources import ResourcePool

        pool_task = None
        if self.backend == "ray":
            from flotilla._private.ray_supervisor import RayResources

            ray_pool = RayResources()
            self.resources = ray_pool.totals()
            pool_task = loop.create_task(ray_pool.run())
            self.controller = Controller(self.session_dir, self.sock, ray_pool, self.supervisor)
        else:
            self.controller = Controller(self.session_dir, self.sock, ResourcePool(self.resources), self.supervisor)
        self.controller.proxy = self.proxy
        self.controller.canary.source = self.pushed.snapshots
        from flotilla._private.deployer import Deployer

        self.deployer = Deployer(self)
        metrics_port = int(self.cfg.get("metrics_port") or 0)
        saved = self._load_checkpoint()
        if saved is not None:
            state, specs = saved
            try:
                n = checkpoint.restore(self.controller, state, specs, self.supervisor)
                await self.proxy.restore(state.get("proxy"), self.held.pop("http", None))
            except Exception:  # never a crash loop on a checkpoint: start empty instead
                logger.exception("the checkpoint could not be restored; starting empty (kept as %s)",
                                 self.ckpt.set_aside())
                pool = self.controller.pool if self.backend == "ray" else ResourcePool(self.resources)
                self.controller = Controller(self.session_dir, self.sock, pool, self.supervisor)
                self.controller.proxy = self.proxy = ProxyManager(self)
                self.controller.canary.source = self.pushed.snapshots
                state, n = {}, 0
            metrics_port = int(state.get("metrics_port") or metrics_port)
            logger.info("restarted from the checkpoint (restart %s): %d application(s), %d live replica(s) "
                        "re-adopted%s", self.cfg.get("restarts"), len(self.controller.apps), n,
                        ", and the HTTP proxy" if self.proxy.proc is not None else "")
            loop.call_later(REATTACH_TIMEOUT_S, self._expire_adopted)
        for name, fd in self.held.items():  # sockets the checkpoint no longer uses
            os.close(fd)
            self.keeper.drop(name)
        self.held.clear()
        self.controller.on_change = self.checkpoint_soon
        try:
            os.unlink(self.sock)  # left by a head that died
        except FileNotFoundError:
            pass
        server = await serve_unix(self.sock, lambda: RpcPeer(self.handle, name="client"))
        os.chmod(self.sock, 0o600)
        tcp_server = None
        if self.secret is not None:  # replicas on Ray's nodes register over authenticated TCP
            import ray

            from flotilla._private.transport import serve_tcp

            host = ray.util.get_node_ip_address()
            self.node_id = ray.get_runtime_context().get_node_id()
            tcp_server = await serve_tcp(host, 0, lambda: RpcPeer(self.handle, name="client"), self.secret)
            port = tcp_server.sockets[0].getsockname()[1]
            self.tcp_addr = self.supervisor.head_addr = f"tcp://{f'[{host}]' if ':' in host else host}:{port}"
            logger.info("Ray backend: control socket also on %s (authenticated)", self.tcp_addr)
        controller_task = loop.create_task(self.controller.run())
        from flotilla._private.metrics import serve_metrics

        mhost, mtoken = frontdoor.metrics_access(self.session_dir)  # beyond loopback: a bearer token
        try:
            metrics_server, self.metrics_port = await serve_metrics(mhost, metrics_port, self.gather_metrics, mtoken)
        except OSError as e:
            logger.warning("metrics endpoint: port %s unavailable (%s); using a free port", metrics_port, e)
            metrics_server, self.metrics_port = await serve_metrics(mhost, 0, self.gather_metrics, mtoken)
        if not self.in_actor:
            loop.add_reader(0, self._stdin_readable)
            loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        failed = ""
        if self.cfg.get("dashboard"):
            try:
                await self._start_rest()
            except OSError as e:
                port = self.cfg["dashboard"].get("port")
                failed = (f"the dashboard and REST API could not listen on {self.cfg['dashboard'].get('host')}:{port}: "
                          f"{e.strerror or e}; pass another port (flotilla start --dashboard-port, "
                          f"flotilla.init(dashboard_port=...))")
        if not failed and self.cfg.get("http") and self.proxy.options is None:
            try:
                await self.proxy.start(self.cfg["http"])
            except Exception as e:
                failed = str(e).split(". Pass another port")[0] + "; pass another --http-port"
        if failed and saved is None:
            self._fail_start(failed)
        elif failed:
            logger.error("%s", failed)
        if not self.done.is_set():
            self._write_records()
        self.checkpoint_soon()
        ready: dict[str, Any] = {"sock": self.sock, "resources": self.resources, "metrics_port": self.metrics_port,
                                 "pid": os.getpid()}
        if self.secret is not None:  # on the pipe to the keeper, which hands it to the driver only
            ready.update(backend=self.backend, secret=self.secret.hex())
        if self.on_ready is not None:  # a Ray actor: the driver asks for it through Ray
            self.on_ready(dict(ready, tcp_addr=self.tcp_addr, node_id=self.node_id, session_dir=self.session_dir,
                               rest_url=self.rest_url))
        elif self.done.is_set():
            pass  # _fail_start wrote the error line instead
        else:
            ready.update(rest_url=self.rest_url, http_url=self.cluster_info()["http_url"])
            self.ready_out.write(json.dumps(ready) + "\n")
            self.ready_out.flush()
        if self._zygote is None:  # a restarted head: the fork server's preloading waited till now
            await self.supervisor.use_zygote()
        await self.done.wait()
        controller_task.cancel()
        task = self._shutdown_task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if not self.in_actor:
            with contextlib.suppress(Exception):
                loop.remove_reader(0)
            loop.remove_signal_handler(signal.SIGTERM)
        await self.controller.kill_all()
        await self.proxy.stop()
        await self.supervisor.close()
        server.close()
        if tcp_server is not None:
            tcp_server.close()
        if pool_task is not None:
            pool_task.cancel()
        metrics_server.close()
        if self.rest is not None:
            self.rest.close()

    # ---- checkpoint ---------------------------------------------------------------------
    def _load_checkpoint(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]] | None:
        try:
            return self.ckpt.load()
        except Exception as e:
            bad = self.ckpt.set_aside()
            logger.error("the checkpoint could not be read (%r); starting empty (it is kept as %s)", e, bad)
            return None

    def checkpoint_soon(self) -> None:
        """Write the checkpoint at the end of this turn of the loop (changes coalesce)."""
        if self._ckpt_pending or self.controller is None:
            return
        self._ckpt_pending = True
        asyncio.get_running_loop().call_soon(self._write_checkpoint)

    def _write_checkpoint(self) -> None:
        self._ckpt_pending = False
        try:
            self.ckpt.save(checkpoint.capture(self.controller, self.ckpt, self.proxy.checkpoint(), self.metrics_port))
            self._ckpt_error = ""
        except Exception as e:
            if repr(e) != self._ckpt_error:
                logger.exception("could not write the checkpoint")
            self._ckpt_error = repr(e)

    def _expire_adopted(self) -> None:
        self.controller.expire_adopted()
        self.proxy.expire_adopted()

    def gather_metrics(self) -> bytes:
        """Prometheus text for every process: the controller's own metrics, and what the proxy
        and the replicas last pushed (stale by at most their push interval). No process is
        asked anything; the text is rendered again only when something changed."""
        from flotilla._private.metrics import render

        snaps = self.pushed.snapshots()
        own = self.controller.metrics_snapshot()
        cached = self._rendered
        if cached is not None and cached[0] == self.pushed.version and cached[1] == own:
            return cached[2]
        text = render([own, *snaps])
        self._rendered = (self.pushed.version, own, text)
        return text

    def _metrics_push(self, peer: RpcPeer, delta: dict[str, Any]) -> None:
        key = self._push_keys.get(peer)
        if key is None:
            if peer.closed:
                return
            key = self._push_keys[peer] = self._next_push_key
            self._next_push_key += 1

            def gone() -> None:
                self._push_keys.pop(peer, None)
                self.pushed.departed(key)

            peer.on_close(gone)
        self.pushed.push(key, delta)

    def _stdin_readable(self) -> None:
        try:
            data = os.read(0, 4096)
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(0)
            logger.info("the keeper ended the session (stdin closed); stopping every process now")
            self._start_shutdown(graceful=False)

    def _on_sigterm(self) -> None:
        logger.info("SIGTERM: draining every replica, then exiting")
        self._start_shutdown(graceful=True)

    def _start_shutdown(self, graceful: bool) -> None:
        if self._shutdown_task is None or (not graceful and not self.done.is_set()):
            if self._shutdown_task is not None:
                self._shutdown_task.cancel()  # a drain under way gives way to the immediate stop
            self._shutdown_task = asyncio.get_running_loop().create_task(self._shutdown(graceful))

    async def _shutdown(self, graceful: bool = True) -> None:
        if graceful:
            await self.proxy.stop()
            await self.controller.shutdown(SHUTDOWN_DRAIN_TIMEOUT_S)
        self.done.set()

    async def handle(self, peer: RpcPeer, op: str, args: tuple[Any, ...]) -> Any:
        result = await self._handle(peer, op, args)
        if op in _DURABLE and self._ckpt_pending:
            self._write_checkpoint()  # on disk before the caller hears it was done
        return result

    async def _handle(self, peer: RpcPeer, op: str, args: tuple[Any, ...]) -> Any:
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
        if op == "metrics_push":
            return self._metrics_push(peer, args[0])
        if op == "replica_register":
            return c.register(peer, *args)
        if op == "replica_reattach":
            return c.reattach(peer, *args)
        if op == "proxy_reattach":
            return self.proxy.reattach(peer, *args)
        if op == "hello":
            return {"pid": os.getpid()}
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
            return self.deployer.overlay(c.status())
        if op == "apply_config":
            return await self.deployer.apply(*args)
        if op == "applied_config":
            return self.deployer.applied
        if op == "cluster_info":
            return self.cluster_info()
        if op == "available_resources":
            return c.pool.available()
        if op == "cluster_resources":
            return c.pool.totals()
        if op == "set_traffic":
            return c.set_traffic(*args)
        if op == "start_canary":
            return c.start_canary(*args)
        if op == "delete_traffic":
            return c.delete_traffic(*args)
        if op == "set_shadow":
            return c.set_shadow(*args)
        if op == "delete_shadow":
            return c.delete_shadow(*args)
        if op == "app_info":
            app = c.apps.get(args[0])
            if app is None or app.deleting:
                if args[0] in c.splits:
                    return {"split": args[0]}
                return None
            return {"ingress": app.ingress, "route_prefix": app.route_prefix}
        if op == "deployment_specs":  # serve.get_deployment / list_deployments (Ray 1.x API)
            return _deployment_specs(c, args[0] if args else None)
        if op == "start_http":
            return await self.proxy.start(args[0])
        if op == "http_url":
            return self.proxy.url if self.proxy.status is ProxyStatus.HEALTHY else None
        if op == "proxy_ready":
            return self.proxy.ready(peer, *args)
        if op == "proxy_failed":
            return self.proxy.failed(*args)
        if op == "node_proxy_ready":
            return self.proxy.node_ready(peer, *args)
        if op == "serve_shutdown":
            if self.detached:  # the cluster stays, with its proxy: only the applications go
                await self.delete_all()
                return None
            self.deployer.forget()
            await self.proxy.stop()
            await c.shutdown()
            return None
        if op == "shutdown":
            self._start_shutdown(graceful=True)
            return None
        raise ValueError(f"unknown op {op!r}")


    async def delete_all(self, timeout: float = 60.0) -> None:
        """Delete every application (DELETE /api/serve/applications/, serve.shutdown() on a
        detached cluster), and wait until they are gone."""
        c = self.controller
        self.deployer.forget()
        names = list(c.apps)
        for name in names:
            c.delete_app(name)
        await asyncio.gather(*(c.wait_deleted(name, timeout) for name in names))


def _rest_routes(head: Head) -> dict[tuple[str, str], Any]:
    """The REST API's endpoints (see `_private/rest.py`), the dashboard's among them."""
    from flotilla._private import dashboard, rest

    apps_path = "/api/serve/applications/"

    async def get_apps(req: rest.Request) -> rest.Reply:
        return rest.json_reply(_instance_details(head))

    async def put_apps(req: rest.Request) -> rest.Reply:
        from flotilla.serve.exceptions import ConfigError

        try:
            data = json.loads(req.body or b"null")
        except ValueError as e:
            return rest.text_reply(400, f"request body: not valid JSON ({e})")
        try:
            await head.deployer.apply(data, req.headers.get("x-flotilla-cwd"),
                                      pythonpath=req.headers.get("x-flotilla-pythonpath"))
        except (ConfigError, ValueError, TypeError) as e:
            return rest.text_reply(400, str(e))
        except RuntimeError as e:  # e.g. the HTTP port is taken
            return rest.text_reply(409, str(e))
        return rest.empty_reply()

    async def post_scale(req: rest.Request) -> rest.Reply:
        """Ray 2.60's external scaling API; answers as Ray's dashboard does."""
        from flotilla.serve.config import ScaleDeploymentRequest
        from flotilla.serve.exceptions import (
            DeploymentUnavailableError,
            ExternalScalerDisabledError,
        )

        app_name, dep_name = req.params["application_name"], req.params["deployment_name"]
        try:
            target = ScaleDeploymentRequest(**json.loads(req.body)).target_num_replicas
        except Exception as e:  # as Ray's: the JSON or validation error, whatever the body was
            return rest.json_reply({"error": f"Invalid request body: {e}"}, 400)
        try:
            head.controller.scale_deployment(app_name, dep_name, target)
        except LookupError:
            return rest.json_reply({"error": "Application or Deployment not found"}, 404)
        except DeploymentUnavailableError:
            return rest.json_reply({"error": "Deployment is deleted"}, 412)
        except ExternalScalerDisabledError as e:
            return rest.json_reply({"error": str(e)}, 412)
        return rest.json_reply(
            {"message": "Scaling request received. Deployment will get scaled asynchronously."})

    async def delete_apps(req: rest.Request) -> rest.Reply:
        await head.delete_all()
        return rest.empty_reply()

    async def get_cluster(req: rest.Request) -> rest.Reply:
        return rest.json_reply(head.cluster_info())

    async def get_status(req: rest.Request) -> rest.Reply:
        from flotilla._private.cliformat import status_dict

        return rest.json_reply(status_dict(head.deployer.overlay(head.controller.status())))

    async def get_config(req: rest.Request) -> rest.Reply:
        return rest.json_reply(head.deployer.applied)

    async def post_shutdown(req: rest.Request) -> rest.Reply:
        logger.info("REST API: shutdown asked; draining every replica, then exiting")
        asyncio.get_running_loop().call_later(0.05, head._start_shutdown, True)
        return rest.json_reply({"keeper_pid": head.cluster_info()["keeper_pid"]})

    async def get_dashboard(req: rest.Request) -> rest.Reply:
        return rest.json_reply(dashboard.snapshot(head))

    async def get_timeseries(req: rest.Request) -> rest.Reply:
        since = req.query.get("since")
        try:
            after = float(since) if since is not None else None
        except ValueError:
            return rest.text_reply(400, f"since={since!r}: expected epoch seconds")
        return rest.json_reply(head.sampler.series.since(after))

    async def get_logs(req: rest.Request) -> rest.Reply:
        rid = req.query.get("replica", "")
        path = dashboard.log_path(head, rid)
        if path is None:
            return rest.text_reply(404, f"no replica {rid!r} (ids: GET /api/flotilla/dashboard/)")
        try:
            offset = int(req.query["offset"]) if "offset" in req.query else None
            lines = int(req.query.get("lines", "200"))
        except ValueError:
            return rest.text_reply(400, "offset and lines must be integers")
        try:
            got = await asyncio.get_running_loop().run_in_executor(None, dashboard.read_log, path, offset, lines)
        except OSError as e:
            return rest.text_reply(404, f"the log of replica {rid} cannot be read here: {e.strerror or e} ({path})")
        return rest.json_reply(dict(got, replica=rid, path=path))

    async def get_trace(req: rest.Request) -> rest.Reply:
        rid = req.query.get("id", "")
        if not rid:
            return rest.text_reply(400, "give the request id: /api/flotilla/trace/?id=<x-request-id>")
        got = await gather_trace(head, rid)
        if got is None:
            return rest.text_reply(404, f"no trace of request {rid!r} (the last requests of each process are kept)")
        return rest.json_reply(got)

    routes: dict[tuple[str, str], Any] = {
        ("GET", apps_path): get_apps, ("PUT", apps_path): put_apps, ("DELETE", apps_path): delete_apps,
        ("GET", "/api/flotilla/cluster/"): get_cluster, ("GET", "/api/flotilla/status/"): get_status,
        ("GET", "/api/flotilla/config/"): get_config, ("POST", "/api/flotilla/shutdown/"): post_shutdown,
        ("GET", "/api/flotilla/dashboard/"): get_dashboard, ("GET", "/api/flotilla/timeseries/"): get_timeseries,
        ("GET", "/api/flotilla/logs/"): get_logs, ("GET", "/api/flotilla/trace/"): get_trace,
        ("POST", "/api/v1/applications/{application_name}/deployments/{deployment_name}/scale/"): post_scale,
    }
    for path, name, ctype in (("/", "dashboard.html", "text/html; charset=utf-8"),
                              ("/static/dashboard.js", "dashboard.js", "text/javascript; charset=utf-8"),
                              ("/static/dashboard.css", "dashboard.css", "text/css; charset=utf-8")):
        routes[("GET", path)] = _static(name, ctype)
    return routes


#: Seconds each process has to answer a `trace` look-up.
TRACE_TIMEOUT_S = 2.0


async def gather_trace(head: Head, request_id: str) -> dict[str, Any] | None:
    """One request's latency breakdown: its events from the proxy and every replica (asked
    over their authenticated control connections), nested by `trace.assemble`."""
    from flotilla._private import trace

    peers: dict[str, Any] = {}
    peers.update(head.proxy.peers())
    if head.controller is not None:
        for dep in head.controller.all_deployments():
            for rid, r in dep.replicas.items():
                if r.peer is not None:
                    peers[str(rid)] = r.peer
    names = list(peers)
    results = await asyncio.gather(
        *(asyncio.wait_for(peers[n].call("trace", request_id), TRACE_TIMEOUT_S) for n in names),
        return_exceptions=True)
    sources = {n: res for n, res in zip(names, results, strict=True) if isinstance(res, list) and res}
    return trace.assemble(request_id, sources)


def _static(name: str, ctype: str) -> Any:
    """A route serving the dashboard's file `name` (read once)."""
    from flotilla._private import rest

    data: list[bytes] = []

    async def get(req: rest.Request) -> rest.Reply:
        if not data:
            with open(os.path.join(os.path.dirname(__file__), "static", name), "rb") as f:
                data.append(f.read())
        return rest.Reply(200, ctype, data[0], (("cache-control", "no-cache"),))

    return get


def _instance_details(head: Head) -> dict[str, Any]:
    """GET /api/serve/applications/: Ray's (2.60) `ServeInstanceDetails` shape (plus each
    replica's memory figures, flotilla's)."""
    from flotilla._private.dashboard import memory_fields

    c = head.controller
    status = head.deployer.overlay(c.status())
    opts = head.proxy.options or {}
    apps: dict[str, Any] = {}
    for name, a in status.applications.items():
        live = c.apps.get(name)
        deps: dict[str, Any] = {}
        for dname, d in a.deployments.items():
            dep = live.deployments.get(dname) if live is not None else None
            replicas = []
            if dep is not None:
                for r in dep.replicas.values():
                    replicas.append({"replica_id": r.id, "state": r.state.public.value, "pid": r.pid,
                                     "node_id": r.node or head.node_id or "local",
                                     "start_time_s": r.placed_wall_s, **memory_fields(r.memory)})
            deps[dname] = {
                "name": dname, "status": d.status.value, "status_trigger": d.status_trigger.value,
                "message": d.message, "target_num_replicas": d.target_num_replicas,
                # the options given, as Ray lists them (unset ones left out, not null)
                "deployment_config": _ray_deployment_config(dep.config) if dep is not None else {"name": dname},
                "required_resources": dict(dep.spec.get("demand") or {}) if dep is not None else {},
                "replicas": replicas,
            }
        applied = head.deployer.app_config(name)
        apps[name] = {
            "name": name, "route_prefix": a.route_prefix, "docs_path": None, "status": a.status.value,
            "message": a.message, "last_deployed_time_s": a.last_deployed_time_s,
            "deployed_app_config": applied, "source": "declarative" if (live.declarative if live is not None else applied is not None) else "imperative",
            "deployments": deps, "external_scaler_enabled": bool(live is not None and live.external_scaler_enabled),
        }
    return {
        "controller_info": {"pid": os.getpid(), "node_id": head.node_id or "local",
                            "log_file_path": os.path.join(head.session_dir, "logs", "head.log")},
        "proxy_location": opts.get("location", "EveryNode"),
        "http_options": {k: opts[k] for k in ("host", "port", "root_path", "request_timeout_s") if k in opts},
        "grpc_options": {k: v for k, v in (opts.get("grpc_options") or {}).items() if k != "sys_path"},
        "proxies": {node: {"node_id": node, "status": st.value} for node, st in status.proxies.items()},
        "applications": apps,
        "target_capacity": status.target_capacity,
    }


#: flotilla's own autoscaling fields, shown only when set (Ray's details do not have them)
_OWN_AUTOSCALING = ("target_latency_ms", "target_queue_delay_ms")


def _ray_deployment_config(config: dict[str, Any]) -> dict[str, Any]:
    """A deployment's options as Ray's details list them: unset ones left out (not null), and
    `num_replicas="auto"` as the autoscaling_config it stands for."""
    out = {k: v for k, v in config.items() if v is not None and not (k == "num_replicas" and v == "auto")}
    ac = out.get("autoscaling_config")
    if isinstance(ac, dict):
        out["autoscaling_config"] = {k: v for k, v in ac.items() if not (k in _OWN_AUTOSCALING and v is None)}
    return out


def _deployment_specs(c: Any, only: str | None) -> list[dict[str, Any]]:
    """What runs, per deployment (every application's, or those named `only`): its options,
    its pickled code and arguments (as the driver sent them), its route (the application's,
    for its ingress deployment) and its replica target."""
    out = []
    for app in c.apps.values():
        if app.deleting:
            continue
        for d in app.deployments.values():
            if d.deleting or (only is not None and d.name != only):
                continue
            out.append({
                "app": app.name,
                "name": d.name,
                "route_prefix": app.route_prefix if d.name == app.ingress else None,
                "config": d.spec["config"],
                "def_bytes": d.spec["def_bytes"],
                "args_bytes": d.spec["args_bytes"],
                "target": d.target,
            })
    return out


def _join_ray(cfg: dict[str, Any]) -> Any:
    """The Ray backend: keep the pipe to the keeper for the ready line only (fd 1 becomes the
    log, so nothing Ray or its child processes print reaches the keeper), then `ray.init`.
    Returns the ready line's file, or None after writing an error line (the session ends)."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        from flotilla._private.ray_supervisor import connect

        connect(cfg.get("ray") or {})
    except Exception as e:
        logger.exception("could not start or join Ray")
        out.write(json.dumps({"error": f"the Ray backend could not start: {type(e).__name__}: {e}"}) + "\n")
        out.flush()
        return None
    return out


def main(zygote: Any = None) -> None:
    """Run the head until shutdown; `zygote`: the fork server `headboot` started (or None)."""
    cfg = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logrotate.rotate_own_log((2,))  # stderr is logs/head.log (stdout is the pipe to the driver)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ready_out = None
    if cfg.get("backend") == "ray":
        if cfg.get("restarts"):
            # Not yet: its actors died with the previous head (their owner), and routers hold
            # the previous head's secret. End the session cleanly (exit 0) instead.
            logger.error("the head of a Ray-backend session died; restarting it is not supported yet: "
                         "ending the session (flotilla.init() starts a new one)")
            if zygote is not None:
                zygote.kill()
            return
        ready_out = _join_ray(cfg)
        if ready_out is None:
            if zygote is not None:
                zygote.kill()
            return  # exit code 0: the keeper ends the session; the driver raises the error
    head = Head(cfg, zygote)
    if ready_out is not None:
        head.ready_out = ready_out
    try:
        import uvloop

        uvloop.run(head.run())
    except ImportError:  # pragma: no cover
        asyncio.run(head.run())
    if head.backend == "ray":
        import ray

        ray.shutdown()
    if cfg.get("keeper_fd") is None:  # else the keeper finishes the session, after the rest
        logger.info("head exiting; session folder %s removed, logs kept under %s", cfg["session_dir"], session.logs_root())
        session.finish(cfg["session_dir"])
    else:
        logger.info("head exiting")


if __name__ == "__main__":
    main()
