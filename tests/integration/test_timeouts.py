"""http_options.request_timeout_s: 408 after the timeout, and the replica's slot comes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from flotilla import serve
from tests.conftest import running_cluster, wait_for

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
        r = c.get("/t?slow=1", headers={"X-Request-ID": "late-1"})
        assert r.status_code == 408 and r.text == "Request late-1 timed out after 0.5s."  # Ray's text
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


@serve.deployment
class Streaming:
    def __init__(self):
        self.stopped = 0

    async def __call__(self, request):
        from starlette.responses import StreamingResponse

        async def chunks():
            try:
                for i in range(20):
                    yield f"{i},"
                    await asyncio.sleep(0.1)
            except asyncio.CancelledError:
                self.stopped += 1
                raise

        return StreamingResponse(chunks())

    def stops(self):
        return self.stopped


def test_a_stream_past_request_timeout_s_is_cut_off_and_stopped(url):
    """request_timeout_s is end to end, as Ray's: a stream still going at 0.5 s is cut off
    (the client sees an incomplete response) and its generator stopped."""
    h = serve.run(Streaming.bind(), name="st", route_prefix="/st")
    got = []
    t0 = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream("GET", f"{url}/st", timeout=30) as r:
        assert r.status_code == 200
        for piece in r.iter_text():
            got.append(piece)
    assert time.monotonic() - t0 < 1.5
    assert 1 <= len("".join(got).split(",")) - 1 < 20
    wait_for(lambda: h.stops.remote().result() == 1, timeout=10, what="the generator stopped")
