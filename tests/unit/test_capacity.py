"""A config file's target_capacity: the pure decisions (`_private/capacity.py`), table-tested
against the values Ray Serve 2.60 computes."""

from __future__ import annotations

import pytest

from flotilla._private import capacity


@pytest.mark.parametrize(("n", "tc", "want"), [
    (4, 50, 2), (1, 50, 1), (3, 50, 2), (5, 50, 3),  # half up, not Python's half to even
    (10, 33.3, 3), (2, 0, 0), (0, 50, 0), (7, None, 7), (7, 100, 7), (1, 1, 1), (3, 25, 1),
    (100, 0.5, 1),  # never below 1 unless the count or the percentage is 0
])
def test_adjusted_rounds_half_up_and_keeps_one(n: int, tc: float | None, want: int) -> None:
    assert capacity.adjusted(n, tc) == want


@pytest.mark.parametrize(("lo", "hi", "init", "tc", "direction", "want"), [
    (2, 6, None, None, None, (2, 6)),
    (2, 6, None, 50, "DOWN", (1, 3)),
    (2, 6, 4, 50, "DOWN", (1, 3)),  # initial_replicas is the floor only while scaling up
    (2, 6, 4, 50, "UP", (2, 3)),
    (0, 6, None, 50, "UP", (0, 3)),  # scale to zero stays possible
    (2, 6, None, 0, "DOWN", (0, 0)),
])
def test_autoscaling_bounds(lo: int, hi: int, init: int | None, tc: float | None,
                            direction: capacity.Direction | None, want: tuple[int, int]) -> None:
    assert capacity.bounds(lo, hi, init, tc, direction) == want


@pytest.mark.parametrize(("cur", "new", "same", "cur_dir", "want"), [
    (None, None, False, None, None),
    (None, 50, False, None, "UP"),  # a new config (the first, or other applications) grows from there
    (40, 20, False, "UP", "UP"),  # other applications: a new config, though the percentage fell
    (None, 50, True, None, "DOWN"),  # a running config gets a capacity: it shrinks
    (50, 80, True, "DOWN", "UP"),
    (80, 50, True, "UP", "DOWN"),
    (50, 50, True, "UP", "UP"),  # unchanged: keeps its direction
    (50, None, True, "UP", None),
])
def test_direction(cur: float | None, new: float | None, same: bool, cur_dir: capacity.Direction | None,
                   want: capacity.Direction | None) -> None:
    assert capacity.direction(cur, new, same, cur_dir) == want
