"""Autoscaling policies (Ray's `ray.serve.autoscaling_policy`): the context a custom policy
gets, and the built-in request-based rule as a policy function to build on."""

from __future__ import annotations

import math
from typing import Any

from flotilla._private.autoscaling import AutoscalingContext, TimeStampedValue

__all__ = ["AutoscalingContext", "TimeStampedValue", "default_autoscaling_policy",
           "replica_queue_length_autoscaling_policy"]


def replica_queue_length_autoscaling_policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    """Ray 2.60's default policy as a function to build on: the "raw" replica count for the
    total ongoing requests at `config.target_ongoing_requests` each (a float; with none running
    and a request waiting, the count a cold start scales to). Like any policy's result, the
    controller then applies the scaling factors, the [min, max] bounds and the delays."""
    cfg = ctx.config
    if ctx.current_num_replicas == 0 and ctx.total_num_requests > 0:
        factor = cfg.get_upscaling_factor() if cfg is not None else 1.0
        return max(math.ceil(factor), ctx.target_num_replicas), ctx.policy_state
    if ctx.current_num_replicas == 0 or cfg is None:
        return ctx.target_num_replicas, {}
    return max(0.0, ctx.total_num_requests) / cfg.get_target_ongoing_requests(), {}


default_autoscaling_policy = replica_queue_length_autoscaling_policy
