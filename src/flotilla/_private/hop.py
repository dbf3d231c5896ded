"""Work handed to an event loop from other threads, one wake-up per batch.

`loop.call_soon_threadsafe` per item costs a wake-up of the loop and a handle each; under many
calls in flight (64 asyncio tasks calling handles) most of those wake-ups are redundant, since
the loop is already about to run. An `Inbox` queues `(fn, args)` and schedules one drain per
batch: the first `put` after a drain arms it, the ones before the drain runs only append.
Items run in the order they were put, across all threads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class Inbox:
    """A FIFO of calls to run on `loop`, fed from any thread."""

    __slots__ = ("_armed", "_items", "loop", "unstarted")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._armed = False
        #: handle calls made on the loop whose turn to go to the runtime's loop has not come
        #: (`DeploymentResponse._hand_off`); changed on the loop's own thread only
        self.unstarted = 0

    def put(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the loop soon. Raises RuntimeError if the loop is closed."""
        self._items.append((fn, args))
        # The append comes first and `run` disarms before it drains: an item is either drained
        # by a run already going, or this put sees the inbox disarmed and schedules a run.
        if not self._armed:
            self._armed = True
            try:
                self.loop.call_soon_threadsafe(self.run)
            except BaseException:
                self._armed = False
                raise

    def run(self) -> None:
        """Run everything queued (on the loop; also called inline there to catch up)."""
        self._armed = False
        items = self._items
        while items:
            fn, args = items.popleft()
            try:
                fn(*args)
            except Exception:
                logger.exception("a call handed to the event loop failed")


_local = threading.local()


def inbox_for(loop: asyncio.AbstractEventLoop) -> Inbox:
    """The inbox of `loop`, the running loop of this thread (one per thread, made once)."""
    box: Inbox | None = getattr(_local, "inbox", None)
    if box is None or box.loop is not loop:
        box = _local.inbox = Inbox(loop)
    return box
