"""Per-replica memory on real processes: a replica that holds 60 MB of its own shows it as
private memory (USS) in `serve.status()`, the REST API, the dashboard snapshot and /metrics."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

import flotilla
from flotilla import serve
from tests import browser
from tests.conftest import local_only, sampling_cluster, wait_for

pytestmark = local_only("the controller reads the replicas' memory from this machine's /proc")

MB = 1 << 20


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with sampling_cluster(num_cpus=2) as url:
        yield url


@serve.deployment
class Holder:
    def __init__(self) -> None:
        self.buf = bytearray(b"\x01") * (60 * MB)  # written: every page resident and private

    def __call__(self) -> int:
        return len(self.buf)


def _json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_a_replica_holding_60_mb_shows_it_as_private_memory(cluster: str) -> None:
    serve.run(Holder.bind(), name="mem", route_prefix=None)
    try:
        def sampled() -> dict[str, Any]:
            mem = serve.status().applications["mem"].deployments["Holder"].replica_memory
            return {rid: m for rid, m in mem.items() if m.uss_bytes >= 50 * MB}

        (rid, m), = wait_for(sampled, timeout=8, interval=0.05, what="the replica's memory in serve.status()").items()
        print("memory-test:", rid, {k: v // MB for k, v in vars(m).items()}, "MB")
        assert m.rss_bytes == m.uss_bytes + m.shared_bytes  # each resident page: private or shared
        assert m.uss_bytes <= m.pss_bytes <= m.rss_bytes

        base = flotilla.dashboard_url()
        assert base
        rest = _json(base + "/api/serve/applications/")["applications"]["mem"]["deployments"]["Holder"]["replicas"]
        (r,) = [r for r in rest if r["replica_id"] == rid]
        assert r["uss_bytes"] >= 50 * MB and r["shared_bytes"] >= 0 and r["pss_bytes"] >= r["uss_bytes"]
        assert r["rss_bytes"] >= r["uss_bytes"]
        snap = _json(base + "/api/flotilla/dashboard/")["applications"]["mem"]["deployments"]["Holder"]["replicas"]
        (r,) = [r for r in snap if r["id"] == rid]
        assert r["uss_bytes"] >= 50 * MB and {"pss_bytes", "shared_bytes", "rss_bytes"} <= set(r)

        def gauges() -> dict[str, float] | None:
            text = urllib.request.urlopen(flotilla.metrics_url(), timeout=10).read().decode()
            found = {}
            for ln in text.splitlines():
                name = ln.split("{", 1)[0]
                if name.startswith("flotilla_replica_memory_") and f'replica="{rid}"' in ln:
                    found[name] = float(ln.rsplit(" ", 1)[1])
            return found if len(found) == 3 else None

        found = wait_for(gauges, timeout=5, interval=0.1, what="the memory gauges")
        assert set(found) == {"flotilla_replica_memory_uss_bytes", "flotilla_replica_memory_pss_bytes",
                              "flotilla_replica_memory_shared_bytes"}
        assert found["flotilla_replica_memory_uss_bytes"] >= 50 * MB
    finally:
        serve.delete("mem")
    assert "mem" not in serve.status().applications


@pytest.mark.skipif(bool(browser.missing()), reason=f"no browser: {browser.missing()}")
def test_the_dashboard_page_shows_private_and_shared_memory(cluster: str) -> None:
    serve.run(Holder.bind(), name="mem2", route_prefix=None)
    cell = '[data-deployment="mem2/Holder"] tr.replica:not(.dead) td.mem'
    try:
        with browser.chrome() as page:
            got = browser.on_dashboard(page, cell, "e.textContent.includes('MiB +') ? [e.textContent, e.title] : null")
        print("memory-test: page shows", got)
        assert got[0].endswith(" shared") and "USS" in got[1] and "PSS" in got[1] and "RSS" in got[1]
    finally:
        serve.delete("mem2")
