"""Streaming: generators through handles, StreamingResponse over HTTP, chunks as produced."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from starlette.responses import StreamingResponse

from flotilla import serve

pytestmark = pytest.mark.slow


@serve.deployment
class Streamer:
    def __init__(self):
        self.produced = []

    def numbers(self, n):
        yield from range(n)

    async def anumbers(self, n):
        for i in range(n):
            await asyncio.sleep(0)
            yield i * 10

    def plain(self):
        return [1]

    async def __call__(self, request):
        async def gen():
            for i in range(3):
                self.produced.append((i, time.time()))
                yield f"chunk{i}\n"
                await asyncio.sleep(0.3)

        return StreamingResponse(gen(), media_type="text/plain")

    def produced_at(self):
        return self.produced


def test_handle_streams_sync_and_async_generators(url):
    h = serve.run(Streamer.bind(), name="s", route_prefix=None)
    assert list(h.options(stream=True).numbers.remote(5)) == [0, 1, 2, 3, 4]
    assert list(h.options(stream=True, method_name="anumbers").remote(3)) == [0, 10, 20]

    async def consume():
        return [x async for x in h.options(stream=True).anumbers.remote(2)]

    assert asyncio.run(consume()) == [0, 10]
    # Ray's messages, word for word (its tests match them)
    with pytest.raises(TypeError, match=r"Method 'numbers' returned a generator. You must use "
                                        r"`handle.options\(stream=True\)` to call generators on a deployment."):
        h.numbers.remote(3).result()
    with pytest.raises(TypeError, match=r"Called method 'plain' with `handle.options\(stream=True\)` but it "
                                        r"did not return a generator."):
        list(h.options(stream=True).plain.remote())


@serve.deployment
def counting(n: int):
    yield from range(n)


@serve.deployment
def not_streaming() -> int:
    return 1


def test_a_function_deployment_is_named_by_its_function_in_the_stream_errors(url):
    """As Ray's: the function's own name, not `__call__`."""
    h = serve.run(counting.bind(), name="fs", route_prefix=None)
    assert list(h.options(stream=True).remote(3)) == [0, 1, 2]
    with pytest.raises(TypeError, match=r"Method 'counting' returned a generator"):
        h.remote(3).result()
    g = serve.run(not_streaming.bind(), name="fns", route_prefix=None)
    with pytest.raises(TypeError, match=r"Called method 'not_streaming' with `handle.options\(stream=True\)`"):
        list(g.options(stream=True).remote())


def test_http_streaming_delivers_first_chunk_before_last_is_produced(url):
    h = serve.run(Streamer.bind(), name="s", route_prefix="/s")
    arrivals = []
    with httpx.Client(base_url=url, timeout=30) as c, c.stream("GET", "/s") as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                arrivals.append((line, time.time()))
    assert [a[0] for a in arrivals] == ["chunk0", "chunk1", "chunk2"]
    produced = h.produced_at.remote().result()
    # chunk0 reached the client before chunk2 was produced in the replica.
    assert arrivals[0][1] < produced[2][1]


@serve.deployment
class Endless:
    def __init__(self):
        self.state = {"produced": 0, "closed": False}

    async def __call__(self, request):
        async def gen():
            try:
                while True:
                    self.state["produced"] += 1
                    yield b"x" * 100 + b"\n"
                    await asyncio.sleep(0.05)
            finally:
                self.state["closed"] = True

        return StreamingResponse(gen(), media_type="text/plain")

    def status(self):
        return dict(self.state)


def test_client_disconnect_stops_the_generator_in_the_replica(url):
    h = serve.run(Endless.bind(), name="endless", route_prefix="/endless")
    with httpx.Client(base_url=url, timeout=30) as c, c.stream("GET", "/endless") as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 3:
                break
    from tests.conftest import wait_for

    wait_for(lambda: h.status.remote().result()["closed"], timeout=10, what="generator closed")
    produced = h.status.remote().result()["produced"]
    time.sleep(0.3)
    assert h.status.remote().result()["produced"] == produced


@serve.deployment
class GenIngress:
    async def __call__(self, request):
        for i in range(3):
            yield f"part{i};"
            await asyncio.sleep(0.01)


@serve.deployment
def sync_gen(request):
    yield from (f"n{i};" for i in range(3))


def test_generator_ingress_streams_over_http(url):
    serve.run(GenIngress.bind(), name="g", route_prefix="/g")
    serve.run(sync_gen.bind(), name="sg", route_prefix="/sg")
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/g").text == "part0;part1;part2;"
        assert c.get("/sg").text == "n0;n1;n2;"
