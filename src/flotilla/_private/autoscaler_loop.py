"""The controller's autoscaling loop: samples load, asks the pure policy, applies the target.

Load of a deployment = requests running or waiting inside its replicas (polled) + requests
waiting in routers for a free replica (pushed by every process that routes). Sampling runs
every min(metrics_interval_s, 0.25) s, so handle-driven load is seen as fast as HTTP load.

The policy averages over `look_back_period_s`, but never over more than the shorter of the
two delays (at least 1 s): with `upscale_delay_s=0` the user asked for a fast reaction, and a
30 s average would delay it by ~20 s (Ray's behaviour). With Ray's default delays (30 s /
600 s) the window is Ray's 30 s.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import TYPE_CHECKING, Any

from flotilla._private import capacity
from flotilla.serve.schema import AutoscalingStatus, DeploymentStatusTrigger

if TYPE_CHECKING:  # the policy module imports pydantic: loaded only when a deployment autoscales
    from flotilla._private.autoscaling import AutoscalingConfig, AutoscalingPolicy, PolicyState
    from flotilla._private.controller import App, Controller, Deployment

logger = logging.getLogger("flotilla.autoscaler")

MIN_PERIOD_S = 0.25
STATS_TIMEOUT_S = 2.0


def effective_config(cfg: AutoscalingConfig) -> AutoscalingConfig:
    window = min(cfg.look_back_period_s, max(1.0, min(cfg.upscale_delay_s, cfg.downscale_delay_s)))
    if window == cfg.look_back_period_s:
        return cfg
    return cfg.model_copy(update={"look_back_period_s": window})


class AutoscalerState:
    """Per-deployment autoscaling bookkeeping (lives on the controller's Deployment)."""

    def __init__(self, cfg: AutoscalingConfig) -> None:
        self.cfg = cfg
        self.eff = effective_config(cfg)
        #: [min, max] replicas, scaled by a config file's target_capacity (`set_capacity`)
        self.lo, self.hi = cfg.min_replicas, cfg.max_replicas
        self.samples: list[tuple[float, float]] = []
        self.policy: PolicyState | None = None
        self.last_decision = ""
        self.last_decision_time_s = 0.0
        self.next_due = 0.0
        self.zero_since: float | None = None
        # Latency targets: the deployment's latest (p95 latency ms, p95 queue delay ms).
        self.latency: tuple[float | None, float | None] = (None, None)
        # Custom policies: metric -> replica id -> [(time, value)], the policy's own state.
        self.raw: dict[str, dict[str, list[tuple[float, float]]]] = {}
        self.policy_state: dict[str, Any] = {}
        self.policy_fn: Any = None
        self.policy_failed = False  # logged once until it works again
        self.last_up: float | None = None
        self.last_down: float | None = None
        self.last_ongoing = (0.0, 0.0)  # (running, queued) in replicas, latest sample
        # Ray's autoscaling gauges at the latest tick: (desired replicas, total requests,
        # ms the policy ran); None before the first.
        self.gauges: tuple[int, float, float] | None = None

    def set_capacity(self, target_capacity: float | None, direction: capacity.Direction | None) -> None:
        """Scale the bounds to a config file's `target_capacity` (None: the config's own)."""
        cfg = self.cfg
        self.lo, self.hi = capacity.bounds(cfg.min_replicas, cfg.max_replicas, cfg.initial_replicas,
                                           target_capacity, direction)
        eff = effective_config(cfg)
        if (self.lo, self.hi) != (cfg.min_replicas, cfg.max_replicas):
            eff = eff.model_copy(update={"min_replicas": self.lo, "max_replicas": self.hi})
        self.eff = eff

    def bounded(self, n: int) -> int:
        return max(self.lo, min(self.hi, n))


class Autoscaler:
    def __init__(self, controller: Controller) -> None:
        self.c = controller
        # (peer id, deployment key) -> requests waiting in that process's router
        self.router_load: dict[tuple[int, tuple[str, str, str]], int] = {}

    def report_router_load(self, peer_id: int, loads: dict[tuple[str, str, str], int]) -> None:
        waking = False
        for key, n in loads.items():
            k = (peer_id, tuple(key))
            if n:
                self.router_load[k] = n  # type: ignore[index]
                dep = self.c.find(key)
                if dep is not None and dep.autoscale is not None and not dep.replicas:
                    waking = True
            else:
                self.router_load.pop(k, None)  # type: ignore[arg-type]
        if waking:
            self.c.kick_autoscaler()

    def forget_peer(self, peer_id: int) -> None:
        for k in [k for k in self.router_load if k[0] == peer_id]:
            del self.router_load[k]

    def routed_waiting(self, key: tuple[str, str, str]) -> int:
        return sum(n for (_, k), n in self.router_load.items() if k == key)

    async def replica_load(self, dep: Deployment, now: float | None = None) -> int:
        """Requests running or queued in the deployment's serving replicas (each replica's
        `in_flight` is updated too: scale-down stops the least busy ones first). With latency
        targets or a custom policy, also their p95s and custom metrics (into `dep.autoscale`)."""
        st = dep.autoscale
        serving = [r for r in dep.replicas.values() if r.peer is not None and r.state.routable]
        window = st.eff.look_back_period_s if st is not None else None
        extra = (window,) if window is not None and (st is not None and (st.cfg.uses_latency or st.cfg.policy)) else ()
        calls = [asyncio.wait_for(r.peer.call("stats", *extra), STATS_TIMEOUT_S) for r in serving if r.peer is not None]
        total = 0
        running = queued = 0.0
        lat: list[float] = []
        qd: list[float] = []
        for r, res in zip(serving, await asyncio.gather(*calls, return_exceptions=True), strict=True):
            if isinstance(res, dict):
                r.in_flight = int(res["ongoing"]) + int(res["queued"])
                total += r.in_flight
                running += res["ongoing"]
                queued += res["queued"]
                if res.get("latency_ms") is not None:
                    lat.append(res["latency_ms"])
                    qd.append(res["queue_delay_ms"])
                if st is not None and now is not None and res.get("custom"):
                    for name, v in res["custom"].items():
                        st.raw.setdefault(name, {}).setdefault(r.id, []).append((now, float(v)))
        if st is not None:
            # The deployment's p95: the slowest replica's (conservative; pooled samples would
            # need every sample shipped).
            st.latency = (max(lat) if lat else None, max(qd) if qd else None)
            st.last_ongoing = (running, queued)
            if st.raw and now is not None and window is not None:
                live = {r.id for r in serving}
                for series in st.raw.values():
                    for rid in list(series):
                        kept = [x for x in series[rid] if x[0] > now - window] if rid in live else []
                        if kept:
                            series[rid] = kept
                        else:
                            del series[rid]
        return total

    async def sample(self, dep: Deployment, now: float) -> tuple[int, int] | None:
        """Take one load sample of `dep`: (load, running replicas); None while replicas of a
        restarted head are still to reconnect (their load is unknown)."""
        st = dep.autoscale
        assert st is not None
        if any(r.awaiting_reattach for r in dep.replicas.values()):
            return None
        load = await self.replica_load(dep, now) + self.routed_waiting(dep.key)
        st.samples.append((now, float(load)))
        horizon = now - st.eff.look_back_period_s - 1.0
        while st.samples and st.samples[0][0] < horizon:
            st.samples.pop(0)
        return load, sum(1 for r in dep.replicas.values() if r.state.routable)

    async def tick(self, dep: Deployment, now: float) -> None:
        st = dep.autoscale
        assert st is not None
        got = await self.sample(dep, now)
        if got is None:
            return
        load, running = got
        from flotilla._private.autoscaling import decide

        began = time.perf_counter()
        if st.cfg.policy is not None:
            d = self.custom(dep, now, load, running)
            if d is None:
                return
        else:
            d = decide(st.eff, st.samples, dep.target, running, now, st.policy, st.latency)
        self.apply(dep, d, load, (time.perf_counter() - began) * 1000.0, now)

    def apply(self, dep: Deployment, d: Any, load: float, policy_ms: float, now: float) -> None:
        """A decision's new target for `dep` (and the autoscaling gauges and bookkeeping)."""
        st = dep.autoscale
        assert st is not None
        st.gauges = (d.target if d.desired is None else d.desired, float(load), policy_ms)
        st.policy = d.state
        if d.target != dep.target:
            old = dep.target
            if d.target > old:
                st.last_up = now
            else:
                st.last_down = now
            logger.info("autoscaling %s/%s: %s", dep.app, dep.name, d.reason)
            st.last_decision = d.reason
            st.last_decision_time_s = time.time()
            if old == 0 and d.target > 0:
                st.zero_since = time.monotonic()
            dep.target = d.target
            dep.scaled_from(old)
            dep.trigger = DeploymentStatusTrigger.AUTOSCALING
            self.c.kick()

    def context(self, dep: Deployment, now: float, load: float, running: int, state: dict[str, Any]) -> Any:
        """The `AutoscalingContext` a custom policy gets for `dep` now."""
        from flotilla._private.autoscaling import AutoscalingContext, TimeStampedValue
        from flotilla.serve.schema import DeploymentID, ReplicaID

        st = dep.autoscale
        assert st is not None
        did = DeploymentID(dep.name, dep.app)  # replicas as Ray's ReplicaIDs, here and as metric keys
        replicas = [ReplicaID(rid, did) for rid, r in dep.replicas.items() if r.state.routable]
        raw = {name: {ReplicaID(rid, did): [TimeStampedValue(t, v) for t, v in vals] for rid, vals in series.items()}
               for name, series in st.raw.items()}
        agg = {name: {ReplicaID(rid, did): sum(v for _, v in vals) / len(vals) for rid, vals in series.items() if vals}
               for name, series in st.raw.items()}
        return AutoscalingContext(
            deployment_id=did, deployment_name=dep.name, app_name=dep.app,
            current_num_replicas=running, target_num_replicas=dep.target, running_replicas=replicas,
            total_num_requests=load, total_queued_requests=load - st.last_ongoing[0],
            aggregated_metrics=agg, raw_metrics=raw,
            capacity_adjusted_min_replicas=st.lo, capacity_adjusted_max_replicas=st.hi,
            policy_state=dict(state), last_scale_up_time=st.last_up, last_scale_down_time=st.last_down,
            current_time=now, config=st.cfg, latency_p95_ms=st.latency[0], queue_delay_p95_ms=st.latency[1],
        )

    def custom(self, dep: Deployment, now: float, load: float, running: int) -> Any:
        """One tick of a custom policy: build its AutoscalingContext, call it, clamp (see
        `autoscaling.apply_custom`). A policy that fails (or cannot be loaded) is logged once
        and the target is kept; None then."""
        from flotilla._private.autoscaling import apply_custom, cold_start

        st = dep.autoscale
        assert st is not None and st.cfg.policy is not None
        ctx = self.context(dep, now, load, running, st.policy_state)
        fast = cold_start(ctx)  # as Ray's: a request waiting with none running skips the policy
        if fast is not None:
            return fast
        try:
            if st.policy_fn is None:
                st.policy_fn = load_policy(st.cfg.policy, dep.spec.get("sys_path") or [])
            d, st.policy_state = apply_custom(st.policy_fn(ctx), ctx, st.policy)
        except Exception as e:
            if not st.policy_failed:
                st.policy_failed = True
                logger.exception("autoscaling %s/%s: the custom policy failed (%r); keeping %d replicas "
                                 "(logged once until it works again)", dep.app, dep.name, e, dep.target)
            return None
        st.policy_failed = False
        return d

    async def app_tick(self, app: App, deps: list[Deployment], now: float) -> None:
        """One tick of an application-level policy (Ray 2.60): a sample of each autoscaling
        deployment of `app`, one call with all their contexts, each returned target clamped
        and applied. A policy that fails is logged once and the targets are kept."""
        from flotilla._private.autoscaling import AutoscalingPolicy, apply_app_policy
        from flotilla.serve.schema import DeploymentID

        got = await asyncio.gather(*(self.sample(d, now) for d in deps))
        live = {DeploymentID(d.name, d.app): (d, g) for d, g in zip(deps, got, strict=True) if g is not None}
        if not live:
            return
        pol = app.app_policy
        if pol is None:
            pol = app.app_policy = AppPolicy()
        contexts = {did: self.context(d, now, g[0], g[1], pol.state.get(did, {})) for did, (d, g) in live.items()}
        began = time.perf_counter()
        try:
            if pol.fn is None:
                policy = AutoscalingPolicy.model_validate(app.autoscaling_policy)
                pol.fn = load_policy(policy, deps[0].spec.get("sys_path") or [])
            delays = {did: d.autoscale.policy for did, (d, _) in live.items() if d.autoscale is not None}
            decisions, pol.state = apply_app_policy(pol.fn(contexts), contexts, delays)
        except Exception as e:
            if not pol.failed:
                pol.failed = True
                logger.exception("autoscaling application %s: its autoscaling_policy failed (%r); keeping "
                                 "the targets (logged once until it works again)", app.name, e)
            return
        pol.failed = False
        ms = (time.perf_counter() - began) * 1000.0
        for did, d in decisions.items():
            dep, (load, _) = live[did]
            self.apply(dep, d, load, ms, now)

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.c._autoscale_wake.wait(), MIN_PERIOD_S)
            except TimeoutError:
                pass
            self.c._autoscale_wake.clear()
            now = time.monotonic()
            deps = [d for d in self.c.all_deployments() if d.autoscale is not None and not d.deleting and not d.failed_msg]
            due = [d for d in deps if now >= d.autoscale.next_due or not d.replicas]  # type: ignore[union-attr]
            # An application with its own policy decides for all its autoscaling deployments at once.
            apps = {a.name: a for d in due if (a := self.c.apps.get(d.app)) is not None and a.autoscaling_policy}
            ticks = [self.tick(d, now) for d in due if d.app not in apps]
            for name, a in apps.items():
                members = [d for d in deps if d.app == name]
                due += [d for d in members if d not in due]
                ticks.append(self.app_tick(a, members, now))
            for d in due:
                d.autoscale.next_due = now + min(d.autoscale.cfg.metrics_interval_s, MIN_PERIOD_S)  # type: ignore[union-attr]
            results = await asyncio.gather(*ticks, return_exceptions=True)
            for r in results:
                if isinstance(r, Exception):
                    logger.error("autoscaling tick failed: %r", r)

    @staticmethod
    def status(dep: Deployment) -> AutoscalingStatus | None:
        st = dep.autoscale
        if st is None:
            return None
        running = sum(1 for r in dep.replicas.values() if r.state.routable)
        return AutoscalingStatus(dep.target, running, st.last_decision, st.last_decision_time_s)


def make_state(config: dict[str, Any]) -> AutoscalerState | None:
    ac = config.get("autoscaling_config")
    if ac is None:
        return None
    from flotilla._private.autoscaling import AutoscalingConfig

    return AutoscalerState(AutoscalingConfig.model_validate(ac))


class AppPolicy:
    """What the autoscaler keeps for an application-level policy (on the controller's App)."""

    def __init__(self) -> None:
        self.fn: Any = None
        self.state: dict[Any, dict[str, Any]] = {}  # DeploymentID -> its policy_state
        self.failed = False  # logged once until it works again


def load_policy(policy: AutoscalingPolicy | None, path: list[str]) -> Any:
    """A policy function, imported (or unpickled) in the head with the deploying driver's
    import path appended to the head's (as replicas get it)."""
    import sys

    for p in path:
        if p not in sys.path:
            sys.path.append(p)
    assert policy is not None
    fn = policy.get_policy()
    if inspect.isclass(fn):  # made once, its instance called each tick (Ray 2.60)
        return fn(**policy.policy_kwargs)
    return fn
