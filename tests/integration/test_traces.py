"""Per-request latency breakdown: stage histograms, `GET /api/flotilla/trace/`, `flotilla trace`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

import flotilla
from flotilla import serve
from flotilla._private.trace import STAGES
from tests.conftest import running_cluster, wait_for

pytestmark = pytest.mark.slow


@serve.deployment
class Inner:
    async def __call__(self, x: int) -> int:
        await asyncio.sleep(0.04)
        return x + 1


@serve.deployment
class Outer:
    def __init__(self, inner) -> None:
        self.inner = inner

    async def __call__(self, request) -> dict:
        await asyncio.sleep(0.03)
        y = await self.inner.remote(1)
        await asyncio.sleep(0.02)
        return {"y": y, "request_id": serve.get_request_context().request_id}


@serve.deployment
class SyncOuter:
    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, request) -> dict:
        time.sleep(0.03)
        return {"y": self.inner.remote(1).result()}


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with running_cluster(num_cpus=8) as url:
        yield url


def _trace(rid: str) -> dict | None:
    r = httpx.get(f"{flotilla.dashboard_url()}/api/flotilla/trace/", params={"id": rid}, timeout=10)
    return r.json() if r.status_code == 200 else None


def _check_sums(node: dict) -> None:
    total = sum(node["stages"].values())
    assert total == pytest.approx(node["e2e_ms"], rel=1e-6, abs=1e-6)
    for child in node["downstream_calls"]:
        _check_sums(child)


def test_stages_add_up_to_the_end_to_end_time(cluster: str) -> None:
    serve.run(Outer.bind(Inner.bind()), name="traced", route_prefix="/traced")
    for i in range(3):  # warm: the first request pays for connections
        httpx.get(f"{cluster}/traced", headers={"x-request-id": f"warm-{i}"}, timeout=10)
    coverage = []
    for i in range(3):
        rid = f"trace-me-{i}"
        r = httpx.get(f"{cluster}/traced", headers={"x-request-id": rid}, timeout=10)
        assert r.status_code == 200 and r.json()["request_id"] == rid
        t = wait_for(lambda rid=rid: _trace(rid), timeout=10, what="the trace")
        assert t["request_id"] == rid and t["status"] == 200 and t["deployment"] == "Outer"
        assert set(t["stages"]) == set(STAGES)
        # 30 + 40 + 20 ms of sleeps, each of which may end up to 1 ms early (uvloop's clock
        # counts whole milliseconds)
        assert t["e2e_ms"] >= 87.0
        # The stages sum exactly to the proxy's end-to-end time ("other" is the rest)...
        _check_sums(t)
        assert t["stages"]["downstream"] == pytest.approx(40.0, abs=15.0)
        assert t["stages"]["user_code"] == pytest.approx(50.0, abs=15.0)
        [call] = t["downstream_calls"]
        assert call["deployment"] == "Inner" and call["replica"]
        assert call["stages"]["user_code"] == pytest.approx(40.0, abs=15.0)
        coverage.append(sum(v for k, v in t["stages"].items() if k != "other") / t["e2e_ms"])
    # ... and the named ones cover at least 95% of it (the median of three requests: on a
    # loaded machine one can wait for a CPU between processes, which is "other").
    assert sorted(coverage)[1] >= 0.95, coverage


@serve.deployment
class Nap:
    async def __call__(self, request) -> str:
        await asyncio.sleep(0.03)
        return "ok"


def test_the_end_to_end_time_ends_when_the_response_is_written(cluster: str) -> None:
    """The proxy's end-to-end time stops when it hands the response to the kernel: it never
    exceeds what the client itself measured. (Writing the response wakes the client, which on
    a small machine can take the proxy's CPU before the proxy reads its clock again: that wait
    is the client's time, not the request's.)"""
    serve.run(Nap.bind(), name="nap", route_prefix="/nap")
    with httpx.Client(timeout=10) as c:
        c.get(f"{cluster}/nap")
        seen = []
        for i in range(12):
            rid = f"nap-{i}"
            t0 = time.perf_counter()
            assert c.get(f"{cluster}/nap", headers={"x-request-id": rid}).status_code == 200
            client_ms = (time.perf_counter() - t0) * 1000.0
            t = wait_for(lambda rid=rid: _trace(rid), timeout=10, what="the trace")
            seen.append((round(t["e2e_ms"], 3), round(client_ms, 3)))
    assert all(e2e <= client for e2e, client in seen), seen


def test_downstream_from_sync_code_and_unknown_id(cluster: str) -> None:
    serve.run(SyncOuter.bind(Inner.bind()), name="synctraced", route_prefix="/sync")
    httpx.get(f"{cluster}/sync", timeout=10)
    rid = "trace-me-sync"
    assert httpx.get(f"{cluster}/sync", headers={"x-request-id": rid}, timeout=10).status_code == 200
    t = wait_for(lambda: _trace(rid), timeout=10, what="the trace")
    assert t["stages"]["downstream"] == pytest.approx(40.0, abs=15.0)
    assert [c["deployment"] for c in t["downstream_calls"]] == ["Inner"]
    r = httpx.get(f"{flotilla.dashboard_url()}/api/flotilla/trace/", params={"id": "never-seen"}, timeout=10)
    assert r.status_code == 404
    assert httpx.get(f"{flotilla.dashboard_url()}/api/flotilla/trace/", timeout=10).status_code == 400


def test_a_trace_is_whole_as_soon_as_the_response_is(cluster: str) -> None:
    """Replicas keep each request's figures for a batch (0.1 s) and fold them into metrics,
    access lines and trace events later; a look-up folds first, so one made at once (no
    polling) already sees every process's part."""
    def whole(t: dict | None) -> bool:
        return (t is not None and t.get("status") == 200 and bool(t["replica"])
                and [bool(c["replica"]) for c in t["downstream_calls"]] == [True])

    serve.run(Outer.bind(Inner.bind()), name="traced", route_prefix="/traced")
    before = "trace-at-once-warm"
    httpx.get(f"{cluster}/traced", headers={"x-request-id": before}, timeout=10)
    for i in range(3):
        # Once the last request's trace is whole, no batch is pending in any process: the
        # next request's figures would otherwise wait 0.1 s, longer than the look-up takes.
        wait_for(lambda rid=before: whole(_trace(rid)), timeout=10, what="the previous trace")
        rid = before = f"trace-at-once-{i}"
        assert httpx.get(f"{cluster}/traced", headers={"x-request-id": rid}, timeout=10).status_code == 200
        t = _trace(rid)
        assert whole(t), f"right after the response, the trace was {t}"
        assert t["deployment"] == "Outer" and t["downstream_calls"][0]["deployment"] == "Inner"  # type: ignore[index]
        _check_sums(t)  # type: ignore[arg-type]


def test_cli_prints_the_trace(cluster: str) -> None:
    from flotilla.cli import main

    serve.run(Outer.bind(Inner.bind()), name="traced", route_prefix="/traced")
    rid = "trace-me-cli"
    assert httpx.get(f"{cluster}/traced", headers={"x-request-id": rid}, timeout=10).status_code == 200
    wait_for(lambda: _trace(rid), timeout=10, what="the trace")
    res = CliRunner().invoke(main, ["trace", rid, "--address", flotilla.dashboard_url()])
    assert res.exit_code == 0, res.output
    assert f"request {rid}" in res.output and "end-to-end" in res.output
    for stage in STAGES:
        assert stage in res.output
    assert "call traced/Inner" in res.output


def test_stage_histograms_are_exported(cluster: str) -> None:
    serve.run(Outer.bind(Inner.bind()), name="traced", route_prefix="/traced")
    httpx.get(f"{cluster}/traced", timeout=10)

    def stages() -> set[tuple[str, str]]:
        text = httpx.get(flotilla.metrics_url(), timeout=10).text
        return {(s.labels["deployment"], s.labels["stage"])
                for fam in text_string_to_metric_families(text) if fam.name == "flotilla_request_stage_ms"
                for s in fam.samples if s.name.endswith("_count") and s.value > 0}

    want = {("Outer", "router_queue"), ("Outer", "replica_queue"), ("Outer", "user_code"), ("Outer", "downstream"),
            ("Inner", "router_queue"), ("Inner", "user_code")}
    wait_for(lambda: want <= stages(), timeout=15, what="stage histograms")


def test_dashboard_has_a_trace_lookup(cluster: str) -> None:
    base = flotilla.dashboard_url()
    assert 'id="trace-form"' in httpx.get(f"{base}/", timeout=10).text
    assert "/api/flotilla/trace/?id=" in httpx.get(f"{base}/static/dashboard.js", timeout=10).text


@serve.deployment(max_ongoing_requests=8)
class BatchedModel:
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def infer(self, xs: list[int]) -> list[int]:
        return xs

    async def __call__(self, request) -> dict:
        return {"y": await self.infer(1)}


def test_a_lone_batched_request_shows_its_batch_wait(cluster: str) -> None:
    serve.run(BatchedModel.bind(), name="batched", route_prefix="/batched")
    httpx.get(f"{cluster}/batched", timeout=10)  # warm
    rid = "batch-wait-1"
    assert httpx.get(f"{cluster}/batched", headers={"x-request-id": rid}, timeout=10).status_code == 200
    t = wait_for(lambda: _trace(rid), timeout=10, what="the trace")
    # alone, it waits out the 50 ms timeout for a batch that never fills
    assert 45 <= t["stages"]["batch_wait"] <= 150, t["stages"]
    assert t["stages"]["user_code"] < t["stages"]["batch_wait"]
    _check_sums(t)
