"""The scenarios: each runs one system once and returns {metric: value} (+ notes).

A scenario raises on failure; the orchestrator records the error and moves on.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import procs
from systems import BENCH, COMMANDS, Launched, System, ensure_wrk, launch_app

POST_LUA = BENCH / "apps" / "post.lua"
CHAOS_LUA = BENCH / "apps" / "chaos.lua"
MIB = 1024.0


@dataclass
class Ctx:
    duration: float  # seconds per measured point
    port: int
    log_dir: Path
    round: int
    quick: bool
    conns: tuple[int, ...] = (1, 8, 32)
    wrk_timeout: str = "5s"

    def log(self, system: System, what: str) -> Path:
        return self.log_dir / f"r{self.round}-{what}-{system.name}.log"


Result = dict[str, Any]
Scenario = Callable[[System, Ctx], Result]


# ---- helpers ------------------------------------------------------------------------------
def start_server(system: System, ctx: Ctx, what: str, apps: list[dict[str, Any]]) -> Launched:
    """Start a serving process and wait for its first HTTP 200 (cold_start_s is recorded)."""
    if system.is_serve:
        srv = launch_app(system, "serve", {"port": ctx.port, "apps": apps}, ctx.log(system, what))
    else:
        srv = launch_app(system, "serve", {"port": ctx.port}, ctx.log(system, what))
    try:
        path = apps[0]["route"] if system.is_serve else "/"
        srv.cold_start_s = srv.wait_http(ctx.port, 300.0, path)  # type: ignore[attr-defined]
        if system.is_serve:
            srv.event(60.0)  # "ready": every app of the list is deployed
    except BaseException:
        srv.stop()
        raise
    return srv


def echo_app(route: str = "/", name: str = "echo", **options: Any) -> dict[str, Any]:
    return {"name": name, "route": route, "deployment": "Echo", "options": options}


def wrk(ctx: Ctx, conns: int, duration: float, path: str = "/") -> dict[str, Any]:
    argv = [
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={ctx.wrk_timeout}",
        "-s",
        str(POST_LUA),
        f"http://127.0.0.1:{ctx.port}{path}",
    ]
    COMMANDS.append(" ".join(argv))
    r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    for line in r.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON ") :])
    raise RuntimeError(
        f"wrk gave no summary (rc {r.returncode}): {r.stdout[-300:]} {r.stderr[-300:]}"
    )


def cpu_by_role(srv: Launched, port: int) -> tuple[dict[int, str], dict[int, int]]:
    roles = procs.roles(srv.pid, port, "driver" if srv.system.is_serve else "server")
    ticks = {pid: procs.cpu_ticks(pid) or 0 for pid in roles}
    return roles, ticks


def measure_http(srv: Launched, ctx: Ctx, conns: int, path: str = "/") -> dict[str, Any]:
    """One wrk point, with the CPU the server's process tree spent on it."""
    roles, before = cpu_by_role(srv, ctx.port)
    w = wrk(ctx, conns, ctx.duration, path)
    after = {pid: procs.cpu_ticks(pid) for pid in roles}
    n = max(1, w["requests"])
    per_role: dict[str, float] = {}
    for pid, role in roles.items():
        end = after.get(pid)
        if end is not None:
            ms = (end - before[pid]) / procs.CLK_TCK * 1000.0 / n
            per_role[role] = per_role.get(role, 0.0) + ms
    errors = w["connect"] + w["read"] + w["write"] + w["status"] + w["timeout"]
    return {
        "rps": w["requests"] / (w["duration_us"] / 1e6),
        "p50_ms": w["p50_us"] / 1000.0,
        "p99_ms": w["p99_us"] / 1000.0,
        "errors": errors,
        "cpu_ms": sum(per_role.values()),
        "cpu_roles": {k: round(v, 4) for k, v in sorted(per_role.items(), key=lambda kv: -kv[1])},
    }


def pss_by_role(srv: Launched, port: int | None) -> tuple[float, dict[str, float], dict[str, int]]:
    """Total PSS (MiB) of the process tree, and per role (MiB, process count)."""
    roles = procs.roles(srv.pid, port, "driver" if srv.system.is_serve else "server")
    mib: dict[str, float] = {}
    count: dict[str, int] = {}
    for pid, role in roles.items():
        mib[role] = mib.get(role, 0.0) + (procs.pss_kib(pid) or 0) / MIB
        count[role] = count.get(role, 0) + 1
    return sum(mib.values()), {k: round(v, 1) for k, v in mib.items()}, count


# ---- scenarios ----------------------------------------------------------------------------
def http(system: System, ctx: Ctx) -> Result:
    srv = start_server(system, ctx, "http", [echo_app()])
    out: Result = {"notes": {}}
    try:
        wrk(ctx, 8, 1.0)  # warm-up, not measured
        for c in ctx.conns:
            m = measure_http(srv, ctx, c)
            for k in ("rps", "p50_ms", "p99_ms", "errors", "cpu_ms"):
                out[f"http_{k}_c{c}"] = m[k]
            out["notes"][f"cpu_ms_per_req_by_process_c{c}"] = m["cpu_roles"]
    finally:
        srv.stop()
    return out


def batch(system: System, ctx: Ctx) -> Result:
    if not system.is_serve:
        raise NotImplementedError("no @serve.batch in a bare server")
    opts = {"max_ongoing_requests": 32}
    apps = [
        echo_app("/plain", "plain", **opts),
        {"name": "batched", "route": "/batched", "deployment": "EchoBatched", "options": opts},
    ]
    srv = start_server(system, ctx, "batch", apps)
    out: Result = {"notes": {}}
    try:
        srv.wait_http(ctx.port, 120.0, "/batched")
        wrk(ctx, 32, 1.0, "/plain")
        wrk(ctx, 32, 1.0, "/batched")
        for label in ("plain", "batched"):
            m = measure_http(srv, ctx, 32, f"/{label}")
            for k in ("rps", "p50_ms", "p99_ms", "errors", "cpu_ms"):
                out[f"batch_{label}_{k}"] = m[k]
            out["notes"][f"cpu_ms_per_req_by_process_{label}"] = m["cpu_roles"]
        out["batch_gain"] = out["batch_batched_rps"] / max(out["batch_plain_rps"], 1e-9)
    finally:
        srv.stop()
    return out


def run_to_result(
    system: System, ctx: Ctx, mode: str, cfg: dict[str, Any], timeout: float
) -> Result:
    """Run an app mode that measures by itself and prints one result line."""
    proc = launch_app(system, mode, cfg, ctx.log(system, mode))
    try:
        return proc.event(timeout)
    finally:
        proc.stop()


def handle(system: System, ctx: Ctx) -> Result:
    if not system.is_serve:
        raise NotImplementedError("no handles in a bare server")
    cfg = {"port": ctx.port, "duration": ctx.duration, "inflight": 64}
    r = run_to_result(system, ctx, "handle", cfg, 240 + 3 * ctx.duration)
    return {
        "handle_seq_cps": r["seq_cps"],
        "handle_64_cps": r["inflight_cps"],
        "notes": {"64 in flight via": r["how"]},
    }


def coldstart(system: System, ctx: Ctx) -> Result:
    srv = start_server(system, ctx, "coldstart", [echo_app()])
    out: Result = {"cold_start_s": srv.cold_start_s}  # type: ignore[attr-defined]
    srv.stop()
    if system.is_serve:
        r = run_to_result(system, ctx, "deploy", {"port": ctx.port, "replicas": 4}, 300)
        out["deploy4_s"] = r["deploy_s"]
    return out


def memory(system: System, ctx: Ctx) -> Result:
    settle = 1.0 if ctx.quick else 3.0
    out: Result = {"notes": {}}
    if not system.is_serve:
        srv = start_server(system, ctx, "memory", [])
        try:
            time.sleep(settle)
            out["pss_1rep_mib"], roles, _ = pss_by_role(srv, ctx.port)
            out["notes"]["pss_mib_by_process"] = roles
        finally:
            srv.stop()
        return out
    proc = launch_app(
        system, "memory", {"port": ctx.port, "replicas": [1, 4]}, ctx.log(system, "memory")
    )
    try:
        for key in ("pss_base_mib", "pss_1rep_mib", "pss_4rep_mib"):
            ev = proc.event(300)
            time.sleep(settle)
            total, roles, count = pss_by_role(proc, ctx.port)
            out[key] = total
            out["notes"][f"{ev['phase']}: MiB by process"] = roles
            out["notes"][f"{ev['phase']}: processes"] = count
            proc.send("next")
        proc.snapshot()
    finally:
        proc.stop()
    out["pss_per_replica_mib"] = (out["pss_4rep_mib"] - out["pss_1rep_mib"]) / 3.0
    return out


def autoscale(system: System, ctx: Ctx) -> Result:
    if not system.is_serve:
        raise NotImplementedError("no autoscaling in a bare server")
    cfg = {"port": ctx.port, "clients": 8, "up_timeout": 60, "down_timeout": 90, "poll": 0.1}
    r = run_to_result(system, ctx, "autoscale", cfg, 400)
    out: Result = {
        "notes": {"requests ok/failed": f"{r['ok']}/{r['err']}", "peak RUNNING": r["peak_running"]}
    }
    if r["up_s"] is None:
        out["error"] = f"did not reach 4 RUNNING replicas within 60 s (peak {r['peak_running']})"
    else:
        out["autoscale_up_s"] = r["up_s"]
    if r["down_s"] is None:
        out["error"] = (out.get("error", "") + "; " if "error" in out else "") + (
            "not back to 1 replica within 90 s of the load's end"
        )
    else:
        out["autoscale_down_s"] = r["down_s"]
    return out


# ---- chaos: failed requests while the app changes under load ------------------------------
CHAOS_CONNS = 16
CHAOS_LEAD_S = 1.0  # load before the event
CHAOS_TAIL_S = 1.0  # load after the event
# After the load stops, how long the last requests get to be answered; under the servers'
# 5 s keep-alive timeout, whose closing of idle connections wrk would count as errors.
CHAOS_DRAIN_S = 4.0
CHAOS_TIMEOUT_S = 120.0  # for one deploy, or for a killed replica's replacement
CHAOS_REPLICAS = 2


def chaos_counts(w: dict[str, Any]) -> dict[str, int]:
    """Failed requests from chaos.lua's summary: non-2xx answers, socket errors, answers
    slower than wrk's timeout, and requests still unanswered after the drain (a request
    lost to a socket error is counted once, as the error)."""
    ok = sum(n for code, n in w["codes"].items() if 200 <= int(code) < 300)
    lost = max(0, w["sent"] - w["answered"] - w["read"] - w["write"])
    parts = {
        "non_2xx": w["answered"] - ok,
        "connect": w["connect"],
        "read": w["read"],
        "write": w["write"],
        "timeout": w["timeout"],
        "unanswered": lost,
    }
    return {"requests": w["sent"], "ok": ok, "failed": sum(parts.values()), **parts}


def chaos_load(
    ctx: Ctx, what: str, event: Callable[[], dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run `event` under steady wrk load: CHAOS_LEAD_S of load, the event, CHAOS_TAIL_S
    more; then wrk stops sending and waits up to CHAOS_DRAIN_S for the last answers.
    Returns chaos.lua's summary and what `event` returned."""
    stop_file = ctx.log_dir / f"r{ctx.round}-chaos-{what}.stop"
    drained = ctx.log_dir / f"r{ctx.round}-chaos-{what}.drained"
    ctx.log_dir.mkdir(parents=True, exist_ok=True)
    for f in (stop_file, drained):
        f.unlink(missing_ok=True)
    argv = [
        "wrk",
        "-t1",
        f"-c{CHAOS_CONNS}",
        "-d600s",  # stopped by SIGINT below; this only bounds a run left behind
        f"--timeout={ctx.wrk_timeout}",
        "-s",
        str(CHAOS_LUA),
        f"http://127.0.0.1:{ctx.port}/",
        "--",
        str(stop_file),
        str(drained),
    ]
    COMMANDS.append(" ".join(argv))
    w = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.POPEN_PIDS.add(w.pid)
    try:
        time.sleep(CHAOS_LEAD_S)
        if w.poll() is not None:
            raise RuntimeError(f"wrk exited early: {w.communicate()[1][-300:]}")
        result = event()
        time.sleep(CHAOS_TAIL_S)
        stop_file.touch()
        deadline = time.monotonic() + CHAOS_DRAIN_S
        while not drained.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        w.send_signal(signal.SIGINT)
        stdout, stderr = w.communicate(timeout=30)
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
        procs.POPEN_PIDS.discard(w.pid)
    for line in stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON ") :]), result
    raise RuntimeError(f"wrk gave no summary (rc {w.returncode}): {stdout[-300:]} {stderr[-300:]}")


def replica_pids(proc: Launched, port: int) -> set[int]:
    return {pid for pid, role in procs.roles(proc.pid, port).items() if role == "replica"}


def kill_replica(proc: Launched, port: int) -> dict[str, Any]:
    """kill -9 one replica process; return once a new replica process exists and the
    driver sees CHAOS_REPLICAS RUNNING replicas and no other."""
    before = replica_pids(proc, port)
    victim = procs.read_proc(min(before)) if before else None
    if victim is None:
        raise RuntimeError("no replica process found in the system's process tree")
    t0 = time.monotonic()
    if not procs.kill_procs([victim]):
        raise RuntimeError(f"could not kill replica process {victim.pid}")
    while not replica_pids(proc, port) - before:
        if time.monotonic() - t0 > CHAOS_TIMEOUT_S:
            raise TimeoutError(f"no replacement replica process within {CHAOS_TIMEOUT_S:.0f} s")
        time.sleep(0.05)
    proc.send(f"settle {CHAOS_REPLICAS}")
    proc.event(CHAOS_TIMEOUT_S)
    return {"recovery_s": time.monotonic() - t0, "killed_pid": victim.pid}


def chaos(system: System, ctx: Ctx) -> Result:
    """Failed requests under 16 connections of load during three code rollouts, a
    4 -> 1 scale-down, and a kill -9 of one replica (with the time to a RUNNING
    replacement)."""
    if not system.is_serve:
        raise NotImplementedError("no deployments to change in a bare server")
    why = ensure_wrk()
    if why:
        raise RuntimeError(why)
    cfg = {"port": ctx.port, "replicas": CHAOS_REPLICAS, "timeout": CHAOS_TIMEOUT_S}
    proc = launch_app(system, "chaos", cfg, ctx.log(system, "chaos"))
    out: Result = {"notes": {}}

    def command(line: str) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            proc.send(line)
            return proc.event(CHAOS_TIMEOUT_S * 4)

        return run

    def record(what: str, w: dict[str, Any], seconds: float | None) -> None:
        c = chaos_counts(w)
        out[f"chaos_{what}_requests"] = c["requests"]
        out[f"chaos_{what}_failed"] = c["failed"]
        out[f"chaos_{what}_failed_pct"] = 100.0 * c["failed"] / max(1, c["requests"])
        if seconds is not None:
            out[f"chaos_{what}_s"] = seconds
        out["notes"][f"{what}: counts"] = {k: v for k, v in c.items() if v or k == "failed"}
        out["notes"][f"{what}: answers by status"] = w["codes"]

    try:
        proc.event(300)
        proc.wait_http(ctx.port, 120.0)
        wrk(ctx, CHAOS_CONNS, 1.0)  # warm-up, not measured
        w, ev = chaos_load(ctx, "rollout", command("rollouts 3"))
        record("rollout", w, ev["seconds"])
        out["notes"]["rollout: seconds per rollout"] = [round(x, 2) for x in ev["steps"]]
        command("scale 4")()
        w, ev = chaos_load(ctx, "scaledown", command("scale 1"))
        record("scaledown", w, ev["seconds"])
        command(f"scale {CHAOS_REPLICAS}")()
        w, ev = chaos_load(ctx, "kill", lambda: kill_replica(proc, ctx.port))
        record("kill", w, None)
        out["chaos_kill_recovery_s"] = ev["recovery_s"]
        proc.snapshot()
    finally:
        proc.stop()
    return out


SCENARIOS: dict[str, Scenario] = {
    "http": http,
    "handle": handle,
    "batch": batch,
    "coldstart": coldstart,
    "memory": memory,
    "autoscale": autoscale,
    "chaos": chaos,
}
# Which systems each scenario applies to.
APPLIES = {
    "http": {"flotilla", "ray", "bare"},
    "handle": {"flotilla", "ray"},
    "batch": {"flotilla", "ray"},
    "coldstart": {"flotilla", "ray", "bare"},
    "memory": {"flotilla", "ray", "bare"},
    "autoscale": {"flotilla", "ray"},
    "chaos": {"flotilla", "ray"},
}
