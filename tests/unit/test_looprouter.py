"""The fate of a router on a caller's loop (looprouter.fate), by the loop's state."""

from __future__ import annotations

import pytest

from flotilla._private.looprouter import CUT, KEEP, PARK, fate


@pytest.mark.parametrize(
    ("closed", "running", "parked", "idle_with_connections", "expected"),
    [
        (True, False, False, True, CUT),  # a closed loop: its sockets shut, forgotten
        (True, False, True, False, CUT),  # parked or not
        (False, True, False, True, KEEP),  # a running loop answers its replicas itself
        (False, False, False, True, PARK),  # stopped, idle, connected: shut its sockets
        (False, False, False, False, KEEP),  # stopped with calls in flight (or no connection)
        (False, False, True, True, KEEP),  # already parked
    ],
)
def test_fate(closed: bool, running: bool, parked: bool, idle_with_connections: bool, expected: str) -> None:
    assert fate(closed, running, parked, idle_with_connections) == expected
