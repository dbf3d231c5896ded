"""The controller: desired state (apps, deployments, replica targets) reconciled against the
replica processes that run. Lives in the head process, on its event loop.

Guarantees:
- Idempotent deploys: re-deploying an unchanged deployment changes nothing; a changed
  `user_config` (or limits) is applied in place; changed code, init args or resources start
  new replicas, and old ones are drained (`graceful_shutdown_*`) only once new ones run, or
  one at a time when resources are too short to run both.
- Routers learn replica sets by push (`subscribe`), never per request.
- A replica that dies or fails its health check is replaced; one whose constructor keeps
  failing ends in DEPLOY_FAILED with the user's traceback in the status message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from flotilla._private.autoscaler_loop import Autoscaler, AutoscalerState, make_state
from flotilla._private.metrics import Store
from flotilla._private.resources import Allocation, ResourcePool, fmt
from flotilla._private.spawner import Spawner
from flotilla._private.transport import RpcPeer
from flotilla.serve.exceptions import ConfigError
from flotilla.serve.schema import (
    ApplicationStatus,
    ApplicationStatusOverview,
    DeploymentStatus,
    DeploymentStatusOverview,
    DeploymentStatusTrigger,
    ReplicaState,
    ServeStatus,
)

logger = logging.getLogger("flotilla.controller")

MAX_CONSTRUCTOR_FAILURES = 3
_SERVING = (DeploymentStatus.HEALTHY, DeploymentStatus.UPSCALING, DeploymentStatus.DOWNSCALING)
DRAIN_GRACE_S = 0.1  # lets in-flight frames from routers that just got the update arrive


@dataclass
class Replica:
    id: str
    dep: Deployment
    version: str
    state: ReplicaState = ReplicaState.STARTING
    alloc: Allocation | None = None
    pid: int | None = None
    peer: RpcPeer | None = None
    sock: str = ""
    started_at: float = field(default_factory=time.monotonic)
    gone: bool = False
    stopping: bool = False
    models: tuple[str, ...] = ()


@dataclass
class Deployment:
    app: str
    name: str
    spec: dict[str, Any]
    target: int
    replicas: dict[str, Replica] = field(default_factory=dict)
    status: DeploymentStatus = DeploymentStatus.UPDATING
    trigger: DeploymentStatusTrigger = DeploymentStatusTrigger.CONFIG_UPDATE_STARTED
    message: str = ""
    failures: int = 0
    failed_msg: str = ""
    unhealthy_msg: str = ""
    deleting: bool = False
    autoscale: AutoscalerState | None = None
    scaling: int = 0  # +1 / -1 while an autoscaling change is being carried out

    @property
    def version(self) -> str:
        return self.spec["version"]

    @property
    def config(self) -> dict[str, Any]:
        return self.spec["config"]

    @property
    def key(self) -> tuple[str, str, str]:
        return ("deployment", self.app, self.name)


@dataclass
class App:
    name: str
    route_prefix: str | None
    ingress: str
    deployments: dict[str, Deployment]
    status: ApplicationStatus = ApplicationStatus.DEPLOYING
    message: str = ""
    last_deployed_time_s: float = field(default_factory=time.time)
    deleting: bool = False
    was_running: bool = False


class Controller:
    def __init__(self, session_dir: str, head_sock: str, pool: ResourcePool, spawner: Spawner) -> None:
        self.session_dir = session_dir
        self.head_sock = head_sock
        self.pool = pool
        self.spawner = spawner
        self.apps: dict[str, App] = {}
        self.replicas: dict[str, Replica] = {}
        self.by_pid: dict[int, Replica] = {}
        self.subs: dict[Any, set[RpcPeer]] = {}
        self.changed = asyncio.Condition()
        self._dirty = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.proxy: Any = None  # set by the head (ProxyManager)
        self.autoscaler = Autoscaler(self)
        self.metrics = Store()
        m = self.metrics
        m.declare("counter", "ray_serve_deployment_replica_starts", "Replica processes started.", ("deployment", "application"))
        m.declare("counter", "flotilla_deployment_replica_restarts", "Replicas replaced after dying or failing a health check.", ("deployment", "application"))
        m.declare("counter", "flotilla_deployment_health_check_failures", "Failed replica health checks.", ("deployment", "application"))
        m.declare("gauge", "ray_serve_deployment_replica_healthy", "1 for each running replica.", ("deployment", "replica", "application"))
        m.declare("gauge", "flotilla_deployment_replicas", "Replicas by state.", ("deployment", "application", "state"))
        m.declare("gauge", "flotilla_deployment_target_replicas", "Replicas the controller aims for (the autoscaler's target when autoscaling).", ("deployment", "application"))
        m.declare("gauge", "ray_serve_deployment_queued_queries", "Requests waiting in routers for a replica.", ("deployment", "application"))
        self._autoscale_wake = asyncio.Event()

    def kick_autoscaler(self) -> None:
        self._autoscale_wake.set()

    def all_deployments(self) -> list[Deployment]:
        return [d for a in self.apps.values() for d in a.deployments.values()]

    def find(self, key: Any) -> Deployment | None:
        app = self.apps.get(key[1])
        return app.deployments.get(key[2]) if app is not None else None

    # ---- helpers ----------------------------------------------------------------------
    def _spawn_task(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def kick(self) -> None:
        self._dirty.set()

    async def run(self) -> None:
        self._spawn_task(self.autoscaler.run())
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), 0.5)
            except TimeoutError:
                pass
            self._dirty.clear()
            try:
                self.reconcile()
            except Exception:
                logger.exception("reconcile failed")

    # ---- subscriptions ----------------------------------------------------------------
    def subscribe(self, peer: RpcPeer, key: Any) -> Any:
        key = tuple(key)
        peers = self.subs.setdefault(key, set())
        if peer not in peers:
            peers.add(peer)
            peer.on_close(lambda: self.subs.get(key, set()).discard(peer))
        return self.value(key)

    def value(self, key: tuple[Any, ...]) -> Any:
        if key[0] == "deployment":
            app = self.apps.get(key[1])
            dep = app.deployments.get(key[2]) if app and not app.deleting else None
            if dep is None or dep.deleting:
                return {"exists": False}
            return {
                "exists": True,
                "replicas": [(r.id, r.sock, r.models) for r in dep.replicas.values() if r.state is ReplicaState.RUNNING and not r.stopping],
                "max_ongoing_requests": dep.config["max_ongoing_requests"],
                "max_queued_requests": dep.config["max_queued_requests"],
            }
        if key[0] == "routes":
            return self.routes()
        raise KeyError(key)

    def publish(self, key: tuple[Any, ...]) -> None:
        peers = self.subs.get(key)
        if not peers:
            return
        v = self.value(key)
        for p in list(peers):
            p.notify("update", key, v)

    def routes(self) -> dict[str, tuple[str, str]]:
        return {
            a.route_prefix: (a.name, a.ingress)
            for a in self.apps.values()
            if a.route_prefix is not None and not a.deleting
        }

    async def notify_changed(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    # ---- deploy / delete ----------------------------------------------------------------
    def deploy_app(self, spec: dict[str, Any]) -> None:
        name = spec["name"]
        prefix = spec["route_prefix"]
        if prefix is not None and self.proxy is not None and self.proxy.direct is not None:
            for other in self.apps.values():
                if other.name != name and other.route_prefix is not None and not other.deleting:
                    raise ConfigError(
                        f"direct ingress serves one HTTP application per port, and application "
                        f"\"{other.name}\" already has route_prefix {other.route_prefix}. Deploy "
                        f"\"{name}\" with route_prefix=None (handles only), or use the proxy."
                    )
        if prefix is not None:
            for other in self.apps.values():
                if other.name != name and other.route_prefix == prefix and not other.deleting:
                    raise ConfigError(
                        f"Prefix {prefix} is being used by application \"{other.name}\". "
                        f"Failed to deploy application \"{name}\". Pick another route_prefix."
                    )
        for d in spec["deployments"]:
            demand = d["demand"]
            if not self.pool.fits_ever(demand):
                logger.warning(
                    "deployment %s/%s needs %s per replica but the cluster has %s in total",
                    name, d["name"], fmt(demand), fmt(self.pool.totals()),
                )
        app = self.apps.get(name)
        if app is None or app.deleting:
            if app is not None:  # being deleted: replace outright
                self._finish_delete(app)
            app = App(name, prefix, spec["ingress"], {})
            self.apps[name] = app
        app.route_prefix = prefix
        app.ingress = spec["ingress"]
        app.last_deployed_time_s = time.time()
        app.status = ApplicationStatus.DEPLOYING
        app.message = ""
        new_names = {d["name"] for d in spec["deployments"]}
        for dname in list(app.deployments):
            if dname not in new_names:
                self._delete_deployment(app.deployments[dname])
        for d in spec["deployments"]:
            self._deploy_one(app, d)
        logger.info("deploying application %r (%d deployments)", name, len(spec["deployments"]))
        self.publish(("routes",))
        self.kick()

    def _deploy_one(self, app: App, d: dict[str, Any]) -> None:
        cfg = d["config"]
        target = d["initial_replicas"]
        dep = app.deployments.get(d["name"])
        if dep is None or dep.deleting:
            dep = Deployment(app.name, d["name"], d, target)
            dep.autoscale = make_state(cfg)
            app.deployments[d["name"]] = dep
            self.publish(dep.key)
            return
        old_cfg = dep.config
        same_code = dep.version == d["version"]
        dep.spec = d
        if cfg.get("autoscaling_config") != old_cfg.get("autoscaling_config"):
            if cfg.get("autoscaling_config") is None or old_cfg.get("autoscaling_config") is None:
                dep.target = target
            dep.autoscale = make_state(cfg)
        elif cfg.get("autoscaling_config") is None:
            dep.target = target
        dep.failed_msg = ""
        dep.failures = 0
        dep.status = DeploymentStatus.UPDATING
        dep.trigger = DeploymentStatusTrigger.CONFIG_UPDATE_STARTED
        if same_code:
            light = {k: cfg[k] for k in ("user_config", "max_ongoing_requests")}
            if light != {k: old_cfg.get(k) for k in light}:
                for r in dep.replicas.values():
                    if r.state is ReplicaState.RUNNING and not r.stopping:
                        self._spawn_task(self._update_replica(r, light))
        self.publish(dep.key)

    async def _update_replica(self, r: Replica, light: dict[str, Any]) -> None:
        if r.peer is None:
            return
        r.state = ReplicaState.UPDATING
        try:
            await r.peer.call("update_config", light)
        except Exception as e:
            logger.error("reconfigure of replica %s failed: %s", r.id, e)
            r.dep.unhealthy_msg = f"reconfigure() failed on replica {r.id}: {e}"
            self._stop_replica(r, graceful=False)
            return
        finally:
            if r.state is ReplicaState.UPDATING:
                r.state = ReplicaState.RUNNING
        self.kick()

    def delete_app(self, name: str) -> bool:
        app = self.apps.get(name)
        if app is None:
            return False
        app.deleting = True
        app.status = ApplicationStatus.DELETING
        for dep in app.deployments.values():
            self._delete_deployment(dep)
        self.publish(("routes",))
        self.kick()
        return True

    def _delete_deployment(self, dep: Deployment) -> None:
        dep.deleting = True
        dep.target = 0
        self.publish(dep.key)
        for r in list(dep.replicas.values()):
            self._stop_replica(r, graceful=True)

    def _finish_delete(self, app: App) -> None:
        if self.apps.get(app.name) is app:
            del self.apps[app.name]
        for dep in app.deployments.values():
            self.publish(dep.key)

    # ---- replica lifecycle --------------------------------------------------------------
    def _new_replica(self, dep: Deployment) -> Replica:
        rid = secrets.token_hex(4)
        r = Replica(rid, dep, dep.version)
        r.sock = os.path.join(self.session_dir, f"r-{rid}.sock")
        dep.replicas[rid] = r
        self.replicas[rid] = r
        return r

    def _try_start(self, r: Replica) -> bool:
        dep = r.dep
        alloc = self.pool.try_allocate(dep.spec["demand"])
        if alloc is None:
            return False
        r.alloc = alloc
        r.started_at = time.monotonic()
        self._spawn_task(self._spawn(r))
        return True

    async def _spawn(self, r: Replica) -> None:
        dep = r.dep
        env = dict(dep.spec.get("env", {}))
        ncpu = dep.config["ray_actor_options"].get("num_cpus", 1) or 0
        if "OMP_NUM_THREADS" not in env and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, int(ncpu)))
        if r.alloc is not None and r.alloc.gpu_shares:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in r.alloc.gpu_ids)
        env["FLOTILLA_REPLICA_ID"] = r.id
        direct = self.proxy.direct if self.proxy is not None else None
        app = self.apps.get(dep.app)
        args = {
            "replica_id": r.id,
            "app": dep.app,
            "deployment": dep.name,
            "sock_path": r.sock,
            "head_sock": self.head_sock,
            "sys_path": dep.spec.get("sys_path", []),
            "cwd": dep.spec.get("cwd", ""),
            "env": env,
        }
        if direct is not None and app is not None and app.ingress == dep.name and app.route_prefix is not None:
            args["direct"] = {**direct, "route_prefix": app.route_prefix}
        log = os.path.join(self.session_dir, "logs", f"replica_{dep.app}_{dep.name}_{r.id}.log")
        try:
            r.pid = await self.spawner.spawn("replica", log, args)
        except Exception as e:
            logger.error("could not start replica %s: %s", r.id, e)
            self._replica_gone(r, f"could not start: {e}")
            return
        self.by_pid[r.pid] = r
        self.metrics.inc("ray_serve_deployment_replica_starts", (dep.name, dep.app))
        if r.pid in self.spawner.exited:
            self._replica_gone(r, f"exited with code {self.spawner.exited[r.pid]} during start-up")
        logger.info("replica %s of %s/%s starting (pid %d)", r.id, dep.app, dep.name, r.pid)

    def register(self, peer: RpcPeer, rid: str, pid: int) -> dict[str, Any]:
        r = self.replicas.get(rid)
        if r is None or r.gone or r.stopping:
            raise RuntimeError(f"replica {rid} is not expected")
        r.peer = peer
        r.pid = pid
        self.by_pid[pid] = r
        peer.on_close(lambda: self._replica_gone(r, "its process exited"))
        s = r.dep.spec
        return {"config": s["config"], "def_bytes": s["def_bytes"], "args_bytes": s["args_bytes"]}

    def replica_models(self, rid: str, model_ids: list[str]) -> None:
        r = self.replicas.get(rid)
        if r is not None and not r.gone:
            r.models = tuple(model_ids)
            self.publish(r.dep.key)

    def replica_ready(self, rid: str) -> None:
        r = self.replicas.get(rid)
        if r is None or r.gone:
            return
        if r.stopping:
            return
        r.state = ReplicaState.RUNNING
        r.dep.failures = 0
        logger.info("replica %s of %s/%s running (%.0f ms)", rid, r.dep.app, r.dep.name, (time.monotonic() - r.started_at) * 1000)
        self._spawn_task(self._health_loop(r))
        self.publish(r.dep.key)
        self.kick()

    def replica_failed(self, rid: str, tb: str) -> None:
        r = self.replicas.get(rid)
        if r is None:
            return
        dep = r.dep
        if r.version == dep.version:
            dep.failures += 1
            if dep.failures >= MAX_CONSTRUCTOR_FAILURES:
                dep.failed_msg = (
                    f"The deployment failed to start {dep.failures} times in a row. This may be "
                    f"due to a problem with its constructor or initial health check failing. "
                    f"See logs under {self.session_dir}/logs for details. Last error:\n{tb}"
                )
            else:
                dep.unhealthy_msg = f"A replica's constructor failed (attempt {dep.failures}):\n{tb}"
        logger.error("replica %s of %s/%s failed to start:\n%s", rid, dep.app, dep.name, tb)
        self._stop_replica(r, graceful=False)

    def on_process_exit(self, pid: int, code: int) -> None:
        r = self.by_pid.pop(pid, None)
        if r is not None and not r.gone:
            self._replica_gone(r, f"its process exited with code {code}")

    def _replica_gone(self, r: Replica, why: str) -> None:
        if r.gone:
            return
        r.gone = True
        dep = r.dep
        if not r.stopping:
            logger.warning("replica %s of %s/%s died: %s", r.id, dep.app, dep.name, why)
            if r.state is ReplicaState.RUNNING and not dep.deleting:
                dep.unhealthy_msg = f"Replica {r.id} died unexpectedly ({why}); replacing it."
                self.metrics.inc("flotilla_deployment_replica_restarts", (dep.name, dep.app))
        if r.pid is not None:
            self.spawner.kill(r.pid)
        if r.alloc is not None:
            self.pool.release(r.alloc)
            r.alloc = None
        dep.replicas.pop(r.id, None)
        self.replicas.pop(r.id, None)
        try:
            os.unlink(r.sock)
        except OSError:
            pass
        self.publish(dep.key)
        self.kick()

    def _stop_replica(self, r: Replica, graceful: bool) -> None:
        if r.stopping or r.gone:
            return
        was_running = r.state is ReplicaState.RUNNING
        r.stopping = True
        r.state = ReplicaState.STOPPING
        self.publish(r.dep.key)
        if r.pid is None and r.alloc is None:
            self._replica_gone(r, "stopped before it started")
            return
        self._spawn_task(self._stop(r, graceful and was_running))

    async def _stop(self, r: Replica, graceful: bool) -> None:
        cfg = r.dep.config
        timeout = cfg["graceful_shutdown_timeout_s"]
        if graceful and r.peer is not None:
            await asyncio.sleep(DRAIN_GRACE_S)
            try:
                await asyncio.wait_for(
                    r.peer.call("stop", cfg["graceful_shutdown_wait_loop_s"], timeout), timeout + 5
                )
            except Exception:
                pass
        if r.pid is not None:
            deadline = time.monotonic() + 2
            while self.spawner.alive(r.pid) and not r.gone and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            self.spawner.kill(r.pid)
        self._replica_gone(r, "stopped")

    async def _health_loop(self, r: Replica) -> None:
        cfg = r.dep.config
        period = cfg["health_check_period_s"]
        timeout = cfg["health_check_timeout_s"]
        while not r.gone and not r.stopping:
            await asyncio.sleep(period)
            if r.gone or r.stopping or r.peer is None:
                return
            try:
                await asyncio.wait_for(r.peer.call("health"), timeout)
            except Exception as e:
                if r.gone or r.stopping:
                    return
                why = "timed out" if isinstance(e, TimeoutError) else f"raised {e!r}"
                logger.warning("replica %s failed its health check (%s); replacing it", r.id, why)
                r.dep.unhealthy_msg = f"Replica {r.id} failed its health check ({why}); replacing it."
                r.dep.trigger = DeploymentStatusTrigger.HEALTH_CHECK_FAILED
                labels = (r.dep.name, r.dep.app)
                self.metrics.inc("flotilla_deployment_health_check_failures", labels)
                self.metrics.inc("flotilla_deployment_replica_restarts", labels)
                self._stop_replica(r, graceful=False)
                return

    # ---- reconciliation -----------------------------------------------------------------
    def reconcile(self) -> None:
        for app in list(self.apps.values()):
            for dep in list(app.deployments.values()):
                self._reconcile_deployment(dep)
                if dep.deleting and not dep.replicas:
                    if app.deployments.get(dep.name) is dep:
                        del app.deployments[dep.name]
                    self.publish(dep.key)
            if app.deleting and not app.deployments:
                self._finish_delete(app)
                logger.info("application %r deleted", app.name)
            else:
                self._app_status(app)
        self._spawn_task(self.notify_changed())

    def _reconcile_deployment(self, dep: Deployment) -> None:
        if dep.deleting:
            return
        live = [r for r in dep.replicas.values() if not r.stopping and not r.gone]
        current = [r for r in live if r.version == dep.version]
        old = [r for r in live if r.version != dep.version]
        if not dep.failed_msg:
            for _ in range(dep.target - len(current)):
                current.append(self._new_replica(dep))
        # Too many: stop pending ones first, then starting, then the newest running.
        excess = len(current) - dep.target
        if excess > 0:
            order = sorted(current, key=lambda r: (r.alloc is not None, r.state is ReplicaState.RUNNING, -r.started_at))
            for r in order[:excess]:
                self._stop_replica(r, graceful=True)
                current.remove(r)
        pending = [r for r in current if r.alloc is None]
        for r in pending:
            if not self._try_start(r):
                break
        pending = [r for r in current if r.alloc is None]
        running = [r for r in current if r.state in (ReplicaState.RUNNING, ReplicaState.UPDATING)]
        if old:
            if len(running) >= dep.target or dep.failed_msg:
                for r in old:
                    self._stop_replica(r, graceful=True)
            elif pending and not any(r.stopping for r in dep.replicas.values()):
                # Not enough room for old and new side by side: roll one at a time.
                self._stop_replica(max(old, key=lambda r: r.started_at), graceful=True)
        self._deployment_status(dep, running, pending, old)

    def _deployment_status(self, dep: Deployment, running: list[Replica], pending: list[Replica], old: list[Replica]) -> None:
        messages = []
        if pending:
            demand = dep.spec["demand"]
            why = self.pool.shortfall(demand) or "waiting for resources"
            ever = "" if self.pool.fits_ever(demand) else " It can never fit on this cluster: lower the request or add resources with flotilla.init(...)."
            messages.append(
                f"Deployment '{dep.name}' in application '{dep.app}' has {len(pending)} replica(s) "
                f"that cannot be scheduled yet: each requires {fmt(demand)}; {why} "
                f"(total {fmt(self.pool.totals())}).{ever}"
            )
        if dep.failed_msg:
            dep.status = DeploymentStatus.DEPLOY_FAILED
            dep.trigger = DeploymentStatusTrigger.REPLICA_STARTUP_FAILED
            messages.insert(0, dep.failed_msg)
        elif len(running) >= dep.target and not old and all(r.state is ReplicaState.RUNNING for r in running):
            if dep.status is not DeploymentStatus.HEALTHY:
                if dep.scaling:
                    dep.trigger = (DeploymentStatusTrigger.UPSCALE_COMPLETED if dep.scaling > 0
                                   else DeploymentStatusTrigger.DOWNSCALE_COMPLETED)
                else:
                    dep.trigger = DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED
            if dep.autoscale is not None and dep.autoscale.zero_since is not None and running:
                logger.info("%s/%s: cold start from zero took %.2fs", dep.app, dep.name,
                            time.monotonic() - dep.autoscale.zero_since)
                dep.autoscale.zero_since = None
            dep.status = DeploymentStatus.HEALTHY
            dep.scaling = 0
            dep.unhealthy_msg = ""
        elif dep.unhealthy_msg:
            dep.status = DeploymentStatus.UNHEALTHY
            messages.insert(0, dep.unhealthy_msg)
        elif dep.scaling and not old:
            dep.status = DeploymentStatus.UPSCALING if dep.scaling > 0 else DeploymentStatus.DOWNSCALING
        else:
            dep.status = DeploymentStatus.UPDATING
        dep.message = "\n".join(messages)

    def _app_status(self, app: App) -> None:
        if app.deleting:
            app.status = ApplicationStatus.DELETING
            return
        deps = list(app.deployments.values())
        failed = [d for d in deps if d.status is DeploymentStatus.DEPLOY_FAILED]
        if failed:
            app.status = ApplicationStatus.DEPLOY_FAILED
            app.message = "\n".join(
                f"Deploying application '{app.name}' failed: deployment '{d.name}': {d.message}" for d in failed
            )
        elif all(d.status in _SERVING for d in deps):
            if app.status is not ApplicationStatus.RUNNING:
                logger.info("application %r is running", app.name)
            app.status = ApplicationStatus.RUNNING
            app.message = ""
            app.was_running = True
        elif app.was_running and any(d.status is DeploymentStatus.UNHEALTHY for d in deps):
            app.status = ApplicationStatus.UNHEALTHY
            app.message = "; ".join(f"'{d.name}': {d.message}" for d in deps if d.status is DeploymentStatus.UNHEALTHY)
        else:
            app.status = ApplicationStatus.DEPLOYING
            app.message = "; ".join(d.message for d in deps if d.message)

    # ---- status -----------------------------------------------------------------------
    def status(self) -> ServeStatus:
        apps = {}
        for app in self.apps.values():
            deps = {}
            for d in app.deployments.values():
                counts: dict[ReplicaState, int] = {}
                for r in d.replicas.values():
                    counts[r.state] = counts.get(r.state, 0) + 1
                deps[d.name] = DeploymentStatusOverview(
                    status=d.status,
                    status_trigger=d.trigger,
                    replica_states=counts,
                    message=d.message,
                    target_num_replicas=d.target,
                    autoscaling=self.autoscaler.status(d),
                )
            apps[app.name] = ApplicationStatusOverview(
                status=app.status,
                message=app.message,
                last_deployed_time_s=app.last_deployed_time_s,
                deployments=deps,
                route_prefix=app.route_prefix,
            )
        proxies = {}
        if self.proxy is not None and self.proxy.status is not None:
            proxies["head"] = self.proxy.status
        return ServeStatus(proxies=proxies, applications=apps)

    def metrics_snapshot(self) -> dict[str, Any]:
        m = self.metrics
        for name in ("ray_serve_deployment_replica_healthy", "flotilla_deployment_replicas",
                     "flotilla_deployment_target_replicas", "ray_serve_deployment_queued_queries"):
            m.values[name] = {}
        for d in self.all_deployments():
            counts: dict[str, int] = {}
            for r in d.replicas.values():
                counts[r.state.value] = counts.get(r.state.value, 0) + 1
                if r.state is ReplicaState.RUNNING:
                    m.set("ray_serve_deployment_replica_healthy", (d.name, r.id, d.app), 1.0)
            for state, n in counts.items():
                m.set("flotilla_deployment_replicas", (d.name, d.app, state), float(n))
            m.set("flotilla_deployment_target_replicas", (d.name, d.app), float(d.target))
            m.set("ray_serve_deployment_queued_queries", (d.name, d.app), float(self.autoscaler.routed_waiting(d.key)))
        return m.snapshot()

    async def wait_app(self, name: str, timeout: float) -> tuple[str, str]:
        """Wait until app `name` is RUNNING or failed (or `timeout`); returns (status, message)."""
        deadline = time.monotonic() + timeout
        async with self.changed:
            while True:
                app = self.apps.get(name)
                if app is None:
                    return ("NOT_STARTED", f"Application '{name}' does not exist.")
                if app.status in (ApplicationStatus.RUNNING, ApplicationStatus.DEPLOY_FAILED):
                    return (app.status.value, app.message)
                left = deadline - time.monotonic()
                if left <= 0:
                    return (app.status.value, app.message)
                try:
                    await asyncio.wait_for(self.changed.wait(), left)
                except TimeoutError:
                    pass

    async def wait_deleted(self, name: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        async with self.changed:
            while name in self.apps:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                try:
                    await asyncio.wait_for(self.changed.wait(), left)
                except TimeoutError:
                    pass
            return True

    async def shutdown(self) -> None:
        for name in list(self.apps):
            self.delete_app(name)
        await self.wait_all_deleted(30)

    async def wait_all_deleted(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.apps and time.monotonic() < deadline:
            self.reconcile()
            await asyncio.sleep(0.02)
        for r in list(self.replicas.values()):
            if r.pid is not None:
                self.spawner.kill(r.pid)
            self._replica_gone(r, "shutdown")
        self.apps.clear()
