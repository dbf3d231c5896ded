"""How long a caller polls for its reply before it blocks (`_private/poll.py`)."""

from __future__ import annotations

import os

import pytest

from flotilla._private import poll


@pytest.mark.parametrize(
    ("usual_us", "max_us", "budget_us"),
    [
        (50, 250, 100),  # twice the usual wait
        (125, 250, 250),
        (200, 250, 250),  # capped at the limit
        (250, 250, 250),
        (251, 250, 0),  # usually longer than the limit: polling would be wasted
        (5000, 250, 0),
        (0, 250, 0),  # nothing to wait for, nothing polled
        (50, 0, 0),  # FLOTILLA_HANDLE_POLL_US=0 (or one CPU)
    ],
)
def test_poll_budget(usual_us: float, max_us: float, budget_us: float) -> None:
    assert poll.poll_budget(usual_us / 1e6, max_us / 1e6) == pytest.approx(budget_us / 1e6)


def test_usual_wait_follows_the_waits() -> None:
    usual = 100e-6
    for _ in range(60):  # calls turn slow: the average passes the limit within a few dozen
        usual = poll.next_usual(usual, 2e-3)
    assert usual > 250e-6
    assert poll.poll_budget(usual, 250e-6) == 0.0
    for _ in range(60):  # and fast again: polling comes back
        usual = poll.next_usual(usual, 80e-6)
    assert poll.poll_budget(usual, 250e-6) == pytest.approx(2 * usual)
    assert poll.next_usual(100e-6, 100e-6) == pytest.approx(100e-6)


@pytest.mark.parametrize(("value", "us"), [(None, poll.POLL_MAX_US), ("0", 0), ("40", 40), ("junk", poll.POLL_MAX_US), ("-5", 0)])
def test_poll_max_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str | None, us: float) -> None:
    if value is None:
        monkeypatch.delenv("FLOTILLA_HANDLE_POLL_US", raising=False)
    else:
        monkeypatch.setenv("FLOTILLA_HANDLE_POLL_US", value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert poll.poll_max_s() == pytest.approx(us / 1e6)


def test_no_polling_on_one_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOTILLA_HANDLE_POLL_US", "250")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert poll.poll_max_s() == 0.0



def test_reply_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("FLOTILLA_HANDLE_POLL_US", "250")
    w = poll.ReplyWait()
    assert w.budget() == pytest.approx(250e-6)  # no wait seen yet: half the limit, twice that
    for _ in range(60):
        w.waited(2e-3)
    assert w.budget() == 0.0
    monkeypatch.setenv("FLOTILLA_HANDLE_POLL_US", "0")
    off = poll.ReplyWait()
    off.waited(1e-6)
    assert off.budget() == 0.0 and off.usual_s == 0.0  # never polling, it keeps no average
