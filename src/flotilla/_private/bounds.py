"""Replica bounds, as pure decisions: how long a constructor may run, how much memory a replica
and the machine may use. No I/O and no clock; the controller measures and carries them out.

- Start-up: a replica still constructing after `slow_startup_warning_s` is reported in its
  deployment's status (Ray's wording, with the elapsed time) and logged once; after
  `startup_timeout_s` it is killed and counts as a failed start (see `reconcile.failed_start_limit`).
- Memory limit: a replica whose process group's RSS exceeds its `ray_actor_options["memory"]`
  is killed and replaced.
- Health: a replica that fails its health check drains like any replica being stopped (Ray
  Serve's default); `force_stop_unhealthy` kills it at once instead.
- Machine threshold (as Ray's memory monitor): when the machine's used memory is over
  `memory_usage_threshold` of its total, the replica using the most memory is killed; one at a
  time (the next only once the previous one has exited).

Settings come from the environment of the process that starts the cluster (`Limits.from_env`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30


def _env(names: Sequence[str], default: float) -> float:
    """The first of `names` set in the environment, as a float; else `default`."""
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not a number") from None
    return default


@dataclass(frozen=True)
class Limits:
    slow_startup_warning_s: float = 30.0
    startup_timeout_s: float = 1800.0  # 0: no limit
    memory_usage_threshold: float = 0.95  # fraction of the machine; 1 (or more): off
    memory_monitor_refresh_s: float = 0.25  # 0: the memory checks are off
    force_stop_unhealthy: bool = False  # kill a replica that fails its health check instead of draining it

    @classmethod
    def from_env(cls) -> Limits:
        return cls(
            slow_startup_warning_s=_env(("FLOTILLA_SLOW_STARTUP_WARNING_S", "SERVE_SLOW_STARTUP_WARNING_S"), 30.0),
            startup_timeout_s=_env(("FLOTILLA_REPLICA_STARTUP_TIMEOUT_S",), 1800.0),
            memory_usage_threshold=_env(("FLOTILLA_MEMORY_USAGE_THRESHOLD", "RAY_memory_usage_threshold"), 0.95),
            memory_monitor_refresh_s=_env(("FLOTILLA_MEMORY_MONITOR_REFRESH_MS", "RAY_memory_monitor_refresh_ms"), 250.0) / 1000.0,
            force_stop_unhealthy=_env(
                ("FLOTILLA_FORCE_STOP_UNHEALTHY_REPLICAS", "RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS"), 0.0) != 0,
        )


def fmt_bytes(n: float) -> str:
    """`512.0 MiB`, `1.50 GiB`."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


# ---- start-up ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartupVerdict:
    slow: tuple[str, ...]  # still constructing past the warning threshold
    overdue: tuple[str, ...]  # past the limit: kill, count a failed start


def startup_check(elapsed: Mapping[str, float], limits: Limits) -> StartupVerdict:
    """`elapsed`: replica id -> seconds since it was forked, for replicas still constructing."""
    overdue = tuple(rid for rid, s in elapsed.items() if limits.startup_timeout_s > 0 and s > limits.startup_timeout_s)
    slow = tuple(rid for rid, s in elapsed.items() if s > limits.slow_startup_warning_s and rid not in overdue)
    return StartupVerdict(slow, overdue)


def slow_startup_message(deployment: str, app: str, elapsed: Iterable[float], limits: Limits) -> str:
    """The deployment status message for replicas slow to construct (Ray's wording, plus times)."""
    times = sorted(elapsed, reverse=True)
    n = len(times)
    limit = (f" A replica still starting after {limits.startup_timeout_s:g}s "
             f"(FLOTILLA_REPLICA_STARTUP_TIMEOUT_S) is killed and counts as a failed start."
             if limits.startup_timeout_s > 0 else "")
    return (
        f"Deployment '{deployment}' in application '{app}' has {n} replica{'s' if n != 1 else ''} that "
        f"{'have' if n != 1 else 'has'} taken more than {limits.slow_startup_warning_s:g}s to initialize "
        f"(the longest has been initializing for {times[0]:.1f}s). This may be caused by a slow __init__ "
        f"or reconfigure method.{limit}"
    )


def startup_timeout_message(limits: Limits) -> str:
    return (
        f"The replica did not finish its constructor within {limits.startup_timeout_s:g}s "
        f"(FLOTILLA_REPLICA_STARTUP_TIMEOUT_S); it was killed."
    )


# ---- memory -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemSample:
    """One live replica: its process group's resident memory and its `memory` limit (bytes)."""

    id: str
    rss: int
    limit: float | None = None


@dataclass(frozen=True)
class MemKill:
    id: str
    reason: str  # "memory_limit" | "machine_threshold"
    message: str


def memory_decide(
    samples: Sequence[MemSample], used: int, total: int, limits: Limits, killing: bool = False
) -> list[MemKill]:
    """Which replicas to kill for memory.

    Every replica over its own limit goes. Otherwise, when the machine is over the threshold
    and no earlier kill for it is still in progress (`killing`), the replica with the largest
    RSS goes (Ray's memory monitor picks a worker too; one at a time, so the next reading
    sees the memory freed).
    """
    kills = [
        MemKill(s.id, "memory_limit",
                f"its memory (RSS {fmt_bytes(s.rss)}, process group) went over its memory limit of "
                f"{fmt_bytes(s.limit)} (ray_actor_options['memory'])")
        for s in samples
        if s.limit and s.rss > s.limit
    ]
    threshold = limits.memory_usage_threshold
    if kills or killing or not samples or total <= 0 or threshold >= 1 or used <= threshold * total:
        return kills
    victim = max(samples, key=lambda s: s.rss)
    return [MemKill(
        victim.id, "machine_threshold",
        f"the machine ran low on memory: {fmt_bytes(used)} of {fmt_bytes(total)} used "
        f"({used / total:.2f}), over the memory usage threshold {threshold:g} "
        f"(FLOTILLA_MEMORY_USAGE_THRESHOLD), and this replica used the most (RSS {fmt_bytes(victim.rss)})",
    )]
