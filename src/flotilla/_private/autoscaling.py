"""Request-based replica autoscaler: the config model and a pure decision function.

Each control-loop tick the controller calls `decide` with the recent samples of the
deployment's total ongoing requests (running + queued in replicas + waiting in routers):

1. Aggregate (mean by default) the samples in the last `look_back_period_s`.
2. Raw desire = aggregate / `target_ongoing_requests` (= running * per-replica load / target).
3. Gain: step from `running` towards the raw desire by the up- or downscaling factor,
   rounding up; a damped downscale that would not move drops one replica instead.
4. Clamp to [min_replicas, max_replicas]; a downscale from above 1 never goes below 1.
5. Delay: compared with `current_target`, the wish to go up (down) must last
   `upscale_delay_s` (`downscale_delay_s`, or `downscale_to_zero_delay_s` for 1 -> 0)
   before it is applied; a wish that flips direction or disappears resets the timer.

Scale from zero bypasses the delay: with no replica running (or a target of 0) and a
request waiting, the target becomes max(1, ceil(upscaling factor)) at once, as in Ray.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AUTO_MAX_ONGOING_REQUESTS",
    "AutoscalingConfig",
    "Decision",
    "PolicyState",
    "aggregate_load",
    "auto_autoscaling_config",
    "decide",
    "desired_replicas",
    "initial_target",
]

_OLD_TARGET = "target_num_ongoing_requests_per_replica"
_EPS = 1e-9  # tolerance for float clocks and float rounding

#: `max_ongoing_requests` Ray pairs with `num_replicas="auto"` (also its plain default).
AUTO_MAX_ONGOING_REQUESTS = 5


class AutoscalingConfig(BaseModel):
    """Options of the request-based autoscaler (Ray's `ray.serve.config.AutoscalingConfig`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(1, ge=0, description="Fewest replicas; 0 allows scale to zero.")
    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas to start with; None means min_replicas."
    )
    max_replicas: int = Field(1, ge=1, description="Most replicas the autoscaler may ask for.")
    target_ongoing_requests: float = Field(
        2.0,
        gt=0,
        description="Ongoing requests per replica the autoscaler aims for "
        "(old name: target_num_ongoing_requests_per_replica).",
    )
    metrics_interval_s: float = Field(
        10.0, gt=0, description="How often load is sampled and a decision is made."
    )
    look_back_period_s: float = Field(
        30.0, gt=0, description="Window of samples aggregated into one load figure."
    )
    smoothing_factor: float = Field(
        1.0, gt=0, description="Gain for both directions when no specific factor is set."
    )
    upscale_smoothing_factor: float | None = Field(
        None, gt=0, description="Deprecated spelling of upscaling_factor."
    )
    downscale_smoothing_factor: float | None = Field(
        None, gt=0, description="Deprecated spelling of downscaling_factor."
    )
    upscaling_factor: float | None = Field(
        None, gt=0, description="Gain on each upscale step (1 = jump to the desired count)."
    )
    downscaling_factor: float | None = Field(
        None, gt=0, description="Gain on each downscale step (<1 = remove replicas slowly)."
    )
    downscale_delay_s: float = Field(
        600.0, ge=0, description="How long a wish to scale down must last before it applies."
    )
    downscale_to_zero_delay_s: float | None = Field(
        None, ge=0, description="Delay for the 1 -> 0 step; None means downscale_delay_s."
    )
    upscale_delay_s: float = Field(
        30.0, ge=0, description="How long a wish to scale up must last before it applies."
    )
    aggregation_function: Literal["mean", "max", "min"] = Field(
        "mean", description="How the samples in the look-back window are combined."
    )

    @model_validator(mode="before")
    @classmethod
    def _old_target_name(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or _OLD_TARGET not in data:
            return data
        data = dict(data)
        old = data.pop(_OLD_TARGET)
        new = data.get("target_ongoing_requests")
        if new is not None and new != old:
            raise ValueError(
                f"target_ongoing_requests ({new!r}) and its old name {_OLD_TARGET} ({old!r}) "
                "were both given with different values; give only target_ongoing_requests"
            )
        warnings.warn(
            f"{_OLD_TARGET} is deprecated; use target_ongoing_requests",
            DeprecationWarning,
            stacklevel=2,
        )
        data["target_ongoing_requests"] = old
        return data

    @field_validator("aggregation_function", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return getattr(v, "value", v).lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        lo, hi, init = self.min_replicas, self.max_replicas, self.initial_replicas
        if lo > hi:
            raise ValueError(f"min_replicas ({lo}) must be <= max_replicas ({hi})")
        if init is not None and not lo <= init <= hi:
            raise ValueError(
                f"initial_replicas ({init}) must be within [min_replicas ({lo}), "
                f"max_replicas ({hi})]"
            )
        return self

    def get_upscaling_factor(self) -> float:
        """upscaling_factor, else upscale_smoothing_factor, else smoothing_factor."""
        return self.upscaling_factor or self.upscale_smoothing_factor or self.smoothing_factor

    def get_downscaling_factor(self) -> float:
        """downscaling_factor, else downscale_smoothing_factor, else smoothing_factor."""
        return self.downscaling_factor or self.downscale_smoothing_factor or self.smoothing_factor


def auto_autoscaling_config(overrides: Mapping[str, Any] | None = None) -> AutoscalingConfig:
    """The config Ray uses for `num_replicas="auto"`, with `overrides` applied on top.

    Ray changes min_replicas=1, max_replicas=100, target_ongoing_requests=2 (the other fields
    keep their defaults); at deployment level it pairs this with max_ongoing_requests=5
    (`AUTO_MAX_ONGOING_REQUESTS`), which is also the plain default since Ray 2.32.
    """
    base: dict[str, Any] = {"min_replicas": 1, "max_replicas": 100, "target_ongoing_requests": 2.0}
    if overrides:
        over = dict(overrides)
        if _OLD_TARGET in over and "target_ongoing_requests" not in over:
            over["target_ongoing_requests"] = over.pop(_OLD_TARGET)
        base.update(over)
    return AutoscalingConfig.model_validate(base)


def initial_target(config: AutoscalingConfig) -> int:
    """Replicas to start with: initial_replicas if set, else min_replicas."""
    return config.min_replicas if config.initial_replicas is None else config.initial_replicas


@dataclass(frozen=True)
class PolicyState:
    """What `decide` carries between calls: the pending wish and when it began.

    direction is +1 (wants up), -1 (wants down) or 0 (content); since is the `now` of the
    first call that saw the current wish (None when content).
    """

    direction: int = 0
    since: float | None = None


@dataclass(frozen=True)
class Decision:
    """Outcome of one `decide` call."""

    target: int  # desired replica count, within [min_replicas, max_replicas]
    reason: str  # human-readable explanation
    state: PolicyState  # pass back to the next call


def aggregate_load(
    config: AutoscalingConfig, samples: Sequence[tuple[float, float]], now: float
) -> float | None:
    """Aggregate the samples with now - look_back_period_s < t <= now; None if there are none.

    Samples are taken as evenly spaced, so the mean is a plain arithmetic mean.
    """
    start = now - config.look_back_period_s
    window = [v for t, v in samples if start < t <= now + _EPS]
    if not window:
        return None
    if config.aggregation_function == "max":
        return max(window)
    if config.aggregation_function == "min":
        return min(window)
    return sum(window) / len(window)


def _latest(samples: Sequence[tuple[float, float]], now: float, look_back: float) -> float:
    recent = [(t, v) for t, v in samples if now - look_back < t <= now + _EPS]
    return max(recent, key=lambda s: s[0])[1] if recent else 0.0


def _clamp(n: int, config: AutoscalingConfig) -> int:
    return max(config.min_replicas, min(config.max_replicas, n))


def desired_replicas(avg_ongoing: float, config: AutoscalingConfig, current: int) -> int:
    """Replicas wanted for `avg_ongoing` total requests, stepping from `current` by the gain.

    Raw desire is avg_ongoing / target_ongoing_requests; the step from `current` is
    multiplied by the upscaling or downscaling factor and rounded up. A damped downscale
    that would not move removes one replica. Not clamped; `current` is the running count.
    """
    raw = max(0.0, avg_ongoing) / config.target_ongoing_requests
    delta = raw - current
    gain = config.get_upscaling_factor() if delta > 0 else config.get_downscaling_factor()
    n = math.ceil(current + gain * delta - _EPS)
    if math.ceil(raw - _EPS) < current and n >= current:
        n = current - 1
    return max(0, n)


def decide(
    config: AutoscalingConfig,
    samples: Sequence[tuple[float, float]],
    current_target: int,
    running: int,
    now: float,
    state: PolicyState | None,
) -> Decision:
    """One autoscaling step; pure (the caller supplies the clock and keeps `state`).

    samples: (monotonic time, total ongoing requests of the deployment) pairs, any order.
    current_target: the count the controller aims for now; running: replicas running now.
    A `current_target` outside [min, max] (e.g. after a config change) is clamped at once.
    No samples in the window: hold `current_target` and reset the delay timer (no evidence).
    Scale from zero looks at the latest sample in the window (a request still waiting).
    """
    state = state or PolicyState()
    cur = current_target
    if cur != _clamp(cur, config):
        new = _clamp(cur, config)
        return Decision(new, f"target {cur} outside [min, max]: {cur} -> {new}", PolicyState())
    load = aggregate_load(config, samples, now)
    if load is None:
        return Decision(cur, "no samples in look-back window: hold", PolicyState())

    # Scale from zero: skip the delay as soon as a request is waiting.
    if running <= 0 or cur <= 0:
        latest = _latest(samples, now, config.look_back_period_s)
        if latest <= 0:
            return Decision(cur, f"no request waiting, {running} running: hold {cur}", state)
        new = _clamp(max(1, cur, math.ceil(config.get_upscaling_factor() - _EPS)), config)
        why = f"{latest:g} ongoing with {running} running"
        what = f"scale from zero: {cur} -> {new}" if new != cur else f"hold {cur} until one runs"
        return Decision(new, f"{why}: {what}", PolicyState())

    per = load / running
    want = _clamp(desired_replicas(load, config, running), config)
    if want > cur:
        direction, delay, delay_name = 1, config.upscale_delay_s, "upscale_delay_s"
    elif want < cur:
        direction = -1
        if cur == 1 and config.downscale_to_zero_delay_s is not None:
            delay, delay_name = config.downscale_to_zero_delay_s, "downscale_to_zero_delay_s"
        else:
            delay, delay_name = config.downscale_delay_s, "downscale_delay_s"
        if cur > 1:
            want = max(1, want)  # 1 -> 0 is its own step, with its own delay
    else:
        direction = 0
    target = config.target_ongoing_requests
    sign = ">" if per > target else "<" if per < target else "=="
    head = f"avg ongoing {load:.1f} over {running} replicas ({per:.2f}/replica) {sign} target {target:g}"
    if direction == 0:
        return Decision(cur, f"{head}: steady at {cur}", PolicyState())

    since = state.since if state.direction == direction and state.since is not None else now
    waited = now - since
    if waited + _EPS >= delay:
        reason = f"{head} for {waited:.1f}s >= {delay_name} {delay:g}: {cur} -> {want}"
        return Decision(want, reason, PolicyState())
    reason = f"{head} for {waited:.1f}s < {delay_name} {delay:g}: hold {cur} (wants {want})"
    return Decision(cur, reason, PolicyState(direction, since))
