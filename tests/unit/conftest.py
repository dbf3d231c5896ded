"""Fixtures shared by the unit tests (see `aio.py`)."""

from tests.unit.aio import net, sockdir

__all__ = ["net", "sockdir"]
