"""Data-plane req/s with and without a Prometheus scrape storm on the head's /metrics.

    .venv/bin/python bench/metrics_scrape.py [--rounds 3] [--duration 5] [--rate 600]

One app (`Echo`, 2 replicas) behind the proxy; wrk -t1 -c16 POSTs for `duration` seconds,
alternately alone and while another process GETs /metrics `rate` times a second (plain
sockets, one connection per scrape, paced). Prints req/s per round, the paired ratio
storm / quiet, the scrapes/s reached and their latency, and the CPU time (utime + stime from
/proc) per request of the data plane (proxy + replicas) and of the head, per phase: on a
2-core machine shared with wrk the req/s are noisy, the CPU per request much less so. Set
PYTHONPATH to measure another checkout of flotilla.
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
import json, sys, flotilla
from flotilla import serve

@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0})
class Echo:
    async def __call__(self, request):
        await request.body()
        return {"ok": True}

flotilla.init(num_cpus=2)
serve.start(http_options={"port": int(sys.argv[1])})
serve.run(Echo.bind(), route_prefix="/")
print(json.dumps({"metrics": flotilla.metrics_url(), "flotilla": flotilla.__file__}), flush=True)
sys.stdin.read()
flotilla.shutdown()
"""
SCRAPER = """
import json, socket, sys, time
port, rate, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
lat = []
t0 = time.monotonic()
nxt = t0
while time.monotonic() - t0 < seconds:
    s0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        while s.recv(65536):
            pass
    lat.append(time.perf_counter() - s0)
    nxt += 1 / rate
    time.sleep(max(0.0, nxt - time.monotonic()))
lat.sort()
print(json.dumps({"scrapes": len(lat), "seconds": time.monotonic() - t0,
                  "p50_ms": 1000 * lat[len(lat) // 2], "p99_ms": 1000 * lat[int(len(lat) * 0.99)]}))
"""


def processes(root: int) -> dict[int, str]:
    """Every flotilla process below `root`: pid -> title (`flotilla::proxy`, ...)."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parent[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    out = {}
    for pid in found:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if title.startswith("flotilla::"):
            out[pid] = title
    return out


def cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def wrk(port: int, duration: int) -> float:
    out = subprocess.run(
        ["wrk", "-t1", "-c16", f"-d{duration}s", "-s", os.path.join(HERE, "apps", "post.lua"), f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True,
    ).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert m is not None, out
    return float(m.group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rate", type=float, default=600)
    parser.add_argument("--port", type=int, default=18182)
    args = parser.parse_args()
    app = subprocess.Popen([sys.executable, "-c", APP, str(args.port)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert app.stdout is not None
        info = json.loads(app.stdout.readline())
        print(f"flotilla from {info['flotilla']}", flush=True)
        mport = int(info["metrics"].split(":")[2].split("/")[0])
        wrk(args.port, 1)  # warm-up
        procs = processes(app.pid)
        data_plane = [p for p, t in procs.items() if t == "flotilla::proxy" or t.startswith("flotilla::replica:")]
        head = [p for p, t in procs.items() if t == "flotilla::head"]
        assert len(data_plane) == 3 and len(head) == 1, procs
        rps: dict[str, list[float]] = {"quiet": [], "storm": []}
        dp_ms: dict[str, list[float]] = {"quiet": [], "storm": []}
        head_ms: dict[str, list[float]] = {"quiet": [], "storm": []}
        scr: list[dict[str, float]] = []

        def measure(phase: str) -> None:
            d0, h0 = cpu(data_plane), cpu(head)
            r = wrk(args.port, args.duration)
            n = r * args.duration
            rps[phase].append(r)
            dp_ms[phase].append(1000 * (cpu(data_plane) - d0) / n)
            head_ms[phase].append(1000 * (cpu(head) - h0) / n)

        for rnd in range(args.rounds):
            measure("quiet")
            scraper = subprocess.Popen([sys.executable, "-c", SCRAPER, str(mport), str(args.rate), str(args.duration + 1)],
                                       stdout=subprocess.PIPE, text=True)
            time.sleep(0.5)
            measure("storm")
            out, _ = scraper.communicate()
            scr.append(json.loads(out))
            s = scr[-1]
            print(f"round {rnd + 1}: quiet {rps['quiet'][-1]:,.0f} req/s, storm {rps['storm'][-1]:,.0f} req/s "
                  f"({s['scrapes'] / s['seconds']:.0f} scrapes/s, p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms); "
                  f"data-plane CPU ms/request {dp_ms['quiet'][-1]:.3f} -> {dp_ms['storm'][-1]:.3f}, "
                  f"head {head_ms['quiet'][-1]:.3f} -> {head_ms['storm'][-1]:.3f}", flush=True)
        ratios = [b / a for a, b in zip(rps["quiet"], rps["storm"], strict=True)]
        med = statistics.median
        print(f"\nmedian: quiet {med(rps['quiet']):,.0f} req/s, storm {med(rps['storm']):,.0f} req/s, "
              f"storm / quiet {med(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)}); "
              f"{med(s['scrapes'] / s['seconds'] for s in scr):.0f} scrapes/s; data-plane CPU ms/request "
              f"{med(dp_ms['quiet']):.3f} quiet, {med(dp_ms['storm']):.3f} storm; head CPU ms/request "
              f"{med(head_ms['quiet']):.3f} quiet, {med(head_ms['storm']):.3f} storm")
    finally:
        assert app.stdin is not None
        app.stdin.close()
        try:
            app.wait(30)
        except subprocess.TimeoutExpired:
            app.kill()


if __name__ == "__main__":
    main()
