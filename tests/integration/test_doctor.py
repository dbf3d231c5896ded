"""Live findings on real processes: a CPU-bound deployment reserving 2 CPUs shows as GIL-bound
in `serve.status()`, `flotilla status`, `flotilla doctor`, the dashboard JSON and /metrics."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

import flotilla
from flotilla import serve
from flotilla.cli import main
from tests import browser
from tests.conftest import env_vars, local_only, running_cluster, wait_for

pytestmark = local_only("the controller reads the replicas' CPU use from this machine's /proc")


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with env_vars(FLOTILLA_CPU_SAMPLE_S="0.25", FLOTILLA_FINDINGS_WINDOW_S="2"), \
            running_cluster(http_options={"request_timeout_s": 0.5}, num_cpus=4) as url:
        yield url


@serve.deployment(ray_actor_options={"num_cpus": 2}, max_ongoing_requests=4)
class Spin:
    def __call__(self, ms: float = 30.0) -> int:
        end, n = time.perf_counter() + ms / 1000.0, 0
        while time.perf_counter() < end:
            n += 1
        return n


def _json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _gil(status: Any) -> list[dict[str, str]]:
    return [f for f in status.applications["spin"].deployments["Spin"].findings if f["code"] == "gil-bound"]


def test_a_gil_bound_deployment_reserving_2_cpus_is_found(cluster: str) -> None:
    handle = serve.run(Spin.bind(), name="spin", route_prefix="/spin")
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            handle.remote(30.0).result(timeout_s=10)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        # Each surface is polled: on a loaded machine a sample may miss the finding for a moment.
        found = wait_for(lambda: _gil(serve.status()), timeout=15, interval=0.2, what="the gil-bound finding")[0]
        print("doctor-test:", found["message"])
        assert "num_cpus=1" in found["fix"] and found["severity"] == "warning"

        base = flotilla.dashboard_url()
        assert base

        def in_dashboard() -> bool:
            dep = _json(base + "/api/flotilla/dashboard/")["applications"]["spin"]["deployments"]["Spin"]
            return any(f["code"] == "gil-bound" and f["fix"] for f in dep["findings"])

        wait_for(in_dashboard, timeout=10, interval=0.2, what="the finding in the dashboard snapshot")

        def in_cli(*args: str) -> tuple[str, int] | None:
            out = CliRunner().invoke(main, [*args, "--address", base])
            return (out.output, out.exit_code) if "gil-bound" in out.output else None

        text, code = wait_for(lambda: in_cli("status"), timeout=10, interval=0.2, what="flotilla status")
        assert code == 0 and "findings:" in text and "fix:" in text
        text, code = wait_for(lambda: in_cli("doctor", "--strict"), timeout=10, interval=0.2, what="flotilla doctor")
        assert code == 1 and "fix:" in text  # --strict: a warning exits 1

        def cpu_line() -> str | None:
            metrics = urllib.request.urlopen(flotilla.metrics_url(), timeout=10).read().decode()
            lines = [ln for ln in metrics.splitlines() if ln.startswith("flotilla_deployment_cpu_cores{")
                     and 'deployment="Spin"' in ln and float(ln.rsplit(" ", 1)[1]) > 0.2]
            return lines[0] if lines and "flotilla_replica_cpu_cores{" in metrics else None

        print("doctor-test:", wait_for(cpu_line, timeout=10, interval=0.2, what="the cpu_cores gauges"))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
        serve.delete("spin")


@serve.deployment(autoscaling_config={"min_replicas": 0, "initial_replicas": 1, "max_replicas": 1})
class Cold:
    def __init__(self) -> None:
        time.sleep(0.8)

    def __call__(self) -> str:
        return "ok"


def test_scale_to_zero_with_a_start_up_slower_than_the_request_timeout(cluster: str) -> None:
    serve.run(Cold.bind(), name="cold", route_prefix=None)
    try:
        def cold() -> list[dict[str, str]]:
            deps = serve.status().applications["cold"].deployments["Cold"]
            return [f for f in deps.findings if f["code"] == "cold-start-too-slow"]

        (f,) = wait_for(cold, timeout=10, interval=0.1, what="the cold-start finding")
        assert "min_replicas=1" in f["fix"] and "0.5s" in f["message"], f
    finally:
        serve.delete("cold")


@serve.deployment(max_ongoing_requests=1)
class Narrow:
    async def __call__(self, request: Any = None) -> str:
        import asyncio

        await asyncio.sleep(0.02)
        return "ok"


@contextlib.contextmanager
def narrow_under_load(cluster: str) -> Iterator[None]:
    """`Narrow` deployed and kept busy by 6 client threads until the block ends."""
    serve.run(Narrow.bind(), name="narrow", route_prefix="/narrow")
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            with urllib.request.urlopen(cluster + "/narrow", timeout=10) as r:
                r.read()

    threads = [threading.Thread(target=load, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
        serve.delete("narrow")


def test_latency_mostly_queueing_is_found(cluster: str) -> None:
    def outside() -> list[dict[str, str]]:
        deps = serve.status().applications["narrow"].deployments["Narrow"]
        return [f for f in deps.findings if f["code"] == "latency-outside-code"]

    with narrow_under_load(cluster):
        f = wait_for(outside, timeout=15, interval=0.2, what="the latency-outside-code finding")[0]
    print("doctor-test:", f["message"])
    assert f["severity"] == "info" and "replicas" in f["fix"]


@pytest.mark.skipif(bool(browser.missing()), reason=f"no browser: {browser.missing()}")
def test_the_dashboard_page_lists_the_findings(cluster: str) -> None:
    item = '[data-deployment="narrow/Narrow"] .dep-findings li[data-code="latency-outside-code"]'
    with narrow_under_load(cluster), browser.chrome() as page:
        got = browser.on_dashboard(page, item, "!e.parentElement.hidden ? e.textContent : null", timeout=20)
    assert "Fix:" in got
