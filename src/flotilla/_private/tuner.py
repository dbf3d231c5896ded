"""The driver of `flotilla tune`: a private cluster, one deployment per setting tried, a
closed-loop HTTP load generator in this process, CPU read from /proc.

The load generator is raw asyncio streams with keep-alive (one connection per client): on a
small machine it shares the cores with the cluster, so it is kept cheap, and its own CPU is
measured and reported (a warning above `LOADGEN_WARN_CORES`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from flotilla._private import tune
from flotilla._private.procfs import proc_stats
from flotilla._private.tune import LevelResult, Setting, Trial

__all__ = ["TuneReport", "batched_methods", "cluster_cpu_ticks", "run_tune", "tuned_yaml", "write_progress"]

LOADGEN_WARN_CORES = 0.8
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
#: Kept back from the budget for stopping the cluster and writing the file.
SHUTDOWN_RESERVE_S = 4.0
#: The search's part of the budget; the rest measures the finalists again (`_confirm`).
SEARCH_SHARE = 0.55
#: The least time one confirmation run (a redeploy and a measurement) is given.
CONFIRM_SLOT_MIN_S = 6.0
_REQUEST_TIMEOUT_S = 30.0


@dataclasses.dataclass
class TuneReport:
    """What a run tried and chose; `default` is the code's own options, `plain_defaults` a
    deployment's options when the code sets none (1 replica, 1 CPU, max_ongoing_requests 5)."""

    trials: list[Trial]
    chosen: Trial | None
    default: Trial | None
    plain_defaults: Trial | None
    deployment: str
    config: dict[str, Any] | None
    notes: list[str]
    elapsed_s: float


# ---- /proc -----------------------------------------------------------------------------------
def cluster_cpu_ticks(root: int) -> dict[int, int]:
    """utime+stime (clock ticks) of `root` and every live process below it, by pid."""
    stats: dict[int, tuple[int, int]] = {}
    for pid, fields in proc_stats():
        with contextlib.suppress(IndexError, ValueError):
            stats[pid] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, int] = {}
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid in stats and pid not in out:
            out[pid] = stats[pid][1]
            stack.extend(children.get(pid, ()))
    return out


def _cpu_delta_s(before: dict[int, int], after: dict[int, int]) -> float:
    return sum(t - before.get(pid, 0) for pid, t in after.items()) / _TICK


def batched_methods(cls: Any) -> dict[str, dict[str, Any]]:
    """The `@serve.batch` methods of a deployment class: name -> the options in the code."""
    from flotilla.serve.batching import _BatchedMethod

    out: dict[str, dict[str, Any]] = {}
    for klass in getattr(cls, "__mro__", ()):
        for name, value in vars(klass).items():
            if isinstance(value, _BatchedMethod) and name not in out:
                out[name] = dict(value._opts)
    return out


# ---- the load generator ----------------------------------------------------------------------
class _Load:
    def __init__(self) -> None:
        self.recording = False
        self.stop = False
        self.latencies: list[float] = []
        self.errors = 0


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, keep the connection) of one response, its body read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked, close = None, False, False
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            length = int(v)
        elif k == b"transfer-encoding" and b"chunked" in v.lower():
            chunked = True
        elif k == b"connection" and b"close" in v.lower():
            close = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length is not None:
        await reader.readexactly(length)
    else:
        await reader.read()
        close = True
    return status, not close


async def _client(host: str, port: int, request: bytes, load: _Load) -> None:
    writer: asyncio.StreamWriter | None = None
    while not load.stop:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            t0 = time.perf_counter()
            writer.write(request)
            status, keep = await asyncio.wait_for(_read_response(reader), _REQUEST_TIMEOUT_S)
            took = time.perf_counter() - t0
            if load.recording:
                if 200 <= status < 400:
                    load.latencies.append(took)
                else:
                    load.errors += 1
            if not keep:
                writer.close()
                writer = None
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            if load.recording:
                load.errors += 1
            if writer is not None:
                writer.close()
                writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def _level(host: str, port: int, request: bytes, concurrency: int, seconds: float, keeper: int) -> LevelResult:
    """Run `concurrency` closed-loop clients for `seconds` (the first 15%, at most 1 s, warms up)."""
    load = _Load()
    tasks = [asyncio.ensure_future(_client(host, port, request, load)) for _ in range(concurrency)]
    try:
        await asyncio.sleep(min(1.0, seconds * 0.15))
        cpu0, own0, t0 = cluster_cpu_ticks(keeper), os.times(), time.monotonic()
        load.recording = True
        await asyncio.sleep(max(0.2, seconds * 0.85))
        load.recording = False
        cpu1, own1, t1 = cluster_cpu_ticks(keeper), os.times(), time.monotonic()
    finally:
        load.stop = True
        _, pending = await asyncio.wait(tasks, timeout=2.0)
        for t in pending:
            t.cancel()
    wall = t1 - t0
    n = len(load.latencies)
    p50, p95, p99 = tune.summarize(load.latencies)
    own = (own1.user - own0.user) + (own1.system - own0.system)
    return LevelResult(
        concurrency=concurrency, requests=n, errors=load.errors, seconds=wall, p50_ms=p50, p95_ms=p95, p99_ms=p99,
        cpu_ms_per_request=_cpu_delta_s(cpu0, cpu1) * 1000.0 / n if n else float("nan"),
        loadgen_cpu=own / wall if wall > 0 else 0.0,
    )


def _request_bytes(host: str, port: int, route: str, body: bytes | None) -> bytes:
    if body is None:
        return f"GET {route} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    head = (f"POST {route} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


# ---- the search ------------------------------------------------------------------------------
def _base_setting(dep: Any) -> Setting:
    replicas = dep.num_replicas if isinstance(dep.num_replicas, int) else 1
    cpus = dep.ray_actor_options.get("num_cpus", 1.0)
    return Setting(int(replicas), float(cpus), int(dep.max_ongoing_requests))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_tune(
    import_path: str,
    app: Any,
    slo_p95_ms: float,
    *,
    body: bytes | None = None,
    route: str | None = None,
    budget_s: float = 120.0,
    levels: int = 3,
    cores: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> TuneReport:
    """Search settings of `app`'s ingress deployment within `budget_s` seconds (all of it:
    cluster start, trials and shutdown) and return what was tried and the best within the SLO."""
    import flotilla
    from flotilla import serve
    from flotilla._private.appbuild import apply_overrides, walk_deployments
    from flotilla._private.client import Runtime
    from flotilla._private.cliformat import build_config
    from flotilla.serve.deploy_schema import DeploymentSchema

    start = time.monotonic()
    deadline = start + budget_s - SHUTDOWN_RESERVE_S
    confirm_s = (budget_s - SHUTDOWN_RESERVE_S) * (1 - SEARCH_SHARE)
    if confirm_s < 2 * 2 * CONFIRM_SLOT_MIN_S:
        confirm_s = 0.0  # too short a budget to measure two finalists twice: all of it searches
    search_deadline = deadline - confirm_s
    cores = cores or os.cpu_count() or 1
    say = progress or (lambda line: None)
    name, node = walk_deployments(app)[0]
    dep = node.deployment
    base = _base_setting(dep)
    notes: list[str] = []
    if dep.autoscaling_config is not None:
        notes.append(f"deployment '{name}' autoscales; the tuner tries fixed num_replicas instead")
    for meth, opts in batched_methods(dep.func_or_class).items():
        notes.append(
            f"@serve.batch method '{meth}' (max_batch_size={opts.get('max_batch_size')}, batch_wait_timeout_s="
            f"{opts.get('batch_wait_timeout_s')}): batch options live in the code (or set_max_batch_size from "
            "reconfigure), not in a config file, so they are not tuned")
    if len(walk_deployments(app)) > 1:
        notes.append(f"only the ingress deployment '{name}' is tuned; the others keep their options")
    if "OMP_NUM_THREADS" in os.environ:
        notes.append(f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} is set in this shell: replicas use it "
                     "whatever num_cpus")
    prefix = "/"
    path = route or prefix
    base_cfg = build_config([(import_path, app, None)])
    trials: list[Trial] = []
    tried: dict[Setting, Trial] = {}
    port = _free_port()
    flotilla.init(address="local", num_cpus=cores)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        proc = Runtime.current().process
        keeper = proc.pid if proc is not None else os.getpid()
        request = _request_bytes("127.0.0.1", port, path, body)
        best = base
        stages = ("start", *tune.DIMENSIONS)
        for i, dim in enumerate(stages):
            if dim == "start":
                stage = tune.first_candidates(base, cores)
            else:
                stage = tune.stage_candidates(dim, best, cores)
            for j, setting in enumerate(stage):
                if setting in tried:
                    continue
                later = sum(len(tune.stage_candidates(d, best, cores)) - 1 for d in stages[i + 1:] if d != "start")
                left = sum(1 for s in stage[j:] if s not in tried) + later
                share = tune.trial_budget(search_deadline - time.monotonic(), left)
                if share <= 0:
                    notes.append(f"out of time after {len(trials)} trial(s): stopped before {setting.label()}")
                    break
                say(tune.progress_bar(time.monotonic() - start, budget_s, f"trial {len(trials) + 1}: {setting.label()}"))
                trial = _trial(serve, apply_overrides, DeploymentSchema, app, name, setting, prefix, request, port,
                               keeper, slo_p95_ms, levels, time.monotonic() + share)
                trials.append(trial)
                tried[setting] = trial
                say(f"    {setting.label()}: {trial.sweep() or trial.note}")
            else:
                chosen = tune.pick_best([tried[s] for s in stage if s in tried], slo_p95_ms)
                if chosen is not None:
                    best = chosen.setting
                continue
            break
        final = tune.finalists(trials, slo_p95_ms, keep=(base, tune.DEFAULTS))
        confirmed = _confirm(serve, apply_overrides, DeploymentSchema, app, name, final, prefix, request, port, keeper,
                             deadline, say, lambda what: say(tune.progress_bar(time.monotonic() - start, budget_s, what)))
        say(tune.progress_bar(time.monotonic() - start, budget_s, "stopping the cluster"))
    finally:
        with contextlib.suppress(Exception):
            flotilla.shutdown()
    if confirmed:
        n = max(len(t.levels) for t in confirmed)
        notes.append(f"the finalists were measured again, up to {n} rounds interleaved (a round whose redeploy "
                     "left no time to measure is missing): their rows (marked 'median of ...') are the medians; "
                     "the others are single runs")
        by_setting = {t.setting: t for t in confirmed}
        trials = [by_setting.get(t.setting, t) for t in trials]
        tried = {t.setting: t for t in trials}
    chosen = tune.pick_best(confirmed or trials, slo_p95_ms)
    hot = [t.result.loadgen_cpu for t in trials if t.result is not None]
    if hot and max(hot) > LOADGEN_WARN_CORES:
        notes.append(f"the load generator used up to {max(hot):.0%} of a core: it may have limited the req/s measured")
    config = tune.tuned_config(base_cfg, name, chosen.setting) if chosen is not None else None
    return TuneReport(trials, chosen, tried.get(base), tried.get(tune.DEFAULTS), name, config, notes,
                      time.monotonic() - start)


def _confirm(serve: Any, apply_overrides: Any, schema: Any, app: Any, name: str, final: list[Trial], prefix: str,
             request: bytes, port: int, keeper: int, deadline: float, say: Callable[[str], None],
             bar: Callable[[str], None]) -> list[Trial]:
    """Measure each finalist again at the client count of its best level, round-robin, as
    many rounds (2 or 3) as the time left allows; [] when there is no time for two rounds or
    fewer than two finalists. A machine shared with other work makes single runs noisy:
    interleaved rounds and medians keep a burst of that work from picking the winner."""
    if len(final) < 2:
        return []
    left = deadline - time.monotonic()
    rounds = next((r for r in (3, 2) if left / (r * len(final)) >= CONFIRM_SLOT_MIN_S), 0)
    if not rounds:
        return []
    slot = left / (rounds * len(final))
    got: dict[Setting, list[LevelResult]] = {t.setting: [] for t in final}
    for k in range(rounds):
        for t in final:
            assert t.result is not None
            bar(f"confirming, round {k + 1}/{rounds}: {t.setting.label()}")
            until = time.monotonic() + slot
            with contextlib.suppress(Exception):
                serve.delete("tune")
            entry = schema(name=name, num_replicas=t.setting.num_replicas,
                           max_ongoing_requests=t.setting.max_ongoing_requests,
                           ray_actor_options={"num_cpus": t.setting.num_cpus})
            try:
                serve.run(apply_overrides(app, [entry]), name="tune", route_prefix=prefix)
            except Exception:
                continue
            if until - time.monotonic() >= 0.5:
                got[t.setting].append(asyncio.run(
                    _level("127.0.0.1", port, request, t.result.concurrency, until - time.monotonic(), keeper)))
    out = []
    for t in final:
        med = tune.median_result(got[t.setting])
        if med is None:
            continue
        out.append(Trial(t.setting, med, f"median of {len(got[t.setting])}", levels=tuple(got[t.setting])))
        say(f"    {t.setting.label()}: " + " | ".join(f"{r.rps:.0f} req/s p95 {r.p95_ms:.1f} ms"
                                                    for r in got[t.setting]))
    return out


def _trial(serve: Any, apply_overrides: Any, schema: Any, app: Any, name: str, setting: Setting, prefix: str,
           request: bytes, port: int, keeper: int, slo_p95_ms: float, levels: int, until: float) -> Trial:
    """Deploy `setting` (a fresh application: the previous one is deleted first, so replicas
    never wait for CPUs the old ones hold), sweep concurrency levels until `until`."""
    with contextlib.suppress(Exception):
        serve.delete("tune")
    entry = schema(name=name, num_replicas=setting.num_replicas, max_ongoing_requests=setting.max_ongoing_requests,
                   ray_actor_options={"num_cpus": setting.num_cpus})
    try:
        serve.run(apply_overrides(app, [entry]), name="tune", route_prefix=prefix)
    except Exception as e:
        return Trial(setting, None, f"deploy failed: {' '.join(str(e).split())[:80]}")
    results: list[LevelResult] = []
    conc = tune.concurrency_levels(setting, levels)
    seconds = (until - time.monotonic()) / (len(conc) + 1)  # a slot kept for one bisection
    for c in conc:
        if seconds < 0.5 or time.monotonic() + seconds > until + 0.1:
            break
        r = asyncio.run(_level("127.0.0.1", port, request, c, seconds, keeper))
        results.append(r)
        if not tune.within_slo(r, slo_p95_ms):
            mid = tune.bisect_level(results, slo_p95_ms)
            if mid is not None and until - time.monotonic() >= 0.5:
                results.append(asyncio.run(_level("127.0.0.1", port, request, mid, until - time.monotonic(), keeper)))
            break  # more clients only queue longer
    if not results:
        return Trial(setting, None, "no time left to measure")
    return Trial(setting, tune.best_level(results, slo_p95_ms), levels=tuple(results))


def write_progress(line: str) -> None:
    """One progress line on stderr (plain text: a carriage return redraws it on a terminal)."""
    end = "\r" if sys.stderr.isatty() else "\n"
    sys.stderr.write("\x1b[2K" + line + end if sys.stderr.isatty() else line + end)
    sys.stderr.flush()


def tuned_yaml(report: TuneReport, command: str, slo_p95_ms: float) -> str:
    """The chosen config as a `flotilla deploy` file, with what was measured in its header."""
    import yaml  # type: ignore[import-untyped]

    assert report.config is not None and report.chosen is not None and report.chosen.result is not None
    r = report.chosen.result
    header = [
        f"# Generated by `{command}`; deploy it with `flotilla deploy FILE`.",
        f"# Chosen for deployment '{report.deployment}': {report.chosen.setting.label()}",
        f"#   {r.rps:.0f} req/s at {r.concurrency} clients, p95 {r.p95_ms:.1f} ms (SLO {slo_p95_ms:g} ms), "
        f"{r.cpu_ms_per_request:.2f} CPU ms/request, on {os.cpu_count()} cores.",
    ]
    d = report.default.result if report.default is not None else None
    if d is not None:
        header.append(f"#   The code's options ({report.default.setting.label()}): {d.rps:.0f} req/s, "  # type: ignore[union-attr]
                      f"p95 {d.p95_ms:.1f} ms.")
    p = report.plain_defaults.result if report.plain_defaults is not None else None
    if p is not None and report.plain_defaults is not report.default:
        header.append(f"#   The plain defaults ({tune.DEFAULTS.label()}): {p.rps:.0f} req/s, p95 {p.p95_ms:.1f} ms.")
    header += [f"# NOTE: {n}" for n in report.notes]
    return "\n".join(header) + "\n\n" + yaml.safe_dump(report.config, sort_keys=False, default_flow_style=False)
