"""Recording a finished request (proxy, replica, router) keeps its figures until the next
fold without leaving any object the garbage collector tracks: at tens of thousands of
requests a second, one kept tuple or dict per request made the collector run every few
hundred requests and promote each batch through its generations (measured: 90 ms of
collections per 125k requests in the proxy, against 2 ms with metrics off)."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Iterator

import pytest

from flotilla._private import replica as rmod
from flotilla._private.protocol import Http
from flotilla._private.proxy import Proxy
from flotilla._private.router import Router
from flotilla.serve.schema import DeploymentID

N = 2000


@pytest.fixture
def no_collections() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def tracked_growth(record: Callable[[], None]) -> int:
    """How many more GC-tracked objects are alive after N calls of `record`."""
    record()  # lists and caches made on first use
    before = gc.get_count()[0]
    for _ in range(N):
        record()
    return gc.get_count()[0] - before


def test_the_proxy_keeps_no_tracked_object_per_request(no_collections: None) -> None:
    p = Proxy({})
    m = ("/gc", DeploymentID("D", "gcapp"))
    scope = {"method": "GET", "path": "/gc"}
    meta = {"request_id": "gc-1", "route": "/gc"}

    async def main() -> int:
        t0 = time.perf_counter()
        grew = tracked_growth(lambda: p._record(scope, m, None, 200, t0, b"gc-1", meta))
        p.fold()
        return grew

    assert asyncio.run(main()) < N // 100


def test_the_replica_keeps_no_tracked_object_per_request(no_collections: None) -> None:
    async def main() -> int:
        rep = rmod.Replica({"replica_id": "gc-1", "deployment": "gc", "app": "a"})
        meta = {"request_id": "gc-req", "route": "/p"}
        msg = Http({"path": "/p"}, b"", meta)
        t = time.perf_counter()
        grew = tracked_growth(lambda: rep._record(msg, meta, 200, t, t))
        rep._fold()
        return grew

    assert asyncio.run(main()) < N // 100


def test_a_router_keeps_no_tracked_object_per_traced_call(no_collections: None) -> None:
    async def main() -> int:
        router = Router(DeploymentID("d", "app"))
        meta = {"request_id": "gc-call"}
        t = time.perf_counter()
        grew = tracked_growth(lambda: router._traced(meta, t, 0.0))
        router.fold_calls()
        return grew

    assert asyncio.run(main()) < N // 100
