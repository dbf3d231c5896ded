"""A config file's `target_capacity` (Ray Serve's): every replica count of the applications it
deploys, scaled to that percentage, for moving traffic between two clusters step by step.

Pure decisions, as Ray 2.60 makes them: a count is scaled and rounded half up, never below 1
unless the percentage or the count is 0 (`adjusted`); an autoscaling deployment's bounds are
its `min_replicas` (or, while the capacity goes UP, its `initial_replicas`) and its
`max_replicas`, each scaled (`bounds`); the direction is UP when the percentage rises (or is
set by a new config: the first, or one naming other applications), DOWN when it falls (or is
set on a running config), none once unset (`direction`). Applications deployed from code (`serve.run`) are not scaled.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Literal

Direction = Literal["UP", "DOWN"]


def adjusted(num_replicas: int, target_capacity: float | None) -> int:
    """`num_replicas` at `target_capacity` percent (None and 100: unchanged)."""
    if target_capacity is None or target_capacity == 100:
        return num_replicas
    if target_capacity == 0 or num_replicas == 0:
        return 0
    scaled = (Decimal(num_replicas * target_capacity) / Decimal(100)).to_integral_value(rounding=ROUND_HALF_UP)
    return max(1, int(scaled))


def bounds(min_replicas: int, max_replicas: int, initial_replicas: int | None,
           target_capacity: float | None, direction: Direction | None) -> tuple[int, int]:
    """An autoscaling deployment's [lower, upper] replica bounds at `target_capacity`."""
    low = initial_replicas if initial_replicas is not None and direction == "UP" else min_replicas
    return adjusted(low, target_capacity), adjusted(max_replicas, target_capacity)


def direction(current: float | None, new: float | None, same_applications: bool,
              current_direction: Direction | None) -> Direction | None:
    """Which way the capacity moves when a config with `new` replaces one with `current`
    (`same_applications`: the applied config names the same applications; else this config is
    new, the first or one with other applications, and starts scaling up)."""
    if not same_applications:
        return None if new is None else "UP"
    if new == current:
        return current_direction
    if new is None:
        return None
    if current is None:
        return "DOWN"
    return "UP" if current < new else "DOWN"
