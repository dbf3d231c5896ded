"""heap.py: how much freed memory a serving process keeps, and that keeping it spares the page
faults of buffers freed and made again (each case in a fresh interpreter: mallopt is for life)."""

from __future__ import annotations

import logging
import pickle
import random
import subprocess
import sys

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
def test_blank_bytes_is_an_ordinary_bytes_object_once_filled(cls: type, size: int) -> None:
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
    assert size == 0 or sys.getrefcount(obj) == 2  # only ours: freed with the last reference


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
