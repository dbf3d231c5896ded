"""Which sync calls skip the main thread's lane for the runtime's loop: those with a large
argument (`serve.handle._bulky`)."""

from __future__ import annotations

import pytest

from flotilla.serve.handle import _bulky


@pytest.mark.parametrize(
    ("args", "kwargs", "bulky"),
    [
        ((1, "x"), {}, False),
        ((b"x" * (1 << 20),), {}, True),
        ((bytearray(1 << 20),), {}, True),
        ((b"x" * ((1 << 20) - 1),), {}, False),
        ((), {"a": bytearray(2 << 20)}, True),
        (([b"x" * (2 << 20)],), {}, False),  # inside a container: not looked for
        ((type("Arr", (), {"nbytes": 5 << 20})(),), {}, True),  # anything with an int nbytes
        ((type("Odd", (), {"nbytes": "lots"})(),), {}, False),
    ],
)
def test_which_calls_skip_the_lane(args: tuple, kwargs: dict, bulky: bool) -> None:
    assert _bulky(args, kwargs) is bulky
