"""The front door, flotilla against Ray Serve in one run: HTTPS no-op req/s against plain HTTP
(wrk), WebSocket echo messages/s on one connection (FastAPI ingress), gRPC unary calls/s
(sequential and 16 in flight). Writes bench/RESULTS-frontdoor.md.

    .venv/bin/python bench/frontdoor.py [--rounds 2] [--duration 5] [--systems flotilla,ray]

Ray Serve runs from bench/.venv-ray (bench/run creates it); grpcio-tools is installed into
each venv on first use to compile the benchmark's .proto for that venv's protobuf.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHONS = {"flotilla": str(ROOT / ".venv" / "bin" / "python"), "ray": str(BENCH / ".venv-ray" / "bin" / "python")}
PROTO = """syntax = "proto3";
package bench;
service Bench { rpc Echo (EchoRequest) returns (EchoReply); }
message EchoRequest { string text = 1; }
message EchoReply { string text = 1; }
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def compile_proto(python: str, out: Path) -> None:
    """bench_pb2(_grpc).py for `python`'s protobuf, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.proto").write_text(PROTO)
    if subprocess.run([python, "-c", "import grpc_tools"], capture_output=True).returncode != 0:
        subprocess.run([python, "-m", "pip", "install", "-q", "grpcio-tools"], check=True)
    subprocess.run([python, "-m", "grpc_tools.protoc", f"-I{out}", f"--python_out={out}", f"--grpc_python_out={out}",
                    str(out / "bench.proto")], check=True)


def certs(d: Path) -> dict[str, str]:
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return {"certfile": str(cert), "keyfile": str(key)}


class Server:
    def __init__(self, system: str, cfg: dict[str, Any], log: Path) -> None:
        # Ray's proxy actor imports the servicer module in its own worker: on the path of all
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), cfg.get("grpc_dir")]))}
        env.pop("FLOTILLA_ADDRESS", None)
        self.log = open(log, "ab")  # noqa: SIM115
        self.p = subprocess.Popen([PYTHONS[system], str(BENCH / "apps" / "frontdoor_app.py"), system, json.dumps(cfg)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env,
                                  start_new_session=True)
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        if b"ready" not in line:
            self.close()
            raise RuntimeError(f"{system} server did not start; see {log}")

    def close(self) -> None:
        if self.p.stdin:
            self.p.stdin.close()
        try:
            self.p.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, 9)
            self.p.wait()
        self.log.close()


def wrk(url: str, conns: int, duration: int) -> float:
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{duration}s", url], capture_output=True, text=True,
                         check=True).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(m.group(1)) if m else 0.0


def ws_rate(port: int, duration: float) -> float:
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{port}/ws") as ws:
        for _ in range(50):
            ws.send("x")
            ws.recv()
        n, end = 0, time.perf_counter() + duration
        while time.perf_counter() < end:
            ws.send("hello")
            ws.recv()
            n += 1
    return n / duration


def grpc_rates(port: int, grpc_dir: Path, duration: float) -> tuple[float, float]:
    import grpc

    sys.path.insert(0, str(grpc_dir))
    import bench_pb2
    import bench_pb2_grpc

    md = (("application", "grpc"),)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = bench_pb2_grpc.BenchStub(ch)
        for _ in range(20):
            stub.Echo(bench_pb2.EchoRequest(text="x"), metadata=md, timeout=30)
        n, end = 0, time.perf_counter() + duration
        while time.perf_counter() < end:
            stub.Echo(bench_pb2.EchoRequest(text="hello"), metadata=md, timeout=30)
            n += 1
    seq = n / duration

    async def concurrent() -> float:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ach:
            astub = bench_pb2_grpc.BenchStub(ach)
            count = 0
            stop = time.perf_counter() + duration

            async def worker() -> None:
                nonlocal count
                while time.perf_counter() < stop:
                    await astub.Echo(bench_pb2.EchoRequest(text="hello"), metadata=md, timeout=30)
                    count += 1

            await asyncio.gather(*(worker() for _ in range(16)))
            return count / duration

    return seq, asyncio.run(concurrent())


def run_system(system: str, rounds: int, duration: int, work: Path, tls: dict[str, str]) -> dict[str, list[float]]:
    grpc_dir = work / f"grpc-{system}"
    compile_proto(PYTHONS[system], grpc_dir)
    out: dict[str, list[float]] = {k: [] for k in ("http", "https", "ws", "grpc_seq", "grpc_16")}
    log = work / f"{system}.log"
    for _ in range(rounds):
        port, gport = free_port(), free_port()
        s = Server(system, {"port": port, "grpc_port": gport, "grpc_dir": str(grpc_dir)}, log)
        try:
            wrk(f"http://127.0.0.1:{port}/noop", 32, 1)
            out["http"].append(wrk(f"http://127.0.0.1:{port}/noop", 32, duration))
            out["ws"].append(ws_rate(port, duration))
            seq, par = grpc_rates(gport, grpc_dir, duration)
            out["grpc_seq"].append(seq)
            out["grpc_16"].append(par)
        finally:
            s.close()
        port = free_port()
        s = Server(system, {"port": port, "tls": tls}, log)
        try:
            wrk(f"https://127.0.0.1:{port}/noop", 32, 1)
            out["https"].append(wrk(f"https://127.0.0.1:{port}/noop", 32, duration))
        finally:
            s.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--systems", default="flotilla,ray")
    args = parser.parse_args()
    systems = args.systems.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-frontdoor-"))
    tls = certs(work)
    res = {s: run_system(s, args.rounds, args.duration, work, tls) for s in systems}
    med = {s: {k: statistics.median(v) if v else 0.0 for k, v in r.items()} for s, r in res.items()}
    rows = [("HTTP no-op, 32 connections (req/s)", "http"), ("HTTPS no-op, 32 connections (req/s)", "https"),
            ("WebSocket echo, 1 connection (messages/s)", "ws"), ("gRPC unary, sequential (calls/s)", "grpc_seq"),
            ("gRPC unary, 16 in flight (calls/s)", "grpc_16")]
    lines = [f"# Front door: flotilla against Ray Serve ({time.strftime('%Y-%m-%d')})", "",
             f"`bench/frontdoor.py --rounds {args.rounds} --duration {args.duration}`; medians; this machine "
             f"({os.cpu_count()} cores); every system serves with 2 CPUs, clients on the same machine.", "",
             "| scenario | " + " | ".join(systems) + (" | flotilla / ray |" if len(systems) == 2 else " |"),
             "|---|" + "---|" * (len(systems) + (1 if len(systems) == 2 else 0))]
    for label, key in rows:
        vals = [med[s][key] for s in systems]
        ratio = f" {vals[0] / vals[1]:.1f}x |" if len(systems) == 2 and vals[1] else (" - |" if len(systems) == 2 else "")
        lines.append(f"| {label} | " + " | ".join(f"{v:,.0f}" for v in vals) + " |" + ratio)
    for s in systems:
        if med[s]["http"]:
            lines.append("")
            lines.append(f"{s}: HTTPS / HTTP = {med[s]['https'] / med[s]['http']:.2f}")
    lines += ["", "Raw rounds: " + json.dumps(res)]
    text = "\n".join(lines) + "\n"
    (BENCH / "RESULTS-frontdoor.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
