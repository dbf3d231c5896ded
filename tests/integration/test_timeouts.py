"""http_options.request_timeout_s: 408 after the timeout, and the replica's slot comes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

import flotilla
from flotilla import serve
from tests.conftest import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    if flotilla.is_initialized():
        flotilla.shutdown()
    flotilla.init(num_cpus=2)
    port = free_port()
    serve.start(http_options={"port": port, "request_timeout_s": 0.5})
    yield f"http://127.0.0.1:{port}"
    flotilla.shutdown()


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


def test_backpressure_429_with_retry_after():
    if flotilla.is_initialized():
        flotilla.shutdown()
    flotilla.init(num_cpus=2)
    try:
        port = free_port()
        serve.start(http_options={"port": port, "backpressure_status_code": 429})

        @serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
        class Busy:
            async def __call__(self, request):
                await asyncio.sleep(0.3)
                return "done"

        serve.run(Busy.bind(), name="busy", route_prefix="/")
        import concurrent.futures

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c, \
                concurrent.futures.ThreadPoolExecutor(6) as pool:
            resps = list(pool.map(lambda _: c.get("/"), range(6)))
        rejected = [r for r in resps if r.status_code == 429]
        assert rejected and any(r.status_code == 200 for r in resps)
        assert all(int(r.headers["retry-after"]) >= 1 for r in rejected)
    finally:
        flotilla.shutdown()
