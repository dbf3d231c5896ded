"""Scale-out, memory and first response from zero for a ~300 MB scikit-learn model, with
flotilla's `fork_after_init=True`, flotilla without it, and Ray Serve, in one run.

    .venv/bin/python bench/fork_after_init.py [--replicas 8] [--output bench/RESULTS-fork.md]

Builds the model once (ExtraTreesClassifier on load_digits upsampled with noise; saved with
joblib under bench/out/, reused while the parameters match). Then, one system at a time,
each in its own driver process (bench/apps/fork_app.py): deploy 1 replica, redeploy with N
and time until N are RUNNING, measure RSS / PSS / USS of the replicas (and of the fork
template) from /proc/PID/smaps_rollup, then time one HTTP request to a min_replicas=0 app
from zero replicas. Every process the run starts is gone before the next system starts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procs
import systems

BENCH = systems.BENCH
OUT = systems.OUT
DRIVER = BENCH / "apps" / "fork_app.py"
SYSTEMS = ("flotilla-fork", "flotilla", "ray")
LABELS = {
    "flotilla-fork": "flotilla, fork_after_init=True",
    "flotilla": "flotilla",
    "ray": "Ray Serve",
}
# The model: ExtraTreesClassifier, fully grown trees, on load_digits x `upsample` with noise.
MODEL = {"trees": 430, "upsample": 20, "noise": 1.0, "seed": 0}
MB = 1024 * 1024


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--replicas", type=int, default=8, help="replicas after scale-out (8)")
    p.add_argument("--output", default=str(BENCH / "RESULTS-fork.md"), help="report path")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    p.add_argument("--port", type=int, default=18090, help="HTTP port (another if taken)")
    p.add_argument("--trees", type=int, default=MODEL["trees"], help="trees in the forest (430)")
    p.add_argument("--python", default=sys.executable, help="Python with flotilla (this one)")
    p.add_argument(
        "--ray-python",
        default=None,
        help="Python with ray[serve] and scikit-learn (bench/.venv-ray, made by bench/run)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per step (300)")
    args = p.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    for s in args.systems:
        if s not in SYSTEMS:
            p.error(f"unknown system {s!r}")
    return args


def ray_python(arg: str | None) -> str:
    return arg or str(systems.RAY_VENV / "bin" / "python")


def ensure_model(python: str, params: dict[str, Any], log: Path) -> dict[str, Any]:
    """The model file for `params` (built now if missing) and what the build reported."""
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    path = OUT / f"fork-model-{key}.joblib"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        info = json.loads(meta.read_text())
        info["reused"] = True
        return info
    print(f"[fork] building the model {params} ...", flush=True)
    cfg = {**params, "path": str(path)}
    argv = [python, str(DRIVER), "build", json.dumps(cfg)]
    systems.COMMANDS.append(shlex.join(argv))
    with open(log, "ab") as f:
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=f, timeout=1800, cwd=OUT)
    events = [json.loads(x) for x in r.stdout.decode().splitlines() if x.startswith("{")]
    built = next((e for e in events if e.get("event") == "built"), None)
    if r.returncode != 0 or built is None:
        raise RuntimeError(f"model build failed ({events[-1:] or r.returncode}); see {log}")
    info = {**built, "params": params, "path": str(path), "reused": False}
    meta.write_text(json.dumps(info, indent=1))
    return info


def probe_model(python: str, path: str, log: Path) -> dict[str, Any]:
    """RSS of a plain Python process after its imports and after joblib.load of the model."""
    argv = [python, str(DRIVER), "probe", json.dumps({"path": path})]
    systems.COMMANDS.append(shlex.join(argv))
    with open(log, "ab") as f:
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=f, timeout=600, cwd=OUT)
    for line in r.stdout.decode().splitlines():
        if line.startswith("{") and '"probe"' in line:
            return dict(json.loads(line))
    raise RuntimeError(f"probe failed (code {r.returncode}); see {log}")


def digits_row() -> list[float]:
    """Row 0 of load_digits (a "0"): written out so that the orchestrator needs no sklearn."""
    return [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0,
            0, 4, 12, 0, 0, 8, 8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0,
            0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]  # fmt: skip


def classify(pid: int) -> str | None:
    """"replica", "template" or None, from the process title / command line."""
    line = " ".join(procs.cmdline(pid))
    if line.startswith("flotilla::replica") or "ray::ServeReplica" in line:
        return "replica"
    if "template" in line:
        return "template"
    return None


def memory(label: str) -> dict[str, Any]:
    """RSS / PSS / USS (MB) of every replica and template process below this orchestrator
    (a subreaper: the systems' daemons stay in its tree)."""
    out: dict[str, Any] = {}
    for role in ("replica", "template"):
        out[role] = {"count": 0, "rss_mb": 0.0, "pss_mb": 0.0, "uss_mb": 0.0, "procs": []}
    for p in procs.tree(os.getpid(), include_root=False):
        role = classify(p.pid)
        sm = procs.smaps_rollup(p.pid) if role else None
        if role is None or sm is None:
            continue
        rss, pss = sm.get("Rss", 0) / 1024, sm.get("Pss", 0) / 1024
        uss = (sm.get("Private_Clean", 0) + sm.get("Private_Dirty", 0)) / 1024
        tot = out[role]
        tot["count"] += 1
        tot["rss_mb"] += rss
        tot["pss_mb"] += pss
        tot["uss_mb"] += uss
        title = " ".join(procs.cmdline(p.pid))[:80]
        tot["procs"].append({"pid": p.pid, "ppid": p.ppid, "title": title,
                             "rss_mb": round(rss, 1), "pss_mb": round(pss, 1),
                             "uss_mb": round(uss, 1)})  # fmt: skip
    print(f"[fork] {label}: " + ", ".join(
        f"{r} x{t['count']} RSS {t['rss_mb']:.0f} PSS {t['pss_mb']:.0f} USS {t['uss_mb']:.0f} MB"
        for r, t in out.items()), flush=True)  # fmt: skip
    return out


def wait_template_warm(app: str, min_rss_mb: float, timeout: float) -> float | None:
    """Seconds until the fork template of `app` (`flotilla::template:<app>:...`) exists with
    an RSS above `min_rss_mb` that held still for 0.5 s (its constructor has loaded the model);
    None if not by `timeout`."""
    t0 = time.monotonic()
    last, since = -1, t0
    while time.monotonic() - t0 < timeout:
        rss = -1
        for p in procs.tree(os.getpid(), include_root=False):
            if " ".join(procs.cmdline(p.pid)).startswith(f"flotilla::template:{app}:"):
                sm = procs.smaps_rollup(p.pid) or {}
                rss = sm.get("Rss", 0)
        now = time.monotonic()
        if rss != last:
            last, since = rss, now
        elif rss / 1024 > min_rss_mb and now - since >= 0.5:
            return since - t0
        time.sleep(0.05)
    return None


def run_system(name: str, sys_: systems.System, cfg: dict[str, Any], log: Path) -> dict[str, Any]:
    argv = [sys_.python, str(DRIVER), name, json.dumps(cfg)]
    proc = systems.Launched(sys_, argv, log)
    res: dict[str, Any] = {}
    timeout = cfg["timeout"]
    try:
        for step in ("started", "deployed1", "scaled"):
            ev = proc.event(timeout)
            assert ev["event"] == step, ev
            res.update({k: v for k, v in ev.items() if k != "event"})
            print(f"[fork] {name}: {step} {ev}", flush=True)
        time.sleep(cfg["settle"])
        proc.snapshot()
        res["memory_n"] = memory(f"{name} {cfg['replicas']} replicas")
        proc.send("next")
        ev = proc.event(timeout)
        assert ev["event"] == "zero_deployed", ev
        res.update({k: v for k, v in ev.items() if k != "event"})
        if name == "flotilla-fork":  # the first request should find the template warm
            res["template_warm_s"] = wait_template_warm("digits0", cfg["model_mb"], timeout)
            print(f"[fork] {name}: template warm {res['template_warm_s']} s after "
                  f"zero_deployed (+{cfg['idle_before_request']} s idle)", flush=True)
        proc.snapshot()
        res["memory_zero"] = memory(f"{name} at zero replicas")
        proc.send("next")
        ev = proc.event(timeout)
        print(f"[fork] {name}: {ev}", flush=True)
        res.update({k: v for k, v in ev.items() if k not in ("event", "states")})
        res["states_after"] = ev.get("states")
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"[:500]
        print(f"[fork] {name}: FAILED {res['error']}", flush=True)
    finally:
        proc.stop(timeout=90.0)
        systems.kill_orphans(f"{name} (after stop)")
        left = [p for p in procs.tree(os.getpid(), include_root=False)
                if p.pid not in procs.POPEN_PIDS]  # fmt: skip
        res["left_after_stop"] = [" ".join(procs.cmdline(p.pid))[:80] for p in left]
    return res


# ---------------------------------------------------------------- report


def fmt(x: Any, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def ratio(a: Any, b: Any) -> str:
    return "—" if not a or not b else f"{a / b:.2f}x"


def report(args: argparse.Namespace, model: dict[str, Any], versions: dict[str, Any],
           results: dict[str, dict[str, Any]], wall_s: float) -> str:  # fmt: skip
    n = args.replicas
    model_mb = model["bytes"] / MB
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    p = model["params"]
    pr = model["probe"]
    lines = [
        "# fork_after_init: scale-out, memory and first response from zero",
        "",
        f"Run {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by `bench/fork_after_init.py "
        f"--replicas {n}` ({wall_s / 60:.1f} min). Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, {ram_gib:.0f} GiB RAM, Linux {platform.release()}.",
        "",
        f"Model: scikit-learn `ExtraTreesClassifier(n_estimators={p['trees']})`, fully grown "
        f"trees ({model['nodes']:,} nodes), fitted on `load_digits` repeated {p['upsample']} "
        f"times with Gaussian noise (std {p['noise']}) = {model['samples']:,} rows; "
        f"joblib file **{model_mb:.0f} MB** (built in {model['seconds']:.0f} s, accuracy on the "
        f"original 1,797 rows {model['train_accuracy']:.3f}). Each replica's constructor "
        "`joblib.load`s it; `__call__` predicts one digit from a JSON body over HTTP. "
        f"In a plain Python process: {pr['imports_rss_mb']:.0f} MB RSS after importing "
        f"scikit-learn, {pr['loaded_rss_mb']:.0f} MB after `joblib.load` ({pr['load_s']:.1f} s; "
        f"the trees' arrays are {pr['tree_arrays_mb']:.0f} MB, the rest is heap the unpickling "
        "freed but glibc keeps). "
        "Replicas: `ray_actor_options={\"num_cpus\": 0}`; each system: "
        "`init(num_cpus=2)`, HTTP on 127.0.0.1.",
        "",
        "Versions: " + "; ".join(f"{k}: {v}" for k, v in versions.items()) + ".",
        "",
        f"## Scale-out 1 → {n} replicas",
        "",
        f"Deploy 1 replica, wait until it answers; `serve.run` the same app with "
        f"`num_replicas={n}` (in a thread) and poll `serve.status()` every 10 ms until {n} are "
        "RUNNING.",
        "",
        "| system | init + serve.start s | first deploy (1 replica) s | 1 → N, until N RUNNING s "
        "| serve.run returned s | replicas that answered 4N requests |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "error" in r and "scale_s" not in r:
            lines.append(f"| {LABELS[name]} | failed: {r['error'][:150]} | | | | |")
            continue
        lines.append(
            f"| {LABELS[name]} | {fmt(r.get('start_s'))} | {fmt(r.get('deploy1_s'))} | "
            f"{fmt(r.get('scale_s'))} | "
            f"{fmt(r.get('run_returned_s'))} | {r.get('pids_answering', '—')} |"
        )
    lines += [
        "",
        f"## Memory with {n} replicas",
        "",
        "Sums over the replica processes (found by title: `flotilla::replica:...`, "
        "`ray::ServeReplica:...`), from `/proc/PID/smaps_rollup`; USS = Private_Clean + "
        f"Private_Dirty. \"x model\" = PSS / the model file's {model_mb:.0f} MB; \"x one "
        f"loaded process\" = PSS (template included) / the {pr['loaded_rss_mb']:.0f} MB RSS of a "
        "plain Python process that imported scikit-learn and loaded the model. The fork "
        "template is listed on its own.",
        "",
        "| system | replicas | RSS MB | PSS MB | USS MB | PSS per replica MB | PSS x model "
        "| PSS x one loaded process | template RSS / PSS / USS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        m = r.get("memory_n")
        if not m:
            continue
        rep, tpl = m["replica"], m["template"]
        tpl_s = (f"{tpl['rss_mb']:.0f} / {tpl['pss_mb']:.0f} / {tpl['uss_mb']:.0f}"
                 if tpl["count"] else "—")  # fmt: skip
        pss_total = rep["pss_mb"] + tpl["pss_mb"]
        lines.append(
            f"| {LABELS[name]} | {rep['count']} | {rep['rss_mb']:.0f} | {rep['pss_mb']:.0f} | "
            f"{rep['uss_mb']:.0f} | {rep['pss_mb'] / max(rep['count'], 1):.0f} | "
            f"{rep['pss_mb'] / model_mb:.2f} (with template "
            f"{pss_total / model_mb:.2f}) | {pss_total / pr['loaded_rss_mb']:.2f} | {tpl_s} |"
        )
    lines += [
        "",
        "## First response from zero replicas",
        "",
        "`autoscaling_config={min_replicas: 0, max_replicas: 1, initial_replicas: 0, "
        "upscale_delay_s: 0}`; after `serve.run` returned (0 replicas) and "
        f"{args.idle} s idle (with the option: and then until the template's RSS is above the "
        "model's size and still for 0.5 s, i.e. its constructor is done), one HTTP POST is "
        "timed from send to response; then a second.",
        "",
        "| system | deploy at 0 replicas s | template warm after serve.run s | template at 0 replicas "
        "RSS / PSS MB | first response s | second response ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "deploy0_s" not in r:
            continue
        tz = (r.get("memory_zero") or {}).get("template", {})
        tz_s = f"{tz['rss_mb']:.0f} / {tz['pss_mb']:.0f}" if tz.get("count") else "—"
        sec = r.get("second_response_s")
        warm = r.get("template_warm_s")
        warm_s = "—" if warm is None else f"{args.idle + warm:.2f}"
        lines.append(
            f"| {LABELS[name]} | {fmt(r.get('deploy0_s'))} | {warm_s} | {tz_s} | "
            f"{fmt(r.get('first_response_s'))} | {fmt(sec * 1000 if sec else None, 1)} |"
        )
    f, base, ray = (results.get(k, {}) for k in ("flotilla-fork", "flotilla", "ray"))
    if f.get("scale_s"):

        def pss(r: dict[str, Any]) -> float | None:
            m = r.get("memory_n")
            return m["replica"]["pss_mb"] + m["template"]["pss_mb"] if m else None

        lines += [
            "",
            "## Ratios: flotilla with fork_after_init against ...",
            "",
            "(other / with the option; above 1 means the option is faster or smaller; PSS "
            "includes the template)",
            "",
            "| measure | vs flotilla without | vs Ray Serve |",
            "|---|---|---|",
            f"| scale-out 1 → {n} s | {ratio(base.get('scale_s'), f.get('scale_s'))} | "
            f"{ratio(ray.get('scale_s'), f.get('scale_s'))} |",
            f"| total PSS | {ratio(pss(base), pss(f))} | {ratio(pss(ray), pss(f))} |",
            f"| first response from zero s | "
            f"{ratio(base.get('first_response_s'), f.get('first_response_s'))} | "
            f"{ratio(ray.get('first_response_s'), f.get('first_response_s'))} |",
        ]
    notes = [f"- {LABELS[k]}: {r['error']}" for k, r in results.items() if r.get("error")]
    notes += [f"- {x}" for x in systems.LEFTOVERS]
    notes += [f"- {LABELS[k]}: left after stop: {r['left_after_stop']}"
              for k, r in results.items() if r.get("left_after_stop")]  # fmt: skip
    notes.append(
        "- 1-minute load average before / after each system (2 cores; other sessions' "
        "processes count too): "
        + "; ".join(f"{LABELS[k]} {r['loadavg_1m'][0]:.1f} / {r['loadavg_1m'][1]:.1f}"
                    for k, r in results.items() if "loadavg_1m" in r) + "."
    )  # fmt: skip
    notes.append("- One run of each; the timings move with the machine's load (above).")
    lines += ["", "## Notes", ""]
    if not any(r.get("error") or r.get("left_after_stop") for r in results.values()) and not (
        systems.LEFTOVERS
    ):
        lines.append("- No errors; no process left behind after any system (checked by PID).")
    lines += notes
    lines += [
        "- Raw numbers (per process): `bench/out/fork-after-init.json`; logs: "
        "`bench/out/fork-after-init-logs/`.",
        "",
    ]
    return "\n".join(lines)


def git_head() -> str:
    """The commit of this checkout (the flotilla code run when PYTHONPATH points at it)."""
    try:
        r = subprocess.run(["git", "-C", str(BENCH.parent), "log", "-1", "--format=%h %s"],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "commit ?"
    return f"commit {r.stdout.strip()[:70]}" if r.returncode == 0 else "commit ?"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.idle = 2.0
    procs.become_subreaper()
    signal.signal(signal.SIGTERM, _interrupt)
    OUT.mkdir(parents=True, exist_ok=True)
    logs = OUT / "fork-after-init-logs"
    logs.mkdir(parents=True, exist_ok=True)
    t_run = time.monotonic()
    model = ensure_model(args.python, {**MODEL, "trees": args.trees}, logs / "build.log")
    print(f"[fork] model {model['bytes'] / MB:.0f} MB at {model['path']} "
          f"(reused: {model['reused']})", flush=True)  # fmt: skip
    model["probe"] = probe_model(args.python, model["path"], logs / "build.log")
    rp = ray_python(args.ray_python)
    versions: dict[str, Any] = {}
    sysmap: dict[str, systems.System] = {}
    for name in args.systems:
        if name == "ray":
            v = systems.probe_versions(rp, ["ray", "scikit-learn"])
            want = systems.probe_versions(args.python, ["scikit-learn", "joblib"])
            if v["scikit-learn"] != want["scikit-learn"]:  # the model file is a pickle: same versions
                pins = [f"scikit-learn=={want['scikit-learn']}", f"joblib=={want['joblib']}"]
                print(f"[fork] installing {' '.join(pins)} into {rp}", flush=True)
                subprocess.run([rp, "-m", "pip", "install", "-q", *pins], check=True, timeout=900)
                v = systems.probe_versions(rp, ["ray", "scikit-learn"])
            versions["Ray Serve"] = f"ray {v['ray']}, scikit-learn {v['scikit-learn']}"
            sysmap[name] = systems.System("ray", rp, DRIVER, v)
        elif "flotilla" not in versions:
            v = systems.probe_versions(args.python, ["flotilla", "scikit-learn", "numpy"])
            versions["flotilla"] = (f"flotilla {v['flotilla']} (code from PYTHONPATH="
                                    f"{os.environ.get('PYTHONPATH', '')}, {git_head()}), scikit-learn "
                                    f"{v['scikit-learn']}, Python {v['python']}")  # fmt: skip
        if name != "ray":
            sysmap[name] = systems.System("flotilla", args.python, DRIVER)
    results: dict[str, dict[str, Any]] = {}
    try:
        for name in args.systems:
            port = systems.pick_port(args.port)
            cfg = {
                "port": port, "replicas": args.replicas, "poll": 0.01, "timeout": args.timeout,
                "model": model["path"], "row": digits_row(), "idle_before_request": args.idle,
                "settle": 2.0, "model_mb": model["bytes"] / MB,
            }  # fmt: skip
            print(f"[fork] === {name} (port {port}) ===", flush=True)
            load_before = os.getloadavg()[0]
            try:
                results[name] = run_system(name, sysmap[name], cfg, logs / f"{name}.log")
            except Exception as e:
                traceback.print_exc()
                results[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            results[name]["loadavg_1m"] = [load_before, os.getloadavg()[0]]
    finally:
        systems.kill_orphans("end of run")
    wall = time.monotonic() - t_run
    raw = {"model": model, "versions": versions, "results": results,
           "leftovers": systems.LEFTOVERS, "commands": systems.COMMANDS}  # fmt: skip
    (OUT / "fork-after-init.json").write_text(json.dumps(raw, indent=1))
    text = report(args, model, versions, results, wall)
    Path(args.output).write_text(text)
    print(text)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
