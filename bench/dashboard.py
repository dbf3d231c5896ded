"""What the dashboard costs the serving path: no-op req/s through the proxy (wrk, 32
connections) with no page open, with the page open in headless Chromium (polling every second),
and with only its endpoints polled (no browser), interleaved in one run; plus the head's CPU
and each endpoint's latency. Writes bench/RESULTS-dashboard.md.

    .venv/bin/python bench/dashboard.py [--rounds 4] [--duration 8]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

import flotilla  # noqa: E402
from flotilla import serve  # noqa: E402
from tests import browser  # noqa: E402

ENDPOINTS = ("/api/flotilla/dashboard/", "/api/flotilla/timeseries/")


@serve.deployment(max_ongoing_requests=1000)
class Noop:
    def __call__(self, request: Any) -> str:
        return "ok"


def wrk(url: str, conns: int, duration: int) -> float:
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{duration}s", url], capture_output=True, text=True,
                         check=True).stdout
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("Requests/sec")))


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of `pid` and its descendants (the browser's processes)."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
    except psutil.Error:
        pass
    return total


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Poller:
    """The page's requests without a browser: both endpoints once a second."""

    def __init__(self, base: str) -> None:
        self.base, self.stop = base, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        since = None
        while not self.stop.wait(1.0):
            urllib.request.urlopen(self.base + ENDPOINTS[0], timeout=10).read()
            q = "" if since is None else f"?since={since}"
            urllib.request.urlopen(self.base + ENDPOINTS[1] + q, timeout=10).read()
            since = time.time() - 1

    def __enter__(self) -> Poller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def endpoint_ms(base: str, path: str, n: int = 50) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        urllib.request.urlopen(base + path, timeout=10).read()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=int, default=8)
    args = ap.parse_args()
    if browser.missing():
        sys.exit(f"needs a browser: {browser.missing()}")
    flotilla.init()
    try:
        serve.run(Noop.bind(), route_prefix="/noop")
        url, base = "http://127.0.0.1:8000/noop", str(flotilla.dashboard_url())
        from flotilla._private.client import Runtime

        head = Runtime.current().head_pid
        wrk(url, 32, 2)  # warm up
        rates: dict[str, list[float]] = {"closed": [], "open": [], "polled": []}
        head_cpu: dict[str, list[float]] = {k: [] for k in rates}
        browser_cpu: list[float] = []
        with browser.chrome(1400, 1000) as page:
            for r in range(args.rounds):
                order = ["closed", "open", "polled"] if r % 2 == 0 else ["open", "polled", "closed"]
                for mode in order:
                    page.get(base + "/" if mode == "open" else "about:blank")
                    time.sleep(1.5)  # the page's first polls are done
                    c0, b0 = cpu_s(head), tree_cpu_s(page.service.process.pid)
                    if mode == "polled":
                        with Poller(base):
                            rate = wrk(url, 32, args.duration)
                    else:
                        rate = wrk(url, 32, args.duration)
                    head_cpu[mode].append((cpu_s(head) - c0) / args.duration * 100)
                    if mode == "open":
                        browser_cpu.append((tree_cpu_s(page.service.process.pid) - b0) / args.duration * 100)
                    rates[mode].append(rate)
                    print(f"round {r + 1} {mode:7s} {rate:9.0f} req/s  head {head_cpu[mode][-1]:.1f}% CPU", flush=True)
        lat = {p: endpoint_ms(base, p) for p in ENDPOINTS}
        size = {p: len(urllib.request.urlopen(base + p, timeout=10).read()) for p in ENDPOINTS}
    finally:
        flotilla.shutdown()
    med = {k: statistics.median(v) for k, v in rates.items()}
    lines = [
        "# The dashboard's cost to the serving path",
        "",
        f"`bench/dashboard.py`, {time.strftime('%Y-%m-%d')}, this machine ({os.cpu_count()} cores). A no-op deployment",
        f"through the proxy, wrk -t1 -c32, {args.duration} s per measurement, {args.rounds} rounds interleaved",
        "(closed / open / polled, order alternating); medians. *open*: the page in headless Chromium,",
        "polling every second and redrawing its charts; *polled*: the page's two requests per second",
        "without a browser (the server side alone); *closed*: neither.",
        "",
        "| page | req/s (median) | vs closed | head CPU | all rounds |",
        "|---|---|---|---|---|",
    ]
    for mode in ("closed", "polled", "open"):
        lines.append(f"| {mode} | {med[mode]:,.0f} | {med[mode] / med['closed']:.3f}x | "
                     f"{statistics.median(head_cpu[mode]):.1f}% | {', '.join(f'{v:,.0f}' for v in rates[mode])} |")
    lines += ["", f"With the page open, the browser's processes used {statistics.median(browser_cpu):.1f}% of a core "
                  "(median; polling, parsing and redrawing ten charts a second). Head CPU: the head process's "
                  "share of one core during the measurement.",
              "", "| endpoint | median latency (idle) | reply size |", "|---|---|---|"]
    for p in ENDPOINTS:
        lines.append(f"| `{p}` | {lat[p]:.2f} ms | {size[p]:,} B |")
    lines.append("")
    (BENCH / "RESULTS-dashboard.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
