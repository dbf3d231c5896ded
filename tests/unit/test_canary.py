"""The canary policy, table-tested with an injected clock."""

from __future__ import annotations

import pytest

from flotilla._private.canary import (
    CanaryConfig,
    CanaryPhase,
    CanaryState,
    Figures,
    decide,
    p95,
    start,
)

CFG = CanaryConfig(steps=(0.01, 0.1, 0.5, 1.0), hold_s=10, max_error_rate_increase=0.01,
                   max_p95_ratio=1.5, p95_slack_ms=1.0, min_requests=20)
OLD = Figures(requests=1000, errors=5, p95_ms=10.0)  # 0.5% errors
GOOD = Figures(requests=50, errors=0, p95_ms=11.0)
FEW = Figures(requests=5, errors=5, p95_ms=500.0)  # too few to judge


@pytest.mark.parametrize(
    ("state", "new", "now", "phase", "step", "share", "changed", "reason"),
    [
        # held long enough, within bounds: the next step
        (CanaryState(0, 0.0), GOOD, 10.0, CanaryPhase.RUNNING, 1, 0.1, True, "1% -> 10%"),
        (CanaryState(2, 0.0), GOOD, 12.0, CanaryPhase.RUNNING, 3, 1.0, True, "50% -> 100%"),
        # the last step held: promoted
        (CanaryState(3, 0.0), GOOD, 10.0, CanaryPhase.PROMOTED, 3, 1.0, True, "promoted"),
        # not held long enough: stay
        (CanaryState(1, 0.0), GOOD, 9.9, CanaryPhase.RUNNING, 1, 0.1, False, ""),
        # held, but too few requests to promote: stay and say so
        (CanaryState(1, 0.0), FEW, 30.0, CanaryPhase.RUNNING, 1, 0.1, False, "5 of 20 requests"),
        # too few requests to judge a breach: no rollback on 5 errors of 5
        (CanaryState(0, 0.0), FEW, 1.0, CanaryPhase.RUNNING, 0, 0.01, False, ""),
        # error rate over the old one's + 1 point: rolled back at once, before the hold ends
        (CanaryState(1, 0.0), Figures(100, 2, 10.0), 1.0, CanaryPhase.ROLLED_BACK, 1, 0.0, True, "error rate 2.00%"),
        # exactly at the bound (0.5% + 1% = 1.5%): fine
        (CanaryState(1, 0.0), Figures(200, 3, 10.0), 10.0, CanaryPhase.RUNNING, 2, 0.5, True, "10% -> 50%"),
        # p95 over 1.5x the old one's + 1 ms: rolled back
        (CanaryState(2, 0.0), Figures(100, 0, 16.1), 3.0, CanaryPhase.ROLLED_BACK, 2, 0.0, True, "p95 latency 16.1 ms"),
        (CanaryState(2, 0.0), Figures(100, 0, 16.0), 10.0, CanaryPhase.RUNNING, 3, 1.0, True, "50% -> 100%"),
        # a finished canary stays as it is
        (CanaryState(1, 0.0, CanaryPhase.ROLLED_BACK, "x"), GOOD, 99.0, CanaryPhase.ROLLED_BACK, 1, 0.0, False, "x"),
        (CanaryState(3, 0.0, CanaryPhase.PROMOTED, "y"), FEW, 99.0, CanaryPhase.PROMOTED, 3, 1.0, False, "y"),
    ],
)
def test_decide(state: CanaryState, new: Figures, now: float, phase: CanaryPhase, step: int, share: float,
                changed: bool, reason: str) -> None:
    d = decide(CFG, state, OLD, new, now)
    assert (d.state.phase, d.state.step, d.share, d.changed) == (phase, step, share, changed)
    assert reason in d.state.reason
    if d.changed:
        assert d.state.step_started == now  # a step, promotion or rollback restarts the clock
    else:
        assert d.state.step_started == state.step_started


def test_a_whole_canary_walks_every_step_then_promotes() -> None:
    state, now, shares = start(CFG, 0.0), 0.0, []
    while state.phase is CanaryPhase.RUNNING:
        now += 5.0
        d = decide(CFG, state, OLD, GOOD, now)
        state = d.state
        if d.changed:
            shares.append(d.share)
    assert shares == [0.1, 0.5, 1.0, 1.0] and state.phase is CanaryPhase.PROMOTED
    assert now == 40.0  # four steps, each held 10 s


def test_an_old_version_with_errors_is_the_baseline() -> None:
    flaky_old = Figures(1000, 100, 10.0)  # 10% errors already
    assert decide(CFG, CanaryState(0, 0.0), flaky_old, Figures(100, 10, 10.0), 10.0).state.step == 1
    assert decide(CFG, CanaryState(0, 0.0), flaky_old, Figures(100, 12, 10.0), 1.0).state.phase is CanaryPhase.ROLLED_BACK


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": ()}, "must not be empty"),
        ({"steps": (0.5, 0.1, 1.0)}, r"bad entry: 0\.1"),
        ({"steps": (0.0, 1.0)}, "bad entry: 0"),
        ({"steps": (0.1, 0.5)}, "last canary step must be 1.0"),
        ({"hold_s": -1}, "hold_s"),
        ({"max_p95_ratio": 0.5}, "max_p95_ratio"),
        ({"p95_slack_ms": -1}, "p95_slack_ms"),
        ({"max_error_rate_increase": -0.1}, "max_error_rate_increase"),
        ({"min_requests": 0}, "min_requests"),
    ],
)
def test_bad_configs_say_what_is_wrong(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CanaryConfig(**kwargs)


@pytest.mark.parametrize(
    ("counts", "want"),
    [
        ([0, 0, 0, 0], None),
        ([100, 0, 0, 0], 0.95),  # all in (0, 1]: 95% of the way up
        ([90, 4, 6, 0], 5.0 + 5.0 * 1 / 6),  # 94 within 5 ms: the 95th is 1/6 into (5, 10]
        ([95, 5, 0, 0], 1.0),
        ([0, 0, 0, 7], 10.0),  # all above the last bound: the last finite bound
    ],
)
def test_p95_from_buckets(counts: list[int], want: float | None) -> None:
    assert p95([1.0, 5.0, 10.0], counts) == pytest.approx(want)
