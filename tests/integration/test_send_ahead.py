"""A fast deployment at its max_ongoing_requests: routers send each replica a few requests
ahead (about FLOTILLA_REPLICA_QUEUE_MS of its throughput) to wait in its own queue, so the
processes do not sleep between requests, while the user code never runs more than
max_ongoing_requests at once; with FLOTILLA_REPLICA_QUEUE_MS=0 routers keep Ray's strict rule."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from flotilla import serve
from flotilla._private import router as router_mod
from flotilla._private.client import Runtime
from flotilla.serve.schema import DeploymentID
from tests.conftest import running_cluster, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with running_cluster(num_cpus=8) as url:
        yield url


@serve.deployment(max_ongoing_requests=2)
class Counted:
    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    async def __call__(self, i: int) -> int:
        self.now += 1
        self.peak = max(self.peak, self.now)
        await asyncio.sleep(0)  # let any other request that could run start now
        self.now -= 1
        return i

    def peak_seen(self) -> int:
        return self.peak


def _load(h: Any, seconds: float) -> int:
    """Waves of 200 calls for about `seconds`; the most requests the driver's routers (the
    runtime's, and the main thread's lane follower that sends these calls) had in flight on
    the replica at once, sampled on the runtime's loop every turn."""
    rt = Runtime.current()
    dep = DeploymentID("Counted", "ahead")
    peak = [0]
    done = [False]

    def sample() -> None:
        lead = rt.routers.get(dep)
        for r in [lead, *lead.followers] if lead is not None else []:
            if r.ready:
                peak[0] = max(peak[0], max(c.in_flight for c in list(r.ready)))
        if not done[0]:
            rt.loop.call_soon(sample)

    rt.loop.call_soon_threadsafe(sample)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            calls = [h.remote(i) for i in range(200)]
            assert [c.result(timeout_s=30) for c in calls] == list(range(200))
    finally:
        done[0] = True
    return peak[0]


def test_requests_wait_ahead_in_the_replica_never_past_its_slots(cluster: str) -> None:
    h = serve.run(Counted.bind(), name="ahead", route_prefix=None)
    peak_in_flight = _load(h, 1.5)
    assert peak_in_flight > 2, "the router never sent a request ahead of the replica's 2 slots"
    assert peak_in_flight <= 2 + router_mod.REPLICA_QUEUE_MAX
    assert h.peak_seen.remote().result(timeout_s=10) == 2  # the user code: never more than 2 at once
    serve.delete("ahead")


def test_zero_keeps_rays_strict_rule(cluster: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router_mod, "REPLICA_QUEUE_S", 0.0)
    h = serve.run(Counted.bind(), name="ahead", route_prefix=None)
    h.remote(0).result(timeout_s=10)
    rt = Runtime.current()
    dep = DeploymentID("Counted", "ahead")
    r = rt.routers[dep]
    for each in [r, *r.followers]:
        each._ahead_t = 0.0  # worked out again at the next request, with the patched setting
    assert _load(h, 1.0) == 2
    wait_for(lambda: not r.queue, timeout=5, what="the router's queue to empty")
    serve.delete("ahead")
