"""Draw the autoscaler at work: offered load, ongoing requests per replica, replicas over time.

    .venv/bin/python bench/autoscale/run.py            # writes bench/autoscale/autoscale.png

Load pattern (concurrent clients, each sending 100 ms requests back to back over HTTP):
idle 5 s, ramp 0 -> 16 over 15 s, spike 24 for 6 s, idle 20 s. The app autoscales with
min 1, max 8, target_ongoing_requests 2, upscale_delay_s 0, downscale_delay_s 3.
Installs matplotlib into the running environment if it is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

PHASES = [("idle", 5.0, 0, 0), ("ramp", 15.0, 0, 16), ("spike", 6.0, 24, 24), ("idle", 20.0, 0, 0)]
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 8,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 0,
    "downscale_delay_s": 3,
    "metrics_interval_s": 0.25,
}


def offered(t: float) -> int:
    start = 0.0
    for _, dur, a, b in PHASES:
        if t < start + dur:
            return round(a + (b - a) * (t - start) / dur)
        start += dur
    return 0


async def drive(url: str, total: float, samples: list[dict[str, float]]) -> None:
    import httpx

    from flotilla import serve

    in_flight = 0
    errors = 0
    workers: list[asyncio.Task[None]] = []
    async with httpx.AsyncClient(
        base_url=url, timeout=60, limits=httpx.Limits(max_connections=64)
    ) as client:

        async def worker() -> None:
            nonlocal in_flight, errors
            while True:
                in_flight += 1
                try:
                    r = await client.get("/")
                    if r.status_code != 200:
                        errors += 1
                except asyncio.CancelledError:
                    raise
                except Exception:
                    errors += 1
                finally:
                    in_flight -= 1

        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        while (t := time.monotonic() - t0) < total:
            want = offered(t)
            while len(workers) < want:
                workers.append(loop.create_task(worker()))
            while len(workers) > want:
                workers.pop().cancel()
            st = await asyncio.to_thread(serve.status)
            dep = st.applications["auto"].deployments["Work"]
            running = dep.replica_states.get("RUNNING", 0)
            samples.append(
                {
                    "t": round(t, 2),
                    "offered": want,
                    "in_flight": in_flight,
                    "running": running,
                    "target": dep.target_num_replicas,
                    "per_replica": in_flight / running if running else 0.0,
                    "errors": errors,
                }
            )
            await asyncio.sleep(0.25)
        for w in workers:
            w.cancel()


def plot(samples: list[dict[str, float]], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True)
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    axes[0].plot(t, [s["offered"] for s in samples], label="offered load (concurrent clients)")
    axes[0].plot(t, [s["in_flight"] for s in samples], label="requests in flight", alpha=0.7)
    axes[0].set_ylabel("requests")
    axes[1].plot(
        t, [s["per_replica"] for s in samples], label="ongoing requests per running replica"
    )
    axes[1].axhline(
        AUTOSCALING["target_ongoing_requests"],
        color="gray",
        ls="--",
        label="target_ongoing_requests",
    )
    axes[1].set_ylabel("per replica")
    axes[2].step(t, [s["running"] for s in samples], where="post", label="running replicas")
    axes[2].step(
        t, [s["target"] for s in samples], where="post", ls="--", label="autoscaler target"
    )
    axes[2].set_ylabel("replicas")
    axes[2].set_xlabel("seconds")
    start = 0.0
    for name, dur, _, _ in PHASES:
        for ax in axes:
            ax.axvspan(start, start + dur, alpha=0.04 if name == "idle" else 0.1, color="C0")
        axes[0].text(start + 0.3, 0.9, name, transform=axes[0].get_xaxis_transform())
        start += dur
    for ax in axes:
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(
        "flotilla autoscaling: " + ", ".join(f"{k}={v}" for k, v in AUTOSCALING.items()), fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.path.join(HERE, "autoscale.png"))
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()

    import flotilla
    from flotilla import serve

    @serve.deployment(
        autoscaling_config=AUTOSCALING,
        ray_actor_options={"num_cpus": 0.25},
        graceful_shutdown_wait_loop_s=0.1,
    )
    class Work:
        async def __call__(self, request: object) -> str:
            await asyncio.sleep(0.1)
            return "ok"

    flotilla.init(num_cpus=2)
    try:
        serve.start(http_options={"port": args.port})
        serve.run(Work.bind(), name="auto", route_prefix="/")
        samples: list[dict[str, float]] = []
        total = sum(p[1] for p in PHASES)
        asyncio.run(drive(f"http://127.0.0.1:{args.port}", total, samples))
    finally:
        flotilla.shutdown()
    csv_path = os.path.splitext(args.out)[0] + ".csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(samples[0]))
        w.writeheader()
        w.writerows(samples)
    plot(samples, args.out)
    peak = max(s["running"] for s in samples)
    print(f"wrote {args.out} and {csv_path}: peak {peak} replicas, {samples[-1]['errors']} errors")


if __name__ == "__main__":
    main()
