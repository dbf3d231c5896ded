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

Larger buffers are kept whole: `KEPT`, this process's `Buffers`, holds up to
`FLOTILLA_KEEP_BUFFERS_MB` (default 256) MiB of the buffers and bytes objects large payloads
were received into, and hands one out again once nothing else refers to it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable
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


def _env_mb(name: str, default: int, most: int) -> int:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        mb = int(raw)
    except ValueError:
        mb = -1
    if not 0 <= mb <= most:
        logger.warning("%s=%r is not a whole number of MiB from 0 to %d; using %d", name, raw, most, default)
        return default
    return mb


def keep_freed_mb() -> int:
    """MiB of freed memory to keep, from `FLOTILLA_KEEP_FREED_MB` (0: glibc's default)."""
    return _env_mb(ENV, DEFAULT_MB, MAX_MB)


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
#: Where a variable-size object's length is (after its reference count and type).
_SIZE_AT = 2 * ctypes.sizeof(ctypes.c_void_p)
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


def _set_size(obj: bytes, size: int) -> None:
    """Make a kept bytes object (nothing else refers to it) `size` bytes long, at most its
    allocated length; its contents are then to be written."""
    at = id(obj) + _DATA
    ctypes.c_ssize_t.from_address(id(obj) + _SIZE_AT).value = size
    ctypes.c_ssize_t.from_address(at - ctypes.sizeof(ctypes.c_ssize_t)).value = -1  # hash not cached
    ctypes.c_char.from_address(at + size).value = b"\0"


def _works() -> bool:
    from flotilla._private.awaitable import AwaitableBytes

    try:
        for cls in (bytes, AwaitableBytes):
            obj, view = _blank(cls, 3)
            view[:] = b"abc"
            if not (type(obj) is cls and obj == b"abc" and hash(obj) == hash(b"abc") and len(obj) == 3):
                return False
            _set_size(obj, 2)
            if not (obj == b"ab" and hash(obj) == hash(b"ab") and len(obj) == 2):
                return False
    except Exception:  # another interpreter's layout, or no C API: copy instead
        return False
    return True


BLANK_BYTES = _works()


BUFFERS_ENV = "FLOTILLA_KEEP_BUFFERS_MB"
DEFAULT_BUFFERS_MB = 256
MAX_BUFFERS_MB = 1 << 20


class Buffers:
    """Large buffers used again once nothing refers to them.

    A buffer handed out lives on in what was read into it: a received array's memory, a
    `bytes` object, a frame being decoded. The pool keeps a reference to each buffer it made
    and takes one back when that is the only reference left, so a process that receives large
    payloads again and again fills the same memory instead of fresh pages that fault on first
    write. It holds at most `cap` bytes in all, in use or not; it drops idle buffers to make
    room, and a buffer it cannot make room for is handed out without being kept."""

    def __init__(self, cap: int | None = None) -> None:
        self._cap = cap
        self._held: list[Any] = []
        self._sizes: list[int] = []
        self._kinds: list[object] = []
        self._lock = threading.Lock()

    def cap(self) -> int:
        """Bytes the pool may hold (read from `FLOTILLA_KEEP_BUFFERS_MB` on first use)."""
        if self._cap is None:
            self._cap = _env_mb(BUFFERS_ENV, DEFAULT_BUFFERS_MB, MAX_BUFFERS_MB) << 20
        return self._cap

    def _idle(self, i: int) -> bool:
        return sys.getrefcount(self._held[i]) == 2  # the list's reference and the argument's

    def take(self, size: int, make: Callable[[int], Any]) -> tuple[Any, bool]:
        """(an idle kept buffer that `make` made, with room for `size` bytes (the smallest
        such), True), else (`make(size)`, False). A kept buffer's contents are unset."""
        with self._lock:
            best = -1
            for i, n in enumerate(self._sizes):
                if n >= size and self._kinds[i] == make and (best < 0 or n < self._sizes[best]) and self._idle(i):
                    best = i
            if best >= 0:
                return self._held[best], True
            room = self.cap() - sum(self._sizes) - size
            i = 0
            while room < 0 and i < len(self._held):
                if self._idle(i):
                    del self._held[i], self._kinds[i]
                    room += self._sizes.pop(i)
                else:
                    i += 1
            buf = make(size)
            if room >= 0:
                self._held.append(buf)
                self._sizes.append(size)
                self._kinds.append(make)
            return buf, False

    def get(self, size: int, make: Callable[[int], Any]) -> memoryview:
        """A writable view of `size` bytes of a buffer `take` gave."""
        return memoryview(self.take(size, make)[0])[:size]

    def kept(self) -> tuple[int, int]:
        """(buffers held, bytes held)."""
        with self._lock:
            return len(self._held), sum(self._sizes)

    def _forked(self) -> None:
        self._lock = threading.Lock()  # (a fork while another thread held it)


#: This process's pool of large receive buffers.
KEPT = Buffers()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: KEPT._forked())
#: From this size a blank bytes object comes from `KEPT` (above `REUSED`).
KEPT_MIN = 4 << 20


def blank_bytes(cls: type, size: int) -> tuple[bytes, memoryview] | None:
    """A new `cls` (bytes or a subclass of it that adds no fields) of `size` bytes whose
    contents are not set yet, and a writable view of them; None where this interpreter's
    layout was not confirmed. The caller fills the view before the object is used (a bytes
    object is immutable once others see it) and keeps the object while it writes."""
    if not BLANK_BYTES:
        return None
    if size < KEPT_MIN or size <= REUSED:
        return _blank(cls, size)
    obj, again = KEPT.take(size, _blank_maker(cls))
    at = id(obj) + _DATA
    if again:
        _set_size(obj, size)
    return obj, _view_of(at, size, _PYBUF_WRITE)


@functools.cache
def _blank_maker(cls: type) -> Callable[[int], bytes]:
    """`cls`'s maker for `KEPT` (one per class: the pool tells kinds apart by maker)."""
    def make(size: int) -> bytes:
        return _blank(cls, size)[0]

    return make
