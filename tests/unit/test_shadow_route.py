"""Shadow traffic in the proxy (`_private/shadow.py`), with a fake router: the path and body
of a copy, drops when the queue is full, skips of large bodies, outcomes."""

from __future__ import annotations

import asyncio
from typing import Any

from flotilla._private import shadow
from flotilla._private.metrics import STORE
from flotilla._private.protocol import HttpFull

shadow.declare(STORE)  # as the proxy does when it starts


class FakeRouter:
    def __init__(self, status: int = 200, gate: asyncio.Event | None = None) -> None:
        self.status = status
        self.gate = gate
        self.sent: list[tuple[dict[str, Any], bytes, dict[str, Any]]] = []

    async def http(self, scope: dict[str, Any], body: bytes, meta: dict[str, Any]) -> Any:
        self.sent.append((scope, body, meta))
        if self.gate is not None:
            await self.gate.wait()
        if self.status == 0:
            raise RuntimeError("boom")
        return HttpFull(self.status, [], b"x")


class FakeRt:
    def __init__(self, router: FakeRouter) -> None:
        self.r = router

    def router(self, dep: Any) -> FakeRouter:
        return self.r


def spec(fraction: float = 1.0, max_queue: int = 100, target_prefix: str | None = "/t") -> dict[str, Any]:
    return {"route": "main", "target": "t", "ingress": "T", "target_prefix": target_prefix,
            "fraction": fraction, "max_queue": max_queue}


def scope(path: str) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
            "query_string": b"q=1", "headers": [(b"h", b"v")]}


def counts(prefix: str) -> dict[str, float]:
    return {k[2]: v for k, v in STORE.values[shadow.REQUESTS].items() if k[0] == prefix}


def test_a_copy_goes_under_the_targets_prefix_with_the_body() -> None:
    async def main() -> None:
        r = FakeRouter()
        sr = shadow.ShadowRoute("/m1", spec(), FakeRt(r))
        sr.offer(scope("/m1/x/y"), "/m1/x/y", "", b"body", b"rid")
        while not r.sent or sr.queue.qsize():
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
        sr.close()
        fwd, body, meta = r.sent[0]
        assert (fwd["path"], fwd["root_path"], fwd["query_string"], body) == ("/t/x/y", "/t", b"q=1", b"body")
        assert meta["request_id"] == "rid-shadow"
        # A target without a route keeps the path as it came.
        sr2 = shadow.ShadowRoute("/m1", spec(target_prefix=None), FakeRt(r))
        assert sr2._rewrite(scope("/m1/x"), "/m1/x", "")["path"] == "/m1/x"

    asyncio.run(main())
    assert counts("/m1") == {"ok": 1.0}


def test_full_queue_drops_large_body_skips_errors_count() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        r = FakeRouter(status=503, gate=gate)
        sr = shadow.ShadowRoute("/m2", spec(max_queue=2), FakeRt(r))
        for _ in range(10):  # never blocks: at most 4 in flight + 2 queued, the rest dropped
            sr.offer(scope("/m2"), "/m2", "", b"", b"r")
            await asyncio.sleep(0)
        sr.offer(scope("/m2"), "/m2", "", b"x" * (shadow.MAX_BODY + 1), b"r")
        assert len(sr.workers) == shadow.WORKERS
        gate.set()
        while counts("/m2").get("error", 0) + counts("/m2").get("dropped", 0) < 10:
            await asyncio.sleep(0.001)
        sr.close()

    asyncio.run(main())
    c = counts("/m2")
    assert c["skipped"] == 1 and c["error"] + c["dropped"] == 10 and c["dropped"] >= 4, c


def test_fraction_zero_point_one() -> None:
    async def main() -> int:
        r = FakeRouter()
        sr = shadow.ShadowRoute("/m3", spec(fraction=0.1, max_queue=100000), FakeRt(r))
        for _ in range(20000):
            sr.offer(scope("/m3"), "/m3", "", b"", b"r")
        n = sr.queue.qsize()
        sr.close()
        return n

    n = asyncio.run(main())
    assert 1700 <= n <= 2300, n
