"""The controller: desired state (apps, deployments, replica targets) reconciled against the
replica processes that run. Lives in the head process, on its event loop.

The decisions are pure (`reconcile.py`); this module observes, asks, and carries them out:
allocating and forking replicas, draining and killing them, health checks, reconfigure, status.
Each replica moves through the state machine of `lifecycle.py`.
On the local backend it also samples each replica's CPU use (`_sample_cpu`) for the live
findings of `findings.py`, shown in the status, the dashboard and the cpu_cores gauges.

Guarantees:
- Idempotent deploys: re-deploying an unchanged deployment changes nothing; a changed
  `user_config` (or `max_ongoing_requests`, `logging_config`) is applied in place, one call
  at a time per replica, latest config wins, bounded by RECONFIGURE_TIMEOUT_S; changed code,
  init args or resources roll out new replicas while the old ones keep serving (see
  reconcile.py).
- A failed new version leaves the old replicas serving; the status says DEPLOY_FAILED with the
  constructor's traceback.
- Stopping a serving replica: routers are told first (it leaves the published set), then the
  replica is told `stop` at once; it rejects work it has not started (routers retry it
  elsewhere), finishes what runs, exits; its process group is killed if it does not exit in time.
- Routers learn replica sets by push (`subscribe`), never per request; RUNNING and UPDATING
  replicas are published.
- A replica that dies or fails its health check is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, overload

from flotilla._private import capacity
from flotilla._private.autoscaler_loop import Autoscaler, AutoscalerState, make_state
from flotilla._private.bounds import (
    Limits,
    MemKill,
    MemSample,
    memory_decide,
    slow_startup_message,
    startup_check,
    startup_timeout_message,
)
from flotilla._private.canary_loop import CanaryLoop, CanaryRun
from flotilla._private.doctor import DepSpec, check_cold_start
from flotilla._private.findings import Watch, sample_s
from flotilla._private.lifecycle import RState, transition
from flotilla._private.metrics import LATENCY_MS_BUCKETS, Store, record_auth_failures
from flotilla._private.procfs import Memory, group_cpu, group_rss, machine_memory, memory_of
from flotilla._private.ranks import DeploymentRanks
from flotilla._private.reconcile import (
    Desired,
    Observed,
    PlaceReplica,
    Plan,
    StartReplica,
    StopReplica,
    failed_start_limit,
    reconcile,
    start_backoff_s,
)
from flotilla._private.resources import Allocation, ResourcePool, fmt, visible_devices
from flotilla._private.supervisor import Process, Supervisor, Template
from flotilla._private.templates import Templates
from flotilla._private.transport import RpcPeer
from flotilla.serve.exceptions import ConfigError
from flotilla.serve.schema import (
    ApplicationStatus,
    ApplicationStatusOverview,
    DeploymentStatus,
    DeploymentStatusOverview,
    DeploymentStatusTrigger,
    ReplicaMemory,
    ReplicaRank,
    ServeStatus,
    ShadowStatus,
    TrafficStatus,
)

logger = logging.getLogger("flotilla.controller")

__all__ = ["Controller"]

_SERVING = (DeploymentStatus.HEALTHY, DeploymentStatus.UPSCALING, DeploymentStatus.DOWNSCALING)
#: Longest a replica's reconfigure() (update_config) may take; then the replica is replaced.
#: `FLOTILLA_RECONFIGURE_TIMEOUT_S` in the driver's environment overrides it.
RECONFIGURE_TIMEOUT_S = float(os.environ.get("FLOTILLA_RECONFIGURE_TIMEOUT_S", "60"))
#: How long past graceful_shutdown_timeout_s the replica's answer to `stop` may take.
STOP_REPLY_GRACE_S = 5.0
#: How long a replica may take to exit after answering `stop` (or after SIGKILL).
EXIT_GRACE_S = 5.0
#: How long a replica stopped while its constructor runs has to cancel an async constructor
#: and run `__del__` (as Ray's); one whose sync constructor holds its loop is killed then.
CONSTRUCTING_STOP_S = 2.0
#: Bound on the stats call that tells which replicas have the fewest requests in flight.
LOAD_SAMPLE_TIMEOUT_S = 0.25
#: Failed health checks in a row after which a replica is replaced (Ray Serve's threshold).
UNHEALTHY_AFTER = 3
#: How long a restarted head waits for a re-adopted replica to reconnect before replacing it.
REATTACH_TIMEOUT_S = float(os.environ.get("FLOTILLA_REATTACH_TIMEOUT_S", "10"))
#: How many ids of replicas that died serving each deployment's routers are told of.
DEAD_KEPT = 64
#: Replicas replaced without being asked, kept per deployment for the dashboard.
DEATHS_KEPT = 10
_LIGHT = ("user_config", "max_ongoing_requests", "logging_config")


@overload
def _memory(m: Memory) -> ReplicaMemory: ...
@overload
def _memory(m: Memory | None) -> ReplicaMemory | None: ...
def _memory(m: Memory | None) -> ReplicaMemory | None:
    return ReplicaMemory(m.rss, m.pss, m.uss, m.shared) if m is not None else None


def light_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a config a running replica applies in place (`update_config`)."""
    return {k: config.get(k) for k in _LIGHT}


def world_size(dep: Deployment) -> int:
    """What `ReplicaContext.world_size` says: the deployment's num_replicas, else (autoscaling)
    its target replica count now."""
    n = dep.config.get("num_replicas")
    return n if isinstance(n, int) else max(1, dep.target)


def replica_light(r: Replica) -> dict[str, Any]:
    """`light_config` of `r`'s config with its rank and world size: what `update_config` gives it."""
    out = light_config(r.spec["config"])
    if r.rank is not None:
        out["rank"] = list(r.rank.parts)
        out["world_size"] = r.world_size
    return out


def _only_count_changed(cfg: dict[str, Any], old: dict[str, Any]) -> bool:
    """Whether two deployment configs differ in `num_replicas` at most (no autoscaling)."""
    if cfg.get("autoscaling_config") is not None or old.get("autoscaling_config") is not None:
        return False
    return {k: v for k, v in cfg.items() if k != "num_replicas"} == {k: v for k, v in old.items() if k != "num_replicas"}


def same_user_config(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two `replica_light` configs differ at most in rank and world size."""
    if a is None or b is None:
        return a is b
    return {**a, "rank": None, "world_size": None} == {**b, "rank": None, "world_size": None}


#: Ray's numbers for statuses in its status gauges (0: unknown).
_DEPLOYMENT_STATUS_NUMBER = {DeploymentStatus.DEPLOY_FAILED: 1, DeploymentStatus.UNHEALTHY: 2,
                             DeploymentStatus.UPDATING: 3, DeploymentStatus.UPSCALING: 4,
                             DeploymentStatus.DOWNSCALING: 5, DeploymentStatus.HEALTHY: 6}
_APP_STATUS_NUMBER = {ApplicationStatus.DEPLOY_FAILED: 1, ApplicationStatus.UNHEALTHY: 2,
                      ApplicationStatus.NOT_STARTED: 3, ApplicationStatus.DELETING: 4,
                      ApplicationStatus.DEPLOYING: 5, ApplicationStatus.RUNNING: 6}
#: Ray's buckets for replica start and stop times, ms.
_LIFECYCLE_MS_BUCKETS = (5, 20, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 20000, 30000, 60000, 120000, 300000)
#: The controller's gauges set afresh at each snapshot.
_SNAPSHOT_GAUGES = (
    "ray_serve_deployment_replica_healthy", "flotilla_deployment_replicas", "flotilla_deployment_target_replicas",
    "ray_serve_deployment_queued_queries", "flotilla_replica_cpu_cores", "flotilla_deployment_cpu_cores",
    "flotilla_replica_memory_uss_bytes", "flotilla_replica_memory_pss_bytes", "flotilla_replica_memory_shared_bytes",
    "ray_serve_deployment_status", "ray_serve_application_status", "ray_serve_autoscaling_target_replicas",
    "ray_serve_autoscaling_desired_replicas", "ray_serve_autoscaling_total_requests",
    "ray_serve_autoscaling_policy_execution_time_ms", "ray_serve_autoscaling_target_ongoing_requests",
)


def declare_ray_controller_metrics(m: Store) -> None:
    """The controller's metrics in Ray's monitoring guide: status, lifecycle, autoscaling."""
    dep = ("deployment", "application")
    m.declare("gauge", "ray_serve_deployment_status", "Deployment status as a number: 0 unknown, 1 DEPLOY_FAILED, "
              "2 UNHEALTHY, 3 UPDATING, 4 UPSCALING, 5 DOWNSCALING, 6 HEALTHY.", dep)
    m.declare("gauge", "ray_serve_application_status", "Application status as a number: 0 unknown, 1 DEPLOY_FAILED, "
              "2 UNHEALTHY, 3 NOT_STARTED, 4 DELETING, 5 DEPLOYING, 6 RUNNING.", ("application",))
    for name, doc in (("ray_serve_replica_startup_latency_ms", "Time from a replica's placement to ready, ms."),
                      ("ray_serve_replica_initialization_latency_ms", "Time a replica's constructor ran, ms."),
                      ("ray_serve_replica_shutdown_duration_ms", "Time from telling a replica to stop to its exit, ms.")):
        m.declare("histogram", name, doc, dep, _LIFECYCLE_MS_BUCKETS)
    m.declare("histogram", "ray_serve_replica_reconfigure_latency_ms", "Time a replica took to apply a new config, ms.",
              dep, LATENCY_MS_BUCKETS)
    m.declare("histogram", "ray_serve_health_check_latency_ms", "Time a health check took, ms.", dep, LATENCY_MS_BUCKETS)
    m.declare("counter", "ray_serve_health_check_failures", "Failed health checks.", dep)
    m.declare("histogram", "ray_serve_routing_stats_delay_ms", "Time a replica's record_routing_stats() answer took "
              "to reach the controller, ms.", dep, LATENCY_MS_BUCKETS)
    m.declare("counter", "ray_serve_routing_stats_error", "record_routing_stats() calls that raised "
              "(error_type exception) or timed out (timeout).", ("deployment", "replica", "application", "error_type"))
    m.declare("gauge", "ray_serve_autoscaling_target_replicas", "Replicas the autoscaler aims for.", dep)
    m.declare("gauge", "ray_serve_autoscaling_desired_replicas", "Replicas the load asks for, before bounds and delays.", dep)
    m.declare("gauge", "ray_serve_autoscaling_total_requests", "Requests running and queued, as the autoscaler saw them.", dep)
    m.declare("gauge", "ray_serve_autoscaling_target_ongoing_requests", "target_ongoing_requests per replica.", dep)
    m.declare("gauge", "ray_serve_autoscaling_policy_execution_time_ms", "Time the autoscaling policy ran, ms.",
              (*dep, "policy_scope"))


@dataclass(eq=False)
class Replica:
    id: str
    dep: Deployment
    spec: dict[str, Any]  # what it runs: its version's code and config
    state: RState = RState.PENDING
    alloc: Allocation | None = None
    proc: Process | None = None
    peer: RpcPeer | None = None
    sock: str = ""
    placed_at: float = 0.0
    node: str = ""  # the Ray node it runs on, once it registered ("" on the local backend)
    models: tuple[str, ...] = ()
    in_flight: int = 0  # running + queued in it, at the last stats sample
    config_sent: dict[str, Any] | None = None  # the light config it was last given
    config_want: dict[str, Any] | None = None  # the next one to give it
    config_task: asyncio.Task[None] | None = None
    # Re-adopted by a restarted head from its checkpoint: set once it reconnected (or expired).
    adopted: asyncio.Event | None = None
    rank: ReplicaRank | None = None  # from its registration until it is gone
    world_size: int = 1  # the deployment's size when it was given its rank

    @property
    def awaiting_reattach(self) -> bool:
        return self.adopted is not None and not self.adopted.is_set()
    slow_logged: bool = False  # its slow start was logged (once)
    stopping_at: float = 0.0  # monotonic time it was told to stop (0 before)
    startup_s: float | None = None  # placed to ready (process start plus the constructor)
    memory: Memory | None = None  # its process's RSS/PSS/USS/shared at the last sample (local)
    routing_stats: dict[str, Any] | None = None  # its `record_routing_stats()`, last answered
    stats_task: asyncio.Task[None] | None = None  # polls `record_routing_stats()` (custom routers)
    #: set when its config changes in place: the health loop takes the new period at once
    health_wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def version(self) -> str:
        return str(self.spec["version"])

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def label(self) -> str:
        return f"{self.dep.app}/{self.dep.name}"

    @property
    def placed_wall_s(self) -> float | None:
        """When it was placed, in epoch seconds (`placed_at` is monotonic); None before."""
        return time.time() - (time.monotonic() - self.placed_at) if self.placed_at else None


@dataclass
class Death:
    """A replica that went away without being asked (`Deployment.deaths`)."""

    id: str
    pid: int | None
    reason: str
    time_s: float  # wall clock
    log: str


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
    #: A replica of a version that has not served yet failed to start (it retries; UPDATING)
    start_msg: str = ""
    deleting: bool = False
    autoscale: AutoscalerState | None = None
    scaling: int = 0  # +1 / -1 while a scaling step (autoscaler or new num_replicas) is carried out
    scaling_from: int = 0  # the target that step started from (the status message says it)
    # Replicas that died or were killed while serving, newest last: routers fail what they
    # had in flight on them at once (their connections may never close: a vanished node).
    dead: deque[str] = field(default_factory=lambda: deque(maxlen=DEAD_KEPT))
    #: Replicas replaced after dying, failing a health check or being killed, newest last.
    deaths: deque[Death] = field(default_factory=lambda: deque(maxlen=DEATHS_KEPT))
    #: Seconds the latest replica took from placed to ready (the doctor's cold-start check).
    startup_s: float | None = None
    #: The latest version a replica of which became ready: a version that has served is not
    #: failed by failed starts (they back off instead), as in Ray Serve.
    started_version: str | None = None
    #: No replica is started before this (monotonic clock): the backoff after failed starts.
    retry_at: float = 0.0
    ranks: DeploymentRanks = field(default_factory=DeploymentRanks)
    #: The replicas holding a rank when the ranks were last made contiguous.
    ranked: frozenset[str] = frozenset()
    #: The count the external scaler set last (kept across redeploys while its application
    #: has external_scaler_enabled, as Ray's)
    external_target: int | None = None
    #: Its ASGI app's route templates, as its latest ready replica read them
    #: (`asgiroutes.templates`): the proxies name requests by them
    route_templates: list[Any] | None = None

    @property
    def version(self) -> str:
        return str(self.spec["version"])

    def scaled_from(self, old: int) -> None:
        """`target` was just moved from `old`: a scaling step, as the status tells it."""
        self.scaling, self.scaling_from = (1 if self.target > old else -1), old

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
    #: POST .../deployments/<name>/scale may set its deployments' replica counts (Ray 2.60)
    external_scaler_enabled: bool = False
    #: Ray 2.60's application-level autoscaling policy (a config file's `autoscaling_policy`):
    #: its `AutoscalingPolicy` as JSON, and what the autoscaler keeps for it (`AppPolicy`)
    autoscaling_policy: dict[str, Any] | None = None
    app_policy: Any = None
    #: Deployed from a config file (`flotilla deploy`): its replica counts follow the
    #: config's target_capacity; an application deployed from code (`serve.run`) is not scaled
    declarative: bool = False


@dataclass
class Split:
    """A split route: HTTP requests at `route_prefix` go to one of the `traffic` apps by weight."""

    name: str
    route_prefix: str
    traffic: dict[str, float]
    sticky_header: str | None = None
    sticky_cookie: str | None = None
    canary: CanaryRun | None = None  # a canary rollout moving its weights (serve.start_canary)

    def plain(self) -> dict[str, Any]:
        return {"name": self.name, "route_prefix": self.route_prefix, "traffic": dict(self.traffic),
                "sticky_header": self.sticky_header, "sticky_cookie": self.sticky_cookie}


@dataclass
class Shadow:
    """A shadowed route: `fraction` of the HTTP requests on route `route` (an application's
    or a split's) are mirrored to application `target` (`serve.set_shadow`)."""

    route: str
    target: str
    fraction: float
    max_queue: int = 100

    def plain(self) -> dict[str, Any]:
        return {"route": self.route, "target": self.target, "fraction": self.fraction, "max_queue": self.max_queue}


def _summary(message: str) -> str:
    """One line of a deploy failure for callers: its first line, and when that introduces
    what follows ("Last error:"), the last line after it (the exception)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if not lines:
        return ""
    first = lines[0]
    if first.endswith(":") and len(lines) > 1:
        first = f"{first} {lines[-1]}"
    return first[:500]


class Controller:
    def __init__(self, session_dir: str, head_sock: str, pool: ResourcePool, supervisor: Supervisor) -> None:
        self.session_dir = session_dir
        self.head_sock = head_sock
        self.pool = pool
        self.supervisor = supervisor
        self.apps: dict[str, App] = {}
        #: The applied config file's target_capacity (percent) and which way it moves
        self.target_capacity: float | None = None
        self.capacity_direction: capacity.Direction | None = None
        self.splits: dict[str, Split] = {}  # traffic splits by name (serve.set_traffic)
        self.shadows: dict[str, Shadow] = {}  # shadowed routes by route name (serve.set_shadow)
        self.replicas: dict[str, Replica] = {}
        self.subs: dict[Any, set[RpcPeer]] = {}
        self.changed = asyncio.Condition()
        self._dirty = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.proxy: Any = None  # set by the head (ProxyManager)
        self.autoscaler = Autoscaler(self)
        self.canary = CanaryLoop(self)
        self.templates = Templates(supervisor)
        self.template_memory: dict[tuple[str, str, str], Memory] = {}  # (app, deployment, version) ->
        self.on_change: Any = None  # set by the head: schedules a checkpoint write
        self.metrics = Store()
        m = self.metrics
        m.declare("counter", "ray_serve_deployment_replica_starts", "Replica processes started.", ("deployment", "application"))
        m.declare("counter", "flotilla_deployment_replica_restarts", "Replicas replaced after dying or failing a health check.", ("deployment", "application"))
        m.declare("counter", "flotilla_deployment_health_check_failures", "Failed replica health checks.", ("deployment", "application"))
        m.declare("gauge", "ray_serve_deployment_replica_healthy", "1 for each running replica.", ("deployment", "replica", "application"))
        m.declare("gauge", "flotilla_deployment_replicas", "Replicas by state.", ("deployment", "application", "state"))
        m.declare("gauge", "flotilla_deployment_target_replicas", "Replicas the controller aims for (the autoscaler's target when autoscaling).", ("deployment", "application"))
        m.declare("gauge", "ray_serve_deployment_queued_queries", "Requests waiting in routers for a replica.", ("deployment", "application"))
        m.declare("counter", "flotilla_replica_memory_kills", "Replicas killed for memory: over their own `memory` (memory_limit) or the replica using the most when the machine was over its threshold (machine_threshold).", ("deployment", "application", "reason"))
        m.declare("counter", "flotilla_replica_startup_timeouts", "Replicas killed because their constructor ran past FLOTILLA_REPLICA_STARTUP_TIMEOUT_S.", ("deployment", "application"))
        m.declare("gauge", "flotilla_replica_cpu_cores", "CPU cores a replica's processes used over the last sample (local backend).", ("deployment", "replica", "application"))
        m.declare("gauge", "flotilla_replica_memory_uss_bytes", "A replica process's private memory (USS: what its exit frees) at the last sample (local backend).", ("deployment", "replica", "application"))
        m.declare("gauge", "flotilla_replica_memory_pss_bytes", "A replica process's proportional memory (PSS: each shared page split between the processes mapping it) at the last sample (local backend).", ("deployment", "replica", "application"))
        m.declare("gauge", "flotilla_replica_memory_shared_bytes", "A replica process's resident memory shared with other processes (e.g. copy-on-write from a template) at the last sample (local backend).", ("deployment", "replica", "application"))
        m.declare("gauge", "flotilla_deployment_cpu_cores", "CPU cores a deployment's replicas used over the last sample (local backend).", ("deployment", "application"))
        declare_ray_controller_metrics(m)
        self.watch = Watch()  # CPU and latency samples behind the live findings (findings.py)
        self.live_findings: dict[tuple[str, str, str], list[Any]] = {}
        self._autoscale_wake = asyncio.Event()
        self.limits = Limits.from_env()
        self._mem_victim: Replica | None = None  # killed for the machine threshold, not gone yet

    def kick_autoscaler(self) -> None:
        self._autoscale_wake.set()

    def all_deployments(self) -> list[Deployment]:
        return [d for a in self.apps.values() for d in a.deployments.values()]

    def find(self, key: Any) -> Deployment | None:
        app = self.apps.get(key[1])
        return app.deployments.get(key[2]) if app is not None else None

    # ---- helpers ----------------------------------------------------------------------
    def _spawn_task(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def kick(self) -> None:
        self._dirty.set()
        self._changed()

    def _changed(self) -> None:
        """Desired state or the replica set changed: the head checkpoints it (coalesced)."""
        if self.on_change is not None:
            self.on_change()

    async def run(self) -> None:
        self._spawn_task(self.autoscaler.run())
        self._spawn_task(self.canary.run())
        # Replicas over their `memory`, and the machine's usage.
        self._spawn_task(self._local_loop(self.limits.memory_monitor_refresh_s, self._check_memory, "memory check"))
        # The CPU each replica used and what it runs (live findings, the cpu_cores gauges) and
        # its memory (status's replica_memory, the memory gauges).
        self._spawn_task(self._local_loop(sample_s(), self._sample_cpu, "cpu sample"))
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), 0.5)
            except TimeoutError:
                pass
            self._dirty.clear()
            try:
                await self._sample_load()
                self.reconcile()
            except Exception:
                logger.exception("reconcile failed")

    async def _sample_load(self) -> None:
        """Refresh `in_flight` of serving replicas that reconcile may pick to stop."""
        picks: list[Replica] = []
        for dep in self.all_deployments():
            if dep.deleting or dep.failed_msg:
                continue
            serving = [r for r in dep.replicas.values() if r.state.routable]
            current = [r for r in dep.replicas.values() if r.version == dep.version and r.state is not RState.DRAINING]
            if len(current) > dep.target or any(r.version != dep.version for r in serving):
                picks.extend(r for r in serving if r.peer is not None)
        if not picks:
            return
        results = await asyncio.gather(
            *(asyncio.wait_for(r.peer.call("stats"), LOAD_SAMPLE_TIMEOUT_S) for r in picks if r.peer is not None),
            return_exceptions=True,
        )
        for r, res in zip(picks, results, strict=True):
            if isinstance(res, dict):
                r.in_flight = int(res["ongoing"]) + int(res["queued"])

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
            out = {
                "exists": True,
                "replicas": [(r.id, r.sock, r.models) for r in dep.replicas.values() if r.state.routable],
                "max_ongoing_requests": dep.config["max_ongoing_requests"],
                "max_queued_requests": dep.config["max_queued_requests"],
                "backpressure": dep.config.get("backpressure_config"),
                "dead": list(dep.dead),
                # Its version failed to deploy (DEPLOY_FAILED): with no replica left, calls fail.
                "failed": _summary(dep.failed_msg),
            }
            if dep.spec.get("router_cls"):  # a custom request router (`serve.request_router`)
                rr = dep.config.get("request_router_config") or {}
                out["request_router"] = {
                    "cls": dep.spec["router_cls"], "kwargs": rr.get("request_router_kwargs") or {},
                    **{k: rr[k] for k in ("initial_backoff_s", "backoff_multiplier", "max_backoff_s") if k in rr},
                }
                out["routing_stats"] = {r.id: r.routing_stats for r in dep.replicas.values()
                                        if r.state.routable and r.routing_stats}
                out["replica_nodes"] = {r.id: r.node for r in dep.replicas.values() if r.node}
            return out
        if key[0] == "routes":
            return self.routes()
        if key[0] == "shadows":
            return self.shadow_table()
        if key[0] == "split":
            sp = self.splits.get(key[1])
            if sp is None:
                return {"exists": False}
            return {"exists": True, "variants": self._variants(sp)}
        raise KeyError(key)

    def publish(self, key: tuple[Any, ...]) -> None:
        self._changed()
        peers = self.subs.get(key)
        if not peers:
            return
        v = self.value(key)
        for p in list(peers):
            p.notify("update", key, v)
        if key[0] == "routes" and self.shadows:  # a shadow follows its route's and target's apps
            self.publish(("shadows",))

    def routes(self) -> dict[str, Any]:
        """The proxy's route table: prefix -> (app, ingress[, route templates]) for an app's own route, or a dict
        for a split route (its variants, the apps that exist now, and its sticky key)."""
        table: dict[str, Any] = {
            a.route_prefix: self._route_entry(a)
            for a in self.apps.values()
            if a.route_prefix is not None and not a.deleting
        }
        for sp in self.splits.values():
            table[sp.route_prefix] = {
                "split": sp.name, "variants": self._variants(sp),
                "sticky_header": sp.sticky_header, "sticky_cookie": sp.sticky_cookie,
            }
        return table

    def _route_entry(self, a: App) -> tuple[Any, ...]:
        """(app, ingress), plus the ingress's route templates when its app has them."""
        dep = a.deployments.get(a.ingress)
        tmpl = dep.route_templates if dep is not None else None
        return (a.name, a.ingress, tmpl) if tmpl else (a.name, a.ingress)

    def _variants(self, sp: Split) -> list[tuple[str, str, str | None, float]]:
        """(app, ingress, the app's own route prefix, weight) of each variant that exists now."""
        out = []
        for name, w in sp.traffic.items():
            a = self._live_app(name)
            if a is not None:
                out.append((name, a.ingress, a.route_prefix, w))
        return out

    # ---- traffic splits -------------------------------------------------------------------
    def set_traffic(self, spec: dict[str, Any]) -> None:
        """Create or update a split route (validated by the caller: weights, prefix shape)."""
        name = spec["name"]
        prefix = spec["route_prefix"]
        traffic = dict(spec["traffic"])
        if self.proxy is not None and self.proxy.direct is not None:
            raise ConfigError(
                "traffic splits need the HTTP proxy: with direct ingress the application's "
                "replicas answer HTTP themselves, so no one could route by weight."
            )
        if name in self.apps and not self.apps[name].deleting:
            raise ConfigError(
                f"\"{name}\" is the name of an application; a traffic split needs a name of its own "
                f"(handles look both up by name)."
            )
        unknown = [a for a in traffic if self._live_app(a) is None]
        if unknown:
            have = sorted(a.name for a in self.apps.values() if not a.deleting)
            raise ConfigError(
                f"traffic split \"{name}\" names unknown application(s) {', '.join(map(repr, unknown))}; "
                f"running applications: {have}. Deploy them first (serve.run(..., name=...))."
            )
        for a in self.apps.values():
            if a.route_prefix == prefix and not a.deleting:
                raise ConfigError(
                    f"Prefix {prefix} is being used by application \"{a.name}\"; traffic split "
                    f"\"{name}\" needs a route_prefix of its own."
                )
        for other in self.splits.values():
            if other.name != name and other.route_prefix == prefix:
                raise ConfigError(
                    f"Prefix {prefix} is being used by traffic split \"{other.name}\"; traffic "
                    f"split \"{name}\" needs a route_prefix of its own."
                )
        self.splits[name] = Split(name, prefix, traffic, spec.get("sticky_header"), spec.get("sticky_cookie"))
        logger.info("traffic split %r at %s: %s", name, prefix, traffic)
        self.publish(("split", name))
        self.publish(("routes",))

    def start_canary(self, spec: dict[str, Any]) -> None:
        """Make split `spec["name"]` a canary from app `old` to app `new` (a new split, or one
        whose weights the canary now owns), starting at the first step."""
        from flotilla._private.canary import CanaryConfig

        old, new = spec["old"], spec["new"]
        config = CanaryConfig(**spec["config"])
        self.set_traffic({**spec, "traffic": {old: 1.0 - config.steps[0], new: config.steps[0]}})
        split = self.splits[spec["name"]]
        split.canary = self.canary.begin(split, config, old, new)
        self._changed()

    def delete_traffic(self, name: str) -> bool:
        if self.splits.pop(name, None) is None:
            return False
        logger.info("traffic split %r deleted", name)
        self.publish(("split", name))
        self.publish(("routes",))
        return True

    # ---- shadow traffic --------------------------------------------------------------------
    def _live_app(self, name: str) -> App | None:
        a = self.apps.get(name)
        return a if a is not None and not a.deleting else None

    def _route_prefix_of(self, name: str) -> str | None:
        """The HTTP route prefix of application or split `name`, or None."""
        if name in self.splits:
            return self.splits[name].route_prefix
        a = self._live_app(name)
        return a.route_prefix if a is not None else None

    def set_shadow(self, spec: dict[str, Any]) -> None:
        """Mirror a fraction of route `route`'s requests to application `target` (fraction and
        queue size are checked by the caller)."""
        route, target = spec["route"], spec["target"]
        have = sorted(a.name for a in self.apps.values() if not a.deleting)
        if self._route_prefix_of(route) is None:
            raise ConfigError(
                f"set_shadow: \"{route}\" is neither an application with an HTTP route nor a traffic "
                f"split; applications: {have}, traffic splits: {sorted(self.splits)}.")
        if self._live_app(target) is None:
            raise ConfigError(
                f"set_shadow: target application \"{target}\" does not exist; applications: {have}. "
                f"Deploy it first (serve.run(..., name=...)).")
        if target == route:
            raise ConfigError(f"set_shadow: \"{route}\" cannot mirror to itself.")
        self.shadows[route] = Shadow(route, target, float(spec["fraction"]), int(spec.get("max_queue", 100)))
        logger.info("shadow traffic on %r: %g to %r", route, spec["fraction"], target)
        self.publish(("shadows",))

    def delete_shadow(self, route: str) -> bool:
        if self.shadows.pop(route, None) is None:
            return False
        logger.info("shadow traffic on %r deleted", route)
        self.publish(("shadows",))
        return True

    def shadow_table(self) -> dict[str, Any]:
        """The proxies' shadowed routes: route prefix -> target (its ingress and own prefix),
        fraction, queue size; a shadow whose route or target does not exist now is left out."""
        out: dict[str, Any] = {}
        for sh in self.shadows.values():
            prefix = self._route_prefix_of(sh.route)
            target = self._live_app(sh.target)
            if prefix is None or target is None:
                continue
            out[prefix] = {"route": sh.route, "target": sh.target, "ingress": target.ingress,
                           "target_prefix": target.route_prefix, "fraction": sh.fraction,
                           "max_queue": sh.max_queue}
        return out

    def _shadow_status(self) -> dict[str, Any]:
        out = {}
        for sh in self.shadows.values():
            missing = [n for n, ok in ((sh.route, self._route_prefix_of(sh.route) is not None),
                                       (sh.target, self._live_app(sh.target) is not None)) if not ok]
            out[sh.route] = ShadowStatus(
                route_prefix=self._route_prefix_of(sh.route), target=sh.target, fraction=sh.fraction,
                max_queue=sh.max_queue,
                message=f"{missing} do not exist now: not mirroring" if missing else "")
        return out

    def _splits_changed(self) -> None:
        """An application came or went: splits naming it publish their new variants."""
        for sp in self.splits.values():
            self.publish(("split", sp.name))

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
            for sp in self.splits.values():
                if sp.route_prefix == prefix:
                    raise ConfigError(
                        f"Prefix {prefix} is being used by traffic split \"{sp.name}\". Failed to "
                        f"deploy application \"{name}\". Pick another route_prefix, or "
                        f"serve.delete_traffic(\"{sp.name}\") first."
                    )
        if name in self.splits:
            raise ConfigError(
                f"\"{name}\" is the name of a traffic split; pick another application name, or "
                f"serve.delete_traffic(\"{name}\") first."
            )
        if spec.get("external_scaler_enabled"):
            scaled = [d["name"] for d in spec["deployments"] if d["config"].get("autoscaling_config")]
            if scaled:
                raise ConfigError(
                    f"Application \"{name}\" has external_scaler_enabled, which is mutually exclusive with "
                    f"autoscaling: deployment(s) {', '.join(map(repr, scaled))} set autoscaling_config. Remove "
                    "it (give num_replicas instead), or deploy without external_scaler_enabled.")
        if spec.get("autoscaling_policy"):
            own = [d["name"] for d in spec["deployments"]
                   if (d["config"].get("autoscaling_config") or {}).get("policy")]
            if own:
                logger.warning("application %r: its autoscaling_policy takes precedence over the policy of "
                               "deployment(s) %s", name, ", ".join(own))
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
        app.external_scaler_enabled = bool(spec.get("external_scaler_enabled", False))
        app.declarative = bool(spec.get("declarative", False))
        if spec.get("autoscaling_policy") != app.autoscaling_policy:
            app.autoscaling_policy = spec.get("autoscaling_policy")
            app.app_policy = None  # loaded again, its state fresh
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
        self._splits_changed()
        self.publish(("routes",))
        self.kick()

    def _deploy_one(self, app: App, d: dict[str, Any]) -> None:
        cfg = d["config"]
        tc, direction = self.capacity_of(app)
        dep = app.deployments.get(d["name"])
        if dep is None or dep.deleting:
            state = make_state(cfg)
            dep = Deployment(app.name, d["name"], d, self._start_target(d, state, tc, direction))
            dep.autoscale = state
            app.deployments[d["name"]] = dep
            self.publish(dep.key)
            return
        old_cfg, old_version, old_target = dep.config, dep.version, dep.target
        dep.spec = d
        if cfg.get("autoscaling_config") != old_cfg.get("autoscaling_config"):
            state = make_state(cfg)
            if cfg.get("autoscaling_config") is None or old_cfg.get("autoscaling_config") is None:
                dep.target = self._start_target(d, state, tc, direction)
            dep.autoscale = state
        if dep.autoscale is not None:
            dep.autoscale.set_capacity(tc, direction)
            dep.target = dep.autoscale.bounded(dep.target)
        else:
            dep.target = self._start_target(d, None, tc, direction)
            if app.external_scaler_enabled and dep.external_target is not None:
                dep.target = dep.external_target  # a redeploy keeps the external scaler's count
        if not app.external_scaler_enabled:
            dep.external_target = None
        dep.failed_msg = ""
        dep.start_msg = ""
        dep.failures = 0
        dep.retry_at = 0.0
        dep.status = DeploymentStatus.UPDATING
        dep.trigger = DeploymentStatusTrigger.CONFIG_UPDATE_STARTED
        if dep.version == old_version and dep.target != old_target and _only_count_changed(cfg, old_cfg):
            # As Ray Serve: a new replica count alone scales (the application stays RUNNING).
            dep.scaled_from(old_target)
            dep.status = DeploymentStatus.UPSCALING if dep.scaling > 0 else DeploymentStatus.DOWNSCALING
        # Replicas of this version take the new config; serving ones apply it in place.
        for r in dep.replicas.values():
            if r.version == dep.version and r.state is not RState.DRAINING:
                if r.spec["config"] != d["config"]:
                    r.health_wake.set()
                r.spec = d
                if r.rank is not None:
                    r.world_size = world_size(dep)
                if r.state.routable:
                    self._reconfigure(r)
                    self._watch_routing_stats(r)
        self.publish(dep.key)

    def capacity_of(self, app: App) -> tuple[float | None, capacity.Direction | None]:
        """The target capacity `app`'s replica counts follow (None for a `serve.run` app)."""
        return (self.target_capacity, self.capacity_direction) if app.declarative else (None, None)

    @staticmethod
    def _start_target(d: dict[str, Any], state: AutoscalerState | None, tc: float | None,
                      direction: capacity.Direction | None) -> int:
        """A deployment's first target at target capacity `tc`: its num_replicas scaled, or its
        initial_replicas (else its lower bound) within its scaled autoscaling bounds."""
        if state is None:
            return capacity.adjusted(d["initial_replicas"], tc)
        if tc is None:
            return int(d["initial_replicas"])
        state.set_capacity(tc, direction)
        start = state.cfg.initial_replicas
        return state.bounded(state.lo if start is None else start)

    def set_target_capacity(self, target_capacity: float | None, same_applications: bool) -> None:
        """A config file with `target_capacity` was applied (`same_applications`: it names the
        applications the one before did): every deployment of every application deployed from
        a config scales to it."""
        new_direction = capacity.direction(self.target_capacity, target_capacity, same_applications,
                                           self.capacity_direction)
        if target_capacity != self.target_capacity:
            logger.info("target capacity %s from %s to %s", (new_direction or "set").lower(),
                        self.target_capacity, target_capacity)
        self.target_capacity, self.capacity_direction = target_capacity, new_direction
        for app in self.apps.values():
            if not app.declarative or app.deleting:
                continue
            for dep in app.deployments.values():
                if dep.deleting:
                    continue
                if dep.autoscale is not None:
                    dep.autoscale.set_capacity(target_capacity, new_direction)
                    new = dep.autoscale.bounded(dep.target)
                elif app.external_scaler_enabled and dep.external_target is not None:
                    continue  # the external scaler's count stands
                else:
                    new = capacity.adjusted(dep.spec["initial_replicas"], target_capacity)
                if new != dep.target:
                    old, dep.target = dep.target, new
                    dep.scaled_from(old)
                    dep.status = DeploymentStatus.UPSCALING if new > old else DeploymentStatus.DOWNSCALING
                    dep.trigger = DeploymentStatusTrigger.CONFIG_UPDATE_STARTED
                    self.publish(dep.key)
        self.kick()

    def _reconfigure(self, r: Replica) -> None:
        want = replica_light(r)
        if want == r.config_sent and r.config_want is None:
            return
        r.config_want = want  # latest wins: a call in progress is followed by this one only
        if r.config_task is None or r.config_task.done():
            r.config_task = self._spawn_task(self._config_loop(r))

    async def _config_loop(self, r: Replica) -> None:
        """Give `r` its latest config, one `update_config` call at a time."""
        while r.config_want is not None and r.state.routable and r.peer is not None:
            want, r.config_want = r.config_want, None
            if want == r.config_sent:
                continue
            # A new rank alone (ranks compacted after a rollout or scale-down) is news for the
            # replica, not a config change: it keeps RUNNING and its deployment stays HEALTHY.
            if r.state is RState.RUNNING and not same_user_config(want, r.config_sent):
                transition(r, RState.UPDATING, "applying a new config in place")
                self.publish(r.dep.key)
            state = r.state
            began = time.perf_counter()
            try:
                await asyncio.wait_for(r.peer.call("update_config", want), RECONFIGURE_TIMEOUT_S)
            except Exception as e:
                if r.state is not state:
                    return  # stopped or gone meanwhile
                if not isinstance(e, TimeoutError) and not same_user_config(want, r.config_sent):
                    self._refused(r, e)
                    return
                why = (f"did not finish within {RECONFIGURE_TIMEOUT_S:g}s" if isinstance(e, TimeoutError)
                       else f"failed: {e}")
                logger.error("reconfigure of replica %s %s; replacing it", r.id, why)
                r.dep.unhealthy_msg = f"reconfigure() on replica {r.id} {why}; replacing it."
                self._stop_replica(r, False, f"reconfigure() {why}")
                return
            self.metrics.observe("ray_serve_replica_reconfigure_latency_ms", (r.dep.name, r.dep.app),
                                 (time.perf_counter() - began) * 1000.0)
            r.config_sent = want
        if r.state is RState.UPDATING:
            transition(r, RState.RUNNING, "config applied")
            self.publish(r.dep.key)
            self.kick()

    def _refused(self, r: Replica, e: Exception) -> None:
        """`r`'s reconfigure() raised on a new user_config: the update fails (DEPLOY_FAILED,
        no replica started with it) and `r` keeps serving with the config it had, as the old
        replicas of a version whose constructor fails keep serving."""
        dep = r.dep
        logger.error("reconfigure of replica %s refused the new user_config: %s", r.id, e)
        if not dep.failed_msg:
            dep.failed_msg = (
                f"reconfigure() refused the new user_config on replica {r.id}: {e}\n"
                "The replicas keep serving with the config they had; deploy a user_config that "
                "reconfigure() accepts to update them."
            )
        if r.state is RState.UPDATING:
            transition(r, RState.RUNNING, "reconfigure() refused the new config; serving with the one it had")
        self.publish(dep.key)
        self.kick()

    def scale_deployment(self, app_name: str, name: str, target: int) -> None:
        """Ray 2.60's external scaling API: `target` replicas for a deployment of an application
        deployed with `external_scaler_enabled`. Raises LookupError (no such application or
        deployment), ExternalScalerDisabledError, or DeploymentUnavailableError (being deleted).
        The count is kept through redeploys (`external_target`)."""
        from flotilla.serve.exceptions import (
            DeploymentUnavailableError,
            ExternalScalerDisabledError,
        )

        app = self.apps.get(app_name)
        if app is None or app.deleting:
            raise LookupError(f"Application '{app_name}' not found")
        if not app.external_scaler_enabled:
            raise ExternalScalerDisabledError(
                f"Cannot update replicas for deployment '{name}' in application '{app_name}'. The "
                "external scaling API can only be used when 'external_scaler_enabled' is set to true "
                "for the application (serve.run(..., external_scaler_enabled=True), or "
                "'external_scaler_enabled: true' in its config). Current value: external_scaler_enabled=false.")
        dep = app.deployments.get(name)
        if dep is None:
            raise LookupError(f"Deployment '{name}' not found in application '{app_name}'")
        if dep.deleting:
            raise DeploymentUnavailableError(f"Deployment '{name}' in application '{app_name}' is being deleted.")
        if target < 0:
            raise ValueError(f"target_num_replicas must be >= 0, got {target}")
        dep.external_target = target
        if target == dep.target:
            return
        logger.info("external scaler: %s/%s from %d to %d replicas", app_name, name, dep.target, target)
        old, dep.target = dep.target, target
        dep.scaled_from(old)
        self.publish(dep.key)
        self.kick()

    def delete_app(self, name: str) -> bool:
        app = self.apps.get(name)
        if app is None:
            return False
        app.deleting = True
        app.status = ApplicationStatus.DELETING
        for dep in app.deployments.values():
            self._delete_deployment(dep)
        self._splits_changed()
        self.publish(("routes",))
        self.kick()
        return True

    def _delete_deployment(self, dep: Deployment) -> None:
        """Stop `dep`'s replicas; until they are gone it is UPDATING (trigger DELETING), as in
        Ray, so an application that drops it is DEPLOYING until then."""
        dep.deleting = True
        dep.target = 0
        dep.status, dep.trigger, dep.message = DeploymentStatus.UPDATING, DeploymentStatusTrigger.DELETING, ""
        self.publish(dep.key)
        for r in list(dep.replicas.values()):
            self._stop_replica(r, True, "deployment deleted")

    def _finish_delete(self, app: App) -> None:
        if self.apps.get(app.name) is app:
            del self.apps[app.name]
        for dep in app.deployments.values():
            self.publish(dep.key)

    # ---- replica lifecycle --------------------------------------------------------------
    def _new_replica(self, dep: Deployment) -> Replica:
        rid = secrets.token_hex(4)
        r = Replica(rid, dep, dep.spec)
        r.sock = os.path.join(self.session_dir, f"r-{rid}.sock")
        dep.replicas[rid] = r
        self.replicas[rid] = r
        return r

    def _place(self, r: Replica) -> bool:
        """Allocate `r`'s resources and fork it (PENDING -> STARTING); False if they do not fit."""
        alloc = self.pool.try_allocate(r.spec["demand"])
        if alloc is None:
            return False
        r.alloc = alloc
        r.placed_at = time.monotonic()
        transition(r, RState.STARTING, "resources allocated")
        self._spawn_task(self._spawn(r))
        return True

    def _log_path(self, r: Replica) -> str:
        folder = (r.spec["config"].get("logging_config") or {}).get("logs_dir")
        return os.path.join(folder or os.path.join(self.session_dir, "logs"), f"replica_{r.dep.app}_{r.dep.name}_{r.id}.log")

    @staticmethod
    def version_env(spec: dict[str, Any]) -> dict[str, str]:
        """The environment every replica of the version `spec` gets (and its template)."""
        env = dict(spec.get("env", {}))
        ncpu = spec["config"]["ray_actor_options"].get("num_cpus", 1) or 0
        if "OMP_NUM_THREADS" not in env and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, int(ncpu)))
        return env

    def replica_env(self, r: Replica) -> dict[str, str]:
        env = self.version_env(r.spec)
        if r.alloc is not None and r.alloc.gpu_shares:
            env["CUDA_VISIBLE_DEVICES"] = visible_devices(r.alloc.gpu_ids, os.environ.get("CUDA_VISIBLE_DEVICES"))
        env["FLOTILLA_REPLICA_ID"] = r.id
        return env

    async def _template(self, dep: Deployment, spec: dict[str, Any]) -> Template | None:
        """The ready fork_after_init template of the version `spec` is, if it asks for one and can
        have one (opened now if needed)."""
        if not spec["config"].get("fork_after_init"):
            return None
        key = (dep.app, dep.name, str(spec["version"]))
        args = {"app": dep.app, "deployment": dep.name, "head_sock": self.head_sock,
                "sys_path": spec.get("sys_path", []), "cwd": spec.get("cwd", ""), "env": self.version_env(spec)}
        folder = (spec["config"].get("logging_config") or {}).get("logs_dir") or os.path.join(self.session_dir, "logs")
        os.makedirs(folder, exist_ok=True)
        return await self.templates.get(key, self.templates.log_path(folder, key), args, spec)

    async def _warm_template(self, dep: Deployment) -> None:
        """Open the template of `dep`'s version before any replica asks (it serves scale-from-zero)."""
        try:
            await self._template(dep, dep.spec)
        except Exception:
            logger.exception("fork_after_init template of %s/%s", dep.app, dep.name)

    async def _spawn(self, r: Replica) -> None:
        dep = r.dep
        try:
            template = await self._template(dep, r.spec)
        except Exception as e:
            logger.error("fork_after_init template of %s/%s: %r", dep.app, dep.name, e)
            template = None
        if r.state is not RState.STARTING:  # stopped while its template was being built
            self._replica_gone(r, "stopped before it started")
            return
        direct = self.proxy.direct if self.proxy is not None else None
        app = self.apps.get(dep.app)
        args = {
            "replica_id": r.id,
            "app": dep.app,
            "deployment": dep.name,
            "sock_path": r.sock,
            "head_sock": self.head_sock,
            "sys_path": r.spec.get("sys_path", []),
            "cwd": r.spec.get("cwd", ""),
            "env": self.replica_env(r),
        }
        if not self.supervisor.local:  # Ray: the actor is created with them, as Ray Serve does
            cfg = r.spec["config"]
            for k in ("ray_actor_options", "placement_group_bundles", "placement_group_strategy",
                      "max_replicas_per_node", "placement_group_bundle_label_selector"):
                args[k] = cfg.get(k)
        if direct is not None and app is not None and app.ingress == dep.name and app.route_prefix is not None:
            args["direct"] = {**direct, "route_prefix": app.route_prefix}
        try:
            log = self._log_path(r)
            os.makedirs(os.path.dirname(log), exist_ok=True)  # a logging_config.logs_dir
            starter = template if template is not None else self.supervisor
            proc = await starter.start("replica", log, args, lambda p: self._on_exit(r, p))
        except Exception as e:
            logger.error("could not start replica %s: %s", r.id, e)
            self._replica_gone(r, f"could not start: {e}")
            return
        r.proc = proc
        self._changed()
        self.metrics.inc("ray_serve_deployment_replica_starts", (dep.name, dep.app))
        logger.info("replica %s of %s/%s forked (pid %d%s)", r.id, dep.app, dep.name, proc.pid,
                    f", from its template, pid {template.pid}" if template is not None else "")
        if r.state is RState.DRAINING:  # stopped while it was being forked
            self.supervisor.kill(proc)

    def register(self, peer: RpcPeer, rid: str, pid: int, addr: str = "", node: str = "") -> dict[str, Any]:
        """A starting replica connected; `addr`: where it serves ("tcp://host:port" for a Ray
        actor; "" for the Unix socket it was given); `node`: its Ray node id."""
        r = self.replicas.get(rid)
        if r is None or r.state is not RState.STARTING:
            raise RuntimeError(f"replica {rid} is not expected")
        if addr:
            r.sock = addr
        r.node = node
        if r.proc is not None and not r.proc.pid:  # a Ray actor: its pid is known from now on
            r.proc.pid = pid
        elif r.proc is not None and r.proc.pid != pid:
            logger.warning("replica %s registered with pid %d, but was forked as pid %d", rid, pid, r.proc.pid)
        r.peer = peer
        if r.adopted is not None:
            r.adopted.set()
        peer.on_close(lambda: self._peer_closed(r))
        s = r.spec
        r.rank = r.dep.ranks.assign(r.id, node)
        r.world_size = world_size(r.dep)
        r.config_sent = replica_light(r)
        return {"config": s["config"], "def_bytes": s["def_bytes"], "args_bytes": s["args_bytes"],
                "rank": r.config_sent["rank"], "world_size": r.world_size, "version": s["version"]}

    # ---- a restarted head: replicas reconnect --------------------------------------------
    def reattach(self, peer: RpcPeer, rid: str, pid: int, phase: str, tb: str, models: list[str],
                 routes: list[Any] | None = None) -> None:
        """A replica of the previous head reconnected: bind it again (its id and pid must match
        the checkpoint). `phase`: "constructing", "ready", "failed" or "draining"; `routes`:
        its ASGI app's route templates."""
        r = self.replicas.get(rid)
        if r is None or r.proc is None or r.proc.pid != pid or r.state in (RState.GONE, RState.PENDING):
            raise RuntimeError(f"replica {rid} (pid {pid}) is not one of this head's replicas")
        r.peer = peer
        if r.adopted is not None:
            r.adopted.set()
        peer.on_close(lambda: self._peer_closed(r))
        r.models = tuple(models)
        logger.info("replica %s of %s (pid %d) reconnected (%s)", rid, r.label, pid, phase)
        if phase == "failed":
            self.replica_failed(rid, tb)
        elif r.state is RState.DRAINING:
            if phase == "draining":  # told to stop by the previous head: wait for its exit
                self._spawn_task(self._await_exit(r))
            else:
                self._spawn_task(self._drain(r, True))
        elif phase == "draining":
            self._stop_replica(r, False, "it was draining when the head restarted")
        elif phase == "ready":
            if r.state is RState.STARTING:
                self.replica_ready(rid, None, routes)
            else:
                self._route_templates(r, routes)
                if r.state is RState.UPDATING:  # a reconfigure was cut short: give it again
                    transition(r, RState.RUNNING, "re-adopted by a restarted head")
                    r.config_sent = None
                self._spawn_task(self._health_loop(r))
                self._watch_routing_stats(r)
                self._reconfigure(r)
        self.publish(r.dep.key)
        self.kick()

    async def _await_exit(self, r: Replica) -> None:
        cfg = r.spec["config"]
        proc = r.proc
        if proc is None:
            return
        if not await self.supervisor.wait(proc, cfg["graceful_shutdown_timeout_s"] + STOP_REPLY_GRACE_S + EXIT_GRACE_S):
            self.supervisor.kill(proc)

    def expire_adopted(self) -> None:
        """Replicas of the previous head that did not reconnect in time: replace them."""
        for r in list(self.replicas.values()):
            if r.awaiting_reattach and r.state is not RState.GONE:
                assert r.adopted is not None
                r.adopted.set()
                logger.warning("replica %s of %s (pid %s) did not reconnect to the restarted head within %gs; replacing it",
                               r.id, r.label, r.pid, REATTACH_TIMEOUT_S)
                if r.state is RState.DRAINING:
                    if r.proc is not None:
                        self.supervisor.kill(r.proc)
                else:
                    self._died(r, "it did not reconnect to the restarted head")

    def replica_models(self, rid: str, model_ids: list[str]) -> None:
        r = self.replicas.get(rid)
        if r is not None and r.state is not RState.GONE:
            r.models = tuple(model_ids)
            self.publish(r.dep.key)

    def replica_ready(self, rid: str, init_s: float | None = None, routes: list[Any] | None = None) -> None:
        """`rid` is ready; `init_s`: how long its constructor ran (the replica measured it);
        `routes`: its ASGI app's route templates, if it has such an app."""
        r = self.replicas.get(rid)
        if r is None or r.state is not RState.STARTING:
            return
        self._route_templates(r, routes)
        r.startup_s = time.monotonic() - r.placed_at
        key = (r.dep.name, r.dep.app)
        self.metrics.observe("ray_serve_replica_startup_latency_ms", key, r.startup_s * 1000.0)
        if init_s is not None:
            self.metrics.observe("ray_serve_replica_initialization_latency_ms", key, float(init_s) * 1000.0)
        transition(r, RState.RUNNING, f"ready after {r.startup_s * 1000:.0f} ms")
        r.dep.startup_s = r.startup_s
        if r.version == r.dep.version:
            r.dep.failures = 0
            r.dep.retry_at = 0.0
            r.dep.started_version = r.version
        self._spawn_task(self._health_loop(r))
        self._watch_routing_stats(r)
        self.publish(r.dep.key)
        self._reconfigure(r)  # a config that changed while it started
        self.kick()

    def _route_templates(self, r: Replica, routes: list[Any] | None) -> None:
        """A ready replica's route templates: news for the proxies when they changed."""
        if r.version != r.dep.version or r.dep.route_templates == routes:
            return
        r.dep.route_templates = routes
        app = self.apps.get(r.dep.app)
        if app is not None and app.ingress == r.dep.name and app.route_prefix is not None:
            self.publish(("routes",))

    def replica_failed(self, rid: str, tb: str) -> None:
        r = self.replicas.get(rid)
        if r is None or r.state in (RState.DRAINING, RState.GONE):
            return
        self._start_failed(r, tb)
        self._stop_replica(r, False, "its constructor failed")

    def _start_failed(self, r: Replica, tb: str) -> None:
        """Count a failed start of `r`; the `failed_start_limit`-th in a row fails a version that
        never served, one that has served backs off (`start_backoff_s`)."""
        dep = r.dep
        logger.error("replica %s of %s/%s failed to start:\n%s", r.id, dep.app, dep.name, tb)
        if r.version != dep.version or dep.deleting:
            return
        dep.failures += 1
        serving = any(x.state.routable and x.version == dep.version for x in dep.replicas.values())
        limit = failed_start_limit(dep.config.get("max_constructor_retry_count", 20), dep.target)
        if dep.failures >= limit and not serving and dep.started_version != dep.version:
            dep.failed_msg = (
                f"The deployment failed to start {dep.failures} times in a row. This may be "
                f"due to a problem with its constructor or initial health check failing. "
                f"See logs under {self.supervisor.logs_hint(os.path.join(self.session_dir, 'logs'))} for details. "
                f"Last error:\n{tb}"
            )
        elif dep.started_version != dep.version:
            # As Ray's: a version that has not served yet stays UPDATING while it retries.
            dep.start_msg = (f"A replica failed to start with exception. Retrying "
                             f"{max(0, limit - dep.failures)} more time(s). Error:\n{tb}")
        else:
            wait = start_backoff_s(dep.failures, limit)
            dep.retry_at = time.monotonic() + wait
            then = f"; the next start in {wait:g}s" if wait else ""
            dep.unhealthy_msg = (f"A replica failed to start (attempt {dep.failures}: its constructor or first "
                                 f"health check){then}:\n{tb}")

    def _peer_closed(self, r: Replica) -> None:
        if r.state in (RState.STARTING, RState.RUNNING, RState.UPDATING):
            self._died(r, "its control connection closed")

    def _on_exit(self, r: Replica, proc: Process) -> None:
        why = proc.ending
        if r.state in (RState.STARTING, RState.RUNNING, RState.UPDATING):
            self._died(r, why, stop=False)
        for death in r.dep.deaths:
            if death.id == r.id:  # its connection closed first: say how its process ended
                death.reason = f"died: {why}"
        self._replica_gone(r, why)

    def _died(self, r: Replica, why: str, stop: bool = True) -> None:
        """`r` went away without being asked: record it, and make sure its process is gone."""
        dep = r.dep
        logger.warning("replica %s of %s/%s (pid %s) died: %s", r.id, dep.app, dep.name, r.pid, why)
        if r.state.routable:
            dep.dead.append(r.id)
        if r.state is RState.STARTING:
            self._start_failed(r, f"The replica process died before it was ready ({why}); see {self.supervisor.logs_hint(self._log_path(r))}.")
        elif r.state.routable and not dep.deleting:
            dep.unhealthy_msg = f"Replica {r.id} died unexpectedly ({why}); replacing it."
            self._restarting(r, f"died: {why}")
        if stop:
            self._stop_replica(r, False, why)

    def _restarting(self, r: Replica, why: str) -> None:
        """A serving replica is being replaced without being asked to go: count it
        (`flotilla_deployment_replica_restarts`) and keep a record of it for the dashboard."""
        dep = r.dep
        self.metrics.inc("flotilla_deployment_replica_restarts", (dep.name, dep.app))
        dep.deaths.append(Death(r.id, r.pid, why, time.time(), self._log_path(r)))

    def _stop_replica(self, r: Replica, graceful: bool, why: str) -> None:
        """Take `r` out of routing, then drain it (if it serves and `graceful`) or kill it."""
        if r.state in (RState.DRAINING, RState.GONE):
            return
        if r.state is RState.PENDING:
            self._replica_gone(r, why)
            return
        if r.state.routable and not graceful and r.id not in r.dep.dead:
            r.dep.dead.append(r.id)
        constructing = graceful and r.state is RState.STARTING and r.peer is not None
        graceful = graceful and r.state.routable
        r.stopping_at = time.monotonic()
        transition(r, RState.DRAINING, why)
        self.publish(r.dep.key)  # routers stop choosing it before it is told to stop
        self._spawn_task(self._drain(r, graceful, constructing))

    async def _drain(self, r: Replica, graceful: bool, constructing: bool = False) -> None:
        cfg = r.spec["config"]
        timeout = cfg["graceful_shutdown_timeout_s"]
        if constructing and r.peer is not None and not r.peer.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(r.peer.call("stop", 0.0, 0.0), CONSTRUCTING_STOP_S)
        if graceful and r.adopted is not None and not r.adopted.is_set():
            try:  # re-adopted by a restarted head: drain it once it has reconnected
                await asyncio.wait_for(r.adopted.wait(), REATTACH_TIMEOUT_S)
            except TimeoutError:
                pass
        if graceful and r.peer is not None and not r.peer.closed:
            try:
                await asyncio.wait_for(
                    r.peer.call("stop", cfg["graceful_shutdown_wait_loop_s"], timeout), timeout + STOP_REPLY_GRACE_S
                )
            except Exception as e:
                if r.peer is not None and not r.peer.closed:
                    logger.warning("replica %s did not answer stop (%r); killing it", r.id, e)
        proc = r.proc
        if proc is None:
            return  # still being forked: _spawn kills it
        if await self.supervisor.wait(proc, EXIT_GRACE_S if graceful else 0):
            return
        self.supervisor.kill(proc)
        if not await self.supervisor.wait(proc, EXIT_GRACE_S):
            logger.error("replica %s (pid %d) did not exit %gs after SIGKILL", r.id, proc.pid, EXIT_GRACE_S)
            self._replica_gone(r, "did not exit after SIGKILL")

    def _replica_gone(self, r: Replica, why: str) -> None:
        if r.state is RState.GONE:
            return
        transition(r, RState.GONE, why)
        dep = r.dep
        if r.stopping_at:
            self.metrics.observe("ray_serve_replica_shutdown_duration_ms", (dep.name, dep.app),
                                 (time.monotonic() - r.stopping_at) * 1000.0)
        dep.ranks.release(r.id)
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

    def _watch_routing_stats(self, r: Replica) -> None:
        """Poll `r`'s `record_routing_stats()` while its deployment has a custom request router."""
        if r.spec.get("router_cls") and (r.stats_task is None or r.stats_task.done()):
            r.stats_task = self._spawn_task(self._routing_stats_loop(r))

    async def _routing_stats_loop(self, r: Replica) -> None:
        """Every `request_routing_stats_period_s`, the replica's `record_routing_stats()` (when
        it defines one), bounded by `request_routing_stats_timeout_s`: a new answer goes to
        the routers with the replica set. A failed or late call keeps the last answer."""
        while r.state.routable and r.peer is not None and r.spec.get("router_cls"):
            rr = r.spec["config"].get("request_router_config") or {}
            began = time.perf_counter()
            try:
                got = await asyncio.wait_for(r.peer.call("routing_stats"),
                                             rr.get("request_routing_stats_timeout_s", 30.0))
            except Exception as e:
                if not r.state.routable:
                    return
                late = isinstance(e, TimeoutError)
                logger.warning("record_routing_stats() of replica %s failed: %s", r.id, "timed out" if late else repr(e))
                self.metrics.inc("ray_serve_routing_stats_error",
                                 (r.dep.name, r.id, r.dep.app, "timeout" if late else "exception"))
            else:
                if got is None:  # it defines no record_routing_stats()
                    return
                self.metrics.observe("ray_serve_routing_stats_delay_ms", (r.dep.name, r.dep.app),
                                     (time.perf_counter() - began) * 1000.0)
                if got != r.routing_stats:
                    r.routing_stats = got
                    self.publish(r.dep.key)
            await asyncio.sleep(rr.get("request_routing_stats_period_s", 10.0))

    async def _health_loop(self, r: Replica) -> None:
        failed = 0
        while r.state.routable:
            cfg = r.spec["config"]  # read each time: a config changed in place applies at once
            try:
                await asyncio.wait_for(r.health_wake.wait(), cfg["health_check_period_s"])
            except TimeoutError:
                pass
            if r.health_wake.is_set():  # a new period: wait it from now
                r.health_wake.clear()
                continue
            timeout = r.spec["config"]["health_check_timeout_s"]
            if not r.state.routable or r.peer is None:
                return
            key = (r.dep.name, r.dep.app)
            began = time.perf_counter()
            try:
                await asyncio.wait_for(r.peer.call("health"), timeout)
                failed = 0
            except Exception as e:
                if not r.state.routable:
                    return
                why = "timed out" if isinstance(e, TimeoutError) else f"raised {e!r}"
                failed += 1
                self.metrics.inc("flotilla_deployment_health_check_failures", key)
                self.metrics.inc("ray_serve_health_check_failures", key)
            finally:
                self.metrics.observe("ray_serve_health_check_latency_ms", key, (time.perf_counter() - began) * 1000.0)
            if failed:
                if failed < UNHEALTHY_AFTER:
                    logger.warning("replica %s failed its health check (%s), %d of %d in a row",
                                   r.id, why, failed, UNHEALTHY_AFTER)
                    continue
                logger.warning("replica %s failed its health check %d times in a row (last: %s); replacing it",
                               r.id, failed, why)
                r.dep.unhealthy_msg = (f"Replica {r.id} failed its health check {failed} times in a row "
                                       f"(last: {why}); replacing it.")
                r.dep.trigger = DeploymentStatusTrigger.HEALTH_CHECK_FAILED
                self._restarting(r, f"health check {why}")
                # Drained like any replica stopped on purpose (calls in flight there are answered),
                # unless told to kill it; its replacement starts at once either way.
                self._stop_replica(r, not self.limits.force_stop_unhealthy, f"health check {why}")
                return

    # ---- reconciliation -----------------------------------------------------------------
    def reconcile(self) -> None:
        self._changed()
        self._check_startups()
        forking = [d for d in self.all_deployments() if not d.deleting and d.config.get("fork_after_init")]
        self.templates.retire((d.app, d.name, d.version) for d in forking)
        for d in forking:
            if not self.templates.opened((d.app, d.name, d.version)) and not d.failed_msg:
                self._spawn_task(self._warm_template(d))
        for app in list(self.apps.values()):
            for dep in list(app.deployments.values()):
                self._reconcile_deployment(dep)
                self._compact_ranks(dep)
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
        # On Ray a replica becomes an actor at once; one that Ray has no room for yet (its pending
        # demand) is, for reconcile, a replica not placed, and nothing more of its shape fits now:
        # so a rollout on a full cluster stops an old replica to make room, as on this machine.
        now = time.monotonic()
        unscheduled = {r.id for r in dep.replicas.values()
                       if r.state is RState.STARTING and r.peer is None
                       and self.pool.unscheduled(r.spec["demand"], now - r.placed_at)}
        observed = [Observed(r.id, r.version, RState.PENDING if r.id in unscheduled else r.state, r.in_flight,
                             r.placed_at, r.node) for r in dep.replicas.values()]
        want = Desired(
            version=dep.version,
            target=dep.target,
            failed=bool(dep.failed_msg),
            deleting=dep.deleting,
            # On Ray, Ray holds the per-node limit (see ray_supervisor.placement).
            max_replicas_per_node=dep.config.get("max_replicas_per_node") if self.supervisor.local else None,
            fits_ever=self.pool.fits_ever(dep.spec["demand"]),
            unhealthy=bool(dep.unhealthy_msg),
            scaling=dep.scaling,
        )
        fits = 0 if unscheduled else self.pool.count_fits(dep.spec["demand"], max(0, dep.target))
        plan = reconcile(want, observed, fits)
        for a in plan.actions:
            if isinstance(a, StartReplica):
                if dep.retry_at > now:  # backing off after failed starts (reconcile runs again within 0.5 s)
                    continue
                r = self._new_replica(dep)
                if a.place:
                    self._place(r)
                continue
            found = dep.replicas.get(a.id)
            if found is None:
                continue
            if isinstance(a, PlaceReplica):
                if found.state is RState.PENDING:
                    self._place(found)
            elif isinstance(a, StopReplica):
                self._stop_replica(found, a.graceful, a.reason)
        if not dep.deleting:
            self._deployment_status(dep, plan)

    def _compact_ranks(self, dep: Deployment) -> None:
        """Once `dep` is healthy with no replica starting, and its replicas changed since the
        last time: ranks 0..N-1 again, each replica whose rank moved told through reconfigure."""
        if dep.status is not DeploymentStatus.HEALTHY or any(r.state is RState.STARTING for r in dep.replicas.values()):
            return
        held = frozenset(r for r in dep.replicas if dep.ranks.holds(r))
        if held == dep.ranked:
            return
        dep.ranked = held
        for rid in dep.ranks.compact():
            r = dep.replicas.get(rid)
            if r is None:
                continue
            r.rank = dep.ranks.get(rid)
            r.world_size = world_size(dep)
            if r.state.routable:
                self._reconfigure(r)

    def _deployment_status(self, dep: Deployment, plan: Plan) -> None:
        messages = []
        if plan.waiting_for_resources:
            demand = dep.spec["demand"]
            short = self.pool.shortfall(demand)
            why = short or "waiting for resources"
            per_node, bundles = dep.config.get("max_replicas_per_node"), dep.config.get("placement_group_bundles")
            if per_node and not self.supervisor.local:  # Ray holds the limit on each node
                why = (f"{short or 'no node has room'}: max_replicas_per_node={per_node} allows {per_node} "
                       f"replica(s) of it on one node, and the nodes that run fewer lack the resources")
            elif bundles and not self.supervisor.local:  # Ray places its placement group
                why = (f"{short or 'no room'} for its placement group "
                       f"[{', '.join(fmt(b) for b in bundles)}] "
                       f"({dep.config.get('placement_group_strategy') or 'PACK'})")
            ever = "" if self.pool.fits_ever(demand) else " It can never fit on this cluster: lower the request or add resources with flotilla.init(...)."
            messages.append(
                f"Deployment '{dep.name}' in application '{dep.app}' has {plan.waiting_for_resources} replica(s) "
                f"that cannot be scheduled yet: each requires {fmt(demand)}; {why} "
                f"(total {fmt(self.pool.totals())}).{ever}"
            )
        now = time.monotonic()
        slow = [now - r.placed_at for r in dep.replicas.values()
                if r.state is RState.STARTING and now - r.placed_at > self.limits.slow_startup_warning_s]
        if slow:
            messages.append(slow_startup_message(dep.name, dep.app, slow, self.limits))
        if plan.waiting_for_node:
            messages.append(
                f"Deployment '{dep.name}' in application '{dep.app}' has {plan.waiting_for_node} replica(s) "
                f"that cannot be placed: max_replicas_per_node={dep.config.get('max_replicas_per_node')}, "
                f"and this machine counts as one node."
            )
        status = plan.status
        if status is DeploymentStatus.DEPLOY_FAILED:
            dep.trigger = DeploymentStatusTrigger.REPLICA_STARTUP_FAILED
            messages.insert(0, dep.failed_msg)
        elif status is DeploymentStatus.HEALTHY:
            if dep.status is not DeploymentStatus.HEALTHY:
                if dep.scaling:
                    dep.trigger = (DeploymentStatusTrigger.UPSCALE_COMPLETED if dep.scaling > 0
                                   else DeploymentStatusTrigger.DOWNSCALE_COMPLETED)
                else:
                    dep.trigger = DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED
            running = any(r.state.routable for r in dep.replicas.values())
            if dep.autoscale is not None and dep.autoscale.zero_since is not None and running:
                logger.info("%s/%s: cold start from zero took %.2fs", dep.app, dep.name,
                            time.monotonic() - dep.autoscale.zero_since)
                dep.autoscale.zero_since = None
            dep.scaling = 0
            dep.unhealthy_msg = dep.start_msg = ""
        elif status is DeploymentStatus.UNHEALTHY:
            messages.insert(0, dep.unhealthy_msg)
        elif status is DeploymentStatus.UPDATING and dep.start_msg:
            messages.insert(0, dep.start_msg)
        elif status in (DeploymentStatus.UPSCALING, DeploymentStatus.DOWNSCALING) and dep.scaling:
            messages.insert(0, f"{'Upscaling' if dep.scaling > 0 else 'Downscaling'} from {dep.scaling_from} "
                               f"to {dep.target} replicas.")  # as Ray's status says it
        dep.status = status
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
                f"deployment '{d.name}' failed: {d.message}" for d in failed
            )
        elif all(d.status in _SERVING and not (d.status is not DeploymentStatus.HEALTHY
                                                and d.trigger is DeploymentStatusTrigger.CONFIG_UPDATE_STARTED)
                 for d in deps):  # scaling to a new num_replicas is deploying (as Ray's); autoscaling is not
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

    # ---- bounds: start-up time and memory (decisions in bounds.py) ---------------------
    def _check_startups(self) -> None:
        """Log replicas slow to construct (once each); kill those past the limit (a failed start)."""
        now = time.monotonic()
        starting = {r.id: now - r.placed_at for r in self.replicas.values() if r.state is RState.STARTING}
        if not starting:
            return
        verdict = startup_check(starting, self.limits)
        for rid in verdict.slow:
            r = self.replicas[rid]
            if not r.slow_logged:
                r.slow_logged = True
                logger.warning(
                    "replica %s of %s/%s (pid %s) is slow to initialize: %.1fs so far (killed after %gs, "
                    "FLOTILLA_REPLICA_STARTUP_TIMEOUT_S)", r.id, r.dep.app, r.dep.name, r.pid, starting[rid],
                    self.limits.startup_timeout_s,
                )
        for rid in verdict.overdue:
            r = self.replicas[rid]
            self.metrics.inc("flotilla_replica_startup_timeouts", (r.dep.name, r.dep.app))
            self._start_failed(r, startup_timeout_message(self.limits))
            self._stop_replica(r, False, "its constructor ran past the start-up limit")

    async def _local_loop(self, period: float, step: Any, what: str) -> None:
        """Every `period` s (none if 0): `await step(loop)`, on the local backend only (on Ray,
        replicas may be on other nodes, whose /proc is not ours, and Ray watches their memory)."""
        if period <= 0 or not self.supervisor.local:
            return
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)
            try:
                await step(loop)
            except Exception:
                logger.exception("%s failed", what)

    async def _check_memory(self, loop: asyncio.AbstractEventLoop) -> None:
        live = [r for r in self.replicas.values()
                if r.proc is not None and r.state in (RState.STARTING, RState.RUNNING, RState.UPDATING)]
        if not live:
            return
        limits = self.limits
        used, total = (0, 0)
        if limits.memory_usage_threshold < 1:
            used, total = await loop.run_in_executor(None, machine_memory)
        over = total > 0 and used > limits.memory_usage_threshold * total
        limit_of = {r.id: r.spec["config"]["ray_actor_options"].get("memory") for r in live}
        watch = live if over else [r for r in live if limit_of[r.id]]
        if not watch:
            return
        rss = await loop.run_in_executor(None, group_rss, [r.pid for r in watch if r.pid is not None])
        victim = self._mem_victim
        if victim is not None and victim.state is RState.GONE:
            victim = self._mem_victim = None
        samples = [MemSample(r.id, rss.get(r.pid or 0, 0), limit_of[r.id]) for r in watch
                   if r.state in (RState.STARTING, RState.RUNNING, RState.UPDATING)]
        for kill in memory_decide(samples, used, total, limits, killing=victim is not None):
            self._memory_kill(self.replicas[kill.id], kill)


    async def _sample_cpu(self, loop: asyncio.AbstractEventLoop) -> None:
        # Memory of each replica process (USS/PSS/shared: RSS over-counts pages shared
        # copy-on-write), for the status's replica_memory and the memory gauges.
        sampled = [r for r in self.replicas.values() if r.pid is not None
                   and r.state in (RState.STARTING, RState.RUNNING, RState.UPDATING)]
        templates = self.templates.pids()
        mem = await loop.run_in_executor(None, memory_of, [*(r.pid for r in sampled if r.pid is not None),
                                                           *templates.values()])
        self.template_memory = {key: mem[pid] for key, pid in templates.items() if pid in mem}
        for r in self.replicas.values():
            r.memory = None
        for r in sampled:
            r.memory = mem.get(r.pid) if r.pid is not None else None
        live = [r for r in self.replicas.values()
                if r.pid is not None and r.peer is not None and r.state in (RState.RUNNING, RState.UPDATING)]
        cpu = await loop.run_in_executor(None, group_cpu, [r.pid for r in live if r.pid is not None])
        stats = await asyncio.gather(
            *(asyncio.wait_for(r.peer.call("stats"), LOAD_SAMPLE_TIMEOUT_S) for r in live if r.peer is not None),
            return_exceptions=True,
        )
        now = time.monotonic()
        for r, st in zip(live, stats, strict=True):
            if isinstance(st, dict) and r.pid is not None:
                self.watch.add(r.id, now, cpu.get(r.pid, 0.0), int(st["ongoing"]))
        self.watch.keep(r.id for r in live)
        self.watch.observe_metrics(now, self.canary.source())
        found: dict[tuple[str, str, str], list[Any]] = {}
        request_timeout = (getattr(self.proxy, "options", None) or {}).get("request_timeout_s")
        for app in self.apps.values():
            for d in app.deployments.values():
                opts = d.config.get("ray_actor_options") or {}
                reserved = float(opts.get("num_cpus", 1) or 0)
                f = self.watch.findings(app.name, d.name, reserved, int(d.config.get("max_ongoing_requests") or 5),
                                        [r.id for r in d.replicas.values() if r.version == d.version],
                                        ingress=app.ingress == d.name)
                if (d.config.get("autoscaling_config") or {}).get("min_replicas") == 0 and d.startup_s is not None:
                    f += check_cold_start([DepSpec(d.name, min_replicas=0, constructor_s=d.startup_s)],
                                          request_timeout, 0.0)
                if f:
                    found[d.key] = f
        self.live_findings = found

    def _memory_kill(self, r: Replica, kill: MemKill) -> None:
        dep = r.dep
        logger.error("replica %s of %s/%s (pid %s): %s; killing it", r.id, dep.app, dep.name, r.pid, kill.message)
        self.metrics.inc("flotilla_replica_memory_kills", (dep.name, dep.app, kill.reason))
        if kill.reason == "machine_threshold":
            self._mem_victim = r
        msg = f"Replica {r.id} was killed and is being restarted: {kill.message}."
        if r.state is RState.STARTING:
            self._start_failed(r, msg)
        elif not dep.deleting:
            dep.unhealthy_msg = msg
            self._restarting(r, kill.message)
        self._stop_replica(r, False, f"memory ({kill.reason})")

    # ---- status -----------------------------------------------------------------------
    def status(self) -> ServeStatus:
        apps = {}
        for app in self.apps.values():
            deps = {}
            for d in app.deployments.values():
                counts: dict[str, int] = {}  # plain state names, as Ray's
                for r in d.replicas.values():
                    counts[r.state.public.value] = counts.get(r.state.public.value, 0) + 1
                deps[d.name] = DeploymentStatusOverview(
                    status=d.status,
                    status_trigger=d.trigger,
                    replica_states=counts,
                    message=d.message,
                    target_num_replicas=d.target,
                    autoscaling=self.autoscaler.status(d),
                    findings=[f.plain() for f in [*self.live_findings.get(d.key, []),
                                                  *filter(None, [self.templates.finding(d.app, d.name, d.version)])]],
                    replica_memory={r.id: _memory(r.memory) for r in d.replicas.values() if r.memory is not None},
                    template_memory=_memory(self.template_memory.get((d.app, d.name, d.version))),
                )
            apps[app.name] = ApplicationStatusOverview(
                status=app.status,
                message=app.message,
                last_deployed_time_s=app.last_deployed_time_s,
                deployments=deps,
                route_prefix=app.route_prefix,
            )
        proxies = self.proxy.statuses() if self.proxy is not None else {}
        traffic = {}
        for sp in self.splits.values():
            missing = [a for a in sp.traffic if self._live_app(a) is None]
            traffic[sp.name] = TrafficStatus(
                route_prefix=sp.route_prefix, traffic=dict(sp.traffic), sticky_header=sp.sticky_header,
                sticky_cookie=sp.sticky_cookie, canary=sp.canary.status() if sp.canary is not None else None,
                message=(f"applications {missing} do not exist: their share goes to the others"
                         if missing else ""),
            )
        return ServeStatus(proxies=proxies, applications=apps, target_capacity=self.target_capacity,
                           traffic=traffic, shadows=self._shadow_status())

    def metrics_snapshot(self) -> dict[str, Any]:
        m = self.metrics
        for name in _SNAPSHOT_GAUGES:
            m.values[name] = {}
        for app in self.apps.values():
            m.set("ray_serve_application_status", (app.name,), float(_APP_STATUS_NUMBER.get(app.status, 0)))
        for d in self.all_deployments():
            key = (d.name, d.app)
            m.set("ray_serve_deployment_status", key, float(_DEPLOYMENT_STATUS_NUMBER.get(d.status, 0)))
            st = d.autoscale
            if st is not None:
                m.set("ray_serve_autoscaling_target_replicas", key, float(d.target))
                m.set("ray_serve_autoscaling_target_ongoing_requests", key, float(st.cfg.target_ongoing_requests))
                if st.gauges is not None:
                    desired, load, ms = st.gauges
                    m.set("ray_serve_autoscaling_desired_replicas", key, float(desired))
                    m.set("ray_serve_autoscaling_total_requests", key, load)
                    m.set("ray_serve_autoscaling_policy_execution_time_ms", (*key, "deployment"), ms)
            counts: dict[str, int] = {}
            dep_cores: float | None = None
            for r in d.replicas.values():
                state = r.state.public.value
                counts[state] = counts.get(state, 0) + 1
                if r.state is RState.RUNNING:
                    m.set("ray_serve_deployment_replica_healthy", (d.name, r.id, d.app), 1.0)
                cores = self.watch.cores(r.id)
                if cores is not None:
                    m.set("flotilla_replica_cpu_cores", (d.name, r.id, d.app), round(cores, 3))
                    dep_cores = (dep_cores or 0.0) + cores
                if r.memory is not None:
                    for kind in ("uss", "pss", "shared"):
                        m.set(f"flotilla_replica_memory_{kind}_bytes", (d.name, r.id, d.app), float(getattr(r.memory, kind)))
            if dep_cores is not None:
                m.set("flotilla_deployment_cpu_cores", (d.name, d.app), round(dep_cores, 3))
            for state, n in counts.items():
                m.set("flotilla_deployment_replicas", (d.name, d.app, state), float(n))
            m.set("flotilla_deployment_target_replicas", (d.name, d.app), float(d.target))
            m.set("ray_serve_deployment_queued_queries", (d.name, d.app), float(self.autoscaler.routed_waiting(d.key)))
        record_auth_failures(m, "head")
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

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Delete every app through the drain path; what is left after `timeout` is killed."""
        self.shadows.clear()
        for name in list(self.splits):
            self.delete_traffic(name)
        for name in list(self.apps):
            self.delete_app(name)
        deadline = time.monotonic() + timeout
        self.kick()
        async with self.changed:
            while self.apps:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(self.changed.wait(), min(left, 0.5))
                except TimeoutError:
                    pass
        await self.kill_all()

    async def kill_all(self) -> None:
        """Kill every replica process now (their process groups), and forget all apps."""
        await self.templates.close()
        procs = [r.proc for r in self.replicas.values() if r.proc is not None]
        for p in procs:
            self.supervisor.kill(p)
        await asyncio.gather(*(self.supervisor.wait(p, EXIT_GRACE_S) for p in procs))
        for r in list(self.replicas.values()):
            self._replica_gone(r, "cluster shutdown")
        self.apps.clear()
