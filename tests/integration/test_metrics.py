"""Prometheus metrics from every process, custom metrics, request ids and access logs."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import flotilla
from flotilla import serve
from flotilla._private.client import Runtime
from flotilla.serve.metrics import Counter, Gauge, Histogram
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

REQUESTS = Counter("my_model_requests_total", "Total requests", tag_keys=("kind",))
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
        logging.getLogger("user").info("user log line for %s", request.url.path)
        if request.query_params.get("fail"):
            raise ValueError("failing on purpose")
        return {"request_id": serve.get_request_context().request_id}


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

    m = scrape()
    assert total(m, "ray_serve_num_http_requests_total", application="mon", route="/mon", status_code="200") == 21
    assert total(m, "ray_serve_num_http_requests_total", application="mon", status_code="500") == 5
    assert total(m, "ray_serve_num_http_error_requests_total", application="mon", error_code="500") == 5
    assert total(m, "ray_serve_http_request_latency_ms_count", application="mon") == 26
    assert total(m, "ray_serve_deployment_request_counter_total", deployment="Monitored", application="mon") == 26
    assert total(m, "ray_serve_deployment_error_counter_total", deployment="Monitored") == 5
    assert total(m, "ray_serve_deployment_processing_latency_ms_count", deployment="Monitored") == 26
    assert total(m, "ray_serve_deployment_replica_healthy", deployment="Monitored") == 2
    assert total(m, "ray_serve_deployment_replica_starts_total", deployment="Monitored") == 2
    # Custom metrics from two replicas arrive under two replica labels, summing to the total.
    per_replica = [s for s in m["my_model_requests_total"] if s.labels["deployment"] == "Monitored"]
    assert len({s.labels["replica"] for s in per_replica}) == 2
    assert sum(s.value for s in per_replica) == 26
    assert total(m, "my_model_latency_seconds_count", deployment="Monitored") == 26
    assert len([s for s in m["my_model_loaded"] if s.labels["deployment"] == "Monitored"]) == 2

    # One access-log line per request, with its id, and user logging lines carry the id too.
    logs = os.path.join(Runtime.current().session_dir, "logs")

    def logged():
        text = "".join(Path(p).read_text() for p in glob.glob(f"{logs}/replica_mon_*.log"))
        done = text.count(" /mon 200 ") == 21 and text.count(" /mon 500 ") == 5
        return done and "[my-id-123] user: user log line" in text and text

    text = wait_for(logged, what="log lines")
    assert "my-id-123 /mon 200" in text
    wait_for(lambda: "my-id-123 GET /mon 200" in Path(f"{logs}/proxy.log").read_text(), what="proxy access log")


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
