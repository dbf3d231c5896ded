"""Zero-loss lifecycle under load (issue #10, "Done when"): rollouts, a failed rollout,
scale-down and a killed replica, with many client threads counting every failed request.

Each test runs a short, bounded load (HTTP client threads on 127.0.0.1, plus handle threads)
across the change and asserts that no request failed, except where a replica is killed:
then only the requests in flight on it may fail.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from collections.abc import Hashable, Iterator
from typing import Any

import pytest

from flotilla import serve
from flotilla.serve.schema import ReplicaState
from tests.conftest import RAY_BACKEND, running_cluster, skip_direct_on_ray, wait_for
from tests.load import Load, combined, running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

APP = "zl"
PREFIX = "/zl"
BOTH = pytest.mark.parametrize("cluster", ["proxy", "direct"], indirect=True)


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[str]:
    """A cluster whose HTTP ingress is the proxy (default) or direct ingress (param "direct")."""
    mode = getattr(request, "param", "proxy")
    skip_direct_on_ray(mode)
    with running_cluster({"direct_ingress": True} if mode == "direct" else {}, num_cpus=8) as url:
        yield url


def is_direct(request: pytest.FixtureRequest) -> bool:
    callspec = getattr(request.node, "callspec", None)
    return callspec is not None and callspec.params.get("cluster") == "direct"


@serve.deployment(num_replicas=2, graceful_shutdown_wait_loop_s=0.05, ray_actor_options={"num_cpus": 0.5})
class Versioned:
    """Answers "<version>:<pid>"; a changed `version` is a code change (new replicas)."""

    def __init__(self, version: int, fail: bool = False) -> None:
        if fail:
            raise ValueError(f"version {version} refuses to start")
        self.version = version

    async def __call__(self, *args: Any) -> str:
        await asyncio.sleep(0.005)
        return f"{self.version}:{os.getpid()}"


def version(answer: Hashable) -> int:
    return int(str(answer).split(":")[0])


def is_version(v: int, answer: Hashable) -> bool:
    return version(answer) == v


def pid(answer: Hashable) -> int:
    return int(str(answer).split(":")[1])


def replica_states(dep: str = "Versioned") -> dict[str, int]:
    app = serve.status().applications.get(APP)
    if app is None or dep not in app.deployments:
        return {}
    return {ReplicaState(state).value: n for state, n in app.deployments[dep].replica_states.items()}


def loads(url: str, handle: Any, direct: bool) -> tuple[Load, Load]:
    """6 HTTP threads (a fresh connection per request under direct ingress, so connections
    keep spreading across replicas) and 2 handle threads."""
    return Load.http(url, PREFIX, threads=6, fresh_connections=direct, max_s=45), Load.handle(handle, threads=2, max_s=45)


def assert_no_failures(*lds: Load) -> None:
    for ld in lds:
        assert ld.failed == 0 and ld.stuck == 0, combined(*lds)


@BOTH
def test_three_rollouts_in_a_row_fail_no_request(url: str, request: pytest.FixtureRequest) -> None:
    h = serve.run(Versioned.bind(1), name=APP, route_prefix=PREFIX)
    http, hl = loads(url, h, is_direct(request))
    with running(http, hl):
        http.wait_ok(30)
        hl.wait_ok(10)
        for v in (2, 3, 4):
            serve.run(Versioned.bind(v), name=APP, route_prefix=PREFIX)
            assert serve.status().applications[APP].status == "RUNNING"
            for ld in (http, hl):
                ld.wait_answers(functools.partial(is_version, v), n=20, timeout=15)
        wait_for(lambda: replica_states() == {"RUNNING": 2}, timeout=15, what="2 replicas of v4 only")
    assert_no_failures(http, hl)
    assert {version(a) for a in http.values} == {1, 2, 3, 4}, http.report()


def test_failed_rollout_leaves_the_old_version_serving(url: str) -> None:
    h = serve.run(Versioned.bind(1), name=APP, route_prefix=PREFIX)
    http, hl = loads(url, h, False)
    with running(http, hl):
        http.wait_ok(30)
        hl.wait_ok(10)
        with pytest.raises(RuntimeError, match="version 2 refuses to start"):
            serve.run(Versioned.bind(2, True), name=APP, route_prefix=PREFIX)
        app = serve.status().applications[APP]
        assert app.status == "DEPLOY_FAILED", app
        dep = app.deployments["Versioned"]
        assert dep.status == "DEPLOY_FAILED", dep
        assert "Traceback" in dep.message and "ValueError: version 2 refuses to start" in dep.message, dep.message
        # v1 is untouched and keeps answering after the failure.
        http.wait_ok(30)
        hl.wait_ok(10)
        assert {version(a) for a in http.values} | {version(a) for a in hl.values} == {1}
        assert replica_states().get("RUNNING") == 2, replica_states()
        assert_no_failures(http, hl)
        # A good version after the failed one rolls out normally.
        serve.run(Versioned.bind(3), name=APP, route_prefix=PREFIX)
        assert serve.status().applications[APP].status == "RUNNING"
        for ld in (http, hl):
            ld.wait_answers(lambda a: version(a) == 3, n=20, timeout=15)
    assert_no_failures(http, hl)
    assert {version(a) for a in http.values} == {1, 3}, http.report()


@BOTH
def test_scale_down_4_to_1_fails_no_request(url: str, request: pytest.FixtureRequest) -> None:
    h = serve.run(Versioned.options(num_replicas=4).bind(1), name=APP, route_prefix=PREFIX)
    http, hl = loads(url, h, is_direct(request))
    with running(http, hl):
        # Every one of the 4 replicas has traffic before the scale-down.
        wait_for(lambda: len({pid(a) for a in http.values}) == 4, timeout=15, what=lambda: f"4 replicas answering ({http.report()})")
        hl.wait_ok(10)
        serve.run(Versioned.options(num_replicas=1).bind(1), name=APP, route_prefix=PREFIX)
        wait_for(lambda: replica_states() == {"RUNNING": 1}, timeout=20, what="1 replica left")
        for ld in (http, hl):
            ld.wait_answers(lambda a: True, n=30, timeout=15)
        assert len({pid(a) for a in http.recent(20)}) == 1, http.report()
    assert_no_failures(http, hl)


@BOTH
def test_autoscaler_scale_down_4_to_1_fails_no_request(url: str, request: pytest.FixtureRequest) -> None:
    auto = Versioned.options(
        autoscaling_config={
            "min_replicas": 1,
            "initial_replicas": 4,
            "max_replicas": 4,
            "target_ongoing_requests": 100,  # 8 client threads need one replica
            "upscale_delay_s": 0,
            # Long enough that no decision falls before the 4 replicas run (Ray actors start slower).
            "downscale_delay_s": 5.0 if RAY_BACKEND else 0.5,
            "metrics_interval_s": 0.1,
            "look_back_period_s": 0.5,
        },
    )
    h = serve.run(auto.bind(1), name=APP, route_prefix=PREFIX)
    assert replica_states() == {"RUNNING": 4}
    http, hl = loads(url, h, is_direct(request))
    with running(http, hl):
        http.wait_ok(30)
        hl.wait_ok(10)
        wait_for(lambda: replica_states() == {"RUNNING": 1}, timeout=20, what=lambda: f"autoscaled down to 1 ({http.report()})")
        for ld in (http, hl):
            ld.wait_answers(lambda a: True, n=30, timeout=15)
    assert_no_failures(http, hl)


@serve.deployment(num_replicas=2, max_ongoing_requests=4, health_check_period_s=0.5, ray_actor_options={"num_cpus": 0.5})
class Victim:
    async def __call__(self, *args: Any) -> str:
        await asyncio.sleep(0.05)  # keeps requests in flight when the replica is killed
        return f"0:{os.getpid()}"


def test_kill_9_fails_only_the_requests_in_flight_and_is_replaced_fast(url: str) -> None:
    h = serve.run(Victim.bind(), name=APP, route_prefix=PREFIX)
    http, hl = loads(url, h, False)
    with running(http, hl):
        wait_for(lambda: len({pid(a) for a in http.values}) == 2, timeout=15, what=lambda: f"both replicas answering ({http.report()})")
        hl.wait_ok(10)
        before = {pid(a) for a in http.values}
        victim = next(iter(before))
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()

        def replaced() -> bool:
            fresh = {pid(a) for a in http.recent(40)} - before
            return bool(fresh) and replica_states("Victim") == {"RUNNING": 2}

        wait_for(replaced, timeout=10, what=lambda: f"a replacement replica RUNNING and serving ({http.report()})")
        took = time.monotonic() - t0
        http.wait_ok(30)
        hl.wait_ok(10)
    assert took < 10
    # Each router (the proxy's, the driver's) has at most max_ongoing_requests=4 in flight on
    # the killed replica: only those may fail, as HTTP 500 / ActorDiedError.
    assert http.failed <= 4 and set(http.failures) <= {"HTTP 500"}, combined(http, hl)
    assert hl.failed <= 4 and set(hl.failures) <= {"ActorDiedError"}, combined(http, hl)
    assert http.stuck == 0 and hl.stuck == 0, combined(http, hl)
