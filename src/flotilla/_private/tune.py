"""The pure parts of `flotilla tune`: settings to try, percentiles, picking the best within an
SLO, the table, the progress bar and the tuned config file. The driver that starts a cluster
and drives load is `flotilla._private.tuner`.

The search is coordinate descent over one deployment (the application's ingress): starting
from the better of the code's options and the plain defaults, vary `num_replicas`, then
`num_cpus` (and with it OMP_NUM_THREADS), then `max_ongoing_requests`, keeping the best value
of each dimension before the next.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "DEFAULTS",
    "DIMENSIONS",
    "LevelResult",
    "Setting",
    "Trial",
    "best_level",
    "bisect_level",
    "concurrency_levels",
    "finalists",
    "first_candidates",
    "format_table",
    "median_result",
    "percentile",
    "pick_best",
    "progress_bar",
    "stage_candidates",
    "summarize",
    "trial_budget",
    "tuned_config",
    "within_slo",
]

#: The dimensions searched, in order.
DIMENSIONS = ("num_replicas", "num_cpus", "max_ongoing_requests")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One combination of the ingress deployment's options."""

    num_replicas: int
    num_cpus: float
    max_ongoing_requests: int

    def label(self) -> str:
        return f"replicas={self.num_replicas} cpus={self.num_cpus:g} max_ongoing={self.max_ongoing_requests}"

    def fits(self, cores: float) -> bool:
        """Whether the cluster's CPUs can place every replica."""
        return self.num_replicas * self.num_cpus <= cores + 1e-9


#: A deployment's options when its code sets none (as Ray Serve's).
DEFAULTS = Setting(1, 1.0, 5)


@dataclasses.dataclass(frozen=True)
class LevelResult:
    """What one concurrency level of a trial measured."""

    concurrency: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    cpu_ms_per_request: float
    loadgen_cpu: float  # the load generator's CPU use, in cores

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class Trial:
    """A setting and its result: the best level within the SLO, else the lowest level tried."""

    setting: Setting
    result: LevelResult | None
    note: str = ""
    levels: tuple[LevelResult, ...] = ()

    def sweep(self) -> str:
        """Every level measured, e.g. `1: 700 req/s p95 2.1 ms | 4: ...`."""
        return " | ".join(f"{r.concurrency}: {r.rps:.0f} req/s p95 {r.p95_ms:.1f} ms"
                          + (f" {r.errors} errors" if r.errors else "") for r in self.levels)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, interpolating linearly between ranks; NaN if empty."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * min(100.0, max(0.0, q)) / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(latencies_s: Sequence[float]) -> tuple[float, float, float]:
    """(p50, p95, p99) in milliseconds."""
    ms = [x * 1000.0 for x in latencies_s]
    return percentile(ms, 50), percentile(ms, 95), percentile(ms, 99)


def within_slo(r: LevelResult | None, slo_p95_ms: float) -> bool:
    """Served something, no errors, and p95 within the SLO."""
    return r is not None and r.requests > 0 and r.errors == 0 and r.p95_ms <= slo_p95_ms


def best_level(levels: Sequence[LevelResult], slo_p95_ms: float) -> LevelResult | None:
    """The level with the most req/s within the SLO; else the first level (to show why not)."""
    ok = [r for r in levels if within_slo(r, slo_p95_ms)]
    if ok:
        return max(ok, key=lambda r: r.rps)
    return levels[0] if levels else None


def pick_best(trials: Sequence[Trial], slo_p95_ms: float) -> Trial | None:
    """The trial with the most req/s within the SLO (the earlier one on a tie), or None."""
    best: Trial | None = None
    for t in trials:
        if within_slo(t.result, slo_p95_ms) and (best is None or t.result.rps > best.result.rps):  # type: ignore[union-attr]
            best = t
    return best


def concurrency_levels(setting: Setting, n: int = 3) -> list[int]:
    """Closed-loop client counts to sweep: up to the setting's capacity (replicas x
    max_ongoing_requests) and a little past it, geometrically, at most `n` levels."""
    cap = max(1, setting.num_replicas * setting.max_ongoing_requests)
    top = max(2, min(64, cap + setting.num_replicas))
    if n <= 1:
        return [top]
    out = sorted({max(1, round(top ** (i / (n - 1)))) for i in range(n)})
    return out


def bisect_level(levels: Sequence[LevelResult], slo_p95_ms: float) -> int | None:
    """After the last level missed the SLO and the one before met it: the client count
    halfway between them (geometrically), or None when there is none to try."""
    if len(levels) < 2 or within_slo(levels[-1], slo_p95_ms) or not within_slo(levels[-2], slo_p95_ms):
        return None
    lo, hi = levels[-2].concurrency, levels[-1].concurrency
    mid = round(math.sqrt(lo * hi))
    return mid if lo < mid < hi else None


def finalists(trials: Sequence[Trial], slo_p95_ms: float, keep: Sequence[Setting] = (), top: int = 2) -> list[Trial]:
    """The trials to measure again: the `top` best within the SLO, then those of `keep`
    (the code's options, the plain defaults) that were tried, each once."""
    ok = sorted((t for t in trials if within_slo(t.result, slo_p95_ms)), key=lambda t: -t.result.rps)  # type: ignore[union-attr]
    out = ok[:top]
    for s in keep:
        t = next((t for t in trials if t.setting == s and t.result is not None), None)
        if t is not None and t not in out:
            out.append(t)
    return out


def median_result(rounds: Sequence[LevelResult]) -> LevelResult | None:
    """The round with the median req/s (the lower one of an even count), carrying the errors
    of every round, so that one failed request anywhere disqualifies the setting."""
    if not rounds:
        return None
    mid = sorted(rounds, key=lambda r: r.rps)[(len(rounds) - 1) // 2]
    return dataclasses.replace(mid, errors=sum(r.errors for r in rounds))


def stage_candidates(dim: str, best: Setting, cores: int) -> list[Setting]:
    """The settings that vary `dim` around `best` (best itself first), those that fit."""
    if dim == "num_replicas":
        values: list[Any] = [best.num_replicas, *range(1, max(1, cores) + 1)]
    elif dim == "num_cpus":
        values = [best.num_cpus, 1.0, 0.5, round(cores / best.num_replicas, 2)]
    elif dim == "max_ongoing_requests":
        values = [best.max_ongoing_requests, 2, 8, 32]
    else:
        raise ValueError(f"unknown dimension {dim!r}; known: {', '.join(DIMENSIONS)}")
    out: list[Setting] = []
    for v in values:
        s = dataclasses.replace(best, **{dim: v})
        if s not in out and s.fits(cores):
            out.append(s)
    return out


def first_candidates(code: Setting, cores: int) -> list[Setting]:
    """Where the search starts: the code's options, then the plain defaults (one replica,
    one CPU, max_ongoing_requests 5) when they differ and fit."""
    return [s for s in dict.fromkeys([code, DEFAULTS]) if s.fits(cores) or s is code]


def trial_budget(remaining_s: float, trials_left: int, minimum_s: float = 3.0) -> float:
    """Seconds the next trial gets: an equal share of what is left (0 when not even `minimum_s`)."""
    if trials_left <= 0:
        return 0.0
    share = remaining_s / trials_left
    if share >= minimum_s:
        return share
    return minimum_s if remaining_s >= minimum_s else 0.0


_HEAD = ("setting", "conc", "req/s", "p50 ms", "p95 ms", "p99 ms", "CPU ms/req", "errors", "loadgen", "")


def format_table(trials: Sequence[Trial], slo_p95_ms: float, chosen: Trial | None = None) -> str:
    """One row per trial (its best level within the SLO; `loadgen` is the load generator's CPU,
    in % of a core); the chosen one marked `<- chosen`, those over the SLO marked."""
    rows: list[tuple[str, ...]] = []
    for t in trials:
        r = t.result
        mark = "<- chosen" if t is chosen else ("" if within_slo(r, slo_p95_ms) else "over SLO")
        if t.note:
            mark = f"{mark} ({t.note})".strip()
        if r is None:
            rows.append((t.setting.label(), "-", "-", "-", "-", "-", "-", "-", "-", mark))
            continue
        rows.append((t.setting.label(), str(r.concurrency), f"{r.rps:.0f}", f"{r.p50_ms:.1f}", f"{r.p95_ms:.1f}",
                     f"{r.p99_ms:.1f}", f"{r.cpu_ms_per_request:.2f}", str(r.errors), f"{r.loadgen_cpu:.0%}", mark))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(_HEAD)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in (0, 9) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(_HEAD), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def progress_bar(done_s: float, total_s: float, label: str = "", width: int = 30) -> str:
    """A plain-text bar: `[#######.......]  42%  label`."""
    frac = 0.0 if total_s <= 0 else min(1.0, max(0.0, done_s / total_s))
    filled = round(frac * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {frac * 100:3.0f}%  {label}".rstrip()


def tuned_config(base: dict[str, Any], deployment: str, setting: Setting) -> dict[str, Any]:
    """`base` (the `flotilla build` config of one application) with `setting` written into
    `deployment`'s entry: num_replicas, max_ongoing_requests, ray_actor_options.num_cpus."""
    out = copy.deepcopy(base)
    for app in out.get("applications", []):
        for entry in app.get("deployments", []):
            if entry.get("name") != deployment:
                continue
            entry.pop("autoscaling_config", None)
            entry["num_replicas"] = setting.num_replicas
            entry["max_ongoing_requests"] = setting.max_ongoing_requests
            entry["ray_actor_options"] = {**(entry.get("ray_actor_options") or {}), "num_cpus": setting.num_cpus}
            return out
    raise ValueError(f"no deployment {deployment!r} in the config")
