"""Ray 2.60's public autoscaling pieces as a custom policy (or its unit tests) uses them:
`AutoscalingContext` built with Ray's keywords, and `replica_queue_length_autoscaling_policy`
giving the raw count, which the controller's standard parameters then shape (checked
against Ray 2.60)."""

from __future__ import annotations

import warnings

import pytest

from flotilla._private.autoscaling import apply_custom
from flotilla.serve.autoscaling_policy import (
    AutoscalingContext,
    default_autoscaling_policy,
    replica_queue_length_autoscaling_policy,
)
from flotilla.serve.config import AutoscalingConfig


def ray_ctx(**kw: object) -> AutoscalingContext:
    base: dict[str, object] = dict(
        deployment_id=None, deployment_name="d", app_name=None, current_num_replicas=10, target_num_replicas=10,
        running_replicas=[], total_num_requests=40.0, total_queued_requests=0.0, aggregated_metrics=None,
        raw_metrics=None, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=30, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=None,
        config=AutoscalingConfig(min_replicas=1, max_replicas=30, target_ongoing_requests=2, upscaling_factor=0.5,
                                 upscale_delay_s=0))
    return AutoscalingContext(**{**base, **kw})  # type: ignore[arg-type]


def test_a_context_takes_rays_keywords_and_reads_callables_when_asked():
    calls: list[int] = []

    def total() -> float:
        calls.append(1)
        return 42.0

    c = ray_ctx(total_num_requests=total, total_queued_requests=lambda: 2.0,
                aggregated_metrics=lambda: {"m": {"r": 1.0}}, raw_metrics=None)
    assert calls == []  # nothing read yet
    assert c.total_num_requests == 42.0 and c.total_queued_requests == 2.0
    assert c.total_running_requests == 40.0  # the total less the queued, as Ray's
    assert c.aggregated_metrics == {"m": {"r": 1.0}} and c.raw_metrics is None
    assert ray_ctx(total_num_requests=1.0, total_queued_requests=5.0).total_running_requests == 0.0


def test_the_default_policy_function_gives_the_raw_count():
    assert replica_queue_length_autoscaling_policy(ray_ctx()) == (20.0, {})
    assert default_autoscaling_policy is replica_queue_length_autoscaling_policy
    # with none running and a request waiting: the cold-start count
    cold = ray_ctx(current_num_replicas=0, target_num_replicas=0, total_num_requests=3.0, policy_state={"k": 1})
    assert replica_queue_length_autoscaling_policy(cold) == (1, {"k": 1})


def test_a_policy_delegating_to_it_gets_the_factor_once():
    decision, _ = apply_custom(replica_queue_length_autoscaling_policy(ray_ctx()), ray_ctx())
    assert decision.target == 15  # 10 + 0.5 * (20 - 10); Ray 2.60 decides 15 too (was 13)


def test_config_accessors_and_the_metrics_interval_deprecation():
    assert AutoscalingConfig(target_ongoing_requests=3).get_target_ongoing_requests() == 3
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        AutoscalingConfig()
        assert not seen
        AutoscalingConfig(metrics_interval_s=5)
    assert [w.category for w in seen] == [DeprecationWarning]
    with pytest.warns(DeprecationWarning, match="metrics_interval_s"):
        AutoscalingConfig(metrics_interval_s=1)
