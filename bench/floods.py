"""A normal client's latency while the proxy is under hostile connections (default limits).

    .venv/bin/python bench/floods.py [--idle 10000] [--slow 50] [--seconds 5]

Scenarios, one after the other on one cluster: none; `--slow` slowloris connections (one
header line every 0.5 s); `--idle` idle connections (opened in batches of 500, held). The
normal client sends GET requests (raw sockets, a new connection each), sequentially, for `--seconds`.
Prints p50 / p99 / max latency in ms, failures, and the proxy's peak descriptor count.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flotilla
from flotilla import serve
from tests.conftest import free_port
from tests.integration.test_bounds import _listener_pid


@serve.deployment(max_ongoing_requests=100)
def ok(request: object = None) -> str:
    return "ok"


def client(addr: tuple[str, int], seconds: float, proxy: int) -> dict[str, float]:
    lat, failed, fds = [], 0, 0
    end = time.monotonic() + seconds
    next_sample = 0.0
    while time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            with socket.create_connection(addr, timeout=10) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            if not data.startswith(b"HTTP/1.1 200"):
                failed += 1
        except OSError:
            failed += 1
        lat.append(time.perf_counter() - t0)
        if time.monotonic() > next_sample:  # listing 10,000 descriptors takes a while
            next_sample = time.monotonic() + 0.25
            with contextlib.suppress(OSError):
                fds = max(fds, len(os.listdir(f"/proc/{proxy}/fd")))
    lat.sort()
    return {"n": len(lat), "p50_ms": statistics.median(lat) * 1e3, "p99_ms": lat[int(len(lat) * 0.99)] * 1e3,
            "max_ms": lat[-1] * 1e3, "failed": failed, "proxy_fds": fds}


@contextlib.contextmanager
def slowloris(addr: tuple[str, int], n: int) -> Iterator[None]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(addr)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.5):
            for s in socks:
                with contextlib.suppress(OSError):
                    s.send(b"X-Slow: 1\r\n")

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        for s in socks:
            s.close()


@contextlib.contextmanager
def idle(addr: tuple[str, int], n: int) -> Iterator[None]:
    socks = []
    try:
        while len(socks) < n:
            for _ in range(min(500, n - len(socks))):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(addr)
                socks.append(s)
            time.sleep(0.01)
        yield
    finally:
        for s in socks:
            s.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--idle", type=int, default=10_000)
    ap.add_argument("--slow", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    flotilla.init(num_cpus=2)
    port = free_port()
    serve.start(http_options={"port": port})
    serve.run(ok.bind(), route_prefix="/")
    proxy = _listener_pid(port)
    addr = ("127.0.0.1", port)
    print("scenario              n   p50_ms  p99_ms  max_ms  failed  proxy_fds")
    for name, ctx in (("none", contextlib.nullcontext()), (f"{a.slow} slowloris", slowloris(addr, a.slow)),
                      (f"{a.idle} idle", idle(addr, a.idle))):
        with ctx:
            r = client(addr, a.seconds, proxy)
        print(f"{name:18s} {r['n']:5d} {r['p50_ms']:8.2f} {r['p99_ms']:7.2f} {r['max_ms']:7.1f} {r['failed']:6d} {r['proxy_fds']:9d}")
    flotilla.shutdown()


if __name__ == "__main__":
    main()
