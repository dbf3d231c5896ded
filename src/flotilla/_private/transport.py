"""Tagged, length-prefixed frames over stream sockets (Unix sockets locally).

A frame is a 12-byte header, `<QI`: payload length (8 bytes, so frames over 4 GiB are fine
up to `MAX_FRAME`) and a tag (the request or call id), then the payload: a message from
`protocol.py`. Frames are only exchanged over sockets in the session's private directory
(mode 0700), so no stranger can send us a pickle; over TCP (`connect_tcp`/`serve_tcp`, for
the Ray backend) a connection first passes `auth.py`'s handshake.

`FrameProtocol` is the (buffered) asyncio protocol both ends use. It never drops a frame
silently: a payload that cannot be decoded is handed to `on_bad_frame(tag, error)`, so the
request it belongs to fails, and a frame over `MAX_FRAME` is skipped the same way. It honours
`pause_writing`/`resume_writing`: senders that can wait call `await proto.drained()`.
`RpcPeer` adds request/response calls in both directions on one connection (the control
plane). The data plane (router <-> replica) uses `FrameProtocol` directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import mmap
import pickle
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

from flotilla._private import auth, heap
from flotilla._private.awaitable import AwaitableBytes
from flotilla._private.protocol import (
    OOB_MIN,
    Failure,
    Reply,
    Request,
    decode,
    encode,
    encode_parts,
)

logger = logging.getLogger(__name__)

_HEAD = struct.Struct("<QI")
HEADER = _HEAD.size
MAX_FRAME = 1 << 36  # 64 GiB: far above any body or reply limit, below what breaks the length
#: Set in a header's length: the payload is `<IQ` (n, pickle length), n `<Q` buffer sizes, the
#: pickle, then the n out-of-band buffers (protocol 5), each at an offset of the payload that is
#: a multiple of ALIGN (zero bytes between). A large frame's pickle and buffers are each read
#: into memory of their own; they decode in place: a read-only buffer (a bytes field that
#: `protocol.oob` wrapped) as `AwaitableBytes` whose contents the kernel wrote, any other
#: (numpy arrays) as a writable view.
OOB = 1 << 63
#: Set in an out-of-band buffer's size: the sender's buffer was read-only; it arrives as bytes,
#: `AwaitableBytes` (a body: `protocol.oob`) unless PLAIN is set too (a bytes object itself:
#: `protocol.wire`).
AS_BYTES = 1 << 63
PLAIN = 1 << 62
_SIZE = PLAIN - 1
ALIGN = 64
_OOB_META = struct.Struct("<IQ")
#: A frame at least this large that has not fully arrived is received into a buffer of its own
#: size, filled as its bytes come (one copy), instead of the connection's shared buffer.
BIG_FRAME = OOB_MIN


class FrameTooLargeError(ValueError):
    """A message is larger than a frame may be."""


def frame(tag: int, msg: tuple[Any, ...]) -> bytes:
    """One whole frame holding `msg` (small messages: one buffer, one write)."""
    payload = encode(msg)
    if len(payload) > MAX_FRAME:
        raise FrameTooLargeError(f"a message of {len(payload)} bytes is over the {MAX_FRAME}-byte frame limit")
    return _HEAD.pack(len(payload), tag) + payload


def big_buffer(size: int) -> memoryview:
    """Writable memory of `size` bytes for data about to be written into it, not zeroed first.

    Up to `heap.REUSED` (in a proxy or replica, which keep freed memory: heap.py) an
    uninitialised bytearray from memory the process already touched: no page faults. Above it
    a buffer of `heap.KEPT`, the pool of large buffers taken back once nothing refers to
    them: a process that receives large payloads again and again fills the same
    memory (100 MB arrays there and back through a handle on the VM of bench/RESULTS.md: no
    page faults, 41 ms a call instead of about 57, and none of the 150 to 480 ms stalls that
    fresh memory sometimes cost there). New buffers are `_fresh_buffer`'s."""
    if size <= heap.REUSED:
        return memoryview(heap.uninitialized(size))
    return heap.KEPT.get(size, _fresh_buffer)


def _fresh_buffer(size: int) -> Any:
    """With numpy loaded (it is, where large arrays travel) an uninitialised numpy buffer: the
    allocator hands back memory already touched (under glibc's adaptive mmap threshold, up
    to 32 MB) and numpy asks for huge pages above it. Else fresh private anonymous pages with
    huge pages asked for. Filling 100 MB then takes about 13 ms on the 2-core machine of
    bench/RESULTS.md instead of about 70 (a bytearray, zeroed and in 4 KiB pages) or 105 (a
    shared anonymous mapping)."""
    np = sys.modules.get("numpy")
    if np is not None:
        return np.empty(size, np.uint8)
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # no THP: small pages
        m.madvise(mmap.MADV_HUGEPAGE)
    return m


def _frame_buffer(size: int) -> bytearray | memoryview:
    """Writable memory for a large frame (zeroed only where it is a plain bytearray)."""
    return big_buffer(size) if size >= MAPPED_FRAME or size <= heap.REUSED else bytearray(size)


#: From this size a frame's buffer is `big_buffer`'s.
MAPPED_FRAME = 4 << 20


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _oob_layout(pickle_len: int, sizes: list[int] | tuple[int, ...]) -> tuple[int, list[int], int]:
    """Where the pickle and each buffer start in an out-of-band payload, and its length."""
    start = _OOB_META.size + 8 * len(sizes)
    offsets = []
    end = start + pickle_len
    for size in sizes:
        off = _aligned(end)
        offsets.append(off)
        end = off + size
    return start, offsets, end


def _split(payload: bytearray | memoryview) -> tuple[Any, list[Any] | None]:
    """A whole out-of-band frame's pickle and its buffers, each copied into memory of its own
    as if it had been received piece by piece (`_oob_pieces`)."""
    view = memoryview(payload)
    pieces = _oob_pieces(len(view))
    at = 0
    try:
        while True:
            want = next(pieces)
            want[:] = view[at : at + len(want)]
            at += len(want)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def _bytes_buffer(flagged: int) -> tuple[bytes, memoryview]:
    """The bytes (or `AwaitableBytes`) that a buffer's flagged size asks for, to be filled, and
    a writable view of its contents (where this interpreter cannot make one, a buffer whose
    contents become bytes when filled)."""
    size, cls = flagged & _SIZE, bytes if flagged & PLAIN else AwaitableBytes
    made = heap.blank_bytes(cls, size)
    if made is not None:
        return made
    view = big_buffer(size)
    return _Later(cls, view), view  # type: ignore[return-value]


class _Later:
    """A buffer to become `cls` once it is filled (`_settle`)."""

    __slots__ = ("cls", "view")

    def __init__(self, cls: type, view: memoryview) -> None:
        self.cls, self.view = cls, view


def _settle(bufs: list[Any]) -> list[Any]:
    return [b.cls(b.view) if b.__class__ is _Later else b for b in bufs]


def _flagged(buf: memoryview) -> int:
    """A read-only buffer's size with the flags that say what it arrives as."""
    return len(buf) | (AS_BYTES | PLAIN if isinstance(buf.obj, bytes) else AS_BYTES)


def _whole_piece(size: int) -> Generator[memoryview, None, tuple[Any, list[Any] | None]]:
    """A large frame's memory, to be filled: its payload in one buffer of its own."""
    buf = _frame_buffer(size)
    yield memoryview(buf)
    return buf, None


def _oob_pieces(size: int) -> Generator[memoryview, None, tuple[Any, list[Any] | None]]:
    """A large out-of-band frame's memory, part by part as the layout read so far says: its
    pickle, then each buffer in memory of its own (no copy after the kernel's)."""
    meta = bytearray(_OOB_META.size)
    yield memoryview(meta)
    n, pickle_len = _OOB_META.unpack(meta)
    if _OOB_META.size + 8 * n + pickle_len > size:
        raise ValueError(f"an out-of-band frame of {size} bytes says its layout alone is longer")
    raw = bytearray(8 * n)
    yield memoryview(raw)
    sizes = struct.unpack(f"<{n}Q", raw)
    start, offsets, end = _oob_layout(pickle_len, [s & _SIZE for s in sizes])
    if end != size:
        raise ValueError(f"an out-of-band frame of {size} bytes says it holds {end}")
    pickled = _frame_buffer(pickle_len)
    yield memoryview(pickled)
    at = start + pickle_len
    bufs: list[Any] = []
    for off, size in zip(offsets, sizes, strict=True):
        if off > at:
            yield memoryview(bytearray(off - at))  # alignment padding
        if size & AS_BYTES:
            obj, view = _bytes_buffer(size)
            bufs.append(obj)
        else:
            view = memoryview(_frame_buffer(size))
            bufs.append(view)
        yield view
        at = off + len(view)
    return pickled, _settle(bufs)


def _ignore_bad_frame(tag: int, err: BaseException) -> None:
    logger.error("could not decode a frame (tag %d): %r", tag, err)


#: SO_SNDBUF of a Unix socket: how many bytes one side may have written that the other has
#: not read yet. Linux's default (about 208 KiB) makes a 100 MB frame take ~500 turns of
#: writer and reader, each a wake-up of the other process; the kernel caps this at
#: net.core.wmem_max (and doubles it), and it only bounds memory, it does not reserve any.
UNIX_SNDBUF = 1 << 20
#: Bytes a connection reads at a time between large frames (the kernel copies them into this
#: thread's `_scratch`, and the frames in them are decoded from there).
READ_SIZE = 1 << 16
_THREAD = threading.local()


def _scratch() -> memoryview:
    """This thread's read buffer (the protocols of one event loop take turns using it)."""
    s: memoryview | None = getattr(_THREAD, "scratch", None)
    if s is None:
        s = _THREAD.scratch = memoryview(bytearray(READ_SIZE))
    return s


#: Replies a coalescing connection holds before it writes them anyway (`FrameProtocol.send`).
HOLD_BYTES = 1 << 16


class FrameProtocol(asyncio.BufferedProtocol):
    """Parses frames and hands each decoded message to `on_message(tag, msg)`.

    The loop reads into memory the protocol hands it (`get_buffer`): a large frame straight
    into memory of its own (an out-of-band one piece by piece: `_oob_pieces`), so its bytes
    are copied once, by the kernel; anything else
    into the thread's scratch buffer, parsed before the next read. `data_received` takes
    bytes the same way (a connection handed over by `auth`, tests)."""

    def __init__(
        self,
        on_message: Callable[[int, Any], None],
        on_close: Callable[[BaseException | None], None] | None = None,
        on_bad_frame: Callable[[int, BaseException], None] = _ignore_bad_frame,
    ) -> None:
        self.on_message = on_message
        self.on_close = on_close
        self.on_bad_frame = on_bad_frame
        self._buf = bytearray()
        self._skip = 0  # bytes still to discard of an oversize frame
        # A large frame being received: `_pieces` hands out the memory for it piece by piece;
        # `_want` is the piece being filled (`_fill` bytes so far), `_left` the frame's bytes
        # still to come.
        self._pieces: Generator[memoryview, None, tuple[Any, list[Any] | None]] | None = None
        self._want: memoryview | None = None
        self._fill = 0
        self._left = 0
        self._big_tag = 0
        self._scratch: memoryview | None = None
        self.transport: asyncio.Transport | None = None
        self._join_free = True  # the transport writes `writelines`' parts without joining them
        self.closed = False
        self.paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.on_connect: Callable[[], None] | None = None
        #: Set before connecting (a replica's end): the frames sent while the requests of one
        #: read run their first steps go out in one write (`_held` until `flush`).
        self.coalesce = False
        self._held: list[bytes] | None = None
        self._held_bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # asyncio's own socket transport (a lane's loop) joins what `writelines` gets (`_write_large`)
        self._join_free = not type(transport).__module__.startswith("asyncio")
        if self.coalesce:
            self._loop = asyncio.get_running_loop()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)
        if self.on_connect is not None:
            self.on_connect()

    def get_buffer(self, sizehint: int) -> memoryview:
        want = self._want
        if want is not None:
            return want[self._fill :]
        s = self._scratch
        if s is None:
            s = self._scratch = _scratch()
        return s

    def buffer_updated(self, nbytes: int) -> None:
        want = self._want
        if want is None:
            self.data_received(self._scratch[:nbytes])  # type: ignore[index]
            return
        self._filled(want, nbytes)

    def _filled(self, want: memoryview, nbytes: int) -> None:
        """`nbytes` more of the piece `want` arrived."""
        self._left -= nbytes
        fill = self._fill + nbytes
        if fill < len(want):
            self._fill = fill
        else:
            self._next_piece()

    def _start_big(self, tag: int, size: int, oob: bool) -> None:
        self._pieces = _oob_pieces(size) if oob else _whole_piece(size)
        self._big_tag, self._left = tag, size
        self._next_piece()

    def _next_piece(self) -> None:
        """The piece being filled is full: on to the next (or deliver the whole frame)."""
        pieces = self._pieces
        assert pieces is not None
        self._fill = 0
        try:
            want = next(pieces)
            while not want:
                want = next(pieces)
        except StopIteration as done:
            self._pieces = self._want = None
            payload, bufs = done.value
            self._deliver(self._big_tag, payload, False, bufs)
            return
        except Exception as e:  # a layout that does not add up: skip the rest of the frame
            self._pieces = self._want = None
            self._skip, self._left = self._left, 0
            self.on_bad_frame(self._big_tag, e)
            return
        self._want = want

    def _feed(self, data: memoryview) -> int:
        """Copy `data` into the large frame being received; returns the bytes it took."""
        took = 0
        while self._want is not None and took < len(data):
            want, fill = self._want, self._fill
            n = min(len(want) - fill, len(data) - took)
            want[fill : fill + n] = data[took : took + n]
            took += n
            self._filled(want, n)
        return took

    def data_received(self, data: bytes | bytearray | memoryview) -> None:
        if self._want is not None:  # filling a large frame
            data = memoryview(data)
            took = self._feed(data)
            if took == len(data):
                return
            data = data[took:]
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return
            data = data[self._skip :]
            self._skip = 0
        buf = self._buf
        if buf:
            buf += data
            view: bytes | bytearray | memoryview = buf
        else:
            view = data  # fast path: nothing buffered (usually whole frames)
        n = len(view)
        pos = 0
        frames = 0
        while n - pos >= HEADER:
            size, tag = _HEAD.unpack_from(view, pos)
            oob = size & OOB
            size &= ~OOB
            start = pos + HEADER
            if size > MAX_FRAME:
                self.on_bad_frame(tag, FrameTooLargeError(f"a frame of {size} bytes is over the {MAX_FRAME}-byte limit"))
                left = n - start
                if size > left:
                    self._skip = size - left
                    pos = n
                    break
                pos = start + size
                continue
            end = start + size
            if end > n:
                if size >= BIG_FRAME:  # the rest comes into memory of its own
                    self._start_big(tag, size, bool(oob))
                    pos = start + self._feed(memoryview(view)[start:n])
                    if self._want is None:  # refused on its layout: skip what of it is here
                        k = min(self._skip, n - pos)
                        self._skip -= k
                        pos += k
                        continue
                    pos = n
                break
            if oob:  # `_split` copies each part into memory of its own before decoding
                self._deliver(tag, memoryview(view)[start:end], True)
            elif size < BIG_FRAME or view is buf:
                self._deliver(tag, view[start:end], False)
            else:
                self._deliver(tag, memoryview(view)[start:end], False)
            pos = end
            frames += 1
        if view is buf:
            del buf[:pos]
        elif pos < n:
            buf += view[pos:]
        if frames > 1 and self._loop is not None and self._held is None:
            # Several requests in one read: their replies (sent from the first steps of their
            # tasks, which run before this callback) leave together.
            self._held = []
            self._loop.call_soon(self.flush)

    def _deliver(self, tag: int, payload: Any, oob: bool, bufs: list[Any] | None = None) -> None:
        """Decode a frame's payload (`oob`: a whole out-of-band one; `bufs`: the out-of-band
        buffers of one received piece by piece) and hand the message on."""
        try:
            msg = decode(*_split(payload)) if oob else decode(payload, bufs)
        except Exception as e:
            self.on_bad_frame(tag, e)
            return
        self.on_message(tag, msg)

    def send(self, tag: int, msg: tuple[Any, ...]) -> None:
        """Queue one message; raises FrameTooLargeError (or a pickling error) for what cannot go.

        Large buffers in it (numpy arrays, PickleBuffers) are written from their own memory
        after the pickle, not copied: they are read until the transport has written them."""
        if self.transport is not None and not self.closed:
            payload, bufs = encode_parts(msg)
            if bufs:
                if self._held:
                    self._write_held()
                sizes = [len(b) for b in bufs]
                start, offsets, total = _oob_layout(len(payload), sizes)
                if total > MAX_FRAME:
                    raise FrameTooLargeError(f"a message of {total} bytes is over the {MAX_FRAME}-byte frame limit")
                flagged = [_flagged(b) if b.readonly else len(b) for b in bufs]
                parts: list[bytes | memoryview] = [
                    _HEAD.pack(total | OOB, tag) + _OOB_META.pack(len(bufs), len(payload))
                    + struct.pack(f"<{len(bufs)}Q", *flagged) + payload]
                at = start + len(payload)
                for off, b in zip(offsets, bufs, strict=True):
                    if off > at:
                        parts.append(bytes(off - at))
                    parts.append(b)
                    at = off + len(b)
                self._write_large(parts)
                return
            if len(payload) > MAX_FRAME:
                raise FrameTooLargeError(f"a message of {len(payload)} bytes is over the {MAX_FRAME}-byte frame limit")
            if len(payload) < 65536:
                self._write(_HEAD.pack(len(payload), tag) + payload)
            else:  # large: no copy to prepend the header
                if self._held:
                    self._write_held()
                self._write_large([_HEAD.pack(len(payload), tag), payload])

    def _write_large(self, parts: list[bytes | memoryview]) -> None:
        """Write a large frame's parts in order, none copied to join them: uvloop's
        `writelines` takes them as they are; asyncio's joins them, so each part goes to its
        `write` as a memoryview (what the socket does not take at once is copied once)."""
        if self._join_free:
            self.transport.writelines(parts)  # type: ignore[union-attr]
            return
        write = self.transport.write  # type: ignore[union-attr]
        for part in parts:
            write(part if part.__class__ is memoryview or len(part) < 65536 else memoryview(part))

    def send_raw(self, data: bytes) -> None:
        """Queue a frame built with `frame()`."""
        if self.transport is not None and not self.closed:
            self._write(data)

    def _write(self, frame: bytes) -> None:
        held = self._held
        if held is None:
            self.transport.write(frame)  # type: ignore[union-attr]
            return
        held.append(frame)
        self._held_bytes += len(frame)
        if self._held_bytes > HOLD_BYTES:
            self._write_held()

    def _write_held(self) -> None:
        """Write the frames held so far in one write; later ones of the read are held still."""
        held = self._held
        if held:
            self._held = []
            self._held_bytes = 0
            if self.transport is not None and not self.closed:
                self.transport.write(held[0] if len(held) == 1 else b"".join(held))

    def flush(self) -> None:
        """Write the frames held since a read of several requests, and hold no more."""
        self._write_held()
        self._held = None

    # ---- flow control ---------------------------------------------------------------
    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def drained(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark again."""
        while self.paused and not self.closed:
            w = self._drain_waiter
            if w is None or w.done():
                w = self._drain_waiter = asyncio.get_running_loop().create_future()
            await w

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)
        if self.on_close is not None:
            self.on_close(exc)

    def close(self) -> None:
        if self.transport is not None:
            self.flush()
            self.transport.close()

    def abort(self) -> None:
        """Close at once, unsent bytes dropped (the peer is known dead)."""
        self._held = None
        if self.transport is not None:
            self.transport.abort()


class RemoteCallError(Exception):
    """A control-plane call failed on the other side; the message carries its traceback."""


class PeerClosedError(ConnectionError):
    """The connection closed before the call was answered."""


Handler = Callable[["RpcPeer", str, tuple[Any, ...]], Awaitable[Any] | Any]

# Set in the tag of an answer (Reply/Failure). Both sides number their calls from 1, so
# without it a frame that cannot be decoded could not be told apart: a call from the other
# side, or the answer to our own call with the same id.
_ANSWER = 1 << 31


class RpcPeer:
    """Request/response calls in both directions over one `FrameProtocol` connection."""

    def __init__(self, handler: Handler | None = None, name: str = "peer") -> None:
        self._handler = handler
        self._ids = itertools.cycle(range(1, _ANSWER))  # below the answer bit
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._on_close_cbs: list[Callable[[], None]] = []
        self.name = name
        self.proto = FrameProtocol(self._on_message, self._on_closed, self._on_bad_frame)

    @property
    def closed(self) -> bool:
        return self.proto.closed

    def on_close(self, cb: Callable[[], None]) -> None:
        if self.proto.closed:
            cb()
        else:
            self._on_close_cbs.append(cb)

    def call(self, op: str, *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if self.proto.closed:
            fut.set_exception(PeerClosedError(f"connection to {self.name} is closed"))
            return fut
        cid = next(self._ids)
        self._pending[cid] = fut
        try:
            self.proto.send(cid, Request(op, args))
        except Exception as e:
            del self._pending[cid]
            fut.set_exception(e)
        return fut

    def notify(self, op: str, *args: Any) -> None:
        """Fire-and-forget call (tag 0: no answer is sent)."""
        self.proto.send(0, Request(op, args))

    def _on_message(self, cid: int, msg: Any) -> None:
        cls = type(msg)
        if cls is Request:
            asyncio.get_running_loop().create_task(self._serve(cid, msg.op, msg.args))
            return
        fut = self._pending.pop(cid & ~_ANSWER, None)
        if fut is None or fut.done():
            return
        if cls is Reply:
            fut.set_result(msg.value)
        else:
            err = msg.error if cls is Failure else f"unexpected message {cls.__name__}"
            fut.set_exception(err if isinstance(err, BaseException) else RemoteCallError(err))

    def _on_bad_frame(self, cid: int, err: BaseException) -> None:
        if cid & _ANSWER:
            fut = self._pending.pop(cid & ~_ANSWER, None)
            if fut is not None and not fut.done():
                fut.set_exception(RemoteCallError(f"the answer from {self.name} could not be decoded: {err!r}"))
        elif cid:
            self.proto.send(cid | _ANSWER, Failure(f"the call could not be decoded by {self.name}: {err!r}"))
        else:
            logger.error("could not decode a notification from %s: %r", self.name, err)

    async def _serve(self, cid: int, op: str, args: tuple[Any, ...]) -> None:
        try:
            if self._handler is None:
                raise RemoteCallError(f"{self.name} accepts no calls")
            result = self._handler(self, op, args)
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                result = await result
        except Exception as e:
            if cid:
                self._reply(cid, Failure(_portable(e)))
            else:
                logger.exception("notification %r failed", op)
            return
        if cid:
            self._reply(cid, Reply(result))

    def _reply(self, cid: int, msg: Reply | Failure) -> None:
        try:
            self.proto.send(cid | _ANSWER, msg)
        except Exception as e:
            self.proto.send(cid | _ANSWER, Failure(f"the answer could not be sent: {e!r}"))

    def _on_closed(self, exc: BaseException | None) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(PeerClosedError(f"connection to {self.name} closed"))
        cbs, self._on_close_cbs = self._on_close_cbs, []
        for cb in cbs:
            try:
                cb()
            except Exception:
                logger.exception("on_close callback failed")

    def close(self) -> None:
        self.proto.close()


def _portable(e: BaseException) -> BaseException | str:
    """`e` if it survives a pickle round trip, else its formatted traceback."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return "".join(traceback.format_exception(e))


async def connect_unix(path: str, peer: RpcPeer) -> RpcPeer:
    loop = asyncio.get_running_loop()
    await loop.create_unix_connection(lambda: peer.proto, path)
    return peer


async def serve_unix(path: str, make_peer: Callable[[], RpcPeer]) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(lambda: make_peer().proto, path)


# ---- TCP (the Ray backend): the same frames after a mutual HMAC handshake (auth.py) ----------

Conn = TypeVar("Conn", bound=RpcPeer | asyncio.BaseProtocol)


def _protocol(conn: RpcPeer | asyncio.BaseProtocol) -> asyncio.BaseProtocol:
    return conn.proto if isinstance(conn, RpcPeer) else conn


async def connect_tcp(
    host: str, port: int, conn: Conn, secret: bytes, *, timeout: float = auth.HANDSHAKE_TIMEOUT
) -> Conn:
    """Connect `conn` (an `RpcPeer` or a data-plane `FrameProtocol`) to a `serve_tcp` server.

    Returns once both ends proved they hold `secret`; `conn` sees no byte before that. Raises
    `auth.AuthError` (a `ConnectionError`) when the handshake fails or takes over `timeout`
    seconds, `OSError` when the connection cannot be made.
    """
    auth.check_secret(secret)
    loop = asyncio.get_running_loop()
    inner = _protocol(conn)
    _, hs = await loop.create_connection(lambda: auth.ClientHandshake(inner, secret, timeout), host, port)
    try:
        await hs.done
    except BaseException:
        hs.abort()
        raise
    return conn


async def serve_tcp(
    host: str,
    port: int,
    factory: Callable[[], RpcPeer] | Callable[[], asyncio.BaseProtocol],
    secret: bytes,
    *,
    timeout: float = auth.HANDSHAKE_TIMEOUT,
) -> asyncio.Server:
    """Listen on `host:port` (a node's own address, not 0.0.0.0); `factory()` builds each
    connection's `RpcPeer` or `FrameProtocol` only after its client proved it holds `secret`.
    With port 0 the system picks one: `server.sockets[0].getsockname()[1]`.
    A client that fails, or does not finish within `timeout` seconds, is closed and counted
    (`auth.failures`)."""
    auth.check_secret(secret)
    loop = asyncio.get_running_loop()

    def make() -> asyncio.BaseProtocol:
        return _protocol(factory())

    return await loop.create_server(lambda: auth.ServerHandshake(make, secret, timeout), host, port)


def tcp_address(addr: str) -> tuple[str, int] | None:
    """(host, port) of a "tcp://host:port" address; None for a Unix socket path."""
    if not addr.startswith("tcp://"):
        return None
    host, _, port = addr[6:].rpartition(":")
    return host.strip("[]"), int(port)


async def connect_addr(addr: str, conn: Conn) -> Conn:
    """Connect to a Unix socket path, or to "tcp://host:port" with this process's cluster
    secret (`auth.cluster_secret()`, mutual handshake first)."""
    tcp = tcp_address(addr)
    if tcp is None:
        loop = asyncio.get_running_loop()
        await loop.create_unix_connection(lambda: _protocol(conn), addr)
        return conn
    return await connect_tcp(tcp[0], tcp[1], conn, auth.cluster_secret())
