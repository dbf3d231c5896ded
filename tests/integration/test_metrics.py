"""Prometheus metrics from every process, custom metrics, request ids and access logs.

Processes push their metrics to the head every `FLOTILLA_METRICS_PUSH_INTERVAL_S` (here 0.25 s)
and `/metrics` answers from the head's aggregate: a scrape never calls into a replica or the
proxy, so it costs the data plane nothing, and answers while a replica's event loop is blocked.
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import flotilla
from flotilla import serve
from flotilla._private.client import Runtime
from flotilla.serve.metrics import Counter, Gauge, Histogram
from tests.conftest import descendants, env_vars, local_only, running_cluster, title, wait_for
from tests.load import Load

pytestmark = pytest.mark.slow

PUSH_S = 0.25  # FLOTILLA_METRICS_PUSH_INTERVAL_S in this module's cluster
RETAIN_S = 3.0  # FLOTILLA_METRICS_RETAIN_S: how long a departed process's counters are kept

REQUESTS = Counter("my_model_requests_total", "Total requests", tag_keys=("kind",))
BY_ROUTE = Counter("my_model_routed", "Requests by route", tag_keys=("route",))
LATENCY = Histogram("my_model_latency_seconds", "Request latency")
LOADED = Gauge("my_model_loaded", "Models loaded")


@serve.deployment(num_replicas=2)
class Monitored:
    def __init__(self):
        LOADED.set(1)

    async def __call__(self, request):
        import logging

        with LATENCY.time():
            REQUESTS.inc(tags={"kind": "http"})
        BY_ROUTE.inc()  # `route` is filled in from the request, as in Ray Serve
        logging.getLogger("user").info("user log line for %s", request.url.path)
        if request.query_params.get("fail"):
            raise ValueError("failing on purpose")
        return {"request_id": serve.get_request_context().request_id}

    def ping(self) -> str:
        return "pong"

    async def hold(self, s: float) -> str:
        import asyncio

        await asyncio.sleep(s)
        return "held"


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    env = {"FLOTILLA_METRICS_PUSH_INTERVAL_S": str(PUSH_S), "FLOTILLA_METRICS_RETAIN_S": str(RETAIN_S),
           "RAY_SERVE_EVENT_LOOP_MONITORING_INTERVAL_S": "0.2"}
    with env_vars(**env), running_cluster(num_cpus=8) as url:
        yield url


def scrape() -> dict[str, list]:
    text = httpx.get(flotilla.metrics_url(), timeout=30).text
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def total(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def test_counts_latency_custom_metrics_and_request_ids(url):
    serve.run(Monitored.bind(), name="mon", route_prefix="/mon")
    with httpx.Client(base_url=url, timeout=30) as c:
        ok = [c.get("/mon") for _ in range(20)]
        bad = [c.get("/mon?fail=1") for _ in range(5)]
        mine = c.get("/mon", headers={"X-Request-ID": "my-id-123"})
    assert all(r.status_code == 200 for r in ok) and all(r.status_code == 500 for r in bad)
    # Request ids: generated when absent, kept when given, returned as a header, seen in the replica.
    assert ok[0].headers["x-request-id"] == ok[0].json()["request_id"] != ""
    assert len({r.headers["x-request-id"] for r in ok}) == 20
    assert mine.headers["x-request-id"] == "my-id-123" and mine.json()["request_id"] == "my-id-123"

    # Pushed by each process within the push interval.
    m = wait_for(lambda: (m := scrape()) and total(m, "ray_serve_num_http_requests_total", application="mon") == 26
                 and total(m, "ray_serve_deployment_request_counter_total", application="mon") == 26 and m,
                 timeout=10, what="the counts pushed")
    assert total(m, "ray_serve_num_http_requests_total", application="mon", route="/mon", status_code="200") == 21
    assert total(m, "ray_serve_num_http_requests_total", application="mon", status_code="500") == 5
    assert total(m, "ray_serve_num_http_error_requests_total", application="mon", error_code="500") == 5
    assert total(m, "ray_serve_num_deployment_http_error_requests_total", deployment="Monitored", application="mon",
                 error_code="500", method="GET", route="/mon") == 5
    assert total(m, "ray_serve_http_request_latency_ms_count", application="mon") == 26
    assert total(m, "ray_serve_deployment_request_counter_total", deployment="Monitored", application="mon") == 26
    assert total(m, "ray_serve_deployment_error_counter_total", deployment="Monitored") == 5
    assert total(m, "ray_serve_deployment_processing_latency_ms_count", deployment="Monitored") == 26
    assert total(m, "ray_serve_deployment_replica_healthy", deployment="Monitored") == 2
    assert total(m, "ray_serve_deployment_replica_starts_total", deployment="Monitored") == 2
    # Routers count what they send: the proxy's 26, then handle calls from this driver.
    assert total(m, "ray_serve_num_router_requests_total", deployment="Monitored", application="mon",
                 handle="proxy", route="/mon") == 26
    assert total(m, "ray_serve_handle_request_counter_total", deployment="Monitored", handle="proxy") == 26
    h = serve.get_app_handle("mon")
    for _ in range(7):
        h.options(method_name="ping").remote().result()
    wait_for(lambda: total(scrape(), "ray_serve_handle_request_counter_total", deployment="Monitored",
                           application="mon", handle="driver") == 7, timeout=10, what="the driver's handle calls")
    assert total(scrape(), "ray_serve_num_router_requests_total", deployment="Monitored", handle="driver") == 7
    held = [h.options(method_name="hold").remote(3.0) for _ in range(3)]
    wait_for(lambda: total(scrape(), "ray_serve_num_ongoing_requests_at_replicas", deployment="Monitored",
                           handle="driver") == 3, timeout=10, what="3 requests on replicas")
    assert [r.result(timeout_s=30) for r in held] == ["held"] * 3
    wait_for(lambda: total(scrape(), "ray_serve_num_ongoing_requests_at_replicas", deployment="Monitored",
                           handle="driver") == 0, timeout=10, what="none on replicas any more")
    m = scrape()
    # Custom metrics from two replicas arrive under two replica labels, summing to the total.
    per_replica = [s for s in m["my_model_requests_total"] if s.labels["deployment"] == "Monitored"]
    assert len({s.labels["replica"] for s in per_replica}) == 2
    assert sum(s.value for s in per_replica) == 26
    assert total(m, "my_model_latency_seconds_count", deployment="Monitored") == 26
    assert total(m, "my_model_routed_total", deployment="Monitored", route="/mon") == 26
    assert len([s for s in m["my_model_loaded"] if s.labels["deployment"] == "Monitored"]) == 2

    # One access-log line per request, with its id, and user logging lines carry the id too.
    logs = os.path.join(Runtime.current().session_dir, "logs")

    def logged():
        text = "".join(Path(p).read_text() for p in glob.glob(f"{logs}/replica_mon_*.log"))
        done = text.count(" GET /mon 200 ") == 21 and text.count(" GET /mon 500 ") == 5
        return done and " my-id-123 -- user log line for /mon" in text and text

    text = wait_for(logged, what="log lines")
    assert "my-id-123 -- GET /mon 200" in text  # as Ray's: the request id, then the method and the route
    wait_for(lambda: "my-id-123 -- GET /mon 200" in Path(f"{logs}/proxy.log").read_text(), what="proxy access log")


@serve.deployment(autoscaling_config={"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 0.2,
                                      "downscale_delay_s": 60, "metrics_interval_s": 0.1,
                                      "look_back_period_s": 0.5},
                  health_check_period_s=0.2, user_config={"n": 1})
class Batched:
    def reconfigure(self, config: dict) -> None:
        self.n = config["n"]

    def check_health(self) -> None:
        pass

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def double(self, xs: list[int]) -> list[int]:
        return [2 * x for x in xs]


def test_ray_lifecycle_batching_autoscaling_and_status_metrics(url):
    """The tables of Ray's monitoring guide: lifecycle, batching, autoscaling and status."""
    h = serve.run(Batched.bind(), name="tables", route_prefix=None)
    assert sorted(h.options(method_name="double").remote(i).result() for i in range(1)) == [0]
    calls = [h.options(method_name="double").remote(i) for i in range(8)]
    assert sorted(c.result(timeout_s=30) for c in calls) == [2 * i for i in range(8)]
    serve.run(Batched.options(user_config={"n": 2}).bind(), name="tables", route_prefix=None)
    dep = {"deployment": "Batched", "application": "tables"}

    def seen() -> dict[str, list] | None:
        m = scrape()
        want = ["ray_serve_batches_processed_total", "ray_serve_actual_batch_size_count",
                "ray_serve_batch_wait_time_ms_count", "ray_serve_batch_execution_time_ms_count",
                "ray_serve_batch_utilization_percent_count", "ray_serve_replica_startup_latency_ms_count",
                "ray_serve_replica_initialization_latency_ms_count", "ray_serve_replica_reconfigure_latency_ms_count",
                "ray_serve_health_check_latency_ms_count"]
        return m if all(total(m, name, **dep) > 0 for name in want) else None

    m = wait_for(seen, timeout=15, what="the lifecycle and batching metrics")
    fn = {"function_name": "double", **dep}
    assert total(m, "ray_serve_batches_processed_total", **fn) >= 2
    assert total(m, "ray_serve_actual_batch_size_sum", **fn) == 9  # every call in some batch
    assert total(m, "ray_serve_actual_batch_size_bucket", le="4.0", **fn) == total(
        m, "ray_serve_actual_batch_size_count", **fn)  # none bigger than max_batch_size
    assert "ray_serve_batch_queue_length" in m
    assert total(m, "ray_serve_replica_startup_latency_ms_count", **dep) == 1
    assert total(m, "ray_serve_replica_initialization_latency_ms_count", **dep) == 1
    assert total(m, "ray_serve_replica_reconfigure_latency_ms_count", **dep) >= 1
    # Status gauges: Ray's numbers (6 = HEALTHY, 6 = RUNNING).
    assert total(m, "ray_serve_deployment_status", **dep) == 6
    assert total(m, "ray_serve_application_status", application="tables") == 6
    # Autoscaling: Ray's target, desired and total-requests gauges, and the policy's run time.
    assert total(m, "ray_serve_autoscaling_target_replicas", **dep) == 1
    for name in ("ray_serve_autoscaling_desired_replicas", "ray_serve_autoscaling_total_requests"):
        assert [s.labels["deployment"] for s in m[name] if s.labels["application"] == "tables"] == ["Batched"]
    # Idle (once the calls left the look-back window), the load asks for 0, below min_replicas.
    wait_for(lambda: total(scrape(), "ray_serve_autoscaling_desired_replicas", **dep) == 0, timeout=10,
             what="desired replicas 0 when idle")
    assert [s.labels["policy_scope"] for s in m["ray_serve_autoscaling_policy_execution_time_ms"]
            if s.labels.get("application") == "tables"] == ["deployment"]
    serve.delete("tables")
    m = wait_for(lambda: (m := scrape()) and total(m, "ray_serve_replica_shutdown_duration_ms_count", **dep) == 1
                 and m, timeout=15, what="the replica's shutdown time")
    assert not [s for s in m.get("ray_serve_deployment_status", []) if s.labels.get("application") == "tables"]


def test_invalid_metric_definitions():
    with pytest.raises(ValueError):
        Counter("")
    with pytest.raises(ValueError):
        Counter("bad name!")
    with pytest.raises(TypeError):
        Counter("c", tag_keys="kind")
    c = Counter("ok_counter", tag_keys=("a",))
    with pytest.raises(ValueError, match="missing"):
        c.inc()
    with pytest.raises(ValueError, match="unknown tag"):
        c.inc(tags={"b": "x"})
    with pytest.raises(ValueError):
        c.inc(-1, tags={"a": "x"})
    c.set_default_tags({"a": "x"})
    c.inc()
    with pytest.raises(ValueError):
        Histogram("h", boundaries=[3, 1])


# ---- pushed metrics: staleness, scrape cost, departed replicas, head restarts ----------------


@serve.deployment(num_replicas=1, graceful_shutdown_wait_loop_s=0.05)
class Blocking:
    async def __call__(self, request):
        block = float(request.query_params.get("block", 0))
        if block:
            time.sleep(block)  # on purpose: blocks this replica's event loop
        return "ok"


def series(m: dict[str, list], name: str, **labels: str) -> list:
    return [s for s in m.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]


def pids(name: str) -> list[int]:
    return sorted(p for p in descendants(os.getpid()) if title(p) == name)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_scrape(port: int) -> bytes:
    """One GET /metrics with a plain socket (cheap for the client: the storm measures the server)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    data = b"".join(chunks)
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    return data


SCRAPER = """
import socket, sys, time
port, rate, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
n, t0 = 0, time.monotonic()
while time.monotonic() - t0 < seconds:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        while s.recv(65536):
            pass
    n += 1
    time.sleep(max(0.0, t0 + n / rate - time.monotonic()))
print(n)
"""


def test_metrics_arrive_within_the_push_interval(url):
    serve.run(Blocking.bind(), name="fresh", route_prefix="/fresh")
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(10):
            assert c.get("/fresh").status_code == 200
    t0 = time.monotonic()
    wait_for(lambda: total(m := scrape(), "ray_serve_num_http_requests_total", application="fresh") == 10
             and total(m, "ray_serve_deployment_request_counter_total", application="fresh") == 10,
             timeout=10, interval=0.01, what="the counts")
    # Stale by at most one push interval (plus a scrape and scheduling on a busy 2-core box).
    assert time.monotonic() - t0 < PUSH_S + 1.0


def test_a_scrape_answers_while_every_replica_loop_is_blocked(url):
    serve.run(Blocking.bind(), name="blk", route_prefix="/blk")
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(5):
            assert c.get("/blk").status_code == 200
    wait_for(lambda: total(scrape(), "ray_serve_deployment_request_counter_total", application="blk") == 5,
             timeout=10, what="the counts")
    blocked = threading.Thread(target=lambda: httpx.get(f"{url}/blk?block=4", timeout=30))
    blocked.start()
    try:
        time.sleep(0.5)  # the replica's loop is now stuck in time.sleep
        t0 = time.monotonic()
        m = scrape()
        took = time.monotonic() - t0
        # Answered from the head's aggregate, not by asking the (stuck) replica.
        assert took < 1.0, f"/metrics took {took:.2f}s while the replica's loop was blocked"
        assert total(m, "ray_serve_deployment_request_counter_total", application="blk") == 5
    finally:
        blocked.join()


@local_only("it finds the proxy and replica by their process titles")
def test_a_scrape_storm_costs_the_data_plane_nothing(url):
    serve.run(Blocking.bind(), name="storm", route_prefix="/storm")
    assert httpx.get(f"{url}/storm", timeout=30).status_code == 200
    port = int(flotilla.metrics_url().split(":")[2].split("/")[0])
    procs = pids("flotilla::proxy") + pids("flotilla::replica:storm:Blocking")
    assert len(procs) == 2, procs
    # Idle data plane: 2,000 scrapes must not cost the proxy or the replica CPU time.
    before = [cpu_s(p) for p in procs]
    t0 = time.monotonic()
    for _ in range(2000):
        raw_scrape(port)
    took = time.monotonic() - t0
    spent = [cpu_s(p) - b for p, b in zip(procs, before, strict=True)]
    print(f"SCRAPE STORM: 2,000 scrapes in {took:.2f}s; CPU s spent meanwhile by the proxy, the replica: {spent}")
    # What the processes spend anyway (pushes, timers) over the same time, for the message.
    assert max(spent) < 0.03 + 0.01 * took, f"CPU s spent by proxy, replica during {took:.1f}s of scrapes: {spent}"

    # Under load: a phase with a scrape storm (600 scrapes/s from another process, as a
    # Prometheus would) serves about as many requests as the phases before and after it.
    def phase(storm: bool, seconds: float = 2.0) -> tuple[float, int]:
        with Load.http(url, "/storm", threads=4, max_s=30) as load:
            load.wait_ok(20)
            scraper = subprocess.Popen([sys.executable, "-c", SCRAPER, str(port), "600", str(seconds)],
                                       stdout=subprocess.PIPE, text=True) if storm else None
            ok0, t0 = load.ok, time.monotonic()
            time.sleep(seconds)
            rate = (load.ok - ok0) / (time.monotonic() - t0)
            n = int(scraper.communicate(timeout=30)[0]) if scraper is not None else 0
        assert load.failed == 0, load.report()
        return rate, n

    quiet1, _ = phase(False)
    stormy, scrapes = phase(True)
    quiet2, _ = phase(False)
    quiet = (quiet1 + quiet2) / 2
    print(f"SCRAPE STORM: {quiet:.0f} req/s without scrapes, {stormy:.0f} req/s with {scrapes / 2:.0f} scrapes/s")
    assert scrapes >= 300, scrapes
    assert stormy > 0.6 * quiet, (quiet1, stormy, quiet2, scrapes)


def test_a_departed_replica_keeps_its_final_counters_for_a_while(url):
    serve.run(Blocking.bind(), name="gone", route_prefix="/gone")
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(7):
            assert c.get("/gone").status_code == 200
    # Deleted at once, before the next periodic push: its last push on the way out counts all 7.
    serve.delete("gone")
    t0 = time.monotonic()
    m = wait_for(lambda: (m := scrape()) and total(m, "ray_serve_deployment_request_counter_total", application="gone") == 7
                 and m, timeout=2, what="the final counts")
    assert total(m, "ray_serve_deployment_processing_latency_ms_count", application="gone") == 7
    # Its gauges are gone at once (it has no requests in progress); its counters are kept for
    # FLOTILLA_METRICS_RETAIN_S, then dropped (as Ray drops a dead worker's metrics).
    assert series(m, "ray_serve_replica_processing_queries", application="gone") == []
    wait_for(lambda: series(scrape(), "ray_serve_deployment_request_counter_total", application="gone") == [],
             timeout=RETAIN_S + 10, what="the departed replica's counters dropped")
    assert time.monotonic() - t0 > RETAIN_S - 1.0


@local_only("on Ray a head crash ends the session (no restart yet)")
def test_counters_survive_a_head_restart(url):
    serve.run(Blocking.bind(), name="hr", route_prefix="/hr")
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(12):
            assert c.get("/hr").status_code == 200

    def counts() -> tuple[float, float] | None:
        try:
            m = scrape()
        except httpx.HTTPError:
            return None  # the head is away
        return (total(m, "ray_serve_num_http_requests_total", application="hr"),
                total(m, "ray_serve_deployment_request_counter_total", application="hr"))

    wait_for(lambda: counts() == (12, 12), timeout=10, what="the counts")
    [head] = pids("flotilla::head")
    os.kill(head, signal.SIGKILL)
    wait_for(lambda: [p for p in pids("flotilla::head") if p != head], timeout=10, what="a new head")
    # The new head re-learns from the next pushes: a series is absent meanwhile, never lower.
    seen = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        got = counts()
        if got is not None:
            seen.append(got)
            if got == (12, 12):
                break
        time.sleep(0.02)
    assert seen and seen[-1] == (12, 12), seen
    assert all(v in (0, 12) for pair in seen for v in pair), seen
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/hr").status_code == 200
    wait_for(lambda: counts() == (13, 13), timeout=10, what="counts after the restart")


@serve.deployment
class Downstream:
    def __call__(self) -> str:
        return "g1"


@serve.deployment
class Upstream:
    def __init__(self, down):
        self.down = down

    async def __call__(self, request) -> str:
        return await self.down.remote()


def test_calls_made_while_serving_a_request_are_labelled_with_its_route(url):
    """As in Ray: the downstream deployment's request counter and the routers' counters carry
    the route of the HTTP request the call serves ("__call__" and "" before); a driver's own
    calls have route ""."""
    serve.run(Upstream.bind(Downstream.bind()), name="chain", route_prefix="/api")
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(4):
            assert c.get("/api").text == "g1"
    serve.get_deployment_handle("Downstream", "chain").remote().result()

    def counted() -> dict | None:
        m = scrape()
        got = {
            "replica": (total(m, "ray_serve_deployment_request_counter_total", deployment="Downstream", route="/api"),
                        total(m, "ray_serve_deployment_request_counter_total", deployment="Downstream", route="")),
            "router": (total(m, "ray_serve_num_router_requests_total", deployment="Downstream", route="/api"),
                       total(m, "ray_serve_num_router_requests_total", deployment="Downstream", route="")),
            "handle": total(m, "ray_serve_handle_request_counter_total", deployment="Downstream", route="/api"),
        }
        return got if got["replica"] == (4, 1) and got["router"] == (4, 1) else None

    assert wait_for(counted, what="downstream counts by route")["handle"] == 4
    # Ray 2.60's router metrics: the time to a chosen replica, and what waits for one
    wait_for(lambda: total(scrape(), "ray_serve_request_router_fulfillment_time_ms_count", deployment="Upstream",
                           handle="proxy") == 4, what="the proxy's four requests given a replica")
    m = scrape()
    assert total(m, "ray_serve_request_router_fulfillment_time_ms_count", deployment="Downstream", handle="driver") == 1
    assert [s.value for s in m["ray_serve_request_router_queue_len"]
            if s.labels["deployment"] == "Downstream" and s.labels["handle"] == "driver"] == [0.0]


def test_proxies_and_replicas_report_their_event_loops_as_rays(url):
    serve.run(Downstream.bind(), name="loops", route_prefix=None)

    def looked() -> bool:
        m = scrape()
        return (total(m, "ray_serve_event_loop_monitoring_iterations_total", component="replica", deployment="Downstream",
                      application="loops", loop_type="main") >= 2
                and total(m, "ray_serve_event_loop_monitoring_iterations_total", component="proxy") >= 2
                and total(m, "ray_serve_event_loop_scheduling_latency_ms_count", component="replica",
                          deployment="Downstream") >= 1
                and total(m, "ray_serve_event_loop_tasks", component="replica", deployment="Downstream") >= 1)

    wait_for(looked, what="event-loop metrics of the proxy and the replica")
