"""Latency-target autoscaling and custom policies, with real replicas."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flotilla import serve
from flotilla.serve.config import AutoscalingContext
from tests.conftest import metric_total, running_cluster, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with running_cluster(num_cpus=4) as url:
        yield url


def running(app: str, dep: str) -> int:
    return serve.status().applications[app].deployments[dep].replica_states.get("RUNNING", 0)


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=2,
    autoscaling_config={
        "min_replicas": 1, "max_replicas": 4, "target_latency_ms": 60,
        "upscale_delay_s": 0, "downscale_delay_s": 60, "metrics_interval_s": 0.1, "look_back_period_s": 1,
    },
)
class Slow:
    async def __call__(self, *args):
        await asyncio.sleep(0.05)
        return "ok"


def test_scales_up_when_requests_get_slow(url: str) -> None:
    serve.run(Slow.bind(), name="lat", route_prefix="/lat")
    assert running("lat", "Slow") == 1
    stop = threading.Event()
    errors: list[BaseException] = []

    def client() -> None:  # 8 clients, 2 slots per replica: requests queue and get slow
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                try:
                    assert c.get("/lat").status_code == 200
                except BaseException as e:
                    errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: running("lat", "Slow") >= 3, timeout=20, interval=0.1, what=">= 3 running replicas")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    why = serve.status().applications["lat"].deployments["Slow"].autoscaling.last_decision
    assert "p95 latency" in why, why


def wanted_replicas(ctx: AutoscalingContext) -> tuple[int, dict]:
    """A custom policy: as many replicas as the replicas' `wanted` metric says."""
    got = ctx.aggregated_metrics.get("wanted", {})
    calls = ctx.policy_state.get("calls", 0) + 1
    if not got:
        return ctx.target_num_replicas, {"calls": calls}
    return int(max(got.values())), {"calls": calls}


def failing_policy(marker: str) -> Any:
    """A policy that notes each call in `marker` (a file), then raises."""

    def policy(ctx: AutoscalingContext) -> tuple[int, dict]:
        with open(marker, "a") as f:
            f.write("x")
        raise RuntimeError("policy bug")

    return policy


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
    autoscaling_config={"min_replicas": 1, "max_replicas": 3, "metrics_interval_s": 0.1, "upscale_delay_s": 0,
                        "look_back_period_s": 1, "policy": {"policy_function": wanted_replicas}},
)
class Custom:
    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"wanted": 3.0}

    def __call__(self, *args):
        return "ok"


def test_custom_policy_reads_a_custom_metric(url: str) -> None:
    serve.run(Custom.bind(), name="custom", route_prefix="/custom")
    wait_for(lambda: running("custom", "Custom") == 3, timeout=20, interval=0.1, what="3 running replicas")
    why = serve.status().applications["custom"].deployments["Custom"].autoscaling.last_decision
    assert "custom policy" in why, why
    wait_for(lambda: metric_total("ray_serve_user_autoscaling_stats_latency_ms_count", deployment="Custom",
                                  application="custom") > 0, what="record_autoscaling_stats() timed (Ray's metric)")


def test_failing_policy_keeps_the_target(url: str, tmp_path: Path) -> None:
    marker = tmp_path / "calls"
    dep = Custom.options(autoscaling_config={
        "min_replicas": 1, "max_replicas": 3, "metrics_interval_s": 0.1,
        "policy": {"policy_function": failing_policy(str(marker))}})
    serve.run(dep.bind(), name="failing", route_prefix="/failing")
    wait_for(lambda: marker.exists() and len(marker.read_text()) >= 3, timeout=10, what="3 policy calls")
    assert httpx.get(f"{url}/failing", timeout=10).text == "ok"
    st = serve.status().applications["failing"]
    assert st.status == "RUNNING" and running("failing", "Custom") == 1
    assert st.deployments["Custom"].autoscaling.target_replicas == 1


class FixedCount:
    """A class-based policy (Ray 2.60): made once with `policy_kwargs`, then called each tick."""

    def __init__(self, replicas: int) -> None:
        self.replicas = replicas
        self.ticks = 0

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict]:
        self.ticks += 1  # kept across ticks: one instance
        return self.replicas if self.ticks > 1 else ctx.target_num_replicas, {}


def test_a_class_based_policy_is_made_once_with_its_kwargs(url: str) -> None:
    dep = Custom.options(autoscaling_config={
        "min_replicas": 1, "max_replicas": 3, "metrics_interval_s": 0.1, "upscale_delay_s": 0,
        "policy": {"policy_function": FixedCount, "policy_kwargs": {"replicas": 2}}})
    serve.run(dep.bind(), name="classy", route_prefix="/classy")
    wait_for(lambda: running("classy", "Custom") == 2, timeout=20, interval=0.1, what="2 running replicas")


def test_a_custom_policys_wish_waits_out_upscale_delay_s_as_rays(url: str) -> None:
    """Ray 2.60 applies the config's delays and factors to a custom policy's output: a wish
    for 3 replicas waits upscale_delay_s (here 2 s) before the target moves."""
    dep = Custom.options(autoscaling_config={
        "min_replicas": 1, "max_replicas": 3, "metrics_interval_s": 0.1, "upscale_delay_s": 2,
        "look_back_period_s": 1, "policy": {"policy_function": wanted_replicas}})
    serve.run(dep.bind(), name="delayed", route_prefix="/delayed")
    began = time.monotonic()

    def auto() -> Any:
        return serve.status().applications["delayed"].deployments["Custom"].autoscaling

    wait_for(lambda: auto().target_replicas == 3, timeout=20, interval=0.05, what="the target to reach 3")
    waited = time.monotonic() - began
    # the wish began after serve.run returned, so the target cannot move sooner (without the
    # delay it moves within a tick or two, ~0.2 s)
    assert waited >= 1.9, waited
    assert "upscale_delay_s 2: 1 -> 3" in auto().last_decision, auto().last_decision
    wait_for(lambda: running("delayed", "Custom") == 3, timeout=20, interval=0.1, what="3 running replicas")
