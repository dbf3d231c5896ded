"""What waking another process costs on this machine: the round trip of one byte between two
processes over a socket pair, with the two pinned to different CPUs and to the same CPU.

flotilla serves through two processes (proxy and replica) and a handle call crosses a
thread and a process, so every request waits for wake-ups that a one-process server does
not. Where a wake-up across CPUs is dear (virtual machines that halt idle vCPUs), the
requests that wait for them (one connection, sequential handle calls) slow down with it,
and much less so the ones under load. `bench/run` measures this at the start and at the end
of a run and writes it into the report, so that runs on different machines can be compared.

    .venv/bin/python bench/wakeup.py      # prints the figures as JSON
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time

_ECHO = (
    "import os, socket, sys\n"
    "os.sched_setaffinity(0, {int(sys.argv[2])})\n"
    "s = socket.socket(fileno=int(sys.argv[1]))\n"
    "while True:\n"
    "    d = s.recv(64)\n"
    "    if not d or d == b'q':\n"
    "        break\n"
    "    s.send(d)\n"
)


def _round_trip_us(cpu_here: int, cpu_there: int, n: int, batches: int) -> float:
    """Median over `batches` of the mean round trip (µs) of `n` one-byte ping-pongs."""
    a, b = socket.socketpair()
    mask = os.sched_getaffinity(0)
    child = subprocess.Popen(
        [sys.executable, "-c", _ECHO, str(b.fileno()), str(cpu_there)], pass_fds=(b.fileno(),)
    )
    b.close()
    try:
        os.sched_setaffinity(0, {cpu_here})
        a.settimeout(10.0)
        for _ in range(200):  # warm-up (the child starts, caches fill)
            a.send(b"x")
            a.recv(64)
        means = []
        for _ in range(batches):
            t = time.perf_counter()
            for _ in range(n):
                a.send(b"x")
                a.recv(64)
            means.append((time.perf_counter() - t) / n * 1e6)
        return statistics.median(means)
    finally:
        os.sched_setaffinity(0, mask)
        try:
            a.send(b"q")
        except OSError:
            pass
        a.close()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def measure(n: int = 1000, batches: int = 5) -> dict[str, float]:
    """{"cross_cpu_us": ..., "same_cpu_us": ...}; cross_cpu_us is absent with one CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    out = {"same_cpu_us": round(_round_trip_us(cpus[0], cpus[0], n, batches), 1)}
    if len(cpus) > 1:
        out["cross_cpu_us"] = round(_round_trip_us(cpus[0], cpus[1], n, batches), 1)
    return out


def describe(start: dict[str, float] | None, end: dict[str, float] | None) -> str:
    """One line for the report."""

    def one(m: dict[str, float] | None) -> str:
        if not m:
            return "not measured"
        cross = f"{m['cross_cpu_us']:.0f} µs across CPUs, " if "cross_cpu_us" in m else ""
        return f"{cross}{m['same_cpu_us']:.0f} µs on one CPU"

    return f"process round trip (bench/wakeup.py): at the start {one(start)}; at the end {one(end)}"


if __name__ == "__main__":
    print(json.dumps(measure()))
