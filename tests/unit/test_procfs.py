"""`procfs.process_memory` on real processes: this one, and a forked child that shares a big
buffer with it copy-on-write until it writes every page."""

from __future__ import annotations

import os
import sys
import time

import pytest

from flotilla._private import procfs
from flotilla._private.procfs import Memory, memory_of, process_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

MB = 1 << 20
SIZE = 64 * MB
PAGE = os.sysconf("SC_PAGE_SIZE")


def test_this_process() -> None:
    m = process_memory(os.getpid())
    assert m is not None
    assert m.rss > 0 and m.uss > 0 and 0 < m.pss <= m.rss
    assert m.uss + m.shared == m.rss  # every resident page is either private or shared
    assert m.uss <= m.pss
    assert set(memory_of([os.getpid(), os.getpid()])) == {os.getpid()}


def test_a_gone_process_reads_as_none() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    assert process_memory(pid) is None
    assert pid not in memory_of([pid])


def test_smaps_summed_agrees_with_smaps_rollup() -> None:
    """The fallback for kernels without smaps_rollup (summing every mapping in smaps) gives
    the same figures, give or take what this process allocated in between."""
    rollup = process_memory(os.getpid())
    with open(f"/proc/{os.getpid()}/smaps", "rb") as f:
        summed = procfs._sum_smaps(f.read())
    assert rollup is not None and summed.rss > 0 and summed.uss + summed.shared == summed.rss
    for a, b in zip(rollup, summed, strict=True):
        assert abs(a - b) <= 4 * MB, (rollup, summed)


def _poll(pred, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(0.01)
    raise AssertionError(f"timed out: last={last!r}")


def test_a_forked_child_shares_a_buffer_until_it_writes_it() -> None:
    buf = bytearray(b"\x01") * SIZE  # written, so every page is resident before the fork
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: wait, write one byte in every page (copy on write), report, wait
        try:
            os.close(go_w)
            os.close(done_r)
            os.read(go_r, 1)
            for i in range(0, SIZE, PAGE):
                buf[i] = 2
            os.write(done_w, b"x")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(go_r)
    os.close(done_w)
    try:
        before = process_memory(pid)
        assert before is not None
        print("procfs-test: child before writing:", {k: v // MB for k, v in before._asdict().items()}, "MB")
        assert before.shared >= SIZE * 0.9, before
        # Each shared page counts half in PSS while two processes map it (more for libraries).
        assert before.pss <= before.uss + before.shared / 2 + 4 * MB, before
        assert before.pss >= before.uss + SIZE / 2 * 0.9, before
        assert before.rss >= SIZE, before
        parent = process_memory(os.getpid())
        assert parent is not None and parent.shared >= SIZE * 0.9

        os.write(go_w, b"x")
        _poll(lambda: os.read(done_r, 1))
        after = process_memory(pid)
        assert after is not None
        print("procfs-test: child after writing:", {k: v // MB for k, v in after._asdict().items()}, "MB")
        assert after.uss >= before.uss + SIZE * 0.9, (before, after)
        assert after.shared <= before.shared - SIZE * 0.9, (before, after)
        assert isinstance(after, Memory) and memory_of([pid])[pid].uss >= SIZE
    finally:
        os.write(go_w, b"x")
        os.close(go_w)
        os.close(done_r)
        os.waitpid(pid, 0)
    del buf
