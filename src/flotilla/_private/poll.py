"""Polling for a reply expected soon, instead of sleeping until it comes.

On a VM, waking a thread whose vCPU went idle costs tens of microseconds of latency and CPU,
as much as a fast call itself. So a caller that expects its reply soon turns its loop
without blocking in the selector (polls) for a while first: for up to twice its usual wait
(an average of its last waits), and not at all when that is above the limit
(FLOTILLA_HANDLE_POLL_US, default 250; 0: never), where polling would be wasted, or where
the process may use only one CPU (the poller would hold up the replica it waits for). Used
by the main thread's lane (`lane.Lane.drive`) and by the routers on callers' own loops
(`looprouter.Follower.call_polled`), each keeping a `ReplyWait`.
"""

from __future__ import annotations

import os

#: Default of FLOTILLA_HANDLE_POLL_US: calls whose usual wait is longer are not polled for.
POLL_MAX_US = 250
#: Weight of the newest wait in the usual wait.
WAIT_WEIGHT = 0.125


def poll_max_s() -> float:
    """The longest a caller polls before it blocks (seconds; 0: it never polls):
    FLOTILLA_HANDLE_POLL_US microseconds, 0 where this process may run on one CPU only."""
    try:
        us = max(0.0, float(os.environ.get("FLOTILLA_HANDLE_POLL_US", POLL_MAX_US)))
    except ValueError:
        us = POLL_MAX_US
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return us / 1e6 if cpus > 1 else 0.0


def poll_budget(usual_s: float, max_s: float) -> float:
    """How long to poll for a reply whose usual wait is `usual_s`: up to twice that, at most
    `max_s`; nothing when the usual wait is longer than `max_s` (polling would be wasted)."""
    if max_s <= 0.0 or usual_s > max_s:
        return 0.0
    return min(max_s, 2.0 * usual_s)


def next_usual(usual_s: float, waited_s: float) -> float:
    """The usual wait after one more of `waited_s`."""
    return usual_s + WAIT_WEIGHT * (waited_s - usual_s)


class ReplyWait:
    """One caller's usual wait for its replies (`next_usual` of the waits it was told of) and
    how long it polls for the next reply (`poll_budget`)."""

    __slots__ = ("max_s", "usual_s")

    def __init__(self) -> None:
        self.max_s = poll_max_s()
        self.usual_s = self.max_s / 2

    def budget(self) -> float:
        return poll_budget(self.usual_s, self.max_s)

    def waited(self, seconds: float) -> None:
        if self.max_s:  # (never polling, it needs no average)
            self.usual_s = next_usual(self.usual_s, seconds)
