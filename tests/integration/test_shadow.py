"""Shadow (mirror) traffic (issue #13): `serve.set_shadow` copies a fraction of a route's
requests to another application in the background.

The share mirrored and the /metrics counters; a slow shadow does not slow the primary and its
copies are dropped when the proxy's queue is full; a shadow that raises does not fail the
primary; copies follow a split's route; errors; `delete_shadow` stops mirroring.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import flotilla
from flotilla import serve
from flotilla.serve.exceptions import ConfigError, RayServeException
from tests.conftest import running_cluster, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with running_cluster(num_cpus=8) as url:
        yield url


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class Main:
    async def __call__(self, request: Any) -> str:
        return "main"


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=16)
class Recorder:
    """Counts the HTTP requests it saw (and their paths); `mode`: "ok", "slow" (1 s) or "raise"."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.n = 0
        self.paths: list[str] = []

    async def __call__(self, request: Any) -> str:
        self.n += 1
        self.paths = [*self.paths[-49:], f"{request.method} {request.url.path} {(await request.body()).decode()}"]
        if self.mode == "slow":
            await asyncio.sleep(1.0)
        if self.mode == "raise":
            raise RuntimeError("shadow failure")
        return "shadow"

    def seen(self) -> int:
        return self.n

    def seen_paths(self) -> list[str]:
        return list(self.paths)


@pytest.fixture(scope="module")
def apps(cluster: str) -> Iterator[str]:
    serve.run(Main.bind(), name="main", route_prefix="/main")
    for name, mode in (("shadow", "ok"), ("slow", "slow"), ("boom", "raise")):
        serve.run(Recorder.bind(mode), name=name, route_prefix=f"/{name}")
    yield cluster


@pytest.fixture
def url(apps: str) -> Iterator[str]:
    yield apps
    for name in list(serve.status().shadows):
        serve.delete_shadow(name)


def seen(app: str) -> int:
    return int(serve.get_app_handle(app).seen.remote().result(timeout_s=30))


def send(url: str, path: str, n: int, threads: int = 8) -> list[float]:
    """`n` GETs from `threads` keep-alive clients, all answered 200 by "main"; their latencies (s)."""
    lat: list[float] = []
    errors: list[str] = []
    left = iter(range(n))
    lock = threading.Lock()

    def run() -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            while True:
                with lock:
                    if next(left, None) is None:
                        return
                t0 = time.perf_counter()
                r = c.get(path)
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    if r.status_code != 200 or r.text != "main":
                        errors.append(f"{r.status_code} {r.text[:200]}")

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(90)
    assert errors == [], errors[:5]
    assert len(lat) == n
    return lat


def shadow_counts(route: str, app: str) -> dict[str, float]:
    """flotilla_shadow_requests_total for (route, app) by outcome, from /metrics."""
    out: dict[str, float] = {}
    text = httpx.get(flotilla.metrics_url(), timeout=30).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if (s.name == "flotilla_shadow_requests_total" and s.labels.get("route") == route
                    and s.labels.get("application") == app):
                out[s.labels["outcome"]] = out.get(s.labels["outcome"], 0.0) + s.value
    return out


def test_a_tenth_is_mirrored_and_counted(url: str) -> None:
    base = seen("shadow")
    serve.set_shadow("main", "shadow", 0.1)
    st = serve.status().shadows["main"]
    assert (st.route_prefix, st.target, st.fraction, st.max_queue, st.message) == ("/main", "shadow", 0.1, 100, "")
    t0 = time.monotonic()
    send(url, "/main", 1000)
    elapsed = time.monotonic() - t0

    def settled() -> tuple[int, dict[str, float]] | None:
        n = seen("shadow") - base
        m = shadow_counts("/main", "shadow")
        return (n, m) if n > 0 and m.get("ok", 0.0) == n else None

    n, m = wait_for(settled, timeout=20, what="the shadow's count and /metrics to agree")
    print(f"10% shadow: the shadow saw {n} of 1000 ({n / 10:.1f}%); metrics {m}; primary in {elapsed:.1f}s")
    assert 60 <= n <= 140, n
    assert m.get("error", 0) == 0 and m.get("dropped", 0) == 0 and m.get("skipped", 0) == 0, m


def test_the_copy_has_the_path_below_the_prefix_and_the_body(url: str) -> None:
    serve.set_shadow("main", "shadow", 1.0)
    r = httpx.post(f"{url}/main/x/y?q=1", content=b"hello")
    assert r.text == "main"
    wait_for(lambda: "POST /shadow/x/y hello" in serve.get_app_handle("shadow").seen_paths.remote().result(timeout_s=30),
             timeout=10, what="the mirrored POST")


def test_a_split_route_can_be_shadowed(url: str) -> None:
    serve.set_traffic("front", {"main": 1.0})
    try:
        serve.set_shadow("front", "shadow", 1.0)
        assert serve.status().shadows["front"].route_prefix == "/front"
        base = seen("shadow")
        send(url, "/front", 20, threads=2)
        wait_for(lambda: seen("shadow") - base == 20, timeout=10, what="20 copies of the split's requests")
    finally:
        serve.delete_shadow("front")
        serve.delete_traffic("front")


def test_a_slow_shadow_does_not_slow_the_primary(url: str) -> None:
    send(url, "/main", 50)  # warm
    without = send(url, "/main", 300)
    serve.set_shadow("main", "slow", 1.0, max_queue=5)
    with_shadow = send(url, "/main", 300)
    p50_0, p50_1 = statistics.median(without) * 1000, statistics.median(with_shadow) * 1000
    max_0, max_1 = max(without) * 1000, max(with_shadow) * 1000
    # the proxy pushes its counters periodically: wait for them all (300 copies, 4 in flight
    # + 5 queued at a time, so at least 200 dropped), not for the first push
    m = wait_for(lambda: (lambda c: c if c.get("dropped", 0) >= 200 else None)(shadow_counts("/main", "slow")),
                 timeout=20, what="dropped copies counted")
    print(f"slow shadow (1 s, queue 5): primary p50 {p50_0:.1f} -> {p50_1:.1f} ms, "
          f"max {max_0:.1f} -> {max_1:.1f} ms; shadow outcomes {m}")
    assert p50_1 <= 3 * p50_0 + 10, (p50_0, p50_1)
    assert max_1 < 1000, max_1  # a primary that waited for its copy would take >= 1 s


def test_a_shadow_that_raises_does_not_fail_the_primary(url: str) -> None:
    serve.set_shadow("main", "boom", 0.5)
    send(url, "/main", 200)  # asserts 200 answers from "main"
    m = wait_for(lambda: (lambda c: c if c.get("error", 0) >= 40 else None)(shadow_counts("/main", "boom")),
                 timeout=20, what="errors counted")
    print(f"raising shadow: outcomes {m}")
    assert m.get("ok", 0) == 0, m


def test_delete_shadow_stops_mirroring(url: str) -> None:
    serve.set_shadow("main", "shadow", 1.0)
    base = seen("shadow")
    send(url, "/main", 20, threads=2)
    wait_for(lambda: seen("shadow") - base == 20, timeout=10, what="20 copies")
    serve.delete_shadow("main")
    assert "main" not in serve.status().shadows
    last = [seen("shadow")]

    def quiet() -> bool:  # 20 requests that made no copy: the proxy has the deletion
        send(url, "/main", 20, threads=2)
        now = seen("shadow")
        ok = now == last[0]
        last[0] = now
        return ok

    wait_for(quiet, timeout=10, what="no more copies")
    send(url, "/main", 200)
    assert seen("shadow") == last[0]
    with pytest.raises(RayServeException, match="has no shadow"):
        serve.delete_shadow("main")


def test_bad_arguments(url: str) -> None:
    for bad in (0, 1.5, -0.1, "0.5", True):
        with pytest.raises(ValueError, match="fraction"):
            serve.set_shadow("main", "shadow", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_queue"):
        serve.set_shadow("main", "shadow", 0.5, max_queue=0)
    with pytest.raises(ConfigError, match=r"target application \"nope\" does not exist; applications: \[.*'shadow'"):
        serve.set_shadow("main", "nope", 0.5)
    with pytest.raises(ConfigError, match="neither an application"):
        serve.set_shadow("nope", "shadow", 0.5)
    with pytest.raises(ConfigError, match="itself"):
        serve.set_shadow("main", "main", 0.5)
    assert serve.status().shadows == {}
