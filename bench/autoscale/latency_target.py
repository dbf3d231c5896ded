"""Step load against two autoscaling policies, in one run, with a picture: the queue-length
policy (`target_ongoing_requests`) and the latency-target policy (`target_latency_ms`).

    .venv/bin/python bench/autoscale/latency_target.py   # writes bench/autoscale/latency_target.png

The model serves one request at a time per replica (a lock, as a GPU would) in `cost` ms.
Load: 4 clients for 15 s, then 12 clients sending requests that cost three times as much
(20 ms -> 60 ms) for 40 s, then 4 light clients again for 15 s. Both policies may use 1 to 16
replicas and react at once (upscale_delay_s 0). With target_ongoing_requests=2 a replica holds
two requests, so once requests are heavy a request waits for one other: p95 about 2 x 60 ms,
whatever the count of replicas. The latency policy aims p95 below 150 ms, so it keeps adding
replicas until requests stop waiting. Installs matplotlib if it is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

PHASES = [(15.0, 4, 20), (40.0, 12, 60), (15.0, 4, 20)]  # seconds, clients, cost ms
TARGET_MS = 150.0
COMMON = {"min_replicas": 1, "max_replicas": 16, "upscale_delay_s": 0, "downscale_delay_s": 5,
          "metrics_interval_s": 0.25, "look_back_period_s": 2}
POLICIES = {
    "queue length (target_ongoing_requests=2)": {**COMMON, "target_ongoing_requests": 2},
    f"latency (target_latency_ms={TARGET_MS:g})": {**COMMON, "target_latency_ms": TARGET_MS},
}


def phase_at(t: float) -> tuple[int, int]:
    start = 0.0
    for dur, clients, cost in PHASES:
        if t < start + dur:
            return clients, cost
        start += dur
    return 0, 0


def app(autoscaling: dict[str, Any]) -> Any:
    from flotilla import serve

    @serve.deployment(max_ongoing_requests=16, ray_actor_options={"num_cpus": 0}, autoscaling_config=autoscaling)
    class Serial:
        def __init__(self) -> None:
            self.lock = asyncio.Lock()

        async def __call__(self, cost_ms: int) -> int:
            async with self.lock:
                await asyncio.sleep(cost_ms / 1000)
            return cost_ms

    return Serial.bind()


async def drive(handle: Any, samples: list[tuple[float, float, int]]) -> None:
    """Clients per phase, each calling back to back; (t, latency ms, cost) per call."""
    total = sum(d for d, _, _ in PHASES)
    t0 = time.perf_counter()

    async def client(i: int) -> None:
        while (t := time.perf_counter() - t0) < total:
            clients, cost = phase_at(t)
            if i >= clients:
                await asyncio.sleep(0.05)
                continue
            s = time.perf_counter()
            await handle.remote(cost)
            samples.append((s - t0, (time.perf_counter() - s) * 1000, cost))

    await asyncio.gather(*(client(i) for i in range(max(c for _, c, _ in PHASES))))


def replicas_over_time(name: str, stop: asyncio.Event, out: list[tuple[float, int]], t0: float) -> Any:
    from flotilla import serve

    async def poll() -> None:
        while not stop.is_set():
            st = serve.status().applications.get(name)
            if st is not None:
                d = next(iter(st.deployments.values()))
                out.append((time.perf_counter() - t0, d.replica_states.get("RUNNING", 0)))
            await asyncio.sleep(0.25)

    return poll()


def p95_windows(samples: list[tuple[float, float, int]], width: float = 2.0) -> list[tuple[float, float]]:
    total = sum(d for d, _, _ in PHASES)
    out = []
    t = 0.0
    while t < total:
        lat = sorted(ms for s, ms, _ in samples if t <= s < t + width)
        if lat:
            out.append((t + width / 2, lat[int(0.95 * (len(lat) - 1))]))
        t += width
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "latency_target.png"))
    args = ap.parse_args()
    try:
        import matplotlib
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True)
    import flotilla
    from flotilla import serve

    results: dict[str, tuple[list[tuple[float, float, int]], list[tuple[float, int]]]] = {}
    flotilla.init(num_cpus=2)
    try:
        for i, (label, cfg) in enumerate(POLICIES.items()):
            name = f"p{i}"
            handle = serve.run(app(cfg), name=name, route_prefix=None)
            samples: list[tuple[float, float, int]] = []
            reps: list[tuple[float, int]] = []

            async def run(handle: Any = handle, name: str = name, samples: list[Any] = samples,
                          reps: list[Any] = reps) -> None:
                stop = asyncio.Event()
                t0 = time.perf_counter()
                poller = asyncio.ensure_future(replicas_over_time(name, stop, reps, t0))
                await drive(handle, samples)
                stop.set()
                await poller

            asyncio.run(run())
            results[label] = (samples, reps)
            serve.delete(name)
    finally:
        flotilla.shutdown()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    heavy_start, heavy_end = PHASES[0][0], PHASES[0][0] + PHASES[1][0]
    print("| policy | requests | p95 ms while heavy (after the first 10 s) | heavy seconds over target | replicas (max) |")
    print("|---|---|---|---|---|")
    for label, (samples, reps) in results.items():
        win = p95_windows(samples)
        ax1.plot([t for t, _ in win], [v for _, v in win], label=label)
        ax2.step([t for t, _ in reps], [n for _, n in reps], where="post", label=label)
        settled = sorted(ms for s, ms, _ in samples if heavy_start + 10 <= s < heavy_end)
        over = sum(2.0 for t, v in win if heavy_start <= t < heavy_end and v > TARGET_MS)
        p95 = settled[int(0.95 * (len(settled) - 1))] if settled else float("nan")
        print(f"| {label} | {len(samples)} | {p95:.0f} | {over:.0f} of {heavy_end - heavy_start:.0f} | "
              f"{max((n for _, n in reps), default=0)} |")
    ax1.axhline(TARGET_MS, color="grey", linestyle="--", label=f"target {TARGET_MS:g} ms")
    for ax in (ax1, ax2):
        ax.axvspan(heavy_start, heavy_end, color="orange", alpha=0.08)
    ax1.set_ylabel("p95 latency, ms (2 s windows)")
    ax1.set_yscale("log")
    ax1.legend(loc="upper right", fontsize=8)
    ax2.set_ylabel("replicas RUNNING")
    ax2.set_xlabel("seconds (shaded: 12 clients, requests 3x heavier)")
    ax2.legend(loc="upper right", fontsize=8)
    fig.suptitle("Step load: queue-length policy against latency-target policy (flotilla)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
