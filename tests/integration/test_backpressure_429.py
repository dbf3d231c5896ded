"""Backpressure with http_options.backpressure_status_code=429: Retry-After from the drain rate."""

from __future__ import annotations

import asyncio
import concurrent.futures

import httpx
import pytest

from flotilla import serve
from tests.conftest import running_cluster

pytestmark = pytest.mark.slow


def test_backpressure_429_with_retry_after():
    with running_cluster({"backpressure_status_code": 429}, num_cpus=2) as base:

        @serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
        class Busy:
            async def __call__(self, request):
                await asyncio.sleep(0.3)
                return "done"

        serve.run(Busy.bind(), name="busy", route_prefix="/")
        with httpx.Client(base_url=base, timeout=30) as c, \
                concurrent.futures.ThreadPoolExecutor(6) as pool:
            resps = list(pool.map(lambda _: c.get("/"), range(6)))
        rejected = [r for r in resps if r.status_code == 429]
        assert rejected and any(r.status_code == 200 for r in resps)
        assert all(int(r.headers["retry-after"]) >= 1 for r in rejected)
