"""The scenarios: each runs one system once and returns {metric: value} (+ notes).

A scenario raises on failure; the orchestrator records the error and moves on.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import procs
from systems import BENCH, COMMANDS, Launched, System, ensure_wrk, http_ok, launch_app, pick_port

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
def start_server(system: System, ctx: Ctx, what: str, apps: list[dict[str, Any]],
                 num_proxies: int | None = None) -> Launched:
    """Start a serving process and wait for its first HTTP 200 (cold_start_s is recorded).
    `num_proxies`: flotilla's `http_options["num_proxies"]` (else its default)."""
    if system.is_serve:
        cfg: dict[str, Any] = {"port": ctx.port, "apps": apps}
        if num_proxies is not None:
            cfg["num_proxies"] = num_proxies
        srv = launch_app(system, "serve", cfg, ctx.log(system, what))
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
    roles = srv.roles(port, "driver" if srv.system.is_serve else "server")
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
    roles = srv.roles(port, "driver" if srv.system.is_serve else "server")
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
        if system.name == "flotilla":
            _metrics_cost(system, ctx, out, srv)
    finally:
        srv.stop()
    if system.name == "flotilla":
        _variant(system, ctx, out, "two-proxies", "2proxies", num_proxies=2)
    return out


def _variant(system: System, ctx: Ctx, out: Result, what: str, tag: str,
             num_proxies: int | None = None) -> dict[int, dict[str, Any]]:
    """The same app started again as `system` with `num_proxies`, measured at 8 and 32
    connections (those of the run just made): `http_rps_<tag>_c*`, `http_cpu_ms_<tag>_c*`."""
    srv = start_server(system, ctx, f"http-{what}", [echo_app()], num_proxies=num_proxies)
    got: dict[int, dict[str, Any]] = {}
    try:
        wrk(ctx, 8, 1.0)
        for c in (8, 32):
            if f"http_rps_c{c}" not in out:
                continue
            m = got[c] = measure_http(srv, ctx, c)
            out[f"http_rps_{tag}_c{c}"] = m["rps"]
            out[f"http_cpu_ms_{tag}_c{c}"] = m["cpu_ms"]
            out["notes"][f"cpu_ms_per_req_by_process_{tag}_c{c}"] = m["cpu_roles"]
    finally:
        srv.stop()
    return got


#: On/off pairs per connection count in `_metrics_cost`, and the seconds of each point.
COST_PAIRS = 3
COST_POINT_S = 3.0


def _metrics_cost(system: System, ctx: Ctx, out: Result, on: Launched) -> None:
    """What metrics, access logs and traces cost: the same app started again with
    FLOTILLA_METRICS=0 on another port, while `on` (the run just measured) stays up, then
    both measured in turn at 8 and 32 connections, COST_PAIRS times, the order swapped each
    pair, so drift and the VM's noise fall on both alike. The cost is the median over pairs
    of 1 - on/off (req/s) and on/off - 1 (CPU per request)."""
    off_system = replace(system, extra_env={**system.extra_env, "FLOTILLA_METRICS": "0"})
    off_ctx = replace(ctx, port=pick_port(ctx.port + 100))
    off = start_server(off_system, off_ctx, "http-metrics-off", [echo_app()])
    seconds = min(ctx.duration, COST_POINT_S)
    try:
        wrk(off_ctx, 8, 1.0)
        for c in (8, 32):
            if f"http_rps_c{c}" not in out:
                continue
            pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
            for k in range(COST_PAIRS):
                first, second = ((on, ctx), (off, off_ctx)) if k % 2 == 0 else ((off, off_ctx), (on, ctx))
                a = measure_http(first[0], replace(first[1], duration=seconds), c)
                b = measure_http(second[0], replace(second[1], duration=seconds), c)
                pairs.append((a, b) if first[0] is on else (b, a))
            offs = [p[1] for p in pairs]
            out[f"http_rps_nometrics_c{c}"] = statistics.median(m["rps"] for m in offs)
            out[f"http_cpu_ms_nometrics_c{c}"] = statistics.median(m["cpu_ms"] for m in offs)
            out[f"metrics_cost_rps_c{c}"] = statistics.median(1.0 - a["rps"] / max(b["rps"], 1e-9) for a, b in pairs)
            out[f"metrics_cost_cpu_c{c}"] = statistics.median(a["cpu_ms"] / max(b["cpu_ms"], 1e-9) - 1.0 for a, b in pairs)
            out["notes"][f"metrics on/off req/s pairs c{c}"] = [(round(a["rps"]), round(b["rps"])) for a, b in pairs]
            out["notes"][f"cpu_ms_per_req_by_process_nometrics_c{c}"] = offs[-1]["cpu_roles"]
    finally:
        off.stop()


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
        "handle_aseq_cps": r.get("aseq_cps"),
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
# Kills of the control plane and the proxy: the load goes on after the kill until the
# system has recovered, plus CHAOS_TAIL_S, but at most CHAOS_KILL_WINDOW_S; recovery is
# then awaited without load up to CHAOS_RECOVERY_TIMEOUT_S from the kill.
CHAOS_KILL_WINDOW_S = 10.0
CHAOS_RECOVERY_TIMEOUT_S = 60.0
# The process each kill event hits, by its role in the system's process tree (procs.roles);
# a system missing from an entry has no such process.
CHAOS_KILLS: dict[str, dict[str, str]] = {
    "zygote": {"flotilla": "zygote"},  # Ray has no fork server
    "proxy": {"flotilla": "proxy", "ray": "proxy"},
    "head": {"flotilla": "head", "ray": "controller"},  # Ray: the ServeController actor
}
# How each kill event's recovery is detected.
CHAOS_RECOVERED = {
    "zygote": "a new fork-server process exists",
    "proxy": "a POST on a new connection gets a 2xx answer",
    "head": "a serve.status() call from the driver works",
}


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
    more (less if the event's result has a `load_until`, a time.monotonic() value); then
    wrk stops sending and waits up to CHAOS_DRAIN_S for the last answers.
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
        tail_end = time.monotonic() + CHAOS_TAIL_S
        tail_end = min(tail_end, result.get("load_until", tail_end))
        time.sleep(max(0.0, tail_end - time.monotonic()))
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


def role_procs(proc: Launched, role: str, port: int | None = None) -> list[procs.Proc]:
    """The processes of `proc`'s tree that have `role` (see procs.roles)."""
    out = []
    for pid, r in proc.roles(port).items():
        p = procs.read_proc(pid) if r == role else None
        if p is not None:
            out.append(p)
    return out


def replica_pids(proc: Launched, port: int) -> set[int]:
    return {p.pid for p in role_procs(proc, "replica", port)}


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


def _new_process(proc: Launched, role: str, old: int, until: float) -> float | None:
    """Poll until `proc`'s tree has a `role` process other than `old`; when it appeared
    (time.monotonic()), or None at `until`."""
    while time.monotonic() < until:
        if any(p.pid != old for p in role_procs(proc, role)):
            return time.monotonic()
        time.sleep(0.05)
    return None


def _http_back(port: int, until: float) -> float | None:
    """Poll with POSTs, each on a new connection, until one gets a 2xx answer; when it
    came (time.monotonic()), or None at `until`."""
    while time.monotonic() < until:
        if http_ok(port, "/", timeout=max(0.05, min(1.0, until - time.monotonic()))):
            return time.monotonic()
        time.sleep(0.02)
    return None


def kill_process(proc: Launched, ctx: Ctx, event: str, role: str) -> dict[str, Any]:
    """One kill event under load: kill -9 the single `role` process, then wait (under load,
    at most CHAOS_KILL_WINDOW_S) for the event's sign of recovery. Returns what was killed,
    the kill's time and the recovery's (None if not yet), and `load_until` for chaos_load."""
    victims = role_procs(proc, role, ctx.port)
    if len(victims) != 1:
        raise RuntimeError(f"expected one {role} process in the tree, found {len(victims)}")
    victim = victims[0]
    t0 = time.monotonic()
    if not procs.kill_procs([victim]):
        raise RuntimeError(f"could not kill the {role} process {victim.pid}")
    window_end = t0 + CHAOS_KILL_WINDOW_S
    out: dict[str, Any] = {"killed_pid": victim.pid, "t0": t0, "load_until": window_end}
    if event == "head":
        proc.send(f"status {t0 + CHAOS_RECOVERY_TIMEOUT_S}")
        try:
            out["probe"] = proc.event(max(0.05, window_end - time.monotonic()))
            out["t_ok"] = out["probe"]["t_ok"]
        except TimeoutError:
            pass  # still waiting: chaos_kill collects the answer after the load
    elif event == "proxy":
        out["t_ok"] = _http_back(ctx.port, window_end)
    else:
        out["t_ok"] = _new_process(proc, role, victim.pid, window_end)
    return out


def chaos_kill(proc: Launched, ctx: Ctx, system: System, event: str) -> tuple[dict, dict]:
    """Run one kill event under load; afterwards (without load) wait for the recovery if it
    took longer than the window, then for CHAOS_REPLICAS RUNNING replicas. Returns wrk's
    summary and the event's figures and notes."""
    role = CHAOS_KILLS[event][system.name]
    data_plane = {
        p.pid for r in ("replica", "proxy") if r != role for p in role_procs(proc, r, ctx.port)
    }
    w, ev = chaos_load(ctx, event, lambda: kill_process(proc, ctx, event, role))
    t0 = ev["t0"]
    until = t0 + CHAOS_RECOVERY_TIMEOUT_S
    if event == "head" and "probe" not in ev:
        ev["probe"] = proc.event(max(0.05, until - time.monotonic()) + 30)
        ev["t_ok"] = ev["probe"]["t_ok"]
    elif ev["t_ok"] is None:
        if event == "proxy":
            ev["t_ok"] = _http_back(ctx.port, until)
        else:
            ev["t_ok"] = _new_process(proc, role, ev["killed_pid"], until)
    notes: dict[str, Any] = {f"killed {role} pid": ev["killed_pid"]}
    if "probe" in ev:
        notes["serve.status() attempts"] = ev["probe"]["attempts"]
        if ev["probe"]["last_error"]:
            notes["last serve.status() error"] = ev["probe"]["last_error"]
    recovery = None if ev["t_ok"] is None else ev["t_ok"] - t0
    if recovery is not None and recovery > CHAOS_KILL_WINDOW_S:
        notes["recovered after the load window"] = True
    now = {p.pid for p in role_procs(proc, role)}
    notes[f"{role} pids now"] = sorted(now)
    if recovery is None:
        return w, {
            "recovery_s": None,
            "notes": notes,
            "error": (
                f"no recovery ({CHAOS_RECOVERED[event]}) within {CHAOS_RECOVERY_TIMEOUT_S:.0f} s"
            ),
        }
    proc.send(f"settle {CHAOS_REPLICAS}")
    proc.event(CHAOS_TIMEOUT_S)
    notes[f"{CHAOS_REPLICAS} RUNNING afterwards"] = True  # else settle raised
    after = {
        p.pid for r in ("replica", "proxy") if r != role for p in role_procs(proc, r, ctx.port)
    }
    notes["replica/proxy processes that survived"] = f"{len(data_plane & after)}/{len(data_plane)}"
    if event == "head":  # serve.run works again from the same driver
        proc.send("rollouts 1")
        notes["serve.run (a rollout) afterwards, s"] = round(
            proc.event(CHAOS_TIMEOUT_S)["seconds"], 2
        )
    return w, {"recovery_s": recovery, "notes": notes}


def chaos(system: System, ctx: Ctx) -> Result:
    """Failed requests under 16 connections of load during three code rollouts, a
    4 -> 1 scale-down, and kill -9 of the fork server, a replica, the proxy and the head /
    controller (with the time to recover)."""
    if not system.is_serve:
        raise NotImplementedError("no deployments to change in a bare server")
    why = ensure_wrk()
    if why:
        raise RuntimeError(why)
    cfg = {"port": ctx.port, "replicas": CHAOS_REPLICAS, "timeout": CHAOS_TIMEOUT_S}
    proc = launch_app(system, "chaos", cfg, ctx.log(system, "chaos"))
    out: Result = {"notes": {}}
    errors: list[str] = []

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
        # Of the failed: attempts on connections nothing accepted (a closed port fails the
        # first write with ECONNREFUSED), which wrk retries at once, without a pause.
        out[f"chaos_{what}_refused"] = c["connect"] + c["write"]
        if seconds is not None:
            out[f"chaos_{what}_s"] = seconds
        out["notes"][f"{what}: counts"] = {k: v for k, v in c.items() if v or k == "failed"}
        out["notes"][f"{what}: answers by status"] = w["codes"]

    def attempt(what: str, fn: Callable[[], None]) -> None:
        """One event; its failure is recorded and the scenario goes on with the next."""
        try:
            fn()
        except Exception as e:
            errors.append(f"{what}: {type(e).__name__}: {e}"[:400])

    def rollout() -> None:
        w, ev = chaos_load(ctx, "rollout", command("rollouts 3"))
        record("rollout", w, ev["seconds"])
        out["notes"]["rollout: seconds per rollout"] = [round(x, 2) for x in ev["steps"]]

    def scaledown() -> None:
        command("scale 4")()
        w, ev = chaos_load(ctx, "scaledown", command("scale 1"))
        record("scaledown", w, ev["seconds"])
        command(f"scale {CHAOS_REPLICAS}")()

    def kill() -> None:
        w, ev = chaos_load(ctx, "kill", lambda: kill_replica(proc, ctx.port))
        record("kill", w, None)
        out["chaos_kill_recovery_s"] = ev["recovery_s"]

    def kill_event(event: str) -> Callable[[], None]:
        def run() -> None:
            if system.name not in CHAOS_KILLS[event]:
                out["notes"][f"{event}: n/a"] = f"{system.name} has no such process"
                return
            w, ev = chaos_kill(proc, ctx, system, event)
            record(event, w, None)
            if ev["recovery_s"] is not None:
                out[f"chaos_{event}_recovery_s"] = ev["recovery_s"]
            out["notes"].update({f"{event}: {k}": v for k, v in ev["notes"].items()})
            if "error" in ev:
                raise TimeoutError(ev["error"])

        return run

    try:
        proc.event(300)
        proc.wait_http(ctx.port, 120.0)
        wrk(ctx, CHAOS_CONNS, 1.0)  # warm-up, not measured
        # The fork server goes before the replica kill, whose replacement it must fork.
        for what, fn in (
            ("rollout", rollout),
            ("scaledown", scaledown),
            ("zygote", kill_event("zygote")),
            ("kill", kill),
            ("proxy", kill_event("proxy")),
            ("head", kill_event("head")),
        ):
            attempt(what, fn)
        proc.snapshot()
    finally:
        proc.stop()
    if errors:
        out["error"] = "; ".join(errors)
    return out


# ---- payload: large arrays through a handle, large bodies over HTTP -------------------------
PAYLOAD_SIZES_MB = (1, 10, 100)  # MB = 10**6 bytes (float64 arrays of MB * 125,000 elements)
PAYLOAD_SECONDS = 2.0  # per size and variant: calls go on this long, and at least ...
PAYLOAD_MIN_CALLS = 3
PAYLOAD_HTTP_TIMEOUT_S = 120.0  # one request


def _gbps_ms(nbytes: int, calls: int, seconds: float) -> tuple[float, float]:
    """GB/s (10**9 bytes of payload per second) and ms per call."""
    return nbytes * calls / seconds / 1e9, seconds / calls * 1000.0


def post_loop(port: int, path: str, body: bytes, echo: bool) -> tuple[int, float]:
    """Sequential POSTs of `body` on one keep-alive connection (TCP_NODELAY; the body is
    sent from its own memory, not joined to the headers) for PAYLOAD_SECONDS and at least
    PAYLOAD_MIN_CALLS, after one unmeasured request; each answer is checked. Returns
    (requests, seconds)."""
    conn = HTTPConnection("127.0.0.1", port, timeout=PAYLOAD_HTTP_TIMEOUT_S)
    conn.connect()
    assert conn.sock is not None
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    view = memoryview(body)
    headers = {"Content-Type": "application/octet-stream"}

    def one() -> None:
        conn.request("POST", path, body=view, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"POST {path}: HTTP {resp.status}: {data[:200]!r}")
        got = len(data) if echo else json.loads(data)["n"]
        if got != len(body):
            raise RuntimeError(f"POST {path}: answer says {got} bytes, not {len(body)}")

    try:
        one()
        n, t0 = 0, time.perf_counter()
        while n < PAYLOAD_MIN_CALLS or time.perf_counter() - t0 < PAYLOAD_SECONDS:
            one()
            n += 1
        return n, time.perf_counter() - t0
    finally:
        conn.close()


def payload(system: System, ctx: Ctx) -> Result:
    """1, 10 and 100 MB: float64 arrays and bytes objects through a handle (as the argument,
    and back), and bodies POSTed over HTTP (length answered, and the body echoed); GB/s and
    ms per call."""
    out: Result = {"notes": {}}
    if system.is_serve:
        cfg = {
            "port": ctx.port,
            "sizes_mb": list(PAYLOAD_SIZES_MB),
            "seconds": PAYLOAD_SECONDS,
            "min_calls": PAYLOAD_MIN_CALLS,
        }
        srv = launch_app(system, "payload", cfg, ctx.log(system, "payload"))
    else:
        srv = launch_app(system, "serve", {"port": ctx.port}, ctx.log(system, "payload"))
    try:
        if system.is_serve:
            results = srv.event(600.0)["results"]
            for mb in PAYLOAD_SIZES_MB:
                for label, key in (("arg", "handle"), ("rt", "handle_rt"), ("barg", "handle_bytes"),
                                   ("brt", "handle_bytes_rt")):
                    r = results[f"{label}_{mb}"]
                    gbps, ms = _gbps_ms(r["bytes"], r["calls"], r["s"])
                    out[f"payload_{key}_gbps_{mb}mb"] = gbps
                    out[f"payload_{key}_ms_{mb}mb"] = ms
                    out["notes"][f"{key} {mb} MB: calls"] = r["calls"]
            srv.event(60.0)  # "ready"
        srv.wait_http(ctx.port, 120.0, "/size")
        for mb in PAYLOAD_SIZES_MB:
            body = random.Random(mb).randbytes(mb * 10**6)
            for key, path, echo in (("http", "/size", False), ("http_echo", "/echo", True)):
                n, seconds = post_loop(ctx.port, path, body, echo)
                gbps, ms = _gbps_ms(len(body), n, seconds)
                out[f"payload_{key}_gbps_{mb}mb"] = gbps
                out[f"payload_{key}_ms_{mb}mb"] = ms
                out["notes"][f"{key} {mb} MB: requests"] = n
            del body
    finally:
        srv.stop()
    return out


# The traffic scenario's apps: a plain route, a 0.5/0.5 split of two apps, and a route whose
# requests are mirrored (10%) to a fifth app. Every app is the no-op Echo.
TRAFFIC_SHADOW_FRACTION = 0.1


def traffic(system: System, ctx: Ctx) -> Result:
    """The cost of a split route and of 10% shadow traffic on the no-op HTTP path: wrk on a
    plain route, a split route and a shadowed route of one server, taking turns, at 8 and 32
    connections; req/s and the ratios to plain."""
    if system.name != "flotilla":
        raise NotImplementedError("traffic splitting and shadow traffic are flotilla's (serve.set_traffic/set_shadow)")
    apps = [echo_app(f"/{n}", n) for n in ("plain", "a", "b", "shadowed", "mirror")]
    srv = launch_app(system, "serve", {
        "port": ctx.port, "apps": apps,
        "traffic": [{"name": "split", "route": "/split", "weights": {"a": 0.5, "b": 0.5}}],
        "shadows": [{"route": "shadowed", "target": "mirror", "fraction": TRAFFIC_SHADOW_FRACTION}],
    }, ctx.log(system, "traffic"))
    out: Result = {"notes": {}}
    try:
        srv.wait_http(ctx.port, 300.0, "/plain")
        srv.event(60.0)  # "ready": apps, split and shadow are set
        for path in ("/plain", "/split", "/shadowed"):
            srv.wait_http(ctx.port, 60.0, path)
            wrk(ctx, 8, 1.0, path)  # warm-up, not measured
        for c in (8, 32):
            for label, path in (("plain", "/plain"), ("split", "/split"), ("shadow", "/shadowed")):
                m = measure_http(srv, ctx, c, path)
                for k in ("rps", "p50_ms", "errors"):
                    out[f"traffic_{label}_{k}_c{c}"] = m[k]
                out["notes"][f"cpu_ms_per_req_by_process_{label}_c{c}"] = m["cpu_roles"]
            plain = max(out[f"traffic_plain_rps_c{c}"], 1e-9)
            out[f"traffic_split_ratio_c{c}"] = out[f"traffic_split_rps_c{c}"] / plain
            out[f"traffic_shadow_ratio_c{c}"] = out[f"traffic_shadow_rps_c{c}"] / plain
        srv.send("shadow_counts")
        out["notes"]["shadow copies by outcome (/metrics)"] = srv.event(60.0)["counts"]
    finally:
        srv.stop()
    return out


SCENARIOS: dict[str, Scenario] = {
    "http": http,
    "handle": handle,
    "batch": batch,
    "coldstart": coldstart,
    "memory": memory,
    "autoscale": autoscale,
    "chaos": chaos,
    "traffic": traffic,
    "payload": payload,
}
# Scenarios a run leaves out unless named in --scenarios.
NOT_DEFAULT = frozenset({"traffic"})
# Which systems each scenario applies to. flotilla-ray has no chaos: on the Ray backend the
# head's end is the session's (phase one), and it has no fork server for replicas.
APPLIES = {
    "http": {"flotilla", "flotilla-ray", "ray", "bare"},
    "handle": {"flotilla", "flotilla-ray", "ray"},
    "batch": {"flotilla", "flotilla-ray", "ray"},
    "coldstart": {"flotilla", "flotilla-ray", "ray", "bare"},
    "memory": {"flotilla", "flotilla-ray", "ray", "bare"},
    "autoscale": {"flotilla", "flotilla-ray", "ray"},
    "chaos": {"flotilla", "ray"},
    "traffic": {"flotilla"},
    # Not yet run on flotilla-ray: left out of its runs.
    "payload": {"flotilla", "ray", "bare"},
}
