"""Freed memory a serving process keeps for its next requests.

A proxy or replica that receives a large HTTP body or handle argument reads it into a buffer
of its own and frees that buffer after the reply. glibc gives such memory back to the kernel
at once (it trims the top of the heap, or unmaps a large block), so the next request's buffer
is fresh memory again and every 4 KiB page of it costs a page fault when first written
(measured: docs/ARCHITECTURE.md, "Freed memory is kept").

`keep_freed()` asks glibc (`mallopt(M_TOP_PAD)`) to keep `FLOTILLA_KEEP_FREED_MB` (default 64)
MiB at the top of the heap when it trims, and to grow the heap by as much, and fixes its mmap
threshold at that size (at most 32 MiB, glibc's largest): buffers up to the threshold then
come from memory the process has already touched. The price is resident memory:
a process that served large requests keeps up to that much more. An idle process is unchanged
(the pad is address space until it is written). 0 keeps glibc's behaviour, as does
`MALLOC_TOP_PAD_` in the environment (glibc reads that one itself). Where the C library is not
glibc, nothing changes.

Where it applied, `uninitialized(n)` makes the buffers that a large frame or body is read into
from that memory, without zeroing them first (they are written whole before anything reads
them); `REUSED` is the size up to which it is used.
"""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger("flotilla")

ENV = "FLOTILLA_KEEP_FREED_MB"
DEFAULT_MB = 64
MAX_MB = 2047  # mallopt takes an int of bytes
M_TOP_PAD = -2  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX_MB = 32  # glibc's largest on 64-bit

#: Buffers up to this many bytes come from the kept memory (`uninitialized`); 0: not kept here.
REUSED = 0


def keep_freed_mb() -> int:
    """MiB of freed memory to keep, from `FLOTILLA_KEEP_FREED_MB` (0: glibc's default)."""
    raw = os.environ.get(ENV, "")
    if raw == "":
        return DEFAULT_MB
    try:
        mb = int(raw)
    except ValueError:
        mb = -1
    if not 0 <= mb <= MAX_MB:
        logger.warning("%s=%r is not a whole number of MiB from 0 to %d; using %d", ENV, raw, MAX_MB, DEFAULT_MB)
        return DEFAULT_MB
    return mb


def keep_freed() -> int:
    """Apply `keep_freed_mb()` to this process; returns the MiB now kept (0: not applied)."""
    global REUSED
    mb = keep_freed_mb()
    if mb == 0 or "MALLOC_TOP_PAD_" in os.environ:
        return 0
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return 0
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Setting either turns glibc's adaptive mmap threshold off: it is set too, so that blocks
    # up to it come from the heap (and its pad), not from fresh mappings.
    mapped = min(mb, MMAP_THRESHOLD_MAX_MB) << 20
    if not (mallopt(M_MMAP_THRESHOLD, mapped) == 1 and mallopt(M_TOP_PAD, mb << 20) == 1):
        return 0
    REUSED = mapped
    return mb


_new_bytearray = ctypes.pythonapi.PyByteArray_FromStringAndSize
_new_bytearray.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_new_bytearray.restype = ctypes.py_object


def uninitialized(size: int) -> bytearray:
    """A bytearray of `size` bytes whose contents are whatever the allocator hands back (no
    zeroing, no page touched): for a caller that writes all of it before reading any."""
    return _new_bytearray(None, size)  # type: ignore[no-any-return]
