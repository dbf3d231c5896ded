"""Flame graphs of flotilla's proxy and replica under the `http` scenario's load.

    PYTHONPATH=$PWD/src .venv/bin/python bench/flame.py --label after

Starts the bench's flotilla app (the no-op `Echo` of apps/serve_app.py at `/`, as the
`http` scenario does), warms it up (wrk, 1 s), then runs two passes of
`wrk -t1 -c32 -d10s` (apps/post.lua). In each pass, 1 s after wrk starts, py-spy samples
the proxy (`flotilla::proxy`) and the replica (`flotilla::replica:<app>:<deployment>`)
at the same time for 8 s at 250 Hz (`--nonblocking`): pass 1 writes flame graphs
(`<label>-proxy.svg`, `<label>-replica.svg`), pass 2 raw collapsed stacks, from which
`<label>-top.txt` lists the 25 frames with the most self time in each process. The
interpreter (`--python`, default this one) and `PYTHONPATH` choose the flotilla measured.
Every process started is stopped by PID before the script returns.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procs
from systems import BENCH, OUT, flotilla_system, launch_app, pick_port

POST_LUA = BENCH / "apps" / "post.lua"
PY_SPY = "/work/main/.venv/bin/py-spy"
WRK_S = 10
SPY_S = 8
RATE = 250
TOP = 25


def wrk_argv(port: int, conns: int, seconds: int) -> list[str]:
    return ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout=5s", "-s", str(POST_LUA),
            f"http://127.0.0.1:{port}/"]


def wrk_summary(stdout: str) -> dict:
    for line in stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    raise RuntimeError(f"wrk gave no summary: {stdout[-300:]}")


def find_roles(pid: int, port: int) -> dict[str, int]:
    """The proxy's and the replica's PIDs, by process title."""
    found: dict[str, int] = {}
    for p in procs.tree(pid):
        title = " ".join(procs.cmdline(p.pid))
        if title.startswith("flotilla::proxy"):
            found["proxy"] = p.pid
        elif title.startswith("flotilla::replica:"):
            found["replica"] = p.pid
    if set(found) != {"proxy", "replica"}:
        raise RuntimeError(f"proxy/replica not found in the tree of {pid}: {found}")
    return found


def run_pass(port: int, pids: dict[str, int], fmt: str, outs: dict[str, Path],
             spy: str) -> dict:
    """wrk for WRK_S s; from 1 s in, one py-spy per process. Returns wrk's summary."""
    w = subprocess.Popen(wrk_argv(port, 32, WRK_S), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    spies: list[subprocess.Popen] = []
    try:
        time.sleep(1.0)
        for role, pid in pids.items():
            argv = [spy, "record", "--pid", str(pid), "--format", fmt, "-r", str(RATE),
                    "-d", str(SPY_S), "--nonblocking", "-o", str(outs[role])]
            spies.append(subprocess.Popen(argv, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        for s in spies:
            out, _ = s.communicate(timeout=SPY_S + 60)
            if s.returncode != 0:
                raise RuntimeError(f"py-spy failed ({s.returncode}): {out[-500:]}")
        stdout, _ = w.communicate(timeout=WRK_S + 60)
    finally:
        for p in [w, *spies]:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    return wrk_summary(stdout)


LINE_NO = re.compile(r":\d+\)$")


def top_self(raw: Path, n: int = TOP) -> tuple[int, list[tuple[str, int]]]:
    """Samples, and the `n` leaf frames (line numbers dropped) with the most samples."""
    self_time: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1].strip()
        self_time[LINE_NO.sub(")", leaf)] += int(count)
        total += int(count)
    return total, self_time.most_common(n)


#: Frames whose time is the cost of metrics, access logs and trace events: the per-request
#: recording (`_record` in proxy and replica, `Proxy.fold`, `_fold` and `_fold_columns` in the
#: replica) and what they call, and the periodic flushes.
ACCOUNTING = re.compile(
    r"^(\S+\._(?:record|fold|fold_columns|traced)|Proxy\.fold|Router\.fold_calls|calls_done|AccessLog\.\w+|Store\.\w+"
    r"|observe_(?:into|sorted)|Ring\.(?:add|extend|columns)|LatencyRing\.add|routed|Pusher\.\w+) \("
)


def accounting(raw: Path) -> tuple[int, int]:
    """Samples, and those with a metrics / access-log / trace frame anywhere on the stack."""
    total = hit = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        if any(ACCOUNTING.match(f.strip()) for f in stack.split(";")):
            hit += int(count)
    return total, hit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", required=True, help="file name prefix, e.g. before, after")
    ap.add_argument("--python", default=sys.executable, help="interpreter with flotilla")
    ap.add_argument("--port", type=int, default=18090)
    ap.add_argument("--out-dir", default=str(BENCH / "flame"))
    ap.add_argument("--py-spy", default=PY_SPY)
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    procs.become_subreaper()  # orphans of the app stay below us, for srv.stop() to kill
    port = pick_port(args.port)
    system = flotilla_system(args.python)
    cfg = {"port": port, "apps": [{"name": "echo", "route": "/", "deployment": "Echo",
                                   "options": {}}]}
    srv = launch_app(system, "serve", cfg, OUT / f"flame-{args.label}.log")
    try:
        srv.wait_http(port, 120.0, "/")
        srv.event(60.0)  # "ready"
        subprocess.run(wrk_argv(port, 8, 1), capture_output=True, timeout=60)  # warm-up
        pids = find_roles(srv.pid, port)
        svgs = {r: out_dir / f"{args.label}-{r}.svg" for r in pids}
        w1 = run_pass(port, pids, "flamegraph", svgs, args.py_spy)
        raws = {r: OUT / f"flame-{args.label}-{r}.txt" for r in pids}
        w2 = run_pass(port, pids, "raw", raws, args.py_spy)
    finally:
        srv.stop()
    rps = [w["requests"] / (w["duration_us"] / 1e6) for w in (w1, w2)]
    errors = [w["connect"] + w["read"] + w["write"] + w["status"] + w["timeout"]
              for w in (w1, w2)]
    lines = [
        f"# {args.label}: flotilla {system.versions.get('flotilla')} "
        f"(PYTHONPATH={os.environ.get('PYTHONPATH', '')})",
        f"# wrk -t1 -c32 -d{WRK_S}s: pass 1 (flame graphs) {rps[0]:,.0f} req/s, "
        f"pass 2 (raw) {rps[1]:,.0f} req/s; errors {errors[0]}, {errors[1]}",
        f"# py-spy record -r {RATE} -d {SPY_S} --nonblocking, from 1 s into wrk; self time "
        "= samples with the frame at the top of the stack (line numbers merged)",
    ]
    spent = {role: accounting(raw) for role, raw in raws.items()}
    all_samples = sum(t for t, _ in spent.values())
    all_hits = sum(h for _, h in spent.values())
    lines.append(
        "# metrics, access logs and trace events (stacks through " + ACCOUNTING.pattern + "): "
        + ", ".join(f"{role} {100.0 * h / max(t, 1):.1f}%" for role, (t, h) in spent.items())
        + f"; both processes {100.0 * all_hits / max(all_samples, 1):.1f}% of their samples")
    for role, raw in raws.items():
        total, top = top_self(raw)
        lines += ["", f"## {role} (pid {pids[role]}): {total} samples"]
        lines += [f"{c:6d} {100.0 * c / max(total, 1):5.1f}%  {frame}" for frame, c in top]
    (out_dir / f"{args.label}-top.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:4]))
    for p in svgs.values():
        print(f"{p}: {p.stat().st_size / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
