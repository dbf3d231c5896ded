"""http_options.request_timeout_s: 408 after the timeout, and the replica's slot comes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from flotilla import serve
from tests.conftest import running_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with running_cluster({"request_timeout_s": 0.5}, num_cpus=2) as url:
        yield url


@serve.deployment(max_ongoing_requests=1)
class Sleepy:
    def __init__(self):
        self.cancelled = 0

    async def __call__(self, request):
        if request.query_params.get("slow"):
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return "fast"

    def cancellations(self):
        return self.cancelled


def test_timed_out_request_gets_408_and_frees_its_slot(url):
    h = serve.run(Sleepy.bind(), name="t", route_prefix="/t")
    with httpx.Client(base_url=url, timeout=30) as c:
        t0 = time.monotonic()
        r = c.get("/t?slow=1")
        assert r.status_code == 408
        assert 0.5 <= time.monotonic() - t0 < 3
        # max_ongoing_requests=1: this only succeeds quickly if the slow request was cancelled.
        t0 = time.monotonic()
        assert c.get("/t").text == "fast"
        assert time.monotonic() - t0 < 1
    assert h.cancellations.remote().result() == 1


@serve.deployment
class Downstream:
    def __init__(self):
        self.cancelled = 0

    async def __call__(self):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    def cancellations(self):
        return self.cancelled


@serve.deployment(max_ongoing_requests=1)
class Upstream:
    def __init__(self, down):
        self.down = down

    async def __call__(self, request):
        if request.query_params.get("slow"):
            await self.down.remote()
        return "fast"


def test_client_disconnect_cancels_the_request_and_its_downstream_calls(url):
    serve.run(Upstream.bind(Downstream.bind()), name="up", route_prefix="/up")
    down = serve.get_deployment_handle("Downstream", "up")
    with httpx.Client(base_url=url, timeout=0.4) as c, pytest.raises(httpx.ReadTimeout):
        c.get("/up?slow=1")  # the client gives up and closes the connection
    from tests.conftest import wait_for

    wait_for(lambda: down.cancellations.remote().result() == 1, timeout=10, what="downstream cancelled")
    with httpx.Client(base_url=url, timeout=30) as c:
        t0 = time.monotonic()
        assert c.get("/up").text == "fast"  # the slot (max_ongoing_requests=1) came back
        assert time.monotonic() - t0 < 1
