"""Autoscaling policies (Ray's `ray.serve.autoscaling_policy`): the context a custom policy
gets, and the built-in request-based rule as a policy function to build on."""

from __future__ import annotations

from typing import Any

from flotilla._private.autoscaling import AutoscalingContext, TimeStampedValue, desired_replicas

__all__ = ["AutoscalingContext", "TimeStampedValue", "replica_queue_length_autoscaling_policy"]


def replica_queue_length_autoscaling_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    """Replicas for the total ongoing requests at `config.target_ongoing_requests` each,
    stepped by the up/down factors and clamped (no delays: a custom policy owns its timing)."""
    cfg = ctx.config
    want = desired_replicas(ctx.total_num_requests, cfg, ctx.current_num_replicas) if cfg is not None else ctx.target_num_replicas
    want = max(ctx.capacity_adjusted_min_replicas, min(ctx.capacity_adjusted_max_replicas, want))
    return want, ctx.policy_state
