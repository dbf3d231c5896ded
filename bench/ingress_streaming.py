"""FastAPI ingress no-op against a plain __call__ no-op (wrk, 32 connections), and the
time to the first chunk of a streaming response.

    .venv/bin/python bench/ingress_streaming.py [--rounds 2] [--duration 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wrk(url: str, conns: int, duration: int) -> float:
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{duration}s", url], capture_output=True, text=True, check=True).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def first_chunk_ms(port: int, path: str) -> float:
    """Milliseconds from sending the request to reading the first body chunk (raw socket)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        t0 = time.perf_counter()
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        _, rest = data.split(b"\r\n\r\n", 1)
        while not rest:
            rest = s.recv(65536)
        return (time.perf_counter() - t0) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--port", type=int, default=18282)
    args = parser.parse_args()

    from fastapi import FastAPI
    from starlette.responses import StreamingResponse

    import flotilla
    from flotilla import serve

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=100, ray_actor_options={"num_cpus": 0.5})
    @serve.ingress(api)
    class FastNoop:
        @api.get("/")
        def root(self) -> dict[str, bool]:
            return {"ok": True}

    @serve.deployment(max_ongoing_requests=100, ray_actor_options={"num_cpus": 0.5})
    class PlainNoop:
        async def __call__(self, request: object) -> dict[str, bool]:
            return {"ok": True}

    @serve.deployment(ray_actor_options={"num_cpus": 0.5})
    class Stream:
        async def __call__(self, request: object) -> StreamingResponse:
            async def gen():  # type: ignore[no-untyped-def]
                for i in range(5):
                    yield f"chunk {i}\n"
                    await asyncio.sleep(0.2)  # the last chunk comes 0.8 s after the first

            return StreamingResponse(gen(), media_type="text/plain")

    flotilla.init(num_cpus=2)
    try:
        serve.start(http_options={"port": args.port})
        serve.run(FastNoop.bind(), name="fast", route_prefix="/fast")
        serve.run(PlainNoop.bind(), name="plain", route_prefix="/plain")
        serve.run(Stream.bind(), name="stream", route_prefix="/stream")
        base = f"http://127.0.0.1:{args.port}"
        res: dict[str, list[float]] = {"fast": [], "plain": []}
        for name in res:
            wrk(f"{base}/{name}", 32, 1)
        for _ in range(args.rounds):
            for name in res:
                res[name].append(wrk(f"{base}/{name}", 32, args.duration))
        ttfc = sorted(first_chunk_ms(args.port, "/stream") for _ in range(10))
    finally:
        flotilla.shutdown()
    f, p = statistics.median(res["fast"]), statistics.median(res["plain"])
    print(f"FastAPI ingress no-op {f:,.0f} req/s vs plain __call__ no-op {p:,.0f} req/s at 32 connections: {f / p:.2f}x")
    print(f"streaming: time to first chunk p50 {ttfc[len(ttfc) // 2]:.2f} ms (the last chunk is produced 800 ms later)")


if __name__ == "__main__":
    main()
