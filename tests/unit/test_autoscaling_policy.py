"""The autoscaling config model and the pure policy, driven by synthetic load traces."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
from pydantic import ValidationError

from flotilla._private.autoscaling import (
    AUTO_MAX_ONGOING_REQUESTS,
    AutoscalingConfig,
    Decision,
    PolicyState,
    aggregate_load,
    auto_autoscaling_config,
    decide,
    desired_replicas,
    initial_target,
)

# ---------------------------------------------------------------------------------------
# A fake controller: sample the load and call decide() every metrics_interval_s.
# ---------------------------------------------------------------------------------------


def simulate(
    config: AutoscalingConfig,
    load: Callable[[float], float],
    t_end: float,
    start: int,
    startup_ticks: int = 0,
) -> list[tuple[float, int, Decision]]:
    """Tick from t=0 to t_end, feeding back target and state like a controller.

    A target decided at one tick is running at the next, plus `startup_ticks` more ticks.
    """
    interval = config.metrics_interval_s
    samples: list[tuple[float, float]] = []
    target, state = start, None
    history: list[int] = [start]  # target after each tick, to derive `running`
    out = []
    for k in range(round(t_end / interval) + 1):
        now = k * interval
        samples.append((now, load(now)))
        running = history[max(0, len(history) - 1 - startup_ticks)]
        d = decide(config, samples, target, running, now, state)
        target, state = d.target, d.state
        history.append(target)
        out.append((now, target, d))
    return out


def first_change(trace: list[tuple[float, int, Decision]], start: int) -> tuple[float, int]:
    for now, target, _ in trace:
        if target != start:
            return now, target
    raise AssertionError("target never changed")


def cfg(**kw) -> AutoscalingConfig:
    base = dict(
        min_replicas=1,
        max_replicas=20,
        target_ongoing_requests=2,
        metrics_interval_s=5,
        look_back_period_s=5,
        upscale_delay_s=30,
        downscale_delay_s=600,
    )
    base.update(kw)
    return AutoscalingConfig(**base)


def step(at: float, high: float, low: float = 0.0) -> Callable[[float], float]:
    return lambda t: high if t >= at else low


# ---------------------------------------------------------------------------------------
# Traces
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [0.0, 5.0, 30.0, 60.0])
def test_step_reaches_target_after_exactly_the_upscale_delay(delay):
    c = cfg(upscale_delay_s=delay)
    trace = simulate(c, step(100, 12.0, 2.0), 400, start=1)
    at, target = first_change(trace, 1)
    assert at == 100 + delay
    assert target == 6  # 12 ongoing / target 2
    assert all(t == 6 for now, t, _ in trace if now >= at)


def test_step_averages_over_the_look_back_window():
    # Window of 10 s with 5 s ticks: the first high tick averages 2 and 12 -> 7 -> 4 replicas.
    c = cfg(look_back_period_s=10, upscale_delay_s=0)
    trace = simulate(c, step(100, 12.0, 2.0), 200, start=1)
    by_time = {now: t for now, t, _ in trace}
    assert by_time[95] == 1
    assert by_time[100] == 4
    assert by_time[105] == 6
    assert by_time[200] == 6


def test_spike_shorter_than_upscale_delay_does_not_scale_up():
    def spikes(t: float) -> float:  # two 20 s spikes with a 10 s gap, delay is 30 s
        return 50.0 if 100 <= t < 120 or 130 <= t < 150 else 1.0

    trace = simulate(cfg(upscale_delay_s=30), spikes, 400, start=1)
    assert {t for _, t, _ in trace} == {1}
    # While the spike lasts the policy wants more and says so.
    spike_reason = next(d.reason for now, _, d in trace if now == 115)
    assert "upscale_delay_s" in spike_reason and "hold 1" in spike_reason


def test_ramp_grows_target_monotonically_with_load():
    c = cfg(upscale_delay_s=10, max_replicas=50)
    trace = simulate(c, lambda t: t / 10, 600, start=1)
    targets = [t for _, t, _ in trace]
    assert all(a <= b for a, b in itertools.pairwise(targets))
    assert targets[-1] >= 25  # 60 ongoing / 2 = 30 at the end, delay lags a little
    assert targets[-1] <= 30


@pytest.mark.parametrize(
    ("min_replicas", "to_zero_delay", "expected"),
    [
        (1, None, [(0, 5), (595, 5), (600, 1), (3000, 1)]),
        (2, None, [(595, 5), (600, 2), (3000, 2)]),
        # min 0: 5 -> 1 after downscale_delay_s; 1 -> 0 is a second wish, timed from the next tick.
        (0, None, [(600, 1), (1200, 1), (1205, 0), (3000, 0)]),
        (0, 120.0, [(600, 1), (720, 1), (725, 0), (3000, 0)]),
        (0, 0.0, [(600, 1), (605, 0)]),
    ],
)
def test_long_idle_scales_down_to_min_after_the_downscale_delay(
    min_replicas, to_zero_delay, expected
):
    c = cfg(min_replicas=min_replicas, downscale_to_zero_delay_s=to_zero_delay)
    trace = simulate(c, lambda t: 0.0, 3000, start=5)
    by_time = {now: t for now, t, _ in trace}
    for now, target in expected:
        assert by_time[now] == target, (now, by_time[now])
    assert by_time[595] == 5


def test_flapping_load_keeps_target_put():
    def flap(t: float) -> float:  # 10 s at 12, 10 s at 0: faster than either delay
        return 12.0 if int(t // 10) % 2 == 0 else 0.0

    c = cfg(upscale_delay_s=30, downscale_delay_s=60)
    trace = simulate(c, flap, 2000, start=3)
    assert {t for _, t, _ in trace} == {3}
    assert {d.state.direction for _, _, d in trace} == {1, -1}


@pytest.mark.parametrize(
    ("factors", "expected"),
    [
        ({}, 20),
        ({"upscaling_factor": 0.5}, 11),  # 2 + 0.5 * (20 - 2)
        ({"upscaling_factor": 0.25}, 7),  # ceil(2 + 4.5)
        ({"upscaling_factor": 2.0}, 38),
        ({"smoothing_factor": 0.5}, 11),
        ({"upscale_smoothing_factor": 0.25}, 7),
        ({"smoothing_factor": 0.5, "upscaling_factor": 0.25}, 7),
        ({"downscaling_factor": 0.1}, 20),  # only the upscale gain matters going up
    ],
)
def test_upscaling_gain(factors, expected):
    c = cfg(upscale_delay_s=0, max_replicas=100, **factors)
    d = decide(c, [(0.0, 40.0)], current_target=2, running=2, now=0.0, state=None)
    assert d.target == expected


@pytest.mark.parametrize(
    ("factors", "expected"),
    [
        ({}, 2),
        ({"downscaling_factor": 0.5}, 6),  # ceil(10 - 0.5 * 8)
        ({"downscale_smoothing_factor": 0.5}, 6),
        ({"smoothing_factor": 0.5}, 6),
        ({"downscaling_factor": 0.01}, 9),  # too small to move: drop one replica
        ({"upscaling_factor": 0.1}, 2),
    ],
)
def test_downscaling_gain(factors, expected):
    c = cfg(downscale_delay_s=0, **factors)
    d = decide(c, [(0.0, 4.0)], current_target=10, running=10, now=0.0, state=None)
    assert d.target == expected


def test_half_gain_takes_about_half_the_step_then_converges():
    c = cfg(upscale_delay_s=0, upscaling_factor=0.5, max_replicas=100)
    trace = simulate(c, step(0, 40.0), 100, start=2)
    targets = [t for _, t, _ in trace]
    assert targets[0] == 11  # half of the way from 2 to 20
    assert targets[1] == 16  # running 11 -> half of the rest
    assert targets[-1] == 20
    assert all(a <= b for a, b in itertools.pairwise(targets))


@pytest.mark.parametrize(
    ("upscaling_factor", "expected"), [(None, 1), (0.3, 1), (1.0, 1), (3.0, 3)]
)
def test_scale_from_zero_is_immediate(upscaling_factor, expected):
    c = cfg(min_replicas=0, upscale_delay_s=300, upscaling_factor=upscaling_factor)
    d = decide(c, [(10.0, 1.0)], current_target=0, running=0, now=10.0, state=None)
    assert d.target == expected
    assert "scale from zero" in d.reason
    assert d.state == PolicyState()


def test_scale_from_zero_trace_then_normal_delays():
    # The replica runs 3 ticks after it is asked for; meanwhile the target stays at 1.
    c = cfg(min_replicas=0, upscale_delay_s=30, downscale_delay_s=60)
    trace = simulate(c, step(100, 12.0), 300, start=0, startup_ticks=2)
    by_time = {now: t for now, t, _ in trace}
    assert by_time[95] == 0
    assert by_time[100] == 1  # at once, no upscale delay
    assert by_time[105] == by_time[110] == 1  # replica still starting
    # Running from t=115 (1 replica, 12 ongoing): wants 6, waits upscale_delay_s.
    assert by_time[140] == 1
    assert by_time[145] == 6
    assert by_time[300] == 6


def test_zero_stays_zero_without_requests():
    c = cfg(min_replicas=0)
    d = decide(c, [(0.0, 0.0), (5.0, 0.0)], current_target=0, running=0, now=5.0, state=None)
    assert d.target == 0


def test_target_zero_with_draining_replica_wakes_at_once():
    c = cfg(min_replicas=0, upscale_delay_s=30)
    d = decide(c, [(5.0, 3.0)], current_target=0, running=1, now=5.0, state=None)
    assert d.target == 1


@pytest.mark.parametrize(("load", "expected"), [(1000.0, 8), (16.0, 8), (14.0, 7)])
def test_clamped_to_max(load, expected):
    c = cfg(max_replicas=8, upscale_delay_s=0)
    d = decide(c, [(0.0, load)], current_target=2, running=2, now=0.0, state=None)
    assert d.target == expected


def test_clamped_to_min_and_current_target_out_of_bounds_is_snapped():
    c = cfg(min_replicas=3, max_replicas=5, downscale_delay_s=0)
    assert decide(c, [(0.0, 0.0)], 4, 4, 0.0, None).target == 3
    assert decide(c, [(0.0, 0.0)], 9, 9, 0.0, None).target == 5  # e.g. max lowered
    assert decide(c, [(0.0, 0.0)], 1, 1, 0.0, None).target == 3


def test_no_samples_in_window_holds_and_resets_timer():
    c = cfg(look_back_period_s=10)
    pending = PolicyState(direction=1, since=0.0)
    d = decide(c, [(0.0, 100.0)], current_target=2, running=2, now=50.0, state=pending)
    assert d.target == 2
    assert d.state == PolicyState()
    assert "no samples" in d.reason
    assert decide(c, [], 2, 2, 50.0, None).target == 2


def test_samples_outside_window_ignored_and_order_free():
    c = cfg(look_back_period_s=10)
    samples = [(100.0, 8.0), (0.0, 1000.0), (95.0, 4.0), (90.0, 999.0), (101.0, 999.0)]
    assert aggregate_load(c, samples, 100.0) == 6.0  # 95 and 100 only
    assert (
        aggregate_load(cfg(aggregation_function="max", look_back_period_s=10), samples, 100.0)
        == 8.0
    )
    assert (
        aggregate_load(cfg(aggregation_function="MIN", look_back_period_s=10), samples, 100.0)
        == 4.0
    )


def test_wish_timer_is_carried_and_reported():
    c = cfg(upscale_delay_s=30)
    d1 = decide(c, [(10.0, 12.0)], 3, 3, 10.0, None)
    assert (d1.target, d1.state) == (3, PolicyState(1, 10.0))
    d2 = decide(c, [(40.0, 12.0)], 3, 3, 40.0, d1.state)
    assert d2.target == 6
    assert d2.reason == (
        "avg ongoing 12.0 over 3 replicas (4.00/replica) > target 2 "
        "for 30.0s >= upscale_delay_s 30: 3 -> 6"
    )
    assert d2.state == PolicyState()
    # A down wish does not inherit an up timer.
    d3 = decide(cfg(downscale_delay_s=30), [(40.0, 0.0)], 3, 3, 40.0, d1.state)
    assert (d3.target, d3.state) == (3, PolicyState(-1, 40.0))


def test_decide_is_pure():
    c = cfg()
    samples = [(0.0, 5.0), (5.0, 9.0)]
    state = PolicyState(1, 0.0)
    a = decide(c, samples, 2, 2, 5.0, state)
    b = decide(c, samples, 2, 2, 5.0, state)
    assert a == b
    assert samples == [(0.0, 5.0), (5.0, 9.0)] and state == PolicyState(1, 0.0)


@pytest.mark.parametrize(
    ("avg", "current", "expected"),
    [(0.0, 4, 0), (3.0, 1, 2), (4.0, 2, 2), (4.1, 2, 3), (6.0, 3, 3), (100.0, 0, 50)],
)
def test_desired_replicas(avg, current, expected):
    assert desired_replicas(avg, cfg(), current) == expected


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


def test_defaults_match_ray():
    c = AutoscalingConfig()
    assert c.model_dump() == {
        "min_replicas": 1,
        "initial_replicas": None,
        "max_replicas": 1,
        "target_ongoing_requests": 2.0,
        "metrics_interval_s": 10.0,
        "look_back_period_s": 30.0,
        "smoothing_factor": 1.0,
        "upscale_smoothing_factor": None,
        "downscale_smoothing_factor": None,
        "upscaling_factor": None,
        "downscaling_factor": None,
        "downscale_delay_s": 600.0,
        "downscale_to_zero_delay_s": None,
        "upscale_delay_s": 30.0,
        "aggregation_function": "mean",
        # flotilla's latency targets; Ray's custom policy (None: the built-in rule)
        "target_latency_ms": None,
        "target_queue_delay_ms": None,
        "policy": None,
    }
    assert c.get_upscaling_factor() == c.get_downscaling_factor() == 1.0
    assert all(f.description for f in AutoscalingConfig.model_fields.values())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("min_replicas", -1),
        ("max_replicas", 0),
        ("initial_replicas", -2),
        ("target_ongoing_requests", 0),
        ("target_ongoing_requests", -1.5),
        ("upscale_delay_s", -1),
        ("downscale_delay_s", -0.5),
        ("downscale_to_zero_delay_s", -3),
        ("smoothing_factor", 0),
        ("upscale_smoothing_factor", -1),
        ("downscale_smoothing_factor", 0),
        ("upscaling_factor", 0),
        ("downscaling_factor", -0.25),
        ("metrics_interval_s", 0),
        ("look_back_period_s", -10),
        ("aggregation_function", "median"),
    ],
)
def test_bad_value_rejected_naming_field(field, value):
    with pytest.raises(ValidationError) as e:
        AutoscalingConfig(**{field: value})
    text = str(e.value)
    assert field in text
    assert repr(value) in text or str(value) in text


@pytest.mark.parametrize(
    ("kw", "names", "values"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, ["min_replicas", "max_replicas"], ["3", "2"]),
        (
            {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 5},
            ["initial_replicas", "max_replicas"],
            ["5", "4"],
        ),
        (
            {"min_replicas": 2, "max_replicas": 4, "initial_replicas": 1},
            ["initial_replicas", "min_replicas"],
            ["1", "2"],
        ),
    ],
)
def test_cross_field_bounds(kw, names, values):
    with pytest.raises(ValidationError) as e:
        AutoscalingConfig(**kw)
    text = str(e.value)
    for s in names + values:
        assert s in text


def test_bounds_edges_accepted():
    c = AutoscalingConfig(min_replicas=0, max_replicas=1, initial_replicas=0, upscale_delay_s=0)
    assert (c.min_replicas, c.initial_replicas) == (0, 0)
    assert AutoscalingConfig(min_replicas=4, max_replicas=4, initial_replicas=4).max_replicas == 4


def test_unknown_field_rejected():
    with pytest.raises(ValidationError) as e:
        AutoscalingConfig(target_ongoing_request=3)
    assert "target_ongoing_request" in str(e.value)
    assert e.value.errors()[0]["type"] == "extra_forbidden"


def test_old_target_name_is_an_alias():
    with pytest.warns(DeprecationWarning):
        c = AutoscalingConfig(target_num_ongoing_requests_per_replica=10)
    assert c.target_ongoing_requests == 10.0
    with pytest.warns(DeprecationWarning):
        c = AutoscalingConfig.model_validate(
            {"target_num_ongoing_requests_per_replica": 7, "target_ongoing_requests": 7}
        )
    assert c.target_ongoing_requests == 7.0
    assert "target_num_ongoing_requests_per_replica" not in c.model_dump()


def test_old_and_new_target_names_disagreeing_is_an_error():
    with pytest.raises(ValidationError) as e:
        AutoscalingConfig(target_num_ongoing_requests_per_replica=10, target_ongoing_requests=3)
    text = str(e.value)
    assert "target_num_ongoing_requests_per_replica" in text and "target_ongoing_requests" in text
    assert "10" in text and "3" in text


def test_old_target_name_validated():
    with pytest.warns(DeprecationWarning), pytest.raises(ValidationError) as e:
        AutoscalingConfig(target_num_ongoing_requests_per_replica=0)
    assert "target_ongoing_requests" in str(e.value)


def test_auto_config_values():
    c = auto_autoscaling_config()
    assert (c.min_replicas, c.max_replicas, c.target_ongoing_requests) == (1, 100, 2.0)
    assert c.model_dump(exclude={"min_replicas", "max_replicas"}) == AutoscalingConfig().model_dump(
        exclude={"min_replicas", "max_replicas"}
    )
    assert initial_target(c) == 1
    assert AUTO_MAX_ONGOING_REQUESTS == 5
    over = auto_autoscaling_config({"max_replicas": 7, "upscale_delay_s": 1})
    assert (over.min_replicas, over.max_replicas, over.upscale_delay_s) == (1, 7, 1.0)


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({}, 1),
        ({"min_replicas": 0}, 0),
        ({"min_replicas": 0, "max_replicas": 5, "initial_replicas": 3}, 3),
        ({"min_replicas": 2, "max_replicas": 5}, 2),
    ],
)
def test_initial_target(kw, expected):
    assert initial_target(AutoscalingConfig(**kw)) == expected


def test_config_is_frozen_and_hashable():
    c = AutoscalingConfig()
    with pytest.raises(ValidationError):
        c.min_replicas = 0  # type: ignore[misc]
    assert hash(c) == hash(AutoscalingConfig())
    assert math.isclose(c.model_copy(update={"smoothing_factor": 0.5}).get_upscaling_factor(), 0.5)


@pytest.mark.parametrize(
    ("load", "current", "target", "desired"),
    [
        (0.0, 2, 2, 0),  # idle: the load asks for none, min_replicas keeps 1 and the delay holds 2
        (20.0, 2, 10, 20),  # over max_replicas: desired says what the load asks for
        (2.0, 2, 2, 2),  # steady
    ],
)
def test_decision_desired_is_the_load_before_bounds_and_delays(load, current, target, desired):
    c = AutoscalingConfig(min_replicas=1, max_replicas=10, target_ongoing_requests=1.0, upscale_delay_s=0,
                          downscale_delay_s=60, look_back_period_s=1, metrics_interval_s=1)
    d = decide(c, [(9.5, load)], current, current, 10.0, None)
    assert (d.target, d.desired) == (target, desired)
