"""heap.py: how much freed memory a serving process keeps, and that keeping it spares the page
faults of buffers freed and made again (each case in a fresh interpreter: mallopt is for life)."""

from __future__ import annotations

import logging
import pickle
import random
import subprocess
import sys
from typing import Any

import pytest

from flotilla._private import heap
from flotilla._private.awaitable import AwaitableBytes

CHURN = """
import resource, sys
from flotilla._private import heap
kept = heap.keep_freed()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def churn():  # two 1 MiB buffers made, written and freed, as a large request's are
    a = heap.uninitialized(1 << 20) if heap.REUSED else bytearray(1 << 20)
    b = bytearray(1 << 20)
    a[::4096] = b"x" * 256
    b[::4096] = b"x" * 256
for _ in range(3):
    churn()
f0 = faults()
for _ in range(20):
    churn()
print(kept, heap.REUSED, (faults() - f0) / 20)
"""


def run_churn(env: dict[str, str]) -> tuple[int, int, float]:
    out = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", **env})
    assert out.returncode == 0, out.stderr
    kept, reused, faults = out.stdout.split()
    return int(kept), int(reused), float(faults)


@pytest.mark.parametrize(("raw", "mb"), [(None, 64), ("", 64), ("0", 0), ("16", 16), ("2047", 2047)])
def test_keep_freed_mb_reads_the_environment(monkeypatch: pytest.MonkeyPatch, raw: str | None, mb: int) -> None:
    if raw is None:
        monkeypatch.delenv(heap.ENV, raising=False)
    else:
        monkeypatch.setenv(heap.ENV, raw)
    assert heap.keep_freed_mb() == mb


@pytest.mark.parametrize("raw", ["lots", "-1", "2048", "1.5"])
def test_a_bad_value_is_named_and_the_default_used(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                                   raw: str) -> None:
    monkeypatch.setenv(heap.ENV, raw)
    with caplog.at_level(logging.WARNING, logger="flotilla"):
        assert heap.keep_freed_mb() == heap.DEFAULT_MB
    assert heap.ENV in caplog.text and repr(raw) in caplog.text


def test_uninitialized_is_a_writable_bytearray_of_its_size() -> None:
    b = heap.uninitialized(3 << 20)
    assert type(b) is bytearray and len(b) == 3 << 20
    b[-3:] = b"xyz"
    assert bytes(b[-3:]) == b"xyz"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_spares_the_page_faults_of_buffers_made_again() -> None:
    kept, reused, faults = run_churn({})
    assert (kept, reused) == (64, 32 << 20)
    assert faults < 2 * 256 / 10, f"{faults} page faults per two 1 MiB buffers"
    # The same churn under glibc's own behaviour faults most of those pages in again: the
    # measure above can fail.
    kept, reused, faults = run_churn({heap.ENV: "0"})
    assert (kept, reused) == (0, 0)
    assert faults > 2 * 256 / 2, f"only {faults} page faults without kept memory"


def test_malloc_top_pad_in_the_environment_is_left_to_glibc() -> None:
    kept, reused, _ = run_churn({"MALLOC_TOP_PAD_": "1048576"})
    assert (kept, reused) == (0, 0)


@pytest.mark.parametrize("cls", [bytes, AwaitableBytes])
@pytest.mark.parametrize("size", [0, 1, 100, 70_000, 5 << 20])
def test_blank_bytes_is_an_ordinary_bytes_object_once_filled(cls: type, size: int, own_pool: heap.Buffers) -> None:
    assert heap.BLANK_BYTES  # CPython: the layout was confirmed at import
    made = heap.blank_bytes(cls, size)
    assert made is not None
    obj, view = made
    data = bytes(random.Random(size).getrandbits(8) for _ in range(min(size, 1000))) * (size // 1000 + 1)
    view[:] = data[:size]
    assert not view.readonly and len(view) == size and view.format == "B"
    assert type(obj) is cls and len(obj) == size and obj == data[:size]
    assert hash(obj) == hash(data[:size]) and obj[size:] == b"" and bytes(obj) == data[:size]
    assert pickle.loads(pickle.dumps(obj)) == data[:size]
    del made, view
    # only ours: freed with the last reference, or kept for the next (heap.KEPT) from KEPT_MIN
    assert size == 0 or sys.getrefcount(obj) == (3 if size >= heap.KEPT_MIN else 2)


def test_blank_bytes_are_freed() -> None:
    got = subprocess.run([sys.executable, "-c", """
import resource
from flotilla._private import heap
from flotilla._private.awaitable import AwaitableBytes
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
base = rss()
for _ in range(10):
    obj, view = heap.blank_bytes(AwaitableBytes, 50 << 20)
    view[:] = b"x" * (50 << 20)
    del obj, view
print(rss() - base)
"""], capture_output=True, text=True, timeout=60, check=True)
    assert int(got.stdout) < 60 << 20, got.stdout  # 10 filled 50 MiB objects, not 500 MiB kept


class _Pool:
    """A pool of bytearrays (what it made, in `made`)."""

    def __init__(self, cap: int | None) -> None:
        self.pool, self.made = heap.Buffers(cap), []

    def make(self, size: int) -> bytearray:
        self.made.append(size)
        return bytearray(size)

    def get(self, size: int) -> memoryview:
        return self.pool.get(size, self.make)

    def kept(self) -> tuple[int, int]:
        return self.pool.kept()


def _pool(cap: int | None = 10 << 20) -> tuple[_Pool, list[int]]:
    p = _Pool(cap)
    return p, p.made


def _at(view: memoryview) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_a_buffer_nothing_refers_to_is_filled_again() -> None:
    pool, made = _pool()
    first = pool.get(1 << 20)
    first[:3] = b"abc"
    where = _at(first)
    del first
    again = pool.get(1 << 20)
    assert _at(again) == where and made == [1 << 20] and len(again) == 1 << 20
    assert pool.kept() == (1, 1 << 20)


@pytest.mark.parametrize("hold", ["view", "slice", "array", "bytes_view"])
def test_a_buffer_still_referred_to_is_never_handed_out_again(hold: str) -> None:
    np = pytest.importorskip("numpy")
    pool, made = _pool()
    first = pool.get(1 << 20)
    first[:] = b"\x01" * (1 << 20)
    if hold == "view":
        kept: Any = first
    elif hold == "slice":
        kept = first[10:20]
    elif hold == "array":
        kept = np.frombuffer(first, np.uint8)[5:]
    else:
        kept = memoryview(first).cast("B")
    del first
    second = pool.get(1 << 20)
    second[:] = b"\x02" * (1 << 20)
    assert bytes(kept[:4]) == b"\x01" * 4 and made == [1 << 20, 1 << 20]
    assert pool.kept() == (2, 2 << 20)
    del kept, second
    assert len(pool.get(1 << 20)) == 1 << 20 and len(made) == 2


def test_the_smallest_idle_buffer_large_enough_is_used() -> None:
    pool, made = _pool()
    held = [pool.get(n) for n in (3 << 20, 1 << 20, 2 << 20)]
    sizes = {len(v): _at(v) for v in held}
    del held
    got = pool.get(1 << 20 | 5)  # over 1 MiB: the 2 MiB buffer, a view of the size asked for
    assert len(got) == 1 << 20 | 5 and _at(got) == sizes[2 << 20] and len(made) == 3


def test_the_pool_holds_at_most_its_cap_dropping_idle_buffers_to_make_room() -> None:
    pool, made = _pool(cap=4 << 20)
    a = pool.get(3 << 20)
    b = pool.get(2 << 20)  # no room while `a` is in use: handed out, not kept
    assert pool.kept() == (1, 3 << 20)
    del a
    c = pool.get(4 << 20)  # `a` is idle: dropped for `c`
    assert pool.kept() == (1, 4 << 20) and made == [3 << 20, 2 << 20, 4 << 20]
    d = pool.get(5 << 20)  # over the cap on its own
    assert pool.kept() == (1, 4 << 20) and len(b) == 2 << 20 and len(c) == 4 << 20 and len(d) == 5 << 20


def test_a_cap_of_zero_keeps_nothing() -> None:
    pool, made = _pool(cap=0)
    for _ in range(2):
        pool.get(1 << 20)
    assert pool.kept() == (0, 0) and len(made) == 2


@pytest.mark.parametrize(("raw", "mb"), [(None, 256), ("", 256), ("0", 0), ("1024", 1024), ("x", 256), ("-5", 256)])
def test_the_cap_comes_from_the_environment_on_first_use(monkeypatch: pytest.MonkeyPatch, raw: str | None,
                                                        mb: int) -> None:
    pool, _ = _pool(cap=None)
    monkeypatch.delenv(heap.BUFFERS_ENV, raising=False)
    if raw is not None:
        monkeypatch.setenv(heap.BUFFERS_ENV, raw)
    assert pool.pool.cap() == mb << 20
    monkeypatch.setenv(heap.BUFFERS_ENV, "1")
    assert pool.pool.cap() == mb << 20  # read once


def test_buffers_are_safe_to_take_from_several_threads() -> None:
    import threading

    pool, made = _pool(cap=64 << 20)
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def work(k: int) -> None:
        for i in range(200):
            v = pool.get(1 << 20)
            mark = k.to_bytes(4, "little") + i.to_bytes(4, "little")
            v[:8] = mark
            w = pool.get(1 << 20)  # while `v` is in use: other memory
            w[:8] = b"\xff" * 8
            mine = bytes(v[:8]) == mark
            del v, w
            if mine:
                with lock:
                    seen.append((k, i))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(seen) == 800 and len(made) <= 8


@pytest.fixture
def own_pool(monkeypatch: pytest.MonkeyPatch) -> heap.Buffers:
    """A pool of this test's own in place of the process's (other tests fill that one)."""
    pool = heap.Buffers(64 << 20)
    monkeypatch.setattr(heap, "KEPT", pool)
    return pool


@pytest.mark.parametrize("cls", [bytes, AwaitableBytes])
def test_a_large_blank_bytes_object_nothing_refers_to_is_filled_again(cls: type, own_pool: heap.Buffers) -> None:
    size = heap.KEPT_MIN + 10
    made = heap.blank_bytes(cls, size)
    assert made is not None
    obj, view = made
    view[:] = b"a" * size
    assert hash(obj) == hash(b"a" * size)
    held, where = obj, id(obj)
    del made, obj, view
    other = heap.blank_bytes(cls, size - 3)  # `held` is in use: another object
    assert other is not None and id(other[0]) != where
    other[1][:] = b"b" * (size - 3)
    assert held == b"a" * size
    smaller = id(other[0])
    del held, other
    again = heap.blank_bytes(cls, size - 7)  # the smallest idle one with room, made shorter
    assert again is not None and id(again[0]) == smaller
    obj, view = again
    view[:] = b"c" * (size - 7)
    assert type(obj) is cls and len(obj) == size - 7 and obj == b"c" * (size - 7)
    assert hash(obj) == hash(b"c" * (size - 7)) and bytes(obj[-2:]) == b"cc"
    assert pickle.loads(pickle.dumps(obj)) == b"c" * (size - 7)
    assert own_pool.kept() == (2, 2 * size - 3)


def test_a_child_forked_while_another_thread_held_the_pool_can_use_it() -> None:
    script = """
import os, signal, threading
from flotilla._private import heap
held, release = threading.Event(), threading.Event()
def hold():
    with heap.KEPT._lock:
        held.set()
        release.wait(10)
threading.Thread(target=hold, daemon=True).start()
held.wait(10)
pid = os.fork()
if pid == 0:
    signal.alarm(10)  # a lock left held would hang here: SIGALRM ends the child
    view = heap.KEPT.get(8 << 20, bytearray)
    os._exit(0 if len(view) == 8 << 20 else 1)
release.set()
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "0", (out.stdout, out.stderr)
