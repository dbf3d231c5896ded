"""Benchmark flotilla against Ray Serve and a bare uvicorn + Starlette app, in one run.

    bench/run                      # = .venv/bin/python bench/run.py; full run (~15 min)
    bench/run --quick              # smoke run: 1 round, 2 s points
    bench/run --systems flotilla,bare --scenarios http,handle --rounds 2 --duration 3
    bench/run --systems flotilla-ray,ray     # the Ray backend against Ray Serve, one Ray instance

Installs Ray Serve into bench/.venv-ray and wrk from apt when missing, alternates the
systems within each round, and writes bench/RESULTS.md. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procs
import report
import scenarios
import systems
import wakeup

DEFAULT_RAY = "ray[serve]==2.60.0"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--systems",
        default="flotilla,ray,bare",
        help="comma-separated subset of flotilla,flotilla-ray,ray,bare (default "
        "flotilla,ray,bare); with flotilla-ray, it and ray share one local Ray instance",
    )
    p.add_argument(
        "--scenarios",
        default=None,
        help=f"comma-separated subset of {','.join(scenarios.SCENARIOS)} (default: all; with "
        "flotilla-ray among the systems, those that apply to it)",
    )
    p.add_argument(
        "--rounds", type=int, default=3, help="rounds; systems alternate within each (default 3)"
    )
    p.add_argument(
        "--duration",
        type=float,
        default=5.0,
        help="seconds per measured HTTP/handle point (default 5)",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 1 round, 2 s points (unless given)"
    )
    p.add_argument(
        "--port", type=int, default=18080, help="HTTP port for the servers (default 18080)"
    )
    p.add_argument("--output", default=str(systems.BENCH / "RESULTS.md"), help="report path")
    p.add_argument(
        "--ray-spec",
        default=DEFAULT_RAY,
        help=f"what to pip install for Ray (default {DEFAULT_RAY})",
    )
    p.add_argument(
        "--no-install", action="store_true", help="install nothing; skip what is missing"
    )
    p.add_argument(
        "--python",
        default=sys.executable,
        help="Python with flotilla installed (default: this one)",
    )
    p.add_argument(
        "--ray-cpus",
        type=int,
        default=2,
        help="--num-cpus of the shared Ray instance (flotilla-ray runs; default 2)",
    )
    args = p.parse_args(argv)
    if args.quick:
        given = set(argv)
        if "--rounds" not in given:
            args.rounds = 1
        if "--duration" not in given:
            args.duration = 2.0
    args.systems = [s for s in args.systems.split(",") if s]
    if args.scenarios is None:
        args.scenarios = [
            s
            for s in scenarios.SCENARIOS
            if s not in scenarios.NOT_DEFAULT
            if "flotilla-ray" not in args.systems or "flotilla-ray" in scenarios.APPLIES[s]
        ]
    else:
        args.scenarios = [s for s in args.scenarios.split(",") if s]
    for s in args.systems:
        if s not in report.SYSTEMS:
            p.error(f"unknown system {s!r}")
    for s in args.scenarios:
        if s not in scenarios.SCENARIOS:
            p.error(f"unknown scenario {s!r}")
    return args


def machine() -> str:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}, {mem:.0f} GiB, Linux {platform.release()}"


def build_systems(args: argparse.Namespace, notes: list[str]) -> list[systems.System]:
    out: list[systems.System] = []
    install_log = systems.OUT / "logs" / "ray-install.log"
    for name in args.systems:
        try:
            if name == "flotilla":
                out.append(systems.flotilla_system(args.python))
            elif name == "bare":
                out.append(systems.bare_system(args.python))
            else:
                why = None
                if not args.no_install:
                    why = systems.ensure_ray(args.ray_spec, install_log)
                    if why is None and name == "flotilla-ray":
                        why = systems.ensure_flotilla_deps(args.python, install_log)
                if why is None:
                    if name == "flotilla-ray":
                        out.append(systems.flotilla_ray_system(args.python))
                    else:
                        out.append(systems.ray_system())
                else:
                    notes.append(f"{name} not measured: {why}")
        except Exception as e:
            if name == "flotilla":
                raise
            notes.append(f"{name} not measured: {e}")
    return out


def start_cluster(
    syss: list[systems.System], args: argparse.Namespace, log_dir: Path, notes: list[str]
) -> systems.RayCluster | None:
    """Start the local Ray instance that flotilla-ray and ray share (`ray start --head`, with
    bench/.venv-ray's Ray and flotilla's code on the PYTHONPATH of its workers) and point
    both systems at it. If it does not start, flotilla-ray is dropped (noted)."""
    flray = next(s for s in syss if s.name == "flotilla-ray")
    print(f"[bench] starting the shared Ray instance ({args.ray_cpus} CPUs) ...", flush=True)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update(flray.extra_env)  # flotilla's code, for the replica actors
    env.pop("FLOTILLA_BACKEND", None)
    cluster = systems.RayCluster(flray.python, env, log_dir, args.ray_cpus)
    try:
        took = cluster.wait_ready()
    except BaseException as e:
        cluster.stop()
        if not isinstance(e, Exception):
            raise
        syss.remove(flray)
        notes.append(f"flotilla-ray not measured: the shared Ray instance did not start: {e}")
        return None
    for s in syss:
        if s.name in ("flotilla-ray", "ray"):
            s.cluster = cluster
    shared = " and ".join(s.name for s in syss if s.cluster is not None)
    notes.append(
        f"{shared} joined one local Ray instance (`ray start --head --num-cpus={args.ray_cpus}`, "
        f"started in {took:.1f} s, before the rounds): their cold start excludes starting Ray; "
        "their memory and CPU figures include the instance's processes (GCS, raylet, workers)"
    )
    return cluster


def run_one(system: systems.System, scenario: str, ctx: scenarios.Ctx) -> dict[str, Any]:
    t0 = time.monotonic()
    rec: dict[str, Any] = {
        "round": ctx.round,
        "scenario": scenario,
        "system": system.name,
        "metrics": {},
        "notes": {},
        "error": None,
    }
    try:
        res = scenarios.SCENARIOS[scenario](system, ctx)
        rec["notes"] = res.pop("notes", {})
        rec["error"] = res.pop("error", None)
        rec["metrics"] = {k: v for k, v in res.items() if v is not None}
    except KeyboardInterrupt:
        raise
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {e}"
        ctx.log_dir.mkdir(parents=True, exist_ok=True)
        with open(ctx.log(system, scenario), "a") as f:
            traceback.print_exc(file=f)
    rec["wall_s"] = time.monotonic() - t0
    systems.kill_orphans(f"{system.name} after {scenario}")
    return rec


def progress(rec: dict[str, Any]) -> str:
    shown = [f"{k}={report.fmt(v)}" for k, v in rec["metrics"].items()][:8]
    err = f"  ERROR {rec['error'][:200]}" if rec["error"] else ""
    return (
        f"[bench] round {rec['round'] + 1} {rec['scenario']:<9} {rec['system']:<8} "
        f"{rec['wall_s']:5.1f}s  {' '.join(shown)}{err}"
    )


def _wakeup(when: str) -> dict[str, Any] | None:
    """This machine's process round trip now (bench/wakeup.py); None if it cannot be measured."""
    try:
        m = wakeup.measure()
    except Exception as e:
        print(f"[bench] wake-up round trip ({when}) not measured: {e!r}", flush=True)
        return None
    print(f"[bench] wake-up round trip ({when}): {m}", flush=True)
    return m


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    procs.become_subreaper()
    signal.signal(signal.SIGTERM, _interrupt)
    systems.OUT.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir = systems.OUT / "logs" / stamp
    notes: list[str] = []
    entry = os.environ.get("BENCH_ENTRY") or shlex.join([sys.executable, "bench/run.py"])
    command = " ".join([entry, shlex.join(argv)]).strip()

    if {"http", "batch"} & set(args.scenarios):
        why = (
            ("wrk is missing" if not shutil.which("wrk") else None)
            if args.no_install
            else systems.ensure_wrk()
        )
        if why:
            notes.append(f"{why}: http and batch scenarios skipped")
            args.scenarios = [s for s in args.scenarios if s not in ("http", "batch")]
    syss = build_systems(args, notes)
    cluster = None
    if any(s.name == "flotilla-ray" for s in syss):
        cluster = start_cluster(syss, args, log_dir, notes)
    versions = "; ".join(
        f"{s.name}: " + ", ".join(f"{k} {v}" for k, v in s.versions.items()) for s in syss
    )
    print(
        f"[bench] systems: {', '.join(s.name for s in syss)}; scenarios: {', '.join(args.scenarios)}; "
        f"{args.rounds} round(s), {args.duration:g} s points; logs in {log_dir}",
        flush=True,
    )
    for n in notes:
        print(f"[bench] note: {n}", flush=True)

    wake_start = _wakeup("start")
    records: list[dict[str, Any]] = []
    port = systems.pick_port(args.port)
    try:
        for rnd in range(args.rounds):
            for scenario in args.scenarios:
                for system in syss:
                    if system.name not in scenarios.APPLIES[scenario]:
                        continue
                    if not systems.port_free(port):
                        port = systems.pick_port(port + 1)
                    ctx = scenarios.Ctx(
                        duration=args.duration,
                        port=port,
                        log_dir=log_dir,
                        round=rnd,
                        quick=args.quick,
                    )
                    rec = run_one(system, scenario, ctx)
                    records.append(rec)
                    print(progress(rec), flush=True)
    except KeyboardInterrupt:
        notes.append("interrupted: partial results")
        print("[bench] interrupted; writing partial results", flush=True)
    finally:
        if cluster is not None:
            cluster.stop()
        systems.kill_orphans("end of run")
    wake_end = _wakeup("end")

    rounds_done = max((r["round"] for r in records), default=-1) + 1
    info = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions,
        "command": command,
        "rounds": max(rounds_done, 1),
        "duration": args.duration,
        "systems": [s.name for s in syss],
        "columns": args.systems,
        "notes": notes,
        "leftovers": systems.LEFTOVERS,
        "commands": systems.COMMANDS,
        "wall_min": (time.monotonic() - t_start) / 60,
        "wakeup": {"start": wake_start, "end": wake_end},
    }
    (systems.OUT / f"results-{stamp}.json").write_text(
        json.dumps({"info": info, "records": records}, indent=1)
    )
    Path(args.output).write_text(report.markdown(info, records, args.scenarios))
    print(
        "\n"
        + report.text_table(
            report.summary_head(args.systems),
            report.summary_rows(records, info["rounds"], args.systems),
        )
    )
    errors = [r for r in records if r["error"]]
    for r in errors:
        print(
            f"[bench] error: round {r['round'] + 1} {r['scenario']} {r['system']}: {r['error'][:300]}"
        )
    for x in systems.LEFTOVERS:
        print(f"[bench] leftover: {x}")
    print(f"\n[bench] wrote {args.output} ({info['wall_min']:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
