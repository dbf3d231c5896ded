"""A fixed batch wait against a latency target (`batch_latency_target_s`), in one run: a batch
costs 2 ms + 0.25 ms per item (asyncio.sleep, so the CPU is not what is measured); one
sequential client, then 32 concurrent ones, through handles. Prints a table.

    .venv/bin/python bench/adaptive_batching.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import flotilla
from flotilla import serve

FORMS = {"fixed wait 20 ms": {"batch_wait_timeout_s": 0.02},
         "target 20 ms": {"batch_wait_timeout_s": 0.02, "batch_latency_target_s": 0.02}}


def make(opts: dict[str, Any]) -> Any:
    @serve.deployment(max_ongoing_requests=64)
    class Model:
        @serve.batch(max_batch_size=32, **opts)
        async def infer(self, xs: list[int]) -> list[int]:
            await asyncio.sleep(0.002 + 0.00025 * len(xs))
            return xs

        async def __call__(self, x: int) -> int:
            return await self.infer(x)

    return Model


async def drive(handle: Any, clients: int, seconds: float) -> tuple[float, float, float]:
    lat: list[float] = []
    end = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < end:
            t = time.perf_counter()
            await handle.remote(1)
            lat.append(time.perf_counter() - t)

    await asyncio.gather(*(client() for _ in range(clients)))
    lat.sort()
    return len(lat) / seconds, statistics.median(lat) * 1000, lat[int(len(lat) * 0.95)] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    flotilla.init(num_cpus=2)
    rows = []
    try:
        for name, opts in FORMS.items():
            h = serve.run(make(opts).bind(), name="b", route_prefix=None)
            asyncio.run(drive(h, 4, 1.0))  # warm up (the target learns rate and cost)
            for clients in (1, 32):
                rate, p50, p95 = asyncio.run(drive(h, clients, args.seconds))
                rows.append((name, clients, rate, p50, p95))
            serve.delete("b")
    finally:
        flotilla.shutdown()
    print("| batching | clients | calls/s | p50 ms | p95 ms |\n|---|---|---|---|---|")
    for name, clients, rate, p50, p95 in rows:
        print(f"| {name} | {clients} | {rate:,.0f} | {p50:.1f} | {p95:.1f} |")


if __name__ == "__main__":
    main()
