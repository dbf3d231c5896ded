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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)

__all__ = [
    "AUTO_MAX_ONGOING_REQUESTS",
    "AutoscalingConfig",
    "AutoscalingContext",
    "AutoscalingPolicy",
    "Decision",
    "PolicyState",
    "TimeStampedValue",
    "aggregate_load",
    "apply_custom",
    "auto_autoscaling_config",
    "decide",
    "desired_replicas",
    "initial_target",
    "latency_wanted",
]

_OLD_TARGET = "target_num_ongoing_requests_per_replica"
_EPS = 1e-9  # tolerance for float clocks and float rounding

#: `max_ongoing_requests` Ray pairs with `num_replicas="auto"` (also its plain default).
AUTO_MAX_ONGOING_REQUESTS = 5


#: Prefix of a callable policy function in its wire form (cloudpickled, base64).
PICKLED_POLICY = "cloudpickle:"


class AggregationFunction(str, Enum):
    """How `aggregation_function` combines each replica's samples over the look-back window."""

    MEAN = "mean"
    MAX = "max"
    MIN = "min"


class AutoscalingPolicy(BaseModel):
    """A custom autoscaling policy (Ray's `ray.serve.config.AutoscalingPolicy`).

    `policy_function`: "module:function" (imported where the controller runs) or a callable;
    a callable travels cloudpickled, as deployment code does, and is loaded by the head. A
    class (Ray 2.60) is made once with `policy_kwargs` and the instance called each tick.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    policy_function: str | Callable[..., Any]
    policy_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("policy_kwargs")
    @classmethod
    def _kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        from flotilla._private.args import json_only

        return json_only(v)

    @field_validator("policy_function")
    @classmethod
    def _form(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.startswith(PICKLED_POLICY) and ":" not in v and "." not in v:
            raise ValueError(f"policy_function {v!r}: expected 'module:function' or a callable")
        return v

    @field_serializer("policy_function", when_used="json")
    def _wire(self, v: Any) -> str:
        if isinstance(v, str):
            return v
        import base64

        import cloudpickle

        return PICKLED_POLICY + base64.b64encode(cloudpickle.dumps(v)).decode()

    def get_policy(self) -> Callable[..., Any]:
        """The policy function (imported or unpickled)."""
        v = self.policy_function
        if not isinstance(v, str):
            return v
        if v.startswith(PICKLED_POLICY):
            import base64

            import cloudpickle

            return cloudpickle.loads(base64.b64decode(v[len(PICKLED_POLICY):]))  # type: ignore[no-any-return]
        import importlib

        mod, _, attr = v.partition(":") if ":" in v else v.rpartition(".")
        fn = importlib.import_module(mod)
        for part in attr.split("."):
            fn = getattr(fn, part)
        return fn  # type: ignore[return-value]


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
    target_latency_ms: float | None = Field(
        None, gt=0, description="p95 of the time from a request's arrival at a router to its "
        "reply to aim below (flotilla); with or instead of target_ongoing_requests.",
    )
    target_queue_delay_ms: float | None = Field(
        None, gt=0, description="p95 of the time requests wait (router + replica queue) before a "
        "replica starts them, to aim below (flotilla).",
    )
    policy: AutoscalingPolicy | None = Field(
        None, description="A custom policy (Ray's AutoscalingPolicy): policy_function is "
        "'module:function' or a callable taking an AutoscalingContext.",
    )

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        # Latency targets only: leave target_ongoing_requests out, so it stays unset (and the
        # ongoing rule only permits scale-down) wherever the dumped config is read back.
        data = handler(self)
        if self.latency_only and isinstance(data, dict):
            data.pop("target_ongoing_requests", None)
        return data

    @property
    def uses_latency(self) -> bool:
        """A latency or queue-delay target is set (replicas then keep latency samples)."""
        return self.target_latency_ms is not None or self.target_queue_delay_ms is not None

    @property
    def latency_only(self) -> bool:
        """Latency targets given and target_ongoing_requests left unset: the ongoing-requests
        rule then only permits scale-down, it never scales up."""
        return self.uses_latency and "target_ongoing_requests" not in self.model_fields_set

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

    @field_validator("metrics_interval_s")
    @classmethod
    def _metrics_interval_deprecated(cls, v: float) -> float:
        if v != 10.0:
            warnings.warn(
                "The `metrics_interval_s` field in AutoscalingConfig is deprecated (as in Ray Serve, "
                "whose replicas and handles push their load at intervals set by environment "
                "variables); flotilla still samples the load at this interval.", DeprecationWarning, stacklevel=2)
        return v

    def get_target_ongoing_requests(self) -> float:
        """target_ongoing_requests (Ray's accessor)."""
        return self.target_ongoing_requests

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
    desired: int | None = None  # what the load asks for, before bounds and delays (None: target)


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
    return scaled_step(max(0.0, avg_ongoing) / config.target_ongoing_requests, config, current)


def scaled_step(raw: float, config: AutoscalingConfig, current: int) -> int:
    """The step from `current` toward `raw` replicas, times the upscaling or downscaling
    factor, rounded up; a damped downscale that would not move removes one. Not clamped."""
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
    latency: tuple[float | None, float | None] = (None, None),
) -> Decision:
    """One autoscaling step; pure (the caller supplies the clock and keeps `state`).

    samples: (monotonic time, total ongoing requests of the deployment) pairs, any order.
    current_target: the count the controller aims for now; running: replicas running now.
    A `current_target` outside [min, max] (e.g. after a config change) is clamped at once.
    No samples in the window: hold `current_target` and reset the delay timer (no evidence).
    Scale from zero looks at the latest sample in the window (a request still waiting).
    latency: the observed (p95 latency ms, p95 queue delay ms) over the look-back window,
    None where there were no requests; used when the config sets those targets.
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
    want = desired_replicas(load, config, running)
    lat_why = ""
    if config.uses_latency:
        want, lat_why = _with_latency(config, want, running, latency)
    target = config.target_ongoing_requests
    sign = ">" if per > target else "<" if per < target else "=="
    head = f"avg ongoing {load:.1f} over {running} replicas ({per:.2f}/replica) {sign} target {target:g}{lat_why}"
    return _delayed(want, _clamp(want, config), cur, config, state, now, head)


def _delayed(desired: int, want: int, cur: int, config: AutoscalingConfig, state: PolicyState,
             now: float, head: str) -> Decision:
    """`want` (clamped) against the current target `cur`, once the wish has lasted its delay
    (upscale_delay_s, downscale_delay_s, or downscale_to_zero_delay_s for 1 -> 0)."""
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
    if direction == 0:
        return Decision(cur, f"{head}: steady at {cur}", PolicyState(), desired)

    since = state.since if state.direction == direction and state.since is not None else now
    waited = now - since
    if waited + _EPS >= delay:
        reason = f"{head} for {waited:.1f}s >= {delay_name} {delay:g}: {cur} -> {want}"
        return Decision(want, reason, PolicyState(), desired)
    reason = f"{head} for {waited:.1f}s < {delay_name} {delay:g}: hold {cur} (wants {want})"
    return Decision(cur, reason, PolicyState(direction, since), desired)


#: Latency well below its target ("comfortably"): below this share of it, scale-down may go.
COMFORT = 0.5
#: Most a latency rule multiplies the replica count by in one step.
MAX_LATENCY_STEP = 2.0


def latency_wanted(p95: float | None, target: float | None, running: int) -> int | None:
    """Replicas one latency rule wants: above target, running * p95/target (at most doubled,
    at least one more); below COMFORT * target, one fewer; else hold. None: no opinion (no
    target, or no requests in the window)."""
    if target is None or p95 is None:
        return None
    if p95 > target:
        return max(running + 1, math.ceil(running * min(MAX_LATENCY_STEP, p95 / target) - _EPS))
    if p95 < COMFORT * target:
        return max(0, running - 1)
    return running


def _with_latency(config: AutoscalingConfig, ongoing_want: int, running: int,
                  latency: tuple[float | None, float | None]) -> tuple[int, str]:
    """Combine the ongoing-requests wish with the latency rules: the max of the wishes, so
    any rule can scale up and scale-down needs all of them to allow it. With latency targets
    only, the ongoing rule may only hold or lower the count (its permission to go down)."""
    lat, queue = latency
    wants = [w for w in (latency_wanted(lat, config.target_latency_ms, running),
                         latency_wanted(queue, config.target_queue_delay_ms, running)) if w is not None]
    parts = []
    if config.target_latency_ms is not None:
        parts.append(f"p95 latency {'-' if lat is None else f'{lat:.1f}'} ms (target {config.target_latency_ms:g})")
    if config.target_queue_delay_ms is not None:
        parts.append(f"p95 queue delay {'-' if queue is None else f'{queue:.1f}'} ms "
                     f"(target {config.target_queue_delay_ms:g})")
    why = "; " + ", ".join(parts)
    if config.latency_only:
        ongoing_want = min(ongoing_want, running)
    return max([ongoing_want, *wants]), why


class TimeStampedValue(NamedTuple):
    """One sample of a metric: `timestamp` (seconds, the controller's clock) and `value`."""

    timestamp: float
    value: float


class AutoscalingContext:
    """What a custom policy is given each tick (Ray's `ray.serve.config.AutoscalingContext`,
    built with the same keywords).

    Metrics are keyed by metric name, then by replica id. `aggregated_metrics` holds the mean
    of each replica's samples over `look_back_period_s`; `raw_metrics` the samples. The
    built-in "ongoing requests" figures are the latest sample. `total_num_requests`,
    `total_queued_requests` and the two metric maps may be given as callables, called when
    read (as in Ray); `total_running_requests` is the total less the queued.
    flotilla adds the observed p95 latency and queue delay (ms, None without requests in the
    window).
    """

    def __init__(
        self,
        deployment_id: Any,
        deployment_name: str,
        app_name: str | None,
        current_num_replicas: int,
        target_num_replicas: int,
        running_replicas: list[Any],
        total_num_requests: float | Callable[[], float],
        total_queued_requests: float | Callable[[], float] | None,
        aggregated_metrics: dict[str, dict[Any, float]] | Callable[[], Any] | None,
        raw_metrics: dict[str, dict[Any, list[TimeStampedValue]]] | Callable[[], Any] | None,
        capacity_adjusted_min_replicas: int,
        capacity_adjusted_max_replicas: int,
        policy_state: dict[str, Any],
        last_scale_up_time: float | None,
        last_scale_down_time: float | None,
        current_time: float | None,
        config: Any | None,
        *,
        latency_p95_ms: float | None = None,
        queue_delay_p95_ms: float | None = None,
    ) -> None:
        self.deployment_id = deployment_id
        self.deployment_name = deployment_name
        self.app_name = app_name
        self.current_num_replicas = current_num_replicas
        self.target_num_replicas = target_num_replicas
        self.running_replicas = running_replicas
        self._total = total_num_requests
        self._queued = total_queued_requests
        self._aggregated = aggregated_metrics
        self._raw = raw_metrics
        self.capacity_adjusted_min_replicas = capacity_adjusted_min_replicas
        self.capacity_adjusted_max_replicas = capacity_adjusted_max_replicas
        self.policy_state = policy_state
        self.last_scale_up_time = last_scale_up_time
        self.last_scale_down_time = last_scale_down_time
        self.current_time = current_time
        self.config = config
        self.latency_p95_ms = latency_p95_ms
        self.queue_delay_p95_ms = queue_delay_p95_ms

    @staticmethod
    def _read(value: Any) -> Any:
        return value() if callable(value) else value

    @property
    def total_num_requests(self) -> float:
        """Ongoing requests (running and queued) across the deployment."""
        return float(self._read(self._total))

    @property
    def total_queued_requests(self) -> float | None:
        """Requests waiting in routers for a replica."""
        return self._read(self._queued)

    @property
    def total_running_requests(self) -> float:
        """Requests running on replicas."""
        return max(0.0, self.total_num_requests - (self.total_queued_requests or 0.0))

    @property
    def aggregated_metrics(self) -> dict[str, dict[Any, float]] | None:
        return self._read(self._aggregated)

    @property
    def raw_metrics(self) -> dict[str, dict[Any, list[TimeStampedValue]]] | None:
        return self._read(self._raw)

    def __repr__(self) -> str:
        return (f"AutoscalingContext(deployment_name={self.deployment_name!r}, app_name={self.app_name!r}, "
                f"current_num_replicas={self.current_num_replicas}, target_num_replicas={self.target_num_replicas}, "
                f"total_num_requests={self.total_num_requests:g})")


def apply_app_policy(result: Any, contexts: dict[Any, AutoscalingContext],
                     delays: Mapping[Any, PolicyState | None] | None = None,
                     ) -> tuple[dict[Any, Decision], dict[Any, dict[str, Any]]]:
    """Turn an application-level policy's return value into a Decision per deployment (pure).

    Ray's shape is `({deployment_id: target}, {deployment_id: policy_state})` (the state may be
    None or {}); each target gets the deployment's standard parameters as `apply_custom` gives
    them (a deployment with none running and a request waiting scales from zero at once;
    `delays`: each deployment's delay progress). Deployments the policy leaves out keep their
    targets; ids that are not among its deployments are dropped (as Ray drops them). Raises
    TypeError on another shape."""
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(f"the application policy returned {type(result).__name__}; expected "
                        "({deployment_id: target_replicas}, {deployment_id: policy_state})")
    decisions, states = result
    if not isinstance(decisions, dict):
        raise TypeError(f"the application policy's decisions are a {type(decisions).__name__}, not a dict")
    states = states or {}
    if not isinstance(states, dict) or not all(isinstance(v, dict) for v in states.values()):
        raise TypeError("the application policy's state must be a dict of deployment id -> dict")
    out: dict[Any, Decision] = {}
    for did, target in decisions.items():
        ctx = contexts.get(did)
        if ctx is None:
            continue
        out[did] = cold_start(ctx) or apply_custom((target, states.get(did, {})), ctx, (delays or {}).get(did))[0]
    return out, {did: dict(states[did]) for did in contexts if did in states}  # replaced whole, as Ray


def cold_start(ctx: AutoscalingContext) -> Decision | None:
    """Ray 2.60's fast path for a custom policy: no replica running and a request waiting
    scale up at once (the policy is not asked): max(ceil(upscaling_factor), target)."""
    if ctx.current_num_replicas == 0 and ctx.total_num_requests > 0:
        cfg = ctx.config
        n = _bounded(max(math.ceil((cfg.get_upscaling_factor() if cfg is not None else 1.0) - _EPS),
                         ctx.target_num_replicas), ctx)
        return Decision(n, f"{ctx.total_num_requests:g} waiting with none running: scale from zero to {n}", PolicyState())
    return None


def apply_custom(result: Any, ctx: AutoscalingContext, delay: PolicyState | None = None) -> tuple[Decision, dict[str, Any]]:
    """Turn a policy function's return value into a Decision (pure), as Ray 2.60 does: its
    "raw desired" count gets the config's standard parameters on top (the scaling factors
    from the running count, the capacity-adjusted bounds, and the upscale / downscale /
    downscale-to-zero delays, whose progress `delay` carries; with none running it applies
    at once). Ray's shape is `(target, policy_state)`; a bare number is accepted too (state
    kept). Raises TypeError on another shape."""
    state = ctx.policy_state
    if isinstance(result, tuple) and len(result) == 2:
        result, state = result
        if not isinstance(state, dict):
            raise TypeError(f"the policy returned a policy_state of type {type(state).__name__}, not a dict")
    if isinstance(result, bool) or not isinstance(result, (int, float)) or result != result:
        raise TypeError(f"the policy returned {result!r}; expected (target_replicas, policy_state)")
    cur, running, cfg = ctx.target_num_replicas, ctx.current_num_replicas, ctx.config
    head = f"custom policy asked for {result:g}"
    if cfg is None or running <= 0:  # from zero (or no config to apply): at once
        target = _bounded(math.ceil(max(0.0, result) - _EPS), ctx)
        what = f"{cur} -> {target}" if target != cur else f"steady at {cur}"
        return Decision(target, f"{head}: {what}", PolicyState(), target), state
    step = scaled_step(max(0.0, float(result)), cfg, running)
    return _delayed(step, _bounded(step, ctx), cur, cfg, delay or PolicyState(), ctx.current_time or 0.0, head), state


def _bounded(n: int, ctx: AutoscalingContext) -> int:
    """`n` within the context's capacity-adjusted [min, max]."""
    return max(ctx.capacity_adjusted_min_replicas, min(ctx.capacity_adjusted_max_replicas, n))
