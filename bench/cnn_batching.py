"""Batched vs unbatched PyTorch CNN over HTTP at 32 connections (wrk), plus lone-request latency.

    .venv/bin/python bench/cnn_batching.py [--duration 10]

Needs torch (pip install torch==2.13.0) and wrk (apt-get install wrk).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wrk(url: str, body_file: str, conns: int, duration: int) -> dict[str, float]:
    script = f"""
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
local f = io.open("{body_file}", "r"); wrk.body = f:read("*a"); f:close()
"""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "-s", f.name, url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = re.search(r"50%\s+([\d.]+)(\w+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p50.group(2)]
    return {"rps": rps, "p50_ms": float(p50.group(1)) * scale, "errors": int(non2xx.group(1)) if non2xx else 0}


def lone_latency(url: str, body: bytes, n: int = 30) -> float:
    times = []
    for _ in range(n):
        req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
        t0 = time.perf_counter()
        urllib.request.urlopen(req).read()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--port", type=int, default=8777)
    args = parser.parse_args()

    import flotilla
    from examples.torch_cnn import batched_app, sample_body, unbatched_app
    from flotilla import serve

    body = json.dumps(sample_body()).encode()
    with tempfile.NamedTemporaryFile("wb", suffix=".json", delete=False) as f:
        f.write(body)
    flotilla.init(num_cpus=2)
    results = {}
    try:
        serve.start(http_options={"port": args.port})
        serve.run(batched_app, name="batched", route_prefix="/batched")
        serve.run(unbatched_app, name="unbatched", route_prefix="/unbatched")
        base = f"http://127.0.0.1:{args.port}"
        for name in ("batched", "unbatched"):
            wrk(f"{base}/{name}", f.name, 32, 2)  # warm-up
        for rnd in range(2):
            for name in ("batched", "unbatched"):
                r = wrk(f"{base}/{name}", f.name, 32, args.duration)
                results.setdefault(name, []).append(r)
                print(f"round {rnd} {name}: {r}")
        lone = {name: lone_latency(f"{base}/{name}", body) for name in ("batched", "unbatched")}
    finally:
        flotilla.shutdown()
    b = max(r["rps"] for r in results["batched"])
    u = max(r["rps"] for r in results["unbatched"])
    print(f"\nbatched {b:.0f} req/s vs unbatched {u:.0f} req/s at 32 connections: {b / u:.2f}x")
    print(f"lone request p50: batched {lone['batched']:.2f} ms, unbatched {lone['unbatched']:.2f} ms "
          f"(added {lone['batched'] - lone['unbatched']:.2f} ms; batch_wait_timeout_s = 5 ms)")


if __name__ == "__main__":
    main()
