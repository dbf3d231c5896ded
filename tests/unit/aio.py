"""Small asyncio helpers for the unit tests that run real sockets in one event loop."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


async def settle(n: int = 5) -> None:
    """Let the callbacks that are ready run (this waits for no time)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def until(pred: Callable[[], Any], timeout: float = 1.5, what: str = "") -> Any:
    """Poll `pred` until it is truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        await asyncio.sleep(0.001)


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short private folder for Unix sockets (their paths are limited to ~100 bytes)."""
    d = tempfile.mkdtemp(prefix="fl-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def sock(d: str, name: str) -> str:
    return os.path.join(d, name)


class Net:
    """Where a test's sockets live, and the event loop kind it runs in."""

    def __init__(self, d: str, loop: str) -> None:
        self.dir = d
        self.loop = loop

    def sock(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        factory: Callable[[], asyncio.AbstractEventLoop] | None = None
        if self.loop == "uvloop":
            import uvloop

            factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro)


@pytest.fixture(params=["asyncio", "uvloop"])
def net(request: pytest.FixtureRequest, sockdir: str) -> Net:
    """Run the test in the standard event loop and in uvloop (what the processes use)."""
    return Net(sockdir, request.param)
