"""Direct ingress (one replica) against the bare uvicorn + Starlette app, alternating.

    .venv/bin/python bench/direct_ingress.py [--rounds 3] [--duration 5]

Both serve the same POST handler (read the body, answer {"ok": true}); wrk -t1 at 1, 8 and
32 connections. Prints req/s per round and the paired ratio direct / bare.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
APP = """
import sys, time, flotilla
from flotilla import serve
from starlette.responses import JSONResponse

@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
class Echo:
    async def __call__(self, request):
        await request.body()
        return JSONResponse({"ok": True})

flotilla.init(num_cpus=2)
serve.start(http_options={"port": int(sys.argv[1]), "direct_ingress": True})
serve.run(Echo.bind(), route_prefix="/")
print("ready", flush=True)
sys.stdin.read()
flotilla.shutdown()
"""


def wrk(port: int, conns: int, duration: int) -> float:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "-s", os.path.join(HERE, "apps", "post.lua"), f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True,
    ).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def start(kind: str, port: int) -> subprocess.Popen[str]:
    if kind == "direct":
        cmd = [sys.executable, "-c", APP, str(port)]
    else:
        cmd = [sys.executable, os.path.join(HERE, "apps", "bare_app.py"), json.dumps({"port": port})]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            wrk(port, 1, 1)
            return proc
        except subprocess.CalledProcessError:
            time.sleep(0.2)
    raise RuntimeError(f"{kind} did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--port", type=int, default=18181)
    args = parser.parse_args()
    results: dict[tuple[str, int], list[float]] = {}
    for rnd in range(args.rounds):
        for kind in ("direct", "bare"):
            proc = start(kind, args.port)
            try:
                for conns in (1, 8, 32):
                    rps = wrk(args.port, conns, args.duration)
                    results.setdefault((kind, conns), []).append(rps)
                    print(f"round {rnd + 1} {kind:6} {conns:2} conn: {rps:,.0f} req/s", flush=True)
            finally:
                assert proc.stdin is not None
                proc.stdin.close()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print("\nconnections | direct req/s | bare req/s | direct / bare (per round)")
    for conns in (1, 8, 32):
        d, b = results[("direct", conns)], results[("bare", conns)]
        ratios = [x / y for x, y in zip(d, b, strict=True)]
        print(f"{conns:11} | {statistics.median(d):12,.0f} | {statistics.median(b):10,.0f} | "
              f"{statistics.median(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
