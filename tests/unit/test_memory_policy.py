"""The pure bounds decisions: start-up time (slow, overdue) and memory (own limit, machine threshold)."""

from __future__ import annotations

import pytest

from flotilla._private.bounds import (
    GiB,
    Limits,
    MemSample,
    MiB,
    memory_decide,
    slow_startup_message,
    startup_check,
)

L = Limits(slow_startup_warning_s=30, startup_timeout_s=600, memory_usage_threshold=0.95)
TOTAL = 16 * GiB


# ---- start-up ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("elapsed", "slow", "overdue"),
    [
        ({}, (), ()),
        ({"a": 1.0}, (), ()),
        ({"a": 31.0}, ("a",), ()),
        ({"a": 31.0, "b": 601.0, "c": 5.0}, ("a",), ("b",)),
        ({"a": 30.0}, (), ()),  # strictly past the threshold
    ],
)
def test_startup_check(elapsed: dict[str, float], slow: tuple[str, ...], overdue: tuple[str, ...]) -> None:
    v = startup_check(elapsed, L)
    assert (v.slow, v.overdue) == (slow, overdue)


def test_no_startup_limit_never_kills() -> None:
    v = startup_check({"a": 1e9}, Limits(startup_timeout_s=0))
    assert v.overdue == () and v.slow == ("a",)


def test_slow_startup_message_uses_rays_wording_with_the_elapsed_time() -> None:
    one = slow_startup_message("Model", "app", [42.25], L)
    assert one.startswith("Deployment 'Model' in application 'app' has 1 replica that has taken more than 30s to initialize")
    assert "initializing for 42.2s" in one and "slow __init__ or reconfigure method" in one
    assert "600s (FLOTILLA_REPLICA_STARTUP_TIMEOUT_S)" in one
    two = slow_startup_message("Model", "app", [31, 90], L)
    assert "has 2 replicas that have taken" in two and "initializing for 90.0s" in two


# ---- memory -----------------------------------------------------------------------------------


def test_replicas_over_their_own_limit_are_killed() -> None:
    kills = memory_decide(
        [MemSample("a", 150 * MiB, 100 * MiB), MemSample("b", 90 * MiB, 100 * MiB), MemSample("c", 5 * GiB, None)],
        used=4 * GiB, total=TOTAL, limits=L,
    )
    assert [(k.id, k.reason) for k in kills] == [("a", "memory_limit")]
    assert "RSS 150.0 MiB" in kills[0].message and "memory limit of 100.0 MiB" in kills[0].message


def test_machine_over_threshold_kills_the_biggest_replica() -> None:
    samples = [MemSample("small", 50 * MiB), MemSample("big", 3 * GiB), MemSample("mid", 1 * GiB)]
    kills = memory_decide(samples, used=int(0.96 * TOTAL), total=TOTAL, limits=L)
    assert [(k.id, k.reason) for k in kills] == [("big", "machine_threshold")]
    assert "over the memory usage threshold 0.95" in kills[0].message and "RSS 3.00 GiB" in kills[0].message
    assert "15.36 GiB of 16.00 GiB used (0.96)" in kills[0].message


@pytest.mark.parametrize(
    ("used_fraction", "killing", "threshold", "expect"),
    [
        (0.90, False, 0.95, []),  # under the threshold
        (0.96, True, 0.95, []),  # a kill for the threshold is still in progress: one at a time
        (0.96, False, 1.0, []),  # threshold 1: off
        (0.96, False, 0.95, ["big"]),
    ],
)
def test_machine_threshold_rules(used_fraction: float, killing: bool, threshold: float, expect: list[str]) -> None:
    samples = [MemSample("small", 50 * MiB), MemSample("big", 3 * GiB)]
    limits = Limits(memory_usage_threshold=threshold)
    kills = memory_decide(samples, used=int(used_fraction * TOTAL), total=TOTAL, limits=limits, killing=killing)
    assert [k.id for k in kills] == expect


def test_own_limits_first_then_no_machine_kill_in_the_same_pass() -> None:
    samples = [MemSample("a", 200 * MiB, 100 * MiB), MemSample("big", 3 * GiB)]
    kills = memory_decide(samples, used=int(0.99 * TOTAL), total=TOTAL, limits=L)
    assert [(k.id, k.reason) for k in kills] == [("a", "memory_limit")]


def test_nothing_to_kill_without_replicas() -> None:
    assert memory_decide([], used=TOTAL, total=TOTAL, limits=L) == []


def test_limits_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVE_SLOW_STARTUP_WARNING_S", "12")  # Ray's name is honoured too
    monkeypatch.setenv("FLOTILLA_REPLICA_STARTUP_TIMEOUT_S", "60")
    monkeypatch.setenv("RAY_memory_usage_threshold", "0.8")
    monkeypatch.setenv("FLOTILLA_MEMORY_MONITOR_REFRESH_MS", "0")
    assert Limits.from_env() == Limits(12, 60, 0.8, 0.0)
    monkeypatch.setenv("RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS", "1")
    assert Limits.from_env().force_stop_unhealthy
    monkeypatch.setenv("FLOTILLA_FORCE_STOP_UNHEALTHY_REPLICAS", "0")  # ours first
    assert not Limits.from_env().force_stop_unhealthy
    monkeypatch.setenv("FLOTILLA_MEMORY_USAGE_THRESHOLD", "lots")
    with pytest.raises(ValueError, match="FLOTILLA_MEMORY_USAGE_THRESHOLD='lots' is not a number"):
        Limits.from_env()
