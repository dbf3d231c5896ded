"""The keeper's restart backoff (a pure function, and its memory with an injected clock), and
the hand-over of listening sockets from the head to the keeper."""

from __future__ import annotations

import os
import socket

from flotilla._private.keeper import Backoff, Keeper, KeeperLink, restart_delay


def test_delays_double_from_the_first_to_the_cap() -> None:
    delays = []
    d = None
    for _ in range(8):
        d = restart_delay(d, uptime=0.1)
        delays.append(d)
    assert delays == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    assert all(x > 0 for x in delays)  # never a hot loop


def test_a_stable_run_resets_the_delay() -> None:
    assert restart_delay(5.0, uptime=59.9) == 5.0
    assert restart_delay(5.0, uptime=60.0) == 0.2
    assert restart_delay(None, uptime=0.0) == 0.2
    assert restart_delay(0.4, uptime=1.0, first=0.05, cap=0.5) == 0.5


def test_backoff_follows_the_clock() -> None:
    now = [1000.0]
    b = Backoff(clock=lambda: now[0])
    seen = []
    for _ in range(4):  # crashes a moment after each start
        b.started()
        now[0] += 0.5
        seen.append(b.failed())
    assert seen == [0.2, 0.4, 0.8, 1.6]
    b.started()
    now[0] += 61  # a stable minute, then a crash: back to the first delay
    assert b.failed() == 0.2
    assert b.failures == 5
    b.started()
    now[0] += 1
    assert b.failed() == 0.4


def test_the_keeper_holds_and_drops_sockets_the_head_hands_it(tmp_path: object) -> None:
    keeper = Keeper({"session_dir": str(tmp_path)})
    link = KeeperLink(os.dup(keeper.theirs.fileno()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        link.hold("http", s)
    keeper._held_message()
    assert keeper.held["http"].getsockname()[1] == port  # still listening: the keeper's copy
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    link.drop("http")
    keeper._held_message()
    assert keeper.held == {}
