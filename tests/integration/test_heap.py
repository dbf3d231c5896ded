"""A proxy and a replica keep the memory of a large body's buffers for the next one (heap.py,
issue 19): after the first requests, 3 MiB bodies cost them next to no page faults."""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest
from starlette.requests import Request

from flotilla import serve
from tests.conftest import descendants, title

pytestmark = pytest.mark.slow

BODY = 3 << 20  # over lean_http.LEAN_BODY_BYTES: the proxy reserves one buffer, the replica reads one frame
PAGES = BODY // 4096


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Size:
    async def __call__(self, request: Request) -> dict[str, Any]:
        return {"n": len(await request.body())}

    def pid(self) -> int:
        return os.getpid()


def minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def test_large_bodies_reuse_the_memory_of_the_last_ones(url: str) -> None:
    h = serve.run(Size.bind(), name="heap", route_prefix="/heap")
    proxies = [p for p in descendants(os.getpid()) if title(p) == "flotilla::proxy"]
    assert proxies, "no proxy process found"
    servers = [*proxies, h.pid.remote().result(timeout_s=30)]  # on Ray too: the replica says where it runs
    body = os.urandom(BODY)
    with httpx.Client(base_url=url, timeout=30) as c:
        def post() -> None:
            r = c.post("/heap", content=body)
            assert r.status_code == 200 and r.json() == {"n": BODY}, r.text

        for _ in range(3):
            post()
        before = sum(minor_faults(p) for p in servers)
        for _ in range(10):
            post()
        per_request = (sum(minor_faults(p) for p in servers) - before) / 10
    # Fresh buffers would fault in most of their pages: the proxy's and the replica's.
    assert per_request < PAGES / 8, f"{per_request:.0f} page faults a request for a body of {PAGES} pages"


def test_a_body_beyond_kept_memory_is_read_straight_into_the_bytes_the_app_gets(url: str) -> None:
    """A body over `heap.REUSED` needs fresh memory: the replica's one buffer is the bytes
    object `request.body()` returns, which the kernel fills (before: a frame buffer, then a
    bytes copy and a copy of that copy for `AwaitableBytes`, each fresh: 2 pages' faults per
    page of body and more)."""
    size = 40 << 20
    pages = size // 4096
    h = serve.run(Size.bind(), name="straight", route_prefix="/straight")
    replica = h.pid.remote().result(timeout_s=30)
    body = os.urandom(size)
    with httpx.Client(base_url=url, timeout=60) as c:
        def post() -> None:
            r = c.post("/straight", content=body)
            assert r.status_code == 200 and r.json() == {"n": size}, r.text

        post()
        before = minor_faults(replica)
        for _ in range(3):
            post()
        per_request = (minor_faults(replica) - before) / 3
    # one fresh buffer in 4 KiB pages faults `pages` times (fewer in 2 MiB pages, where it has them)
    assert per_request < 1.5 * pages, f"{per_request:.0f} page faults a request for a body of {pages} pages"


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Kept:
    def reused(self) -> int:
        from flotilla._private import heap

        return heap.REUSED


def test_a_deployment_sets_its_own_amount_in_its_env_vars(url: str) -> None:
    default = serve.run(Kept.bind(), name="kept", route_prefix=None)
    off = serve.run(Kept.options(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {"FLOTILLA_KEEP_FREED_MB": "0"}}})
                    .bind(), name="kept-off", route_prefix=None)
    small = serve.run(Kept.options(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {"FLOTILLA_KEEP_FREED_MB": "8"}}})
                      .bind(), name="kept-8", route_prefix=None)
    assert default.reused.remote().result(timeout_s=30) == 32 << 20
    assert off.reused.remote().result(timeout_s=30) == 0
    assert small.reused.remote().result(timeout_s=30) == 8 << 20
