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
import logging
import time
from typing import TYPE_CHECKING, Any

from flotilla.serve.schema import AutoscalingStatus, DeploymentStatusTrigger

if TYPE_CHECKING:  # the policy module imports pydantic: loaded only when a deployment autoscales
    from flotilla._private.autoscaling import AutoscalingConfig, PolicyState
    from flotilla._private.controller import Controller, Deployment

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
        self.samples: list[tuple[float, float]] = []
        self.policy: PolicyState | None = None
        self.last_decision = ""
        self.last_decision_time_s = 0.0
        self.next_due = 0.0
        self.zero_since: float | None = None


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

    async def replica_load(self, dep: Deployment) -> int:
        """Requests running or queued in the deployment's serving replicas (each replica's
        `in_flight` is updated too: scale-down stops the least busy ones first)."""
        serving = [r for r in dep.replicas.values() if r.peer is not None and r.state.routable]
        calls = [asyncio.wait_for(r.peer.call("stats"), STATS_TIMEOUT_S) for r in serving if r.peer is not None]
        total = 0
        for r, res in zip(serving, await asyncio.gather(*calls, return_exceptions=True), strict=True):
            if isinstance(res, dict):
                r.in_flight = int(res["ongoing"]) + int(res["queued"])
                total += r.in_flight
        return total

    async def tick(self, dep: Deployment, now: float) -> None:
        st = dep.autoscale
        assert st is not None
        if any(r.awaiting_reattach for r in dep.replicas.values()):
            return  # a restarted head: their load is unknown until they reconnect
        load = await self.replica_load(dep) + self.routed_waiting(dep.key)
        st.samples.append((now, float(load)))
        horizon = now - st.eff.look_back_period_s - 1.0
        while st.samples and st.samples[0][0] < horizon:
            st.samples.pop(0)
        running = sum(1 for r in dep.replicas.values() if r.state.routable)
        from flotilla._private.autoscaling import decide

        d = decide(st.eff, st.samples, dep.target, running, now, st.policy)
        st.policy = d.state
        if d.target != dep.target:
            old = dep.target
            logger.info("autoscaling %s/%s: %s", dep.app, dep.name, d.reason)
            st.last_decision = d.reason
            st.last_decision_time_s = time.time()
            if old == 0 and d.target > 0:
                st.zero_since = time.monotonic()
            dep.target = d.target
            dep.scaling = 1 if d.target > old else -1
            dep.trigger = DeploymentStatusTrigger.AUTOSCALING
            self.c.kick()

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
            for d in due:
                d.autoscale.next_due = now + min(d.autoscale.cfg.metrics_interval_s, MIN_PERIOD_S)  # type: ignore[union-attr]
            results = await asyncio.gather(*(self.tick(d, now) for d in due), return_exceptions=True)
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
