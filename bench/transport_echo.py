"""Echo round trips of data-plane frames: Unix socket vs plain TCP vs authenticated TCP.

    PYTHONPATH=src .venv/bin/python bench/transport_echo.py [--seconds 1] [--rounds 5]

Each server (a FrameProtocol answering every `Call` with `Ok`) runs in a forked process on
uvloop, the client in this one, as a router and a replica would; plain TCP is there to tell
the cost of TCP from the cost of the handshake (`auth.py`). Reports round trips per second
with 1 and 64 frames in flight, and new connections per second (each: connect, the handshake
for authenticated TCP, one round trip, close); medians over rounds in which the transports
take turns. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import tempfile
import time
from typing import Any

import uvloop

from flotilla._private import auth
from flotilla._private.protocol import Call, Ok
from flotilla._private.transport import FrameProtocol, connect_tcp, serve_tcp

MSG = Call("m", (b"x" * 64,), {}, None)
KINDS = ("unix", "tcp", "tcp+auth")


def echo() -> FrameProtocol:
    proto = FrameProtocol(lambda t, m: None)
    proto.on_message = lambda tag, msg: proto.send(tag, Ok(None))
    return proto


def serve(kind: str, where: Any, secret: bytes, ready: Any) -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        if kind == "unix":
            await loop.create_unix_server(echo, where)
        elif kind == "tcp":
            await loop.create_server(echo, "127.0.0.1", where)
        else:
            await serve_tcp("127.0.0.1", where, echo, secret)
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(run())


async def connect(kind: str, where: Any, secret: bytes, proto: FrameProtocol) -> None:
    loop = asyncio.get_running_loop()
    if kind == "unix":
        await loop.create_unix_connection(lambda: proto, where)
    elif kind == "tcp":
        await loop.create_connection(lambda: proto, "127.0.0.1", where)
    else:
        await connect_tcp("127.0.0.1", where, proto, secret)


async def round_trips(kind: str, where: Any, secret: bytes, window: int, seconds: float) -> float:
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    done = 0
    outstanding = window
    deadline = 0.0

    def on_message(tag: int, msg: Any) -> None:
        nonlocal done, outstanding
        done += 1
        if time.perf_counter() < deadline:
            proto.send(tag, MSG)  # keep this slot busy
            return
        outstanding -= 1
        if outstanding == 0:
            finished.set_result(None)

    proto = FrameProtocol(on_message)
    await connect(kind, where, secret, proto)
    t0 = time.perf_counter()
    deadline = t0 + seconds
    for i in range(window):
        proto.send(i + 1, MSG)
    await asyncio.wait_for(finished, seconds + 10)
    rate = done / (time.perf_counter() - t0)
    proto.close()
    return rate


async def connects(kind: str, where: Any, secret: bytes, seconds: float) -> float:
    loop = asyncio.get_running_loop()
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:  # connect, one round trip, close
        answered: asyncio.Future[Any] = loop.create_future()
        proto = FrameProtocol(lambda t, m, f=answered: f.set_result(m))  # type: ignore[misc]
        await connect(kind, where, secret, proto)
        proto.send(1, MSG)
        await answered
        proto.close()
        n += 1
    return n / (time.perf_counter() - t0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=1.0, help="per measured point")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; the transports take turns in each")
    a = ap.parse_args()
    secret = auth.new_secret()
    where: dict[str, Any] = {
        "unix": os.path.join(tempfile.mkdtemp(prefix="fl-echo-"), "echo.sock"),
        "tcp": _free_port(),
        "tcp+auth": _free_port(),
    }
    ctx = mp.get_context("fork")
    procs = []
    for kind in KINDS:
        ready = ctx.Event()
        p = ctx.Process(target=serve, args=(kind, where[kind], secret, ready), daemon=True)
        p.start()
        ready.wait(10)
        procs.append(p)
    got: dict[str, list[tuple[float, float, float]]] = {k: [] for k in KINDS}
    try:
        for _ in range(a.rounds):
            for kind in KINDS:
                w = where[kind]
                got[kind].append((
                    uvloop.run(round_trips(kind, w, secret, 1, a.seconds)),
                    uvloop.run(round_trips(kind, w, secret, 64, a.seconds)),
                    uvloop.run(connects(kind, w, secret, a.seconds)),
                ))
    finally:
        for p in procs:
            p.kill()
            p.join()
        os.unlink(where["unix"])
        os.rmdir(os.path.dirname(where["unix"]))
    print(f"median of {a.rounds} rounds, {a.seconds:g} s points, uvloop, server in another process")
    print(f"{'transport':<10} {'rt/s 1 in flight':>17} {'rt/s 64 in flight':>18} {'conns/s':>9}")
    for kind in KINDS:
        seq, pipe, conn = (statistics.median(col) for col in zip(*got[kind], strict=True))
        print(f"{kind:<10} {seq:>17,.0f} {pipe:>18,.0f} {conn:>9,.0f}")
    print(f"auth failures: {auth.failures_total()}")


if __name__ == "__main__":
    main()
