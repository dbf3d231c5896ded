"""Latency-target and custom-policy autoscaling: pure decisions with an injected clock."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flotilla._private import trace
from flotilla._private.autoscaling import (
    AutoscalingConfig,
    AutoscalingContext,
    AutoscalingPolicy,
    apply_custom,
    decide,
    latency_wanted,
)
from flotilla.serve.config import DeploymentConfig


def cfg(**kw: object) -> AutoscalingConfig:
    base: dict[str, object] = {"min_replicas": 1, "max_replicas": 10, "upscale_delay_s": 0.0,
                               "downscale_delay_s": 5.0, "look_back_period_s": 10.0}
    return AutoscalingConfig.model_validate({**base, **kw})


@pytest.mark.parametrize(("p95", "target", "running", "want"), [
    (None, 60.0, 2, None),     # no requests: no opinion
    (80.0, None, 2, None),     # no target
    (61.0, 60.0, 2, 3),        # just above: at least one more
    (90.0, 60.0, 2, 3),        # 2 * 1.5
    (600.0, 60.0, 3, 6),       # at most doubled per step
    (45.0, 60.0, 3, 3),        # between 50% and 100%: hold
    (20.0, 60.0, 3, 2),        # comfortably below: one fewer
    (20.0, 60.0, 0, 0),
])
def test_latency_rule(p95: float | None, target: float | None, running: int, want: int | None) -> None:
    assert latency_wanted(p95, target, running) == want


def samples(load: float, until: float) -> list[tuple[float, float]]:
    return [(float(t), load) for t in range(int(until) + 1)]


# (config, ongoing load, running, current target, (p95 latency, p95 queue), expected target)
TABLE = [
    # latency only: slow requests scale up although the ongoing rule is content
    (dict(target_latency_ms=60), 2.0, 1, 1, (100.0, 5.0), 2),
    # latency only: the ongoing rule never scales up on its own
    (dict(target_latency_ms=60), 40.0, 2, 2, (50.0, 1.0), 2),
    # latency only: comfortably below and few requests -> down (after the delay, below)
    (dict(target_latency_ms=60), 0.5, 3, 3, (10.0, 0.0), 2),
    # latency only: comfortably below but the ongoing rule wants them -> hold
    (dict(target_latency_ms=60, downscaling_factor=1.0), 6.0, 3, 3, (10.0, 0.0), 3),
    # no requests in the window: the ongoing rule's permission alone
    (dict(target_latency_ms=60), 0.0, 3, 3, (None, None), 1),
    # queue-delay target
    (dict(target_queue_delay_ms=10), 2.0, 2, 2, (50.0, 30.0), 4),
    # both targets: the larger wish wins
    (dict(target_latency_ms=60, target_queue_delay_ms=10), 2.0, 2, 2, (70.0, 30.0), 4),
    # ongoing and latency: max of the two
    (dict(target_latency_ms=60, target_ongoing_requests=1), 8.0, 2, 2, (65.0, 1.0), 8),
    (dict(target_latency_ms=60, target_ongoing_requests=1), 2.0, 2, 2, (100.0, 1.0), 4),
    # ongoing says down, latency says hold: hold
    (dict(target_latency_ms=60, target_ongoing_requests=5), 1.0, 3, 3, (45.0, 1.0), 3),
    # clamped to max_replicas
    (dict(target_latency_ms=60, max_replicas=3), 2.0, 2, 2, (1000.0, 1.0), 3),
]


@pytest.mark.parametrize(("kw", "load", "running", "cur", "lat", "want"), TABLE)
def test_decide_with_latency(kw: dict, load: float, running: int, cur: int,
                             lat: tuple[float | None, float | None], want: int) -> None:
    c = cfg(**kw)
    now = 100.0
    d = decide(c, samples(load, now), cur, running, now, None, lat)
    if want < cur:  # down waits out downscale_delay_s, then goes
        assert d.target == cur and d.state.direction == -1
        d = decide(c, samples(load, now + 6), cur, running, now + 6, d.state, lat)
    assert d.target == want, d.reason
    if lat != (None, None) and want != cur:
        assert "p95" in d.reason


def test_upscale_delay_respected() -> None:
    c = cfg(target_latency_ms=60, upscale_delay_s=3.0)
    d = decide(c, samples(2, 10), 1, 1, 10.0, None, (100.0, 1.0))
    assert d.target == 1 and d.state.direction == 1
    d = decide(c, samples(2, 12), 1, 1, 12.0, d.state, (100.0, 1.0))
    assert d.target == 1
    d = decide(c, samples(2, 13), 1, 1, 13.0, d.state, (100.0, 1.0))
    assert d.target == 2
    # latency back under the target: the wish (and its timer) goes
    d = decide(c, samples(2, 14), 1, 1, 14.0, None, (100.0, 1.0))
    d = decide(c, samples(2, 15), 1, 1, 15.0, d.state, (40.0, 1.0))
    assert d.target == 1 and d.state.direction == 0


def test_latency_only_flags_and_validation() -> None:
    assert cfg(target_latency_ms=60).latency_only
    assert not cfg(target_latency_ms=60, target_ongoing_requests=2).latency_only
    assert not cfg().uses_latency
    with pytest.raises(ValidationError):
        cfg(target_latency_ms=0)
    with pytest.raises(ValidationError):
        cfg(policy={"policy_function": "nocolon"})


def ctx(**kw: object) -> AutoscalingContext:
    base: dict[str, object] = dict(
        deployment_id=None, deployment_name="d", app_name="a", current_num_replicas=2, target_num_replicas=2,
        running_replicas=["r1", "r2"], total_num_requests=4.0, total_queued_requests=0.0,
        aggregated_metrics={}, raw_metrics={}, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=5, policy_state={"n": 1}, last_scale_up_time=None,
        last_scale_down_time=None, current_time=0.0, config=None)
    return AutoscalingContext(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(("result", "target", "state"), [
    ((3, {"n": 2}), 3, {"n": 2}),
    ((2.2, {}), 3, {}),          # rounded up
    ((99, {}), 5, {}),           # clamped to max
    ((0, {}), 1, {}),            # and to min
    (4, 4, {"n": 1}),            # a bare number keeps the state
])
def test_apply_custom(result: object, target: int, state: dict) -> None:
    d, st = apply_custom(result, ctx())
    assert d.target == target and st == state


@pytest.mark.parametrize("bad", [("x", {}), (1, "state"), None, float("nan"), True])
def test_apply_custom_rejects(bad: object) -> None:
    with pytest.raises(TypeError):
        apply_custom(bad, ctx())


def _double(ctx: AutoscalingContext) -> tuple[int, dict]:
    return ctx.current_num_replicas * 2, ctx.policy_state


def test_policy_travels_as_import_path_or_pickle() -> None:
    by_path = AutoscalingPolicy(policy_function="tests.unit.test_autoscaling_latency:_double")
    assert by_path.get_policy()(ctx()) == (4, {"n": 1})
    dc = DeploymentConfig(name="d", autoscaling_config={"min_replicas": 1, "max_replicas": 4,
                                              "policy": {"policy_function": lambda c: (3, {})}})
    wire = dc.model_dump(mode="json")["autoscaling_config"]["policy"]["policy_function"]
    assert isinstance(wire, str) and wire.startswith("cloudpickle:")
    back = AutoscalingConfig.model_validate(dc.model_dump(mode="json")["autoscaling_config"])
    assert back.policy is not None and back.policy.get_policy()(ctx()) == (3, {})


def test_latency_ring_p95_over_the_window() -> None:
    ring = trace.LatencyRing(100)
    for i in range(100):
        ring.add(float(i), float(i), i / 10)
    lat, queue, n = ring.p95(window_s=50.0, now=99.0)
    assert n == 50 and lat == 97.0 and queue == pytest.approx(9.7)
    assert ring.p95(1.0, now=500.0) == (None, None, 0)


def test_latency_only_survives_the_wire() -> None:
    """The head reads the dumped config: an unset target_ongoing_requests must stay unset."""
    only = DeploymentConfig(name="d", autoscaling_config={"target_latency_ms": 60, "max_replicas": 3})
    wire = only.model_dump(mode="json")["autoscaling_config"]
    assert "target_ongoing_requests" not in wire
    assert AutoscalingConfig.model_validate(wire).latency_only
    both = DeploymentConfig(name="d", autoscaling_config={"target_latency_ms": 60, "target_ongoing_requests": 2})
    wire = both.model_dump(mode="json")["autoscaling_config"]
    assert wire["target_ongoing_requests"] == 2 and not AutoscalingConfig.model_validate(wire).latency_only


def test_config_files_name_policies_by_import_path() -> None:
    from flotilla.serve.deploy_schema import DeploymentSchema

    ok = DeploymentSchema(name="d", autoscaling_config={"policy": {"policy_function": "pkg.mod:fn"}})
    assert ok.autoscaling_config is not None and ok.autoscaling_config.policy is not None
    with pytest.raises(ValidationError, match="module:function"):
        DeploymentSchema(name="d", autoscaling_config={"policy": {"policy_function": "cloudpickle:AAAA"}})


def test_an_application_policy_decides_per_deployment_clamped_and_keeps_ray_shapes():
    from flotilla._private.autoscaling import apply_app_policy
    from flotilla.serve.schema import DeploymentID

    a, b, c = DeploymentID("A", "app"), DeploymentID("B", "app"), DeploymentID("C", "app")
    contexts = {a: ctx(deployment_id=a, capacity_adjusted_max_replicas=3, target_num_replicas=1),
                b: ctx(deployment_id=b, capacity_adjusted_min_replicas=2, target_num_replicas=2),
                c: ctx(deployment_id=c, target_num_replicas=4)}
    decisions, state = apply_app_policy(({a: 7, b: 0.5}, {a: {"n": 1}}), contexts)
    assert {d: x.target for d, x in decisions.items()} == {a: 3, b: 2}  # clamped; C left alone
    assert state == {a: {"n": 1}}  # replaced whole, as Ray's
    assert apply_app_policy(({a: 2.2}, None), contexts)[0][a].target == 3  # rounded up
    assert apply_app_policy(({}, {}), contexts) == ({}, {})
    with pytest.raises(TypeError, match="expected"):
        apply_app_policy({a: 1}, contexts)
    with pytest.raises(TypeError, match="not a dict"):
        apply_app_policy(([1], {}), contexts)
    with pytest.raises(TypeError, match="state"):
        apply_app_policy(({a: 1}, {a: 3}), contexts)
    # an id that is not one of its autoscaling deployments is dropped, as Ray drops it
    assert {d: x.target for d, x in apply_app_policy(({DeploymentID("X", "app"): 1, a: 2}, {}), contexts)[0].items()} == {a: 2}


def test_a_custom_policys_wish_gets_the_configs_factors_bounds_and_delays_as_rays():
    from flotilla._private.autoscaling import AutoscalingConfig, apply_custom, cold_start

    config = AutoscalingConfig(min_replicas=1, max_replicas=5, upscale_delay_s=2, downscale_delay_s=5,
                               upscaling_factor=0.5)
    c = ctx(config=config, current_num_replicas=2, target_num_replicas=2, current_time=10.0)
    d, state = apply_custom((6, {"mine": 1}), c)
    assert (d.target, d.state.direction, state) == (2, 1, {"mine": 1})  # 2 + 0.5 * (6 - 2) = 4, held
    later = ctx(config=config, current_num_replicas=2, target_num_replicas=2, current_time=12.0)
    assert apply_custom((6, {}), later, d.state)[0].target == 4  # after upscale_delay_s
    assert apply_custom((60, {}), later, d.state)[0].target == 5  # bounded by max_replicas
    down = apply_custom((1, {}), ctx(config=config, current_num_replicas=4, target_num_replicas=4, current_time=0.0))[0]
    assert down.target == 4 and "downscale_delay_s 5" in down.reason  # downscale waits its own delay
    # none running: the wish applies at once
    assert apply_custom((3, {}), ctx(config=config, current_num_replicas=0, target_num_replicas=0))[0].target == 3
    # a request waiting with none running: scale from zero without asking the policy
    assert cold_start(ctx(config=config, current_num_replicas=0, target_num_replicas=0, total_num_requests=2.0)).target == 1
    assert cold_start(ctx(config=config, current_num_replicas=1)) is None


def test_aggregation_function_takes_rays_enum():
    from flotilla.serve.config import AggregationFunction

    assert cfg(aggregation_function=AggregationFunction.MAX).aggregation_function == "max"
    assert [a.value for a in AggregationFunction] == ["mean", "max", "min"]
