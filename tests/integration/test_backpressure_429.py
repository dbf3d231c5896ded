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


def test_a_deployments_backpressure_config_sets_its_answer():
    """Ray 2.60's per-deployment `backpressure_config`: 429 with a fixed Retry-After here, the
    proxy's default (503) for the deployment without one."""
    from flotilla.serve.config import BackpressureConfig

    with running_cluster(num_cpus=2) as base:

        @serve.deployment(max_ongoing_requests=1, max_queued_requests=1,
                          backpressure_config=BackpressureConfig(status_code=429, retry_after_s=4.2))
        class Busy:
            async def __call__(self, request):
                await asyncio.sleep(0.3)
                return "done"

        serve.run(Busy.bind(), name="own", route_prefix="/own")
        serve.run(Busy.options(backpressure_config=None).bind(), name="plain", route_prefix="/plain")
        with httpx.Client(base_url=base, timeout=30) as c, \
                concurrent.futures.ThreadPoolExecutor(6) as pool:
            own = list(pool.map(lambda _: c.get("/own"), range(6)))
            plain = list(pool.map(lambda _: c.get("/plain"), range(6)))
        assert {r.status_code for r in own} == {200, 429}
        assert all(r.headers["retry-after"] == "5" for r in own if r.status_code == 429)
        assert {r.status_code for r in plain} == {200, 503}
        assert all("retry-after" not in r.headers for r in plain)


@serve.deployment(max_ongoing_requests=1, max_queued_requests=1, ray_actor_options={"num_cpus": 0})
class Child:
    async def __call__(self) -> str:
        await asyncio.sleep(0.3)
        return "done"


async def _three(child) -> list:
    return await asyncio.gather(*[child.remote() for _ in range(3)])  # the third is refused


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Parent:
    def __init__(self, child) -> None:
        self.child = child

    async def __call__(self, request) -> list:
        return await _three(self.child)


def test_a_refused_call_to_another_deployment_answers_the_http_request_as_backpressure():
    """A BackPressureError raised out of an HTTP request's code (plain or FastAPI) was a 500."""
    from fastapi import FastAPI

    from flotilla.serve.config import BackpressureConfig

    app = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class FastParent:
        def __init__(self, child) -> None:
            self.child = child

        @app.get("/")
        async def root(self) -> list:
            return await _three(self.child)

    with running_cluster(num_cpus=2) as base:
        serve.run(Parent.bind(Child.bind()), name="plain", route_prefix="/plain")
        serve.run(FastParent.bind(Child.bind()), name="fast", route_prefix="/fast")
        own = Child.options(backpressure_config=BackpressureConfig(status_code=429, retry_after_s=2))
        serve.run(Parent.bind(own.bind()), name="own", route_prefix="/own")
        with httpx.Client(base_url=base, timeout=30) as c:
            for route in ("/plain", "/fast/"):
                r = c.get(route)
                assert r.status_code == 503, (route, r.status_code, r.text)
                assert r.text.startswith("Request dropped due to backpressure"), r.text
            r = c.get("/own")
            assert (r.status_code, r.headers.get("retry-after")) == (429, "2"), (r.status_code, r.headers)
