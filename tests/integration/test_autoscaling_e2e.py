"""Autoscaling with real replicas: grow under load, shrink after it, scale to zero and back."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from flotilla import serve
from tests.conftest import running_cluster, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    os.environ["FLOTILLA_COLD_START_TIMEOUT_S"] = "3"
    try:
        with running_cluster(num_cpus=4) as url:
            yield url
    finally:
        os.environ.pop("FLOTILLA_COLD_START_TIMEOUT_S", None)


def running(app: str, dep: str) -> int:
    st = serve.status().applications[app].deployments[dep]
    return st.replica_states.get("RUNNING", 0)


@serve.deployment(
    ray_actor_options={"num_cpus": 0.5},
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 2,
        "upscale_delay_s": 0,
        "downscale_delay_s": 1,
        "metrics_interval_s": 0.1,
    },
    graceful_shutdown_wait_loop_s=0.1,
)
class Work:
    async def __call__(self, *args):
        await asyncio.sleep(0.1)
        return "ok"


def test_grows_under_handle_load_and_shrinks_after(url):
    h = serve.run(Work.bind(), name="auto", route_prefix="/auto")
    assert running("auto", "Work") == 1
    stop = threading.Event()
    errors: list[BaseException] = []
    done = [0]

    def client(use_http: bool):
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                try:
                    if use_http:
                        assert c.get("/auto").status_code == 200
                    else:
                        assert h.remote().result(timeout_s=30) == "ok"
                    done[0] += 1
                except BaseException as e:
                    errors.append(e)

    threads = [threading.Thread(target=client, args=(i % 4 == 0,)) for i in range(8)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        wait_for(lambda: running("auto", "Work") == 3, timeout=20, what="3 running replicas")
        up = time.monotonic() - t0
        st = serve.status().applications["auto"]
        assert st.status == "RUNNING"
        auto = st.deployments["Work"].autoscaling
        assert auto is not None and auto.target_replicas == 3 and "->" in auto.last_decision
        time.sleep(1.5)  # keep the load on at 3 replicas for a while
    finally:
        stop.set()
        for t in threads:
            t.join()
    t1 = time.monotonic()
    wait_for(lambda: running("auto", "Work") == 1 and serve.status().applications["auto"].deployments["Work"].replica_states == {"RUNNING": 1},
             timeout=30, what="back to 1 replica")
    down = time.monotonic() - t1
    assert not errors, errors[:3]
    assert done[0] > 50
    assert up < 10 and down < 20


@serve.deployment(
    autoscaling_config={
        "min_replicas": 0,
        "max_replicas": 1,
        "upscale_delay_s": 0,
        "downscale_delay_s": 0.5,
        "metrics_interval_s": 0.1,
    },
    graceful_shutdown_wait_loop_s=0.1,
)
class Lazy:
    def __call__(self, *args):
        return os.getpid()


def test_scale_to_zero_and_back(url):
    h = serve.run(Lazy.bind(), name="zero", route_prefix="/zero")
    st = serve.status().applications["zero"]
    assert st.status == "RUNNING" and st.deployments["Lazy"].replica_states == {}
    t0 = time.monotonic()
    pid = h.remote().result(timeout_s=30)  # waits while a replica starts
    assert pid and time.monotonic() - t0 < 5
    wait_for(lambda: serve.status().applications["zero"].deployments["Lazy"].replica_states == {}, timeout=20,
             what="scaled back to zero")
    r = httpx.get(f"{url}/zero", timeout=30)  # over HTTP too
    assert r.status_code == 200 and r.json() != pid


@serve.deployment(
    autoscaling_config={"min_replicas": 0, "max_replicas": 1, "upscale_delay_s": 0, "metrics_interval_s": 0.1},
)
class SlowStart:
    def __init__(self):
        time.sleep(30)

    def __call__(self, *args):
        return "late"


def test_cold_start_is_bounded_by_a_timeout(url):
    serve.run(SlowStart.bind(), name="slow", route_prefix="/slow")
    t0 = time.monotonic()
    r = httpx.get(f"{url}/slow", timeout=30)
    assert r.status_code == 503 and "became available within 3s" in r.text
    assert time.monotonic() - t0 < 10


@serve.deployment(num_replicas=1, graceful_shutdown_wait_loop_s=0.05, ray_actor_options={"num_cpus": 0.25})
class Sized:
    def __init__(self, start_s: float = 0.0) -> None:
        time.sleep(start_s)

    async def __call__(self, hold_s: float = 0.0) -> int:
        await asyncio.sleep(hold_s)
        return os.getpid()


def dep_status(app: str, dep: str) -> tuple[str, str, dict]:
    d = serve.status().applications[app].deployments[dep]
    return d.status.value, d.status_trigger.value, {getattr(k, "value", k): n for k, n in d.replica_states.items()}


def test_a_manual_replica_count_change_is_upscaling_or_downscaling_as_in_ray(url):
    """A changed num_replicas alone: UPSCALING / DOWNSCALING (trigger CONFIG_UPDATE_STARTED,
    the application DEPLOYING, so `serve.run` waits, as Ray 2.60's does), then HEALTHY with
    UPSCALE_COMPLETED / DOWNSCALE_COMPLETED once no replica is stopping."""
    h = serve.run(Sized.bind(1.0), name="sized", route_prefix=None)
    serve.run(Sized.options(num_replicas=3).bind(1.0), name="sized", route_prefix=None)
    assert serve.status().applications["sized"].status == "RUNNING"
    assert dep_status("sized", "Sized") == ("HEALTHY", "UPSCALE_COMPLETED", {"RUNNING": 3})
    serve._run(Sized.options(num_replicas=4).bind(1.0), name="sized", route_prefix=None, _blocking=False)
    assert serve.status().applications["sized"].status == "DEPLOYING"
    assert dep_status("sized", "Sized")[:2] == ("UPSCALING", "CONFIG_UPDATE_STARTED")
    wait_for(lambda: dep_status("sized", "Sized") == ("HEALTHY", "UPSCALE_COMPLETED", {"RUNNING": 4}),
             timeout=30, what=lambda: f"4 replicas, HEALTHY: {dep_status('sized', 'Sized')}")
    held = [h.remote(2.0) for _ in range(4)]  # in flight while the count drops
    wait_for(lambda: serve.status().applications["sized"].deployments["Sized"].replica_states == {"RUNNING": 4},
             timeout=10)
    time.sleep(0.3)  # (the held requests reach their replicas)
    serve._run(Sized.options(num_replicas=1).bind(1.0), name="sized", route_prefix=None, _blocking=False)
    wait_for(lambda: (st := dep_status("sized", "Sized"))[0] == "DOWNSCALING" and st[2].get("STOPPING"),
             timeout=10, what=lambda: f"replicas stopping: {dep_status('sized', 'Sized')}")
    assert serve.status().applications["sized"].status == "DEPLOYING"
    assert all(isinstance(r.result(timeout_s=30), int) for r in held)
    wait_for(lambda: dep_status("sized", "Sized") == ("HEALTHY", "DOWNSCALE_COMPLETED", {"RUNNING": 1}),
             timeout=30, what=lambda: f"1 replica, HEALTHY: {dep_status('sized', 'Sized')}")
