"""Config doctor: checks of deployment options against the machine, each a pure function.

A check takes `DepSpec`s (what it needs of each deployment: replica counts, reserved
resources, OMP threads, batching, limits) and the cluster's totals, and returns `Finding`s,
each with a stable `code` and the fix. `specs_from_app` and `spec_from_config` build the specs
from an `Application` (code plus overrides) or from a running deployment's config dict;
`run_checks` runs them all. `flotilla doctor`, `serve.run` (warnings once per deployment
version) and config builds use it; `findings.py` holds the live checks on running replicas.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

logger = logging.getLogger("flotilla")

WARNING, INFO = "warning", "info"
#: Default of FLOTILLA_REPLICA_STARTUP_TIMEOUT_S (bounds.Limits).
STARTUP_TIMEOUT_S = 1800.0
#: A GPU share wasted per GPU below this is not reported.
GPU_WASTE_MIN = 0.05


@dataclass(frozen=True)
class Finding:
    """One problem: `code` is a stable short id, `fix` says what to set."""

    code: str
    severity: str  # "warning" or "info"
    deployment: str
    message: str
    fix: str

    def plain(self) -> dict[str, str]:
        return asdict(self)

    def line(self) -> str:
        who = f"deployment '{self.deployment}'" if self.deployment else "all deployments"
        return f"[{self.severity}] {self.code}: {who}: {self.message} Fix: {self.fix}"


@dataclass(frozen=True)
class DepSpec:
    """What the checks need of one deployment."""

    name: str
    replicas: int = 1  # at start: num_replicas, or autoscaling's initial/min
    max_replicas: int | None = None  # autoscaling's max (None: no autoscaling)
    min_replicas: int | None = None  # autoscaling's min
    demand: Mapping[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    omp_threads: int | None = None  # OMP_NUM_THREADS the user set (env_vars), if any
    max_ongoing_requests: int = 5
    target_ongoing_requests: float | None = None
    max_batch_size: int | None = None
    batch_wait_timeout_s: float | None = None
    constructor_s: float | None = None  # measured (`--measure`, or a running replica's start-up)

    @property
    def num_cpus(self) -> float:
        return float(self.demand.get("CPU", 0.0))

    @property
    def num_gpus(self) -> float:
        return float(self.demand.get("GPU", 0.0))

    def threads(self, inherited: int | None = None) -> int:
        """OMP threads per replica: the user's env_vars, else the environment's, else flotilla's
        default max(1, int(num_cpus)) (as `Controller.replica_env` sets it)."""
        if self.omp_threads is not None:
            return self.omp_threads
        if inherited is not None:
            return inherited
        return max(1, int(self.num_cpus))


def _int_env(value: Any) -> int | None:
    try:
        return max(1, int(str(value).strip()))
    except (TypeError, ValueError):
        return None


def spec_from_config(name: str, config: Mapping[str, Any], batch: tuple[int | None, float | None] = (None, None),
                     env: Mapping[str, str] | None = None, constructor_s: float | None = None) -> DepSpec:
    """A `DepSpec` from a deployment config dict (`DeploymentConfig.model_dump()`, or the
    `deployment_config` the REST API shows). `batch`: (max_batch_size, batch_wait_timeout_s)
    of its `@serve.batch` methods; the deployment-level options are used when it is unset."""
    from flotilla.serve.config import DeploymentConfig

    known = {k: v for k, v in config.items() if k in DeploymentConfig.model_fields and v is not None}
    known["name"] = name
    cfg = DeploymentConfig.model_validate(known)
    asc = cfg.autoscaling_config
    env_vars = dict(cfg.ray_actor_options.runtime_env.get("env_vars") or {})
    env_vars.update(env or {})
    size, wait = batch
    if size is None and cfg.max_batch_size:
        size, wait = cfg.max_batch_size, cfg.batch_latency_target_s or cfg.batch_wait_timeout_s
    return DepSpec(
        name=name,
        replicas=cfg.initial_replicas,
        max_replicas=asc.max_replicas if asc is not None else None,
        min_replicas=asc.min_replicas if asc is not None else None,
        demand=cfg.demand(),
        omp_threads=_int_env(env_vars["OMP_NUM_THREADS"]) if "OMP_NUM_THREADS" in env_vars else None,
        max_ongoing_requests=cfg.max_ongoing_requests,
        target_ongoing_requests=asc.target_ongoing_requests if asc is not None else None,
        max_batch_size=size,
        batch_wait_timeout_s=wait,
        constructor_s=constructor_s,
    )


def batch_options(target: Any) -> tuple[int | None, float | None]:
    """(max_batch_size, batch_wait_timeout_s) of the largest `@serve.batch` method of a
    deployment class, or of a batched deployment function; (None, None) when none."""
    found: list[tuple[int, float]] = []
    members = list(vars(target).values()) if isinstance(target, type) else [target]
    for value in members:
        opts = getattr(value, "_opts", None)  # a batched method (serve.batching._BatchedMethod)
        if isinstance(opts, dict) and isinstance(opts.get("max_batch_size"), int):
            # with a latency target the wait adapts, never beyond the target
            wait = opts.get("batch_latency_target_s") or opts.get("batch_wait_timeout_s", 0.0)
            found.append((opts["max_batch_size"], float(wait)))
            continue
        queue = getattr(value, "batch_queue", None)  # a batched function
        if queue is not None and hasattr(queue, "get_max_batch_size"):
            target = getattr(queue, "get_batch_latency_target_s", lambda: None)()
            found.append((int(queue.get_max_batch_size()), float(target or queue.get_batch_wait_timeout_s())))
    if not found:
        return None, None
    return max(found)


def specs_from_app(app: Any, env: Mapping[str, str] | None = None,
                   constructor_s: Mapping[str, float] | None = None) -> list[DepSpec]:
    """One `DepSpec` per deployment of an `Application` graph, ingress first."""
    from flotilla.serve.deployments import walk_deployments

    out = []
    for name, node in walk_deployments(app):
        dep = node.deployment
        config = dep.config.model_dump(mode="json")
        out.append(spec_from_config(name, config, batch_options(dep.func_or_class), env,
                                    (constructor_s or {}).get(name)))
    return out


# ---- checks ----------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return f"{x:g}"


def _place(specs: Iterable[tuple[DepSpec, int]], totals: Mapping[str, float]) -> dict[str, int]:
    """Replicas left pending per deployment when `count` replicas of each are placed in order
    on a node with `totals` (flotilla's own scheduler, GPU shares included)."""
    from flotilla._private.resources import ResourcePool

    pool = ResourcePool(dict(totals))
    pending: dict[str, int] = {}
    for spec, count in specs:
        for _ in range(count):
            if pool.try_allocate(dict(spec.demand)) is None:
                pending[spec.name] = pending.get(spec.name, 0) + 1
    return pending


def _short(spec: DepSpec, totals: Mapping[str, float]) -> str:
    """The resource the deployment's replicas run out of first, for the finding's code."""
    need = {k: v * spec.replicas for k, v in spec.demand.items()}
    for key in ("CPU", "GPU", "memory"):
        if need.get(key, 0) > totals.get(key, 0):
            return key
    return next((k for k, v in need.items() if v > totals.get(k, 0)), "CPU")


def _code(resource: str) -> str:
    return f"oversubscribed-{resource.lower() if resource in ('CPU', 'GPU', 'memory') else 'resource'}"


def check_resources(specs: list[DepSpec], totals: Mapping[str, float]) -> list[Finding]:
    """Replicas whose reserved resources do not fit the cluster: at start (they stay pending),
    and at the autoscalers' peak (max_replicas)."""
    out: list[Finding] = []
    pending = _place([(s, s.replicas) for s in specs], totals)
    for s in specs:
        n = pending.get(s.name, 0)
        if not n:
            continue
        res = _short(s, totals)
        fit = s.replicas - n
        per = s.demand.get(res, 0.0)
        have = totals.get(res, 0.0)
        out.append(Finding(
            _code(res), WARNING, s.name,
            f"{s.replicas} replicas reserving {_fmt(per)} {res} each need more than the cluster's "
            f"{_fmt(have)} {res} (after the deployments before it): {n} will stay PENDING.",
            f"set num_replicas={max(1, fit)}, or reserve less per replica (ray_actor_options "
            f"{'num_cpus' if res == 'CPU' else 'num_gpus' if res == 'GPU' else res}), or give the "
            f"cluster more (flotilla start --num-cpus/--num-gpus/--resources).",
        ))
    for s in specs:
        if not s.max_replicas or s.max_replicas <= s.replicas or pending.get(s.name):
            continue
        others = [(o, o.replicas) for o in specs if o is not s]
        n = _place([*others, (s, s.max_replicas)], totals).get(s.name, 0)
        if n > 0:
            out.append(Finding(
                "oversubscribed-at-peak", INFO, s.name,
                f"at max_replicas={s.max_replicas} (the other deployments at their start), "
                f"{n} replica(s) would not fit the cluster and stay PENDING.",
                f"lower autoscaling_config.max_replicas to {max(1, s.max_replicas - n)} or "
                f"reserve less per replica.",
            ))
    return out


def check_omp(specs: list[DepSpec], cores: float, inherited: int | None = None) -> list[Finding]:
    """OMP threads of all replicas against the machine's cores (total > cores: they contend)."""
    total = sum(s.threads(inherited) * s.replicas for s in specs)
    if cores <= 0 or total <= cores:
        return []
    replicas = sum(s.replicas for s in specs) or 1
    each = max(1, int(cores // replicas))
    out = []
    for s in specs:
        t = s.threads(inherited)
        if t <= each or not s.replicas:
            continue
        out.append(Finding(
            "omp-oversubscribed", WARNING, s.name,
            f"{s.replicas} replica(s) x OMP_NUM_THREADS={t}: all replicas together run {total} "
            f"compute threads on {_fmt(cores)} cores, which makes them contend.",
            f"set OMP_NUM_THREADS={each} in ray_actor_options.runtime_env.env_vars (or fewer replicas).",
        ))
    return out


def check_batching(specs: list[DepSpec], latency_budget_ms: float | None = None) -> list[Finding]:
    """Batches that can never fill (max_ongoing_requests < max_batch_size), and a batch wait
    longer than the latency budget."""
    out = []
    for s in specs:
        if s.max_batch_size and s.max_ongoing_requests < s.max_batch_size:
            out.append(Finding(
                "batch-never-full", WARNING, s.name,
                f"max_ongoing_requests={s.max_ongoing_requests} is below max_batch_size="
                f"{s.max_batch_size}: a replica never holds enough requests to fill a batch.",
                f"set max_ongoing_requests >= {s.max_batch_size}.",
            ))
        if (latency_budget_ms is not None and s.batch_wait_timeout_s is not None
                and s.batch_wait_timeout_s * 1000.0 > latency_budget_ms):
            out.append(Finding(
                "batch-wait-over-budget", WARNING, s.name,
                f"batch_wait_timeout_s={_fmt(s.batch_wait_timeout_s)} ({_fmt(s.batch_wait_timeout_s * 1000)} ms) "
                f"is longer than the latency budget of {_fmt(latency_budget_ms)} ms.",
                f"set batch_wait_timeout_s <= {_fmt(latency_budget_ms / 1000.0 / 2)} (half the budget), or "
                f"batch_latency_target_s={_fmt(latency_budget_ms / 1000.0)} to let the wait adapt to it.",
            ))
    return out


def check_autoscaling(specs: list[DepSpec]) -> list[Finding]:
    """A target of ongoing requests a replica can never reach (above max_ongoing_requests)."""
    return [
        Finding(
            "target-above-limit", WARNING, s.name,
            f"autoscaling target_ongoing_requests={_fmt(s.target_ongoing_requests)} is above "
            f"max_ongoing_requests={s.max_ongoing_requests}: a replica never reaches its target, so "
            f"the autoscaler scales up only from requests queued in routers.",
            f"set target_ongoing_requests <= {s.max_ongoing_requests} (or raise max_ongoing_requests).",
        )
        for s in specs
        if s.target_ongoing_requests is not None and s.target_ongoing_requests > s.max_ongoing_requests
    ]


def check_cold_start(specs: list[DepSpec], request_timeout_s: float | None = None,
                     startup_timeout_s: float = STARTUP_TIMEOUT_S) -> list[Finding]:
    """Constructors (measured) slower than the replica start-up timeout, and scale-to-zero
    deployments whose constructor is slower than a request may wait."""
    out = []
    for s in specs:
        if s.constructor_s is None:
            continue
        if startup_timeout_s > 0 and s.constructor_s > startup_timeout_s:
            out.append(Finding(
                "constructor-too-slow", WARNING, s.name,
                f"the constructor took {s.constructor_s:.1f}s, longer than the replica start-up timeout "
                f"({_fmt(startup_timeout_s)}s): every replica is killed before it is ready.",
                f"raise FLOTILLA_REPLICA_STARTUP_TIMEOUT_S above {math.ceil(s.constructor_s * 1.5)}, or "
                f"make the constructor faster.",
            ))
        if s.min_replicas == 0 and request_timeout_s and s.constructor_s > request_timeout_s:
            out.append(Finding(
                "cold-start-too-slow", WARNING, s.name,
                f"min_replicas=0 and the constructor takes {s.constructor_s:.1f}s, longer than the HTTP "
                f"request timeout ({_fmt(request_timeout_s)}s): the first request after an idle spell "
                f"times out.",
                "set autoscaling_config.min_replicas=1, or fork_after_init=True (a warm template: the "
                "first request waits for a fork, not the constructor), or raise http_options.request_timeout_s "
                f"above {math.ceil(s.constructor_s * 1.5)}.",
            ))
    return out


def check_gpu_packing(specs: list[DepSpec], gpus: float) -> list[Finding]:
    """GPU fractions that waste part of each GPU, and fractions that together do not pack onto
    the GPUs there are though their sum would fit."""
    out = []
    for s in specs:
        f = s.num_gpus
        if 0 < f < 1:
            per = math.floor(1 / f + 1e-9)
            waste = 1 - per * f
            if waste >= GPU_WASTE_MIN:
                out.append(Finding(
                    "gpu-fraction-waste", INFO, s.name,
                    f"num_gpus={_fmt(f)}: {per} replica(s) fit on one GPU and {waste:.2g} of each GPU "
                    f"they use stays unused.",
                    f"set num_gpus={_fmt(round(1 / per, 4))} ({per} per GPU) or "
                    f"{_fmt(round(1 / (per + 1), 4))} ({per + 1} per GPU).",
                ))
    frac = [s for s in specs if 0 < s.num_gpus < 1]
    if gpus > 0 and frac:
        need = sum(s.num_gpus * s.replicas for s in specs)
        pending = _place([(s, s.replicas) for s in specs if s.num_gpus], {"GPU": gpus, "CPU": 1e9})
        if pending and need <= gpus + 1e-9:
            names = ", ".join(f"'{n}'" for n in pending)
            out.append(Finding(
                "gpu-fractions-dont-pack", WARNING, "",
                f"the deployments' GPU shares add up to {_fmt(round(need, 4))} of {_fmt(gpus)} GPUs, but a "
                f"replica's share must fit on one GPU: {sum(pending.values())} replica(s) of {names} stay PENDING.",
                "pick fractions that divide one GPU evenly (1/2, 1/3, 1/4...), so the shares pack.",
            ))
    return out


def run_checks(specs: list[DepSpec], totals: Mapping[str, float], *, latency_budget_ms: float | None = None,
               request_timeout_s: float | None = None, startup_timeout_s: float | None = None,
               inherited_omp: int | None = None) -> list[Finding]:
    """Every static check, warnings first."""
    if startup_timeout_s is None:
        from flotilla._private.bounds import Limits

        startup_timeout_s = Limits.from_env().startup_timeout_s
    found = [
        *check_resources(specs, totals),
        *check_omp(specs, float(totals.get("CPU", 0.0)), inherited_omp),
        *check_batching(specs, latency_budget_ms),
        *check_autoscaling(specs),
        *check_cold_start(specs, request_timeout_s, startup_timeout_s),
        *check_gpu_packing(specs, float(totals.get("GPU", 0.0))),
    ]
    return sorted(found, key=lambda f: f.severity != WARNING)


def inherited_omp() -> int | None:
    """OMP_NUM_THREADS of this environment (replicas inherit it; flotilla then sets none)."""
    return _int_env(os.environ["OMP_NUM_THREADS"]) if "OMP_NUM_THREADS" in os.environ else None


# ---- warnings at deploy time -----------------------------------------------------------------
_warned: set[tuple[str, str, str]] = set()


def warn_findings(findings: Iterable[Finding], app: str, versions: Mapping[str, str]) -> list[Finding]:
    """Log each finding at WARNING on the `flotilla` logger, once per (application, deployment,
    version) in this process; returns those logged."""
    logged = []
    for f in findings:
        key = (app, f.deployment, f"{versions.get(f.deployment, '')}:{f.code}")
        if key in _warned:
            continue
        _warned.add(key)
        logged.append(f)
        logger.warning("flotilla doctor: application '%s': %s", app, f.line())
    return logged


def deploy_warnings(app_obj: Any, app: str, totals: Mapping[str, float], versions: Mapping[str, str],
                    env: Mapping[str, str] | None = None, request_timeout_s: float | None = None) -> list[Finding]:
    """The static checks of an application being deployed, logged once per deployment version;
    never raises (a deploy does not fail for a check)."""
    try:
        specs = specs_from_app(app_obj, env)
        found = run_checks(specs, totals, request_timeout_s=request_timeout_s, inherited_omp=inherited_omp())
        return warn_findings(found, app, versions)
    except Exception:
        logger.debug("doctor checks failed", exc_info=True)
        return []


# ---- what `flotilla doctor` runs -------------------------------------------------------------
def machine_totals(num_cpus: float | None = None, num_gpus: float | None = None) -> dict[str, float]:
    """This machine's resources as `flotilla.init()` detects them (cores, GPUs, 70% of memory)."""
    import flotilla

    return {
        "CPU": float(os.cpu_count() or 1) if num_cpus is None else float(num_cpus),
        "GPU": float(flotilla._detect_gpus()) if num_gpus is None else float(num_gpus),
        "memory": flotilla._detect_memory(),
    }


def _placeholder(value: Any) -> Any:
    from flotilla.serve.deployments import Application, map_nested

    return map_nested(value, lambda v: None if isinstance(v, Application) else v)


def measure_constructor(node: Any, timeout: float) -> float | None:
    """Seconds the deployment's constructor takes, run once in a forked child (bound
    deployments passed as None); `timeout` when it runs past it; None for a function
    deployment or when the constructor raises."""
    import select
    import signal
    import time

    target = node.deployment.func_or_class
    if not isinstance(target, type):
        return None
    args = tuple(_placeholder(a) for a in node._args)
    kwargs = {k: _placeholder(v) for k, v in node._kwargs.items()}
    r, w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: construct, report, exit without running the parent's atexit
        os.close(r)
        code = 1
        try:
            from flotilla._private.replica import instantiate
            from flotilla._private.template import settle

            settle(instantiate(target, args, kwargs))  # an async __init__ awaited too
            os.write(w, f"{time.monotonic() - start}".encode())
            code = 0
        except BaseException:
            pass
        finally:
            os._exit(code)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], timeout)
        data = os.read(r, 64) if ready else b""
    finally:
        os.close(r)
        if not data:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        os.waitpid(pid, 0)
    if data:
        return float(data)
    return timeout if time.monotonic() - start >= timeout else None


def check_target(target: str, totals: Mapping[str, float], *, latency_budget_ms: float | None = None,
                 measure: bool = False, measure_timeout: float = 60.0) -> dict[str, list[Finding]]:
    """Findings per application of an import path (module:app) or a config file."""
    from flotilla._private.appbuild import apply_overrides, import_application
    from flotilla.serve.deployments import walk_deployments

    apps: list[tuple[str, Any, dict[str, str]]] = []
    request_timeout: float | None = None
    if target.endswith((".yaml", ".yml", ".json")) or os.path.isfile(target):
        from flotilla.serve.deploy_schema import load_config_file

        cfg = load_config_file(target)
        request_timeout = cfg.http_options.request_timeout_s
        for a in cfg.applications:
            app = apply_overrides(import_application(a.import_path, a.args or {}), list(a.deployments))
            apps.append((a.name, app, dict((a.runtime_env or {}).get("env_vars") or {})))
    else:
        apps.append(("default", import_application(target), {}))
    out: dict[str, list[Finding]] = {}
    for name, app, env in apps:
        times = ({dn: t for dn, node in walk_deployments(app)
                  if (t := measure_constructor(node, measure_timeout)) is not None} if measure else {})
        specs = specs_from_app(app, env, times)
        out[name] = run_checks(specs, totals, latency_budget_ms=latency_budget_ms,
                               request_timeout_s=request_timeout, inherited_omp=inherited_omp())
    return out


def _with_target(spec: DepSpec, target: Any) -> DepSpec:
    """A running deployment counts with the replicas it aims for now."""
    return replace(spec, replicas=int(target)) if isinstance(target, int) else spec


def check_cluster(details: Mapping[str, Any], totals: Mapping[str, float], status: Mapping[str, Any] | None = None,
                  *, latency_budget_ms: float | None = None) -> dict[str, list[Finding]]:
    """Findings per application of a running cluster: static checks of each deployment's
    `deployment_config` (GET /api/serve/applications/), with the live findings the cluster
    reports (GET /api/flotilla/status/) added."""
    request_timeout = (details.get("http_options") or {}).get("request_timeout_s")
    out: dict[str, list[Finding]] = {}
    for app_name, app in (details.get("applications") or {}).items():
        specs = [_with_target(spec_from_config(dn, d["deployment_config"]), d.get("target_num_replicas"))
                 for dn, d in (app.get("deployments") or {}).items() if d.get("deployment_config")]
        found = run_checks(specs, totals, latency_budget_ms=latency_budget_ms, request_timeout_s=request_timeout)
        live = (((status or {}).get("applications") or {}).get(app_name) or {}).get("deployments") or {}
        for dn, d in live.items():
            for f in d.get("findings") or []:
                found.append(Finding(f["code"], f["severity"], dn, f["message"], f["fix"]))
        out[app_name] = sorted(found, key=lambda f: f.severity != WARNING)
    return out


def report(found: Mapping[str, list[Finding]]) -> str:
    """Readable text of the findings, per application, each with its fix."""
    lines = []
    for app, fs in found.items():
        for f in fs:
            where = f"{app}/{f.deployment}" if f.deployment else app
            lines += [f"{f.severity.upper():7} {f.code}  ({where})", f"        {f.message}", f"        fix: {f.fix}"]
    n_warn = sum(f.severity == WARNING for fs in found.values() for f in fs)
    n_info = sum(f.severity != WARNING for fs in found.values() for f in fs)
    apps = ", ".join(found) or "(none)"
    if not n_warn and not n_info:
        lines.append(f"No problems found in application(s) {apps}.")
    else:
        lines.append(f"{n_warn} warning(s), {n_info} note(s) in application(s) {apps}.")
    return "\n".join(lines)
