"""The dashboard's data: a snapshot of the serving system, and 15 minutes of per-deployment series.

Everything comes from the sources `/metrics` and `flotilla status` read, never from a second
count: the head's `Aggregate` of what replicas and proxies push, the controller's own metric
store, and the controller's state. Once a second the head's `Sampler` turns the cumulative
counters into one point per deployment (requests/s, p50/p99 of the replicas' processing latency,
error rate) beside the gauges (queued in routers, running in replicas, replicas, target).
`increments` and `Series` are pure (clock and samples passed in); `snapshot` and `read_log` read
the head. The page (`static/`) polls the JSON endpoints in `head._rest_routes`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flotilla._private.canary import quantile
from flotilla._private.cluster import DEFAULT_DASHBOARD_PORT
from flotilla._private.lifecycle import RState
from flotilla._private.metrics import LATENCY_MS_BUCKETS

if TYPE_CHECKING:
    from flotilla._private.head import Head
    from flotilla._private.procfs import Memory

logger = logging.getLogger("flotilla.dashboard")

#: Where a head serves the dashboard unless told otherwise: 8265 as Ray's, a free port when taken.
DEFAULT: dict[str, Any] = {"host": "127.0.0.1", "port": DEFAULT_DASHBOARD_PORT, "fallback": True}
#: Seconds between two samples (`FLOTILLA_DASHBOARD_INTERVAL_S`).
INTERVAL_S = 1.0
#: Seconds of history kept.
WINDOW_S = 900
SERIES = ("rps", "p50_ms", "p99_ms", "error_rate", "queued", "running", "replicas", "target")
REQUESTS = "ray_serve_deployment_request_counter"
ERRORS = "ray_serve_deployment_error_counter"
LATENCY = "ray_serve_deployment_processing_latency_ms"
RUNNING = "ray_serve_replica_processing_queries"
QUEUED_IN_REPLICA = "flotilla_replica_queued_requests"
QUEUED_IN_ROUTERS = "ray_serve_deployment_queued_queries"
RESTARTS = "flotilla_deployment_replica_restarts"
#: Most a log read returns.
LOG_CHUNK = 256 << 10

DepKey = tuple[str, str]  # (application, deployment)


@dataclass
class Counts:
    """One deployment's requests, errors and latency histogram over one interval."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: list[float] = field(default_factory=lambda: [0.0] * (len(LATENCY_MS_BUCKETS) + 1))

    def figures(self, seconds: float) -> dict[str, float | None]:
        lat = self.buckets if len(self.buckets) == len(LATENCY_MS_BUCKETS) + 1 else []
        return {
            "rps": round(self.requests / seconds, 3) if seconds > 0 else None,
            "p50_ms": _round(quantile(LATENCY_MS_BUCKETS, lat, 0.5)),
            "p99_ms": _round(quantile(LATENCY_MS_BUCKETS, lat, 0.99)),
            "error_rate": round(self.errors / self.requests, 6) if self.requests else None,
        }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _labels(meta: Mapping[str, Any], name: str) -> tuple[int, int, int] | None:
    """Where `deployment`, `application` and `replica` sit in `name`'s labels (-1: absent)."""
    m = meta.get(name)
    if m is None:
        return None
    names = tuple(m[2])
    if "deployment" not in names or "application" not in names:
        return None
    return names.index("application"), names.index("deployment"), names.index("replica") if "replica" in names else -1


def increments(last: Mapping[tuple[Any, ...], Any], procs: Mapping[int, Mapping[str, Any]],
               primed: bool) -> tuple[dict[tuple[Any, ...], Any], dict[DepKey, Counts]]:
    """Per deployment, what the counters and latency histograms of every process (`procs`: the
    head's `Aggregate.procs`) grew by since `last` (the previous call's first result).

    Per process and label set, so a process that goes away or is dropped costs nothing and a
    counter that went backwards (a process reconnected) counts from zero. A series first seen
    counts whole when `primed` (a process that started since the last sample); on the first
    call (`primed` False) it is only remembered."""
    now: dict[tuple[Any, ...], Any] = {}
    out: dict[DepKey, Counts] = {}
    for pkey, p in procs.items():
        meta, values = p["meta"], p["values"]
        for name in (REQUESTS, ERRORS, LATENCY):
            where = _labels(meta, name)
            if where is None:
                continue
            ai, di, _ = where
            histogram = name == LATENCY
            if histogram and tuple(meta[name][3]) != tuple(LATENCY_MS_BUCKETS):
                continue
            for lkey, v in values.get(name, {}).items():
                ident = (pkey, name, lkey)
                prev = last.get(ident)
                counts = None
                if prev is not None or primed:
                    counts = out.setdefault((lkey[ai], lkey[di]), Counts())
                if histogram:
                    cur: list[float] = list(v[0])
                    now[ident] = cur
                    if counts is not None:
                        grown = cur
                        if prev is not None and len(prev) == len(cur) and all(a >= b for a, b in zip(cur, prev, strict=True)):
                            grown = [a - b for a, b in zip(cur, prev, strict=True)]
                        counts.buckets = [a + b for a, b in zip(counts.buckets, grown, strict=True)]
                    continue
                value = float(v)
                now[ident] = value
                if counts is not None:
                    grew = value if prev is None or value < prev else value - prev
                    if name == REQUESTS:
                        counts.requests += grew
                    else:
                        counts.errors += grew
    return now, out


def gauges(procs: Iterable[Mapping[str, Any]]) -> tuple[dict[DepKey, float], dict[str, tuple[float, float]]]:
    """Requests running in replicas, per deployment, and (running, queued) per replica id, from
    the live processes' last pushed gauges."""
    per_dep: dict[DepKey, float] = {}
    per_replica: dict[str, tuple[float, float]] = {}
    for p in procs:
        if p.get("gone") is not None:
            continue
        meta, values = p["meta"], p["values"]
        for name in (RUNNING, QUEUED_IN_REPLICA):
            where = _labels(meta, name)
            if where is None or where[2] < 0:
                continue
            ai, di, ri = where
            for lkey, v in values.get(name, {}).items():
                running, queued = per_replica.get(lkey[ri], (0.0, 0.0))
                if name == RUNNING:
                    per_dep[(lkey[ai], lkey[di])] = per_dep.get((lkey[ai], lkey[di]), 0.0) + float(v)
                    running = float(v)
                else:
                    queued = float(v)
                per_replica[lkey[ri]] = (running, queued)
    return per_dep, per_replica


class Series:
    """The last `window_s` of samples, aligned: one time column and, per deployment, one column
    per name in `SERIES` (None where the deployment had no value)."""

    def __init__(self, interval_s: float = INTERVAL_S, window_s: float = WINDOW_S) -> None:
        self.interval_s = interval_s
        self.window_s = window_s
        self.size = max(1, int(window_s / interval_s))
        self.t: deque[float] = deque(maxlen=self.size)
        self.cols: dict[str, dict[str, deque[float | None]]] = {}

    def add(self, t: float, rows: Mapping[str, Mapping[str, float | None]]) -> None:
        """Append one sample at wall time `t`: {"app/deployment": {series: value}}."""
        self.t.append(t)
        n = len(self.t)
        for key, row in rows.items():
            cols = self.cols.get(key)
            if cols is None:
                cols = self.cols[key] = {s: deque([None] * (n - 1), maxlen=self.size) for s in SERIES}
            for s in SERIES:
                cols[s].append(row.get(s))
        for key in [k for k in self.cols if k not in rows]:
            cols = self.cols[key]
            for s in SERIES:
                cols[s].append(None)
            if all(v is None for v in cols["replicas"]) and all(v is None for v in cols["rps"]):
                del self.cols[key]  # gone for a whole window

    def since(self, after: float | None = None) -> dict[str, Any]:
        """The samples taken after wall time `after` (all of them when None), as the
        `/api/flotilla/timeseries/` reply."""
        ts = list(self.t)
        start = 0
        if after is not None:
            while start < len(ts) and ts[start] <= after:
                start += 1
        return {
            "interval_s": self.interval_s,
            "window_s": self.window_s,
            "t": ts[start:],
            "deployments": {key: {s: list(col)[start:] for s, col in cols.items()} for key, cols in self.cols.items()},
        }


def interval_s() -> float:
    raw = os.environ.get("FLOTILLA_DASHBOARD_INTERVAL_S")
    try:
        value = float(raw) if raw is not None else INTERVAL_S
    except ValueError:
        value = float("nan")
    if not 0.05 <= value <= 60:
        logger.warning("FLOTILLA_DASHBOARD_INTERVAL_S=%r is not a number of seconds in [0.05, 60]; using %g", raw, INTERVAL_S)
        return INTERVAL_S
    return value


class Sampler:
    """The head's sampling task: one `Series` point per interval, and the latest figures."""

    def __init__(self, head: Head, interval: float | None = None) -> None:
        self.head = head
        self.interval = interval_s() if interval is None else interval
        self.series = Series(self.interval, WINDOW_S)
        self.latest: dict[str, dict[str, float | None]] = {}
        self._last: dict[tuple[Any, ...], Any] = {}
        self._primed = False
        self._at = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if loop.time() - next_at > self.interval:  # fell behind (a suspended process): skip ahead
                next_at = loop.time()
            try:
                self.sample()
            except Exception:
                logger.exception("dashboard sample failed")

    def sample(self) -> None:
        c = self.head.controller
        if c is None:
            return
        mono = time.monotonic()
        seconds = mono - self._at if self._primed else self.interval
        self._at = mono
        procs = self.head.pushed.procs
        self._last, grown = increments(self._last, procs, self._primed)
        self._primed = True
        running, _ = gauges(procs.values())
        queued = c.metrics.values.get(QUEUED_IN_ROUTERS, {})
        rows: dict[str, dict[str, float | None]] = {}
        for app in c.apps.values():
            for d in app.deployments.values():
                k = (app.name, d.name)
                row = (grown.get(k) or Counts()).figures(seconds)
                row["queued"] = float(queued.get((d.name, app.name), 0.0))
                row["running"] = running.get(k, 0.0)
                row["replicas"] = float(sum(1 for r in d.replicas.values() if r.state is RState.RUNNING))
                row["target"] = float(d.target)
                rows[f"{app.name}/{d.name}"] = row
        self.series.add(time.time(), rows)
        self.latest = rows


def memory_fields(m: Memory | None) -> dict[str, int | None]:
    """A replica's memory figures (`procfs.Memory`) as the REST API and the dashboard carry
    them: uss_bytes, pss_bytes, shared_bytes, rss_bytes; None before its first sample."""
    return {f"{k}_bytes": getattr(m, k) if m is not None else None for k in ("uss", "pss", "shared", "rss")}


def snapshot(head: Head) -> dict[str, Any]:
    """`GET /api/flotilla/dashboard/`: applications, deployments and replicas with the status
    `flotilla status` shows, the resources, traffic splits, and each deployment's latest figures."""
    from flotilla import __version__
    from flotilla._private.cliformat import status_dict
    from flotilla._private.metrics import enabled

    c = head.controller
    status = head.deployer.overlay(c.status())
    plain = status_dict(status)
    info = head.cluster_info()
    _, per_replica = gauges(head.pushed.procs.values())
    restarts = c.metrics.values.get(RESTARTS, {})
    latest = head.sampler.latest if head.sampler is not None else {}
    pool = c.pool
    gpu_users: dict[int, list[str]] = {}
    apps: dict[str, Any] = {}
    for name, a in status.applications.items():
        live = c.apps.get(name)
        deps: dict[str, Any] = {}
        for dname, d in a.deployments.items():
            dep = live.deployments.get(dname) if live is not None else None
            out = dict(plain["applications"][name]["deployments"][dname])
            out.setdefault("findings", [])
            out.setdefault("autoscaler", None)
            out.update(target=d.target_num_replicas,
                       restarts=int(restarts.get((dname, name), 0)), config=None, now=latest.get(f"{name}/{dname}"),
                       replicas=[], recent_deaths=[])
            if dep is not None:
                out["config"] = _jsonable(dep.config)
                for r in dep.replicas.values():
                    gpu_ids = r.alloc.gpu_ids if r.alloc is not None else []
                    for g in gpu_ids:
                        gpu_users.setdefault(g, []).append(r.id)
                    running, queued = per_replica.get(r.id, (0.0, 0.0))
                    # Ray's states, but PENDING for one that waits for resources (Ray: STARTING)
                    state = "PENDING" if r.state is RState.PENDING else r.state.public.value
                    out["replicas"].append({
                        "id": r.id, "state": state, "pid": r.pid, "node": r.node or head.node_id or "local",
                        "gpu_ids": gpu_ids, "running": running, "queued": queued, "version": r.version,
                        "started_s": r.placed_wall_s, **memory_fields(r.memory),
                        "pending_reason": (pool.shortfall(r.spec["demand"]) or "waiting for resources")
                        if state == "PENDING" else None,
                    })
                out["recent_deaths"] = [{"id": x.id, "pid": x.pid, "reason": x.reason, "time_s": x.time_s}
                                        for x in dep.deaths]
            deps[dname] = out
        apps[name] = {
            "status": plain["applications"][name]["status"], "message": a.message, "route_prefix": a.route_prefix,
            "last_deployed_time_s": a.last_deployed_time_s, "ingress": live.ingress if live is not None else None,
            "deployments": deps,
        }
    gpus = pool.gpus() if hasattr(pool, "gpus") else {}
    return {
        "time": time.time(),
        "cluster": {
            "namespace": info.get("namespace"), "backend": head.backend, "head_pid": os.getpid(),
            "session_dir": head.session_dir, "http_url": info.get("http_url"), "metrics_url": info.get("metrics_url"),
            "dashboard_url": head.rest_url, "detached": head.detached, "version": __version__,
            "metrics_enabled": enabled(),
        },
        "resources": {
            "total": pool.totals(), "available": pool.available(),
            "gpus": [{"id": g, "free": free, "replicas": gpu_users.get(g, [])} for g, free in sorted(gpus.items())],
        },
        "proxies": plain["proxies"],
        "applications": apps,
        "traffic": plain.get("traffic", {}),
        "shadows": plain.get("shadows", {}),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def log_path(head: Head, replica_id: str) -> str | None:
    """The log file of a replica the controller runs, or of one it replaced recently."""
    c = head.controller
    r = c.replicas.get(replica_id)
    if r is not None:
        return str(c._log_path(r))
    for app in c.apps.values():
        for d in app.deployments.values():
            for death in d.deaths:
                if death.id == replica_id:
                    return death.log
    return None


def read_log(path: str, offset: int | None, lines: int) -> dict[str, Any]:
    """The last `lines` lines of `path` (offset None), or what was written from byte `offset` on
    (at most `LOG_CHUNK`); the reply's `offset` is where to read from next. A file that shrank
    (rotated) is read from its start."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        truncated = False
        if offset is None:
            start = max(0, end - LOG_CHUNK)
            f.seek(start)
            data = f.read()
            parts = data.split(b"\n")
            if start > 0:
                parts = parts[1:]  # a partial first line
            if parts and parts[-1] == b"":
                parts = parts[:-1]
            kept = parts[-lines:] if lines > 0 else []
            text = b"\n".join(kept) + (b"\n" if kept else b"")
            return {"offset": end, "text": text.decode("utf-8", "replace"), "truncated": len(parts) > len(kept) or start > 0}
        if offset > end:
            offset = 0
        f.seek(offset)
        data = f.read(LOG_CHUNK)
        if len(data) == LOG_CHUNK and offset + len(data) < end:
            truncated = True
            cut = data.rfind(b"\n")
            if cut > 0:
                data = data[:cut + 1]
        return {"offset": offset + len(data), "text": data.decode("utf-8", "replace"), "truncated": truncated}
