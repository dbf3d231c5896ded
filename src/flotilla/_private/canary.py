"""Canary rollouts, decided: move a split route's traffic from an old application to a new one
in steps (the new one's share: 1% -> 10% -> 50% -> 100% by default), each held for `hold_s`,
promoted only while the new version's error rate and p95 latency stay within the user's bounds
relative to the old version's; otherwise rolled back to the old version at once.

Pure: no I/O and no clock. The controller feeds the figures (from what the proxies push) and
the time; `decide` says what the share is now and why.

- `old`: the old version's figures since the canary began (its baseline);
- `new`: the new version's figures since the current step began.

Each step is judged as soon as the new version has `min_requests` requests in it (a breach
rolls back before the hold ends); it is promoted when it has been held `hold_s` and has seen
`min_requests`. The last step (share 1.0) promoted means the canary is done.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum


class CanaryPhase(str, Enum):
    RUNNING = "RUNNING"
    PROMOTED = "PROMOTED"
    ROLLED_BACK = "ROLLED_BACK"


@dataclass(frozen=True)
class CanaryConfig:
    """How a canary moves, and what it tolerates."""

    steps: tuple[float, ...] = (0.01, 0.1, 0.5, 1.0)
    hold_s: float = 60.0
    #: The new version's error rate may exceed the old one's by at most this (0.01: one point).
    max_error_rate_increase: float = 0.01
    #: The new version's p95 latency may be at most this many times the old one's, plus
    #: `p95_slack_ms` (a few ms either way is noise on a busy machine, not a regression).
    max_p95_ratio: float = 1.5
    p95_slack_ms: float = 5.0
    #: Requests the new version must have seen in a step before it is judged or promoted.
    min_requests: int = 20

    def __post_init__(self) -> None:
        steps = tuple(float(s) for s in self.steps)
        object.__setattr__(self, "steps", steps)
        if not steps:
            raise ValueError("canary steps must not be empty; e.g. steps=(0.01, 0.1, 0.5, 1.0)")
        for prev, cur in zip((0.0, *steps), steps, strict=False):
            if not (0.0 < cur <= 1.0) or cur <= prev:
                raise ValueError(
                    f"canary steps must increase within (0, 1]; got {list(steps)} (bad entry: {cur:g})"
                )
        if steps[-1] != 1.0:
            raise ValueError(f"the last canary step must be 1.0 (all traffic); got {steps[-1]:g}")
        if self.hold_s < 0 or not math.isfinite(self.hold_s):
            raise ValueError(f"hold_s must be a finite number >= 0; got {self.hold_s!r}")
        if self.max_error_rate_increase < 0:
            raise ValueError(f"max_error_rate_increase must be >= 0; got {self.max_error_rate_increase!r}")
        if self.max_p95_ratio < 1.0:
            raise ValueError(f"max_p95_ratio must be >= 1.0; got {self.max_p95_ratio!r}")
        if self.p95_slack_ms < 0:
            raise ValueError(f"p95_slack_ms must be >= 0; got {self.p95_slack_ms!r}")
        if self.min_requests < 1:
            raise ValueError(f"min_requests must be >= 1; got {self.min_requests!r}")


@dataclass(frozen=True)
class Figures:
    """One version's requests, errors (5xx) and p95 latency (ms; None: no requests) over a window."""

    requests: int = 0
    errors: int = 0
    p95_ms: float | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class CanaryState:
    step: int  # index into `CanaryConfig.steps`
    step_started: float
    phase: CanaryPhase = CanaryPhase.RUNNING
    reason: str = ""

    def share(self, config: CanaryConfig) -> float:
        """The new version's share of the traffic in this state."""
        if self.phase is CanaryPhase.ROLLED_BACK:
            return 0.0
        if self.phase is CanaryPhase.PROMOTED:
            return 1.0
        return config.steps[self.step]


@dataclass(frozen=True)
class Decision:
    state: CanaryState
    share: float
    changed: bool  # a step, a promotion or a rollback happened (log it, count it)


def start(config: CanaryConfig, now: float) -> CanaryState:
    return CanaryState(0, now, CanaryPhase.RUNNING, f"started at {config.steps[0]:.0%}")


def breach(config: CanaryConfig, old: Figures, new: Figures) -> str:
    """Why the new version is out of bounds against the old one ("" when it is not)."""
    if new.requests < config.min_requests:
        return ""
    if new.error_rate > old.error_rate + config.max_error_rate_increase:
        return (f"error rate {new.error_rate:.2%} over {new.requests} requests, against the old version's "
                f"{old.error_rate:.2%} (allowed: +{config.max_error_rate_increase:.2%})")
    if (new.p95_ms is not None and old.p95_ms is not None
            and new.p95_ms > old.p95_ms * config.max_p95_ratio + config.p95_slack_ms):
        return (f"p95 latency {new.p95_ms:.1f} ms, against the old version's {old.p95_ms:.1f} ms "
                f"(allowed: x{config.max_p95_ratio:g} + {config.p95_slack_ms:g} ms)")
    return ""


def decide(config: CanaryConfig, state: CanaryState, old: Figures, new: Figures, now: float) -> Decision:
    """The share of traffic for the new version now, and the state to keep."""
    if state.phase is not CanaryPhase.RUNNING:
        return Decision(state, state.share(config), False)
    share = config.steps[state.step]
    why = breach(config, old, new)
    if why:
        back = replace(state, phase=CanaryPhase.ROLLED_BACK, step_started=now,
                       reason=f"rolled back at {share:.0%}: {why}")
        return Decision(back, 0.0, True)
    held = now - state.step_started
    if held < config.hold_s:
        return Decision(state, share, False)
    if new.requests < config.min_requests:
        waiting = f"holding {share:.0%}: {new.requests} of {config.min_requests} requests seen by the new version"
        return Decision(replace(state, reason=waiting), share, False)
    if state.step + 1 == len(config.steps):
        done = replace(state, phase=CanaryPhase.PROMOTED, step_started=now,
                       reason=f"promoted: 100% held {held:.0f}s within bounds")
        return Decision(done, 1.0, True)
    nxt = config.steps[state.step + 1]
    return Decision(CanaryState(state.step + 1, now, CanaryPhase.RUNNING,
                                f"{share:.0%} -> {nxt:.0%}: held {held:.0f}s within bounds"), nxt, True)


def quantile(bounds: Sequence[float], counts: Sequence[float], q: float) -> float | None:
    """The `q` quantile (0 < q <= 1) from histogram buckets (`counts[i]`: observations in
    (`bounds[i-1]`, `bounds[i]`], not cumulative; one more count than bounds, for +Inf),
    interpolated linearly within its bucket (as Prometheus' `histogram_quantile`; the last finite
    bound when it falls in +Inf). None without observations."""
    total = sum(counts)
    if not total or not bounds:
        return None
    want = q * total
    seen = 0.0
    for i, n in enumerate(counts):
        if n and seen + n >= want:
            if i >= len(bounds):
                return float(bounds[-1])
            lo = float(bounds[i - 1]) if i else 0.0
            return lo + (float(bounds[i]) - lo) * (want - seen) / n
        seen += n
    return float(bounds[-1])


def p95(bounds: Sequence[float], counts: Sequence[float]) -> float | None:
    """The 95th percentile (`quantile`)."""
    return quantile(bounds, counts, 0.95)
