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
from pathlib import Path
from typing import Any

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


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def idle_polling() -> dict[str, Any]:
    """How this machine's idle CPUs wait: the cpuidle driver and, under the `haltpoll` driver
    (KVM guests), how long an idle vCPU polls before it halts (`guest_halt_poll_ns`). A
    vCPU that halts at once (0) costs the host an exit and a re-entry to wake."""
    out: dict[str, Any] = {}
    driver = _read("/sys/devices/system/cpu/cpuidle/current_driver")
    if driver:
        out["cpuidle"] = driver
    poll = _read("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
    if poll is not None and poll.isdigit():
        out["guest_halt_poll_ns"] = int(poll)
    return out


def measure(n: int = 1000, batches: int = 5) -> dict[str, Any]:
    """{"cross_cpu_us": ..., "same_cpu_us": ..., and `idle_polling()`}; cross_cpu_us is
    absent with one CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    out: dict[str, Any] = {"same_cpu_us": round(_round_trip_us(cpus[0], cpus[0], n, batches), 1)}
    if len(cpus) > 1:
        out["cross_cpu_us"] = round(_round_trip_us(cpus[0], cpus[1], n, batches), 1)
    out.update(idle_polling())
    return out


def describe(start: dict[str, Any] | None, end: dict[str, Any] | None) -> str:
    """One line for the report."""

    def one(m: dict[str, Any] | None) -> str:
        if not m:
            return "not measured"
        cross = f"{m['cross_cpu_us']:.0f} µs across CPUs, " if "cross_cpu_us" in m else ""
        return f"{cross}{m['same_cpu_us']:.0f} µs on one CPU"

    line = f"process round trip (bench/wakeup.py): at the start {one(start)}; at the end {one(end)}"
    m = start or end or {}
    if "cpuidle" in m:
        poll = m.get("guest_halt_poll_ns")
        line += f"; cpuidle driver {m['cpuidle']}" + (f", guest_halt_poll_ns {poll}" if poll is not None else "")
    return line


if __name__ == "__main__":
    print(json.dumps(measure()))
