"""Live findings: what running replicas' CPU use and the pushed metrics say about their options.

`Watch` keeps, per replica, a short history of samples (monotonic time passed in, CPU seconds
used so far, requests running) and, per deployment and application, the cumulative latency sums
of the pushed histograms; it holds no clock of its own. The decisions are pure functions of
that history: `gil_bound`, `unbalanced`, `latency_outside_code`, `batch_underfilled`, gathered
by `Watch.findings`. The controller samples local replicas every `FLOTILLA_CPU_SAMPLE_S`
(`Controller._sample_cpu`) and shows the result in `serve.status()`, the dashboard and /metrics.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flotilla._private.doctor import INFO, WARNING, Finding

#: Default seconds between two CPU samples (`FLOTILLA_CPU_SAMPLE_S`; 0 turns sampling off).
SAMPLE_S = 2.0
#: Default seconds of history the findings look at (`FLOTILLA_FINDINGS_WINDOW_S`).
WINDOW_S = 30.0
#: Fewest intervals a replica needs before it is judged.
MIN_INTERVALS = 3
#: Busy CPU use at or below this many cores, with N >= 2 reserved: likely GIL-bound.
GIL_CORES = 1.2
#: ... and at least this much (below it the replica waits on I/O, not on the GIL).
GIL_MIN_CORES = 0.2
#: Share of intervals a replica must be busy (requests running) to be judged GIL-bound.
BUSY_SHARE = 0.6
#: Share of intervals at max_ongoing_requests (saturated) or with nothing running (idle).
STUCK_SHARE = 0.8
#: Latency outside user code: end-to-end at least this many times the time in the replica ...
OUTSIDE_FACTOR = 2.0
#: ... and at least this many ms more, over at least `MIN_REQUESTS` requests.
OUTSIDE_MIN_MS = 10.0
MIN_REQUESTS = 20
#: Batches fuller than this on average are fine.
FILL_OK = 0.5

BATCH_FILL = "flotilla_batch_fill_ratio"
PROCESSING = "ray_serve_deployment_processing_latency_ms"
HTTP_LATENCY = "ray_serve_http_request_latency_ms"


def _env(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def sample_s() -> float:
    return _env("FLOTILLA_CPU_SAMPLE_S", SAMPLE_S)


def window_s() -> float:
    return _env("FLOTILLA_FINDINGS_WINDOW_S", WINDOW_S)


@dataclass(frozen=True)
class Interval:
    """Between two samples of one replica: seconds, cores used, requests running at its end."""

    seconds: float
    cores: float
    running: int


def gil_bound(name: str, reserved: float, replicas: Mapping[str, Sequence[Interval]]) -> Finding | None:
    """A replica reserving N >= 2 CPUs that, while busy most of the time, uses about one core."""
    if reserved < 2:
        return None
    judged = []
    for ivs in replicas.values():
        if len(ivs) < MIN_INTERVALS:
            continue
        busy = [iv for iv in ivs if iv.running > 0]
        if len(busy) < BUSY_SHARE * len(ivs):
            continue
        judged.append(sum(iv.cores * iv.seconds for iv in busy) / (sum(iv.seconds for iv in busy) or 1.0))
    if not judged or max(judged) > GIL_CORES or max(judged) < GIL_MIN_CORES:
        return None
    used = max(judged)
    n = len(replicas)
    return Finding(
        "gil-bound", WARNING, name,
        f"uses about {used:.1f} core(s) of the {reserved:g} it reserves while busy: its code is likely "
        + ("GIL-bound (one Python thread at a time)." if used >= 0.5 else
           "GIL-bound (one Python thread at a time) or waiting on I/O, not computing."),
        f"use num_cpus=1 and more replicas (e.g. num_replicas={max(1, int(n * reserved))}).",
    )


def unbalanced(name: str, max_ongoing: int, replicas: Mapping[str, Sequence[Interval]]) -> Finding | None:
    """Some replicas always at max_ongoing_requests while others sit idle."""
    saturated, idle = [], []
    for rid, ivs in replicas.items():
        if len(ivs) < MIN_INTERVALS:
            continue
        if sum(iv.running >= max_ongoing for iv in ivs) >= STUCK_SHARE * len(ivs):
            saturated.append(rid)
        elif sum(iv.running == 0 for iv in ivs) >= STUCK_SHARE * len(ivs):
            idle.append(rid)
    if not saturated or not idle:
        return None
    return Finding(
        "unbalanced-load", WARNING, name,
        f"{len(saturated)} replica(s) stay at max_ongoing_requests={max_ongoing} while {len(idle)} sit idle.",
        "if requests carry multiplexed model ids, spread them (or raise max_num_models_per_replica); "
        "long streams or WebSockets hold their replica: lower max_ongoing_requests so new work goes elsewhere.",
    )


def latency_outside_code(name: str, e2e_ms: float | None, processing_ms: float | None,
                         requests: float) -> Finding | None:
    """Most of the end-to-end latency spent outside user code (queueing, proxy, transport)."""
    if e2e_ms is None or processing_ms is None or requests < MIN_REQUESTS:
        return None
    if e2e_ms < OUTSIDE_FACTOR * processing_ms or e2e_ms - processing_ms < OUTSIDE_MIN_MS:
        return None
    share = 1 - processing_ms / e2e_ms if e2e_ms else 0.0
    return Finding(
        "latency-outside-code", INFO, name,
        f"requests take {e2e_ms:.0f} ms end to end but {processing_ms:.0f} ms in the replicas: "
        f"{share:.0%} of the latency is queueing and transport, not your code.",
        "add replicas (or autoscale with a lower target_ongoing_requests), or raise max_ongoing_requests "
        "if the code can run more requests at once.",
    )


def batch_underfilled(name: str, fill: float | None) -> Finding | None:
    """Batches that go out mostly empty."""
    if fill is None or fill >= FILL_OK:
        return None
    return Finding(
        "batch-underfilled", INFO, name,
        f"batches go out {fill:.0%} full on average.",
        "raise batch_wait_timeout_s (if the latency budget allows) or lower max_batch_size; with little "
        "traffic, batching buys nothing.",
    )


@dataclass
class _Point:
    t: float
    cpu_s: float
    running: int


class Watch:
    """Recent samples of replicas and latency sums; `findings` decides from them."""

    def __init__(self, window: float | None = None) -> None:
        self.window = window_s() if window is None else window
        self.points: dict[str, deque[_Point]] = {}
        # (application, deployment or "" for end to end) -> deque of (t, sum ms, count)
        self.latency: dict[tuple[str, str], deque[tuple[float, float, float]]] = {}
        self.fill: dict[tuple[str, str], float] = {}

    def add(self, rid: str, now: float, cpu_s: float, running: int) -> None:
        pts = self.points.setdefault(rid, deque())
        if pts and cpu_s < pts[-1].cpu_s:  # a new process under the same id
            pts.clear()
        pts.append(_Point(now, cpu_s, running))
        self._trim(pts, now)

    def _trim(self, pts: deque[Any], now: float) -> None:
        while len(pts) > 1 and now - (pts[0].t if isinstance(pts[0], _Point) else pts[0][0]) > self.window:
            pts.popleft()

    def keep(self, rids: Iterable[str]) -> None:
        """Forget replicas not in `rids`."""
        live = set(rids)
        for rid in [r for r in self.points if r not in live]:
            del self.points[rid]

    def intervals(self, rid: str) -> list[Interval]:
        pts = list(self.points.get(rid, ()))
        return [Interval(b.t - a.t, (b.cpu_s - a.cpu_s) / (b.t - a.t), b.running)
                for a, b in itertools.pairwise(pts) if b.t > a.t]

    def cores(self, rid: str) -> float | None:
        """Cores used over the last interval."""
        ivs = self.intervals(rid)
        return ivs[-1].cores if ivs else None

    def observe_metrics(self, now: float, snapshots: Iterable[Mapping[str, Any]]) -> None:
        """Record the latency sums and batch fill ratios of the head's pushed metrics."""
        sums: dict[tuple[str, str], list[float]] = {}
        fills: dict[tuple[str, str], list[float]] = {}
        for snap in snapshots:
            meta, values = snap.get("meta", {}), snap.get("values", {})
            for metric, dep_label in ((PROCESSING, True), (HTTP_LATENCY, False)):
                m = meta.get(metric)
                if m is None or "application" not in m[2] or (dep_label and "deployment" not in m[2]):
                    continue
                ai = list(m[2]).index("application")
                di = list(m[2]).index("deployment") if dep_label else -1
                for key, v in values.get(metric, {}).items():
                    try:
                        total, n = float(v[1]), float(v[2])
                    except (TypeError, ValueError, IndexError):
                        continue
                    acc = sums.setdefault((key[ai], key[di] if dep_label else ""), [0.0, 0.0])
                    acc[0] += total
                    acc[1] += n
            m = meta.get(BATCH_FILL)
            if m is not None and "deployment" in m[2] and "application" in m[2]:
                ai, di = list(m[2]).index("application"), list(m[2]).index("deployment")
                for key, v in values.get(BATCH_FILL, {}).items():
                    try:
                        fills.setdefault((key[ai], key[di]), []).append(float(v))
                    except (TypeError, ValueError):
                        continue
        for k, (total, n) in sums.items():
            pts = self.latency.setdefault(k, deque())
            if pts and (n < pts[-1][2] or total < pts[-1][1]):  # processes dropped: start over
                pts.clear()
            pts.append((now, total, n))
            self._trim(pts, now)
        self.fill = {k: sum(v) / len(v) for k, v in fills.items() if v}

    def mean_ms(self, key: tuple[str, str]) -> tuple[float | None, float]:
        """(mean latency over the window, requests in it) of one latency series."""
        pts = self.latency.get(key)
        if not pts or len(pts) < 2:
            return None, 0.0
        n = pts[-1][2] - pts[0][2]
        return ((pts[-1][1] - pts[0][1]) / n if n > 0 else None), n

    def findings(self, app: str, name: str, reserved_cpus: float, max_ongoing: int,
                 replica_ids: Iterable[str], ingress: bool) -> list[Finding]:
        """The live findings of one deployment."""
        per = {rid: self.intervals(rid) for rid in replica_ids}
        found = [gil_bound(name, reserved_cpus, per), unbalanced(name, max_ongoing, per)]
        if ingress:
            e2e, n = self.mean_ms((app, ""))
            proc, _ = self.mean_ms((app, name))
            found.append(latency_outside_code(name, e2e, proc, n))
        found.append(batch_underfilled(name, self.fill.get((app, name))))
        return [f for f in found if f is not None]
