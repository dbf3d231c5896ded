"""`handle.broadcast(method, ...)` (Ray 2.60): one call on every replica, results collected
with `.results()` / `await .results_async()`; and the handle's `is_initialized`,
`running_replicas_populated()`, `_init()` and `shutdown()`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest

from flotilla import serve
from flotilla.serve.handle import DeploymentBroadcastResponse
from tests.conftest import running_cluster, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with running_cluster(num_cpus=8) as url:
        yield url


@serve.deployment(num_replicas=3, max_ongoing_requests=1)
class Cache:
    def __init__(self) -> None:
        self.entries = {"a": 1}
        self.resets = 0

    def reset_cache(self, keep: str | None = None) -> dict[str, Any]:
        self.entries = {k: v for k, v in self.entries.items() if k == keep}
        self.resets += 1
        return {"pid": os.getpid(), "resets": self.resets}

    def fail(self) -> None:
        raise ValueError(f"no luck in {os.getpid()}")

    async def slow(self) -> str:
        await asyncio.sleep(2)
        return "late"

    def __call__(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "resets": self.resets}


def test_broadcast_reaches_every_replica_once(cluster: str) -> None:
    h = serve.run(Cache.bind(), name="cache", route_prefix=None)
    pids: set[int] = set()

    def three() -> bool:
        pids.update(h.remote().result(timeout_s=10)["pid"] for _ in range(12))
        return len(pids) == 3

    wait_for(three, timeout=20, what="answers from three replicas")
    resp = h.broadcast("reset_cache", keep="a")
    assert isinstance(resp, DeploymentBroadcastResponse)
    out = resp.results(timeout_s=10)
    assert sorted(r["pid"] for r in out) == sorted(pids)
    assert [r["resets"] for r in out] == [1, 1, 1]
    assert resp.results() == out  # asked again: the same results
    again = h.broadcast("reset_cache").results(timeout_s=10)
    assert [r["resets"] for r in again] == [2, 2, 2]


def test_broadcast_errors_raise_or_are_returned(cluster: str) -> None:
    h = serve.run(Cache.bind(), name="cache", route_prefix=None)
    with pytest.raises(ValueError, match="no luck"):
        h.broadcast("fail").results(timeout_s=10)
    got = h.broadcast("fail").results(timeout_s=10, return_exceptions=True)
    assert len(got) == 3 and all(isinstance(e, ValueError) for e in got)
    with pytest.raises(TimeoutError, match="broadcast"):
        h.broadcast("slow").results(timeout_s=0.2)
    with pytest.raises(ValueError, match="negative"):
        h.broadcast("reset_cache").results(timeout_s=-1)


def test_broadcast_from_async_code(cluster: str) -> None:
    h = serve.run(Cache.bind(), name="cache", route_prefix=None)

    async def main() -> list[Any]:
        resp = h.broadcast("reset_cache")
        with pytest.raises(RuntimeError, match="results_async"):
            resp.results()
        return await resp.results_async(timeout_s=10)

    assert len(asyncio.run(main())) == 3


@serve.deployment
class Caller:
    def __init__(self, cache) -> None:
        self.cache = cache

    async def __call__(self) -> int:
        return len(await self.cache.broadcast("reset_cache").results_async(timeout_s=10))


def test_broadcast_from_a_deployment(cluster: str) -> None:
    h = serve.run(Caller.bind(Cache.bind()), name="composed", route_prefix=None)
    assert h.remote().result(timeout_s=20) == 3


def test_handle_initialization_as_ray(cluster: str) -> None:
    serve.run(Cache.bind(), name="cache", route_prefix=None)
    h = serve.get_deployment_handle("Cache", "cache")
    assert not h.is_initialized and not h.running_replicas_populated()
    h._init()
    assert h.is_initialized
    with pytest.raises(RuntimeError, match="already been initialized"):
        h._init()
    wait_for(h.running_replicas_populated, timeout=10, what="the router to know the replicas")
    h2 = serve.get_deployment_handle("Cache", "cache")
    h2.remote().result(timeout_s=10)
    assert h2.is_initialized
    h2.shutdown()
    asyncio.run(h2.shutdown_async())
    assert h2.options(method_name="reset_cache").is_initialized
