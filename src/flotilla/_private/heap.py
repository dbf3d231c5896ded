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
them); `REUSED` is the size up to which it is used. `blank_bytes(cls, n)` makes a bytes object
the same way, with a writable view of its contents, so that a large body is received straight
into the `bytes` the application gets instead of being copied into one after it arrived.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

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


_api = ctypes.pythonapi
_new_gc_var: Any = getattr(_api, "_PyObject_GC_NewVar", None)  # (what PyObject_GC_NewVar calls)
if _new_gc_var is not None:
    _new_gc_var.argtypes = (ctypes.py_object, ctypes.c_ssize_t)
    _new_gc_var.restype = ctypes.py_object
_new_var = _api.PyBytes_FromStringAndSize
_new_var.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_new_var.restype = ctypes.py_object
_view_of = _api.PyMemoryView_FromMemory
_view_of.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_view_of.restype = ctypes.py_object
_PYBUF_WRITE = 0x200
#: Where a bytes object's contents start (its struct ends with them, one byte counted).
_DATA = bytes.__basicsize__ - 1
_HUGE = 2 << 20
_MADV_HUGEPAGE = 14
try:
    _madvise: Any = ctypes.CDLL(None, use_errno=True).madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
except (OSError, AttributeError):
    _madvise = None


def _blank(cls: type, size: int) -> tuple[bytes, memoryview]:
    if size == 0:  # (b"" is shared: never written)
        return cls(), memoryview(bytearray())
    # a subclass (a heap type) is allocated with the garbage collector's header its type has
    obj = _new_var(None, size) if cls is bytes else _new_gc_var(cls, size)
    at = id(obj) + _DATA
    ctypes.c_ssize_t.from_address(at - ctypes.sizeof(ctypes.c_ssize_t)).value = -1  # hash not cached
    ctypes.c_char.from_address(at + size).value = b"\0"
    if size > REUSED and size >= 2 * _HUGE and _madvise is not None:
        # a fresh mapping, filled at once: in 2 MiB pages, a fault each instead of 512
        lo, hi = -(-at // _HUGE) * _HUGE, (at + size) // _HUGE * _HUGE
        _madvise(lo, hi - lo, _MADV_HUGEPAGE)
    return obj, _view_of(at, size, _PYBUF_WRITE)


def _works() -> bool:
    from flotilla._private.awaitable import AwaitableBytes

    try:
        for cls in (bytes, AwaitableBytes):
            obj, view = _blank(cls, 3)
            view[:] = b"abc"
            if not (type(obj) is cls and obj == b"abc" and hash(obj) == hash(b"abc") and len(obj) == 3):
                return False
    except Exception:  # another interpreter's layout, or no C API: copy instead
        return False
    return True


BLANK_BYTES = _works()


def blank_bytes(cls: type, size: int) -> tuple[bytes, memoryview] | None:
    """A new `cls` (bytes or a subclass of it that adds no fields) of `size` bytes whose
    contents are not set yet, and a writable view of them; None where this interpreter's
    layout was not confirmed. The caller fills the view before the object is used (a bytes
    object is immutable once others see it) and keeps the object while it writes."""
    return _blank(cls, size) if BLANK_BYTES else None
