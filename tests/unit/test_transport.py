"""Frames and messages: `protocol.py` (typed messages, encode/decode) and `transport.py`
(`frame()`, `FrameProtocol` parsing and flow control, `RpcPeer` over real sockets)."""

from __future__ import annotations

import asyncio
import collections
import itertools
import pickle
import random
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flotilla._private import auth, heap, protocol, transport
from flotilla._private.awaitable import AwaitableBytes
from flotilla._private.errors import error_reply
from flotilla._private.protocol import (
    MESSAGES,
    Abort,
    Call,
    Cancel,
    Chunk,
    Credit,
    Drain,
    DrainAck,
    End,
    Err,
    Failure,
    Http,
    HttpFull,
    HttpStart,
    Ok,
    Rejected,
    Reply,
    Request,
    Stream,
    UnknownMessageError,
    WsCredit,
    WsIn,
    WsOpen,
    WsOut,
    Yield,
    decode,
    encode,
)
from flotilla._private.transport import (
    HEADER,
    FrameProtocol,
    FrameTooLargeError,
    PeerClosedError,
    RemoteCallError,
    RpcPeer,
    frame,
)
from tests.unit.aio import Net, settle, until

pytestmark = pytest.mark.timeout(10)

HEAD = struct.Struct("<QI")


def _explode() -> Any:
    raise RuntimeError("this object cannot be unpickled")


class Unloadable:
    """Pickles fine, fails to unpickle (like a user type whose __init__ takes other args)."""

    def __reduce__(self) -> Any:
        return (_explode, ())


class LocalThing:
    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalThing) and other.x == self.x


# One example of every message type, with awkward values where a field allows them.
EXAMPLES: list[tuple[Any, ...]] = [
    Call("method", (1, "two", b"3"), {"k": [1, 2]}, {"request_id": "r1"}),
    Stream("gen", (), {}, None),
    Http({"type": "http", "path": "/x", "headers": [(b"a", b"b")]}, b"\x00\xffbody", {"route": "/"}),
    Cancel(),
    Credit(16),
    DrainAck(),
    Ok({"nested": (1, 2.5, None, LocalThing(3))}),
    error_reply(ValueError("bad value")),
    Err("T", "msg", "tb"),
    HttpFull(200, [(b"content-type", b"text/plain")], b"ok"),
    HttpStart(206, []),
    Chunk(b"x" * 70_000),
    Yield(lambda: 42),  # needs cloudpickle
    End(),
    Abort("generator raised"),
    Rejected(),
    Drain(),
    Request("op", (1, {"a": 2})),
    Reply([1, 2, 3]),
    Failure(ValueError("remote")),
    WsOpen({"type": "websocket", "path": "/ws", "subprotocols": ["chat"]}, {"route": "/"}),
    WsIn({"type": "websocket.receive", "bytes": b"\x00\xff"}),
    WsOut({"type": "websocket.close", "code": 4001, "reason": "bye"}),
    WsCredit(16),
]


def same(a: Any, b: Any) -> bool:
    """Equal messages; callables compare by result, exceptions by type and args."""
    if type(a) is not type(b):
        return False
    for x, y in zip(a, b, strict=True):
        if callable(x) and not isinstance(x, type):
            if x() != y():
                return False
        elif isinstance(x, BaseException):
            if type(x) is not type(y) or x.args != y.args:
                return False
        elif x != y:
            return False
    return True


# ---- protocol -----------------------------------------------------------------------------


def test_examples_cover_every_message_type() -> None:
    assert {type(m) for m in EXAMPLES} == set(MESSAGES)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg: tuple[Any, ...]) -> None:
    out = decode(encode(msg))
    assert type(out) is type(msg)
    assert out._fields == msg._fields  # type: ignore[attr-defined]
    assert same(out, msg)
    # also through a bytearray and a memoryview (what FrameProtocol hands to decode)
    assert same(decode(bytearray(encode(msg))), msg)
    assert same(decode(memoryview(encode(msg))), msg)


def test_wire_form_is_a_plain_tuple_with_a_code() -> None:
    t = pickle.loads(encode(Credit(7)))
    assert type(t) is tuple
    assert t == (MESSAGES.index(Credit), 7)


def test_err_defaults_round_trip() -> None:
    out = decode(encode(Err("KeyError", "'k'", "Traceback...")))
    assert out == Err("KeyError", "'k'", "Traceback...", None, None)
    assert out.error is None and out.error_type is None


@pytest.mark.parametrize(
    "payload",
    [pickle.dumps("hello"), pickle.dumps(5), pickle.dumps((999, 1)), pickle.dumps(("x", 1)), pickle.dumps(())],
    ids=["str", "int", "bad-code", "str-code", "empty"],
)
def test_decode_refuses_what_is_not_a_message(payload: bytes) -> None:
    with pytest.raises(UnknownMessageError):
        decode(payload)


def test_decode_raises_on_a_broken_pickle() -> None:
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises
        decode(b"definitely not a pickle")
    with pytest.raises(RuntimeError, match="cannot be unpickled"):
        decode(encode(Ok(Unloadable())))


def test_dumps_falls_back_to_cloudpickle() -> None:
    def local(x: int) -> int:
        return x + 1

    assert pickle.loads(protocol.dumps(local))(1) == 2
    assert pickle.loads(protocol.dumps([1, 2])) == [1, 2]


# ---- frame() --------------------------------------------------------------------------------


def test_frame_layout() -> None:
    data = frame(77, Ok("x"))
    size, tag = HEAD.unpack_from(data)
    assert HEADER == 12
    assert tag == 77
    assert size == len(data) - HEADER
    assert decode(data[HEADER:]) == Ok("x")


def test_frame_refuses_an_oversize_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "MAX_FRAME", 64)
    frame(1, Ok(b""))  # small: fine
    with pytest.raises(FrameTooLargeError, match="64-byte frame limit"):
        frame(1, Ok(b"x" * 100))
    proto = FrameProtocol(lambda tag, msg: None)
    proto.transport = FakeTransport()  # type: ignore[assignment]
    with pytest.raises(FrameTooLargeError):
        proto.send(1, Ok(b"x" * 100))
    assert proto.transport.written == []  # type: ignore[attr-defined]


def test_frame_error_is_a_value_error() -> None:
    assert issubclass(FrameTooLargeError, ValueError)


# ---- FrameProtocol parsing ------------------------------------------------------------------


class FakeTransport:
    """Records writes (only for send(), which needs a transport)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def writelines(self, parts: Any) -> None:
        self.written.append(b"".join(parts))

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class Sink:
    """A FrameProtocol that records what it delivers; `feed` hands it bytes as a transport
    would, by `data_received` or (`buffered`) into the memory `get_buffer` gives."""

    buffered = False

    def __init__(self) -> None:
        self.got: list[tuple[int, Any]] = []
        self.bad: list[tuple[int, BaseException]] = []
        self.proto = FrameProtocol(self._msg, on_bad_frame=self._bad)

    def _msg(self, tag: int, msg: Any) -> None:
        self.got.append((tag, msg))

    def _bad(self, tag: int, err: BaseException) -> None:
        self.bad.append((tag, err))

    def feed(self, *chunks: bytes) -> Sink:
        for c in chunks:
            if self.buffered:
                auth.feed(self.proto, c)
            else:
                self.proto.data_received(c)
        return self


@pytest.fixture(autouse=True, params=["data_received", "get_buffer"])
def feed_mode(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every parsing test twice: bytes handed over, and bytes read into the protocol's memory."""
    Sink.buffered = request.param == "get_buffer"
    yield
    Sink.buffered = False


SEQUENCE: list[tuple[int, tuple[Any, ...]]] = [
    (1, Call("f", (1,), {}, None)),
    (2, Ok(b"y" * 300)),
    (0, Drain()),
    (3, Yield([1, 2, 3])),
    (3, End()),
    (4_000_000_000, Credit(16)),  # tags use the full 32 bits
    (5, Cancel()),
]
BLOB = b"".join(frame(t, m) for t, m in SEQUENCE)


def test_whole_sequence_in_one_chunk() -> None:
    s = Sink().feed(BLOB)
    assert s.got == SEQUENCE and not s.bad
    assert not s.proto._buf


def test_sequence_split_at_every_offset() -> None:
    for i in range(len(BLOB) + 1):
        s = Sink().feed(BLOB[:i], BLOB[i:])
        assert s.got == SEQUENCE, f"split at {i}"
        assert not s.bad and not s.proto._buf


def test_sequence_byte_by_byte() -> None:
    s = Sink()
    for i in range(len(BLOB)):
        s.feed(BLOB[i : i + 1])
    assert s.got == SEQUENCE and not s.bad and not s.proto._buf


def test_sequence_in_random_chunks() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(BLOB)), rng.randint(1, 8)))
        bounds = [0, *cuts, len(BLOB)]
        s = Sink().feed(*(BLOB[a:b] for a, b in itertools.pairwise(bounds)))
        assert s.got == SEQUENCE, cuts


def test_a_chunk_may_also_be_a_bytearray_or_hold_an_empty_chunk() -> None:
    s = Sink().feed(b"", bytearray(BLOB[:5]), b"", BLOB[5:])
    assert s.got == SEQUENCE


def raw(tag: int, payload: bytes) -> bytes:
    return HEAD.pack(len(payload), tag) + payload


BAD_BLOB = b"".join([
    frame(1, Ok(1)),
    raw(2, b"not a pickle at all"),
    frame(3, Ok(3)),
    raw(4, pickle.dumps(("not", "ours"))),
    frame(5, Ok(5)),
    raw(6, encode(Ok(Unloadable()))),
    frame(7, Ok(7)),
    raw(8, b""),  # an empty payload
    frame(9, Ok(9)),
])


def check_bad(s: Sink) -> None:
    assert s.got == [(1, Ok(1)), (3, Ok(3)), (5, Ok(5)), (7, Ok(7)), (9, Ok(9))]
    assert [t for t, _ in s.bad] == [2, 4, 6, 8]
    assert isinstance(s.bad[1][1], UnknownMessageError)
    assert isinstance(s.bad[2][1], RuntimeError)
    assert not s.proto._buf


def test_bad_payloads_are_reported_and_later_frames_still_arrive() -> None:
    check_bad(Sink().feed(BAD_BLOB))


def test_bad_payloads_split_at_every_offset() -> None:
    for i in range(len(BAD_BLOB) + 1):
        check_bad(Sink().feed(BAD_BLOB[:i], BAD_BLOB[i:]))


def test_the_default_bad_frame_handler_logs(caplog: pytest.LogCaptureFixture) -> None:
    got: list[Any] = []
    proto = FrameProtocol(lambda t, m: got.append(m))
    proto.data_received(raw(9, b"garbage") + frame(10, End()))
    assert got == [End()]
    assert "tag 9" in caplog.text


def test_oversize_frames_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "MAX_FRAME", 64)
    small = [(1, Ok(1)), (3, End()), (5, Ok("five")), (7, Credit(2))]
    blob = b"".join([
        frame(*small[0]),
        raw(2, b"A" * 65),  # one byte over
        frame(*small[1]),
        raw(4, b"B" * 1000),
        frame(*small[2]),
        raw(6, b"C" * 100) + raw(8, b"D" * 200),  # two in a row
        frame(*small[3]),
    ])

    def check(s: Sink, where: Any) -> None:
        assert s.got == small, where
        assert [t for t, _ in s.bad] == [2, 4, 6, 8], where
        assert all(isinstance(e, FrameTooLargeError) for _, e in s.bad)
        assert s.proto._skip == 0 and not s.proto._buf, where

    check(Sink().feed(blob), "whole")
    for i in range(len(blob) + 1):
        check(Sink().feed(blob[:i], blob[i:]), i)
    s = Sink()
    for i in range(len(blob)):
        s.proto.data_received(blob[i : i + 1])
    check(s, "byte by byte")


def test_exactly_max_frame_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    payload = encode(Ok(b"z" * 20))
    monkeypatch.setattr(transport, "MAX_FRAME", len(payload))
    s = Sink().feed(frame(1, Ok(b"z" * 20)))
    assert s.got == [(1, Ok(b"z" * 20))] and not s.bad


def test_an_oversize_header_reports_before_its_payload_arrives(monkeypatch: pytest.MonkeyPatch) -> None:
    """The request it belongs to fails at once, not after gigabytes have been read."""
    monkeypatch.setattr(transport, "MAX_FRAME", 64)
    s = Sink().feed(HEAD.pack(10_000, 42) + b"x" * 10)
    assert [t for t, _ in s.bad] == [42]
    assert s.proto._skip == 10_000 - 10
    s.feed(b"x" * (10_000 - 10 - 3), b"xxx" + frame(43, End()))
    assert s.got == [(43, End())] and s.proto._skip == 0


def test_send_writes_whole_frames() -> None:
    proto = FrameProtocol(lambda t, m: None)
    ft = proto.transport = FakeTransport()  # type: ignore[assignment]
    proto.send(3, Ok("small"))
    proto.send(4, Chunk(b"b" * 100_000))  # large: header and payload written together
    proto.send_raw(frame(5, End()))
    s = Sink().feed(*ft.written)  # type: ignore[attr-defined]
    assert s.got == [(3, Ok("small")), (4, Chunk(b"b" * 100_000)), (5, End())]


class Echoer:
    """A replica's end of a connection that coalesces (`FrameProtocol.coalesce`): each
    request's task answers in its first step, as a no-op handler does."""

    def __init__(self) -> None:
        self.proto = FrameProtocol(self._on)
        self.proto.coalesce = True
        self.ft = FakeTransport()
        self.proto.connection_made(self.ft)  # type: ignore[arg-type]

    def _on(self, tag: int, msg: Any) -> None:
        async def answer() -> None:
            self.proto.send(tag, msg.args[0])

        asyncio.get_running_loop().create_task(answer())

    def feed(self, *tagged: tuple[int, Any]) -> None:
        """Requests in one read: Call messages whose first argument is the reply to send."""
        self.proto.data_received(b"".join(frame(t, Call("m", (r,), {}, None)) for t, r in tagged))


def _echo_frames(written: list[bytes]) -> list[tuple[int, Any]]:
    return Sink().feed(*written).got


def test_replies_to_the_requests_of_one_read_leave_in_one_write() -> None:
    async def main() -> None:
        e = Echoer()
        e.feed((1, Ok("a")), (2, Ok("b")), (3, Ok("c")))
        assert e.ft.written == []  # the tasks have not run yet
        await settle()
        assert len(e.ft.written) == 1
        assert _echo_frames(e.ft.written) == [(1, Ok("a")), (2, Ok("b")), (3, Ok("c"))]
        e.proto.send(4, Ok("later"))  # after the read's batch: written at once
        assert len(e.ft.written) == 2 and _echo_frames(e.ft.written[1:]) == [(4, Ok("later"))]

    asyncio.run(main())


def test_the_reply_to_a_read_of_one_request_is_not_held() -> None:
    async def main() -> None:
        e = Echoer()
        e.feed((1, Ok("alone")))
        await asyncio.sleep(0)  # the task's first step: its write goes at once
        assert e.proto._held is None and _echo_frames(e.ft.written) == [(1, Ok("alone"))]

    asyncio.run(main())


def test_held_replies_keep_their_order_with_large_frames_a_size_limit_and_close(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "HOLD_BYTES", 300)

    async def main() -> None:
        e = Echoer()
        big = Chunk(b"x" * 100_000)  # written from its own memory: what is held goes first
        e.feed((1, Ok("a")), (2, big), (3, Ok("b" * 200)), (4, Ok("c" * 200)), (5, Ok("d")))
        await settle()
        assert _echo_frames(e.ft.written) == [(1, Ok("a")), (2, big), (3, Ok("b" * 200)),
                                              (4, Ok("c" * 200)), (5, Ok("d"))]
        assert len(e.ft.written) == 4  # a, big, then b and c over the limit, then d at the release
        at_close: list[Any] = []

        def answer_then_close(tag: int, msg: Any) -> None:
            async def answer() -> None:
                e.proto.send(tag, msg.args[0])
                if tag == 7:  # before the release: both replies are held
                    at_close.append(list(e.proto._held or []))
                    e.proto.close()  # what is held is written before the transport closes

            asyncio.get_running_loop().create_task(answer())

        e.proto.on_message = answer_then_close
        e.feed((6, Ok("e")), (7, Ok("f")))
        await settle()
        assert len(at_close) == 1 and len(at_close[0]) == 2
        assert e.ft.closed and _echo_frames(e.ft.written)[-2:] == [(6, Ok("e")), (7, Ok("f"))]
        assert len(_echo_frames(e.ft.written)) == 7  # written once

    asyncio.run(main())


def _sent(*msgs: tuple[int, tuple[Any, ...]]) -> bytes:
    """The bytes `send` writes for `msgs` (out-of-band frames included)."""
    proto = FrameProtocol(lambda t, m: None)
    ft = proto.transport = FakeTransport()  # type: ignore[assignment]
    for tag, msg in msgs:
        proto.send(tag, msg)
    return b"".join(ft.written)  # type: ignore[attr-defined]


def test_large_buffers_travel_out_of_band_and_decode_in_place() -> None:
    np = pytest.importorskip("numpy")
    big = np.arange(300_000, dtype=np.float64)  # 2.4 MB: out of band
    small = np.arange(10)  # out of band too
    blob = _sent((1, Ok("a")), (2, Call("f", (big, small, pickle.PickleBuffer(b"z" * 70_000)), {}, None)),
                 (3, End()))
    size, _ = HEAD.unpack_from(blob, len(frame(1, Ok("a"))))
    assert size & transport.OOB and (size & ~transport.OOB) > big.nbytes
    for cuts in ([], [5], [len(blob) // 2], [13, 100_000, 2_000_000, len(blob) - 3]):
        bounds = [0, *cuts, len(blob)]
        s = Sink().feed(*(blob[a:b] for a, b in itertools.pairwise(bounds)))
        assert not s.bad and [t for t, _ in s.got] == [1, 2, 3], cuts
        call = s.got[1][1]
        got_big, got_small, got_raw = call.args
        assert (got_big == big).all() and (got_small == small).all() and bytes(got_raw) == b"z" * 70_000
        assert got_big.flags.writeable and got_big.flags.aligned  # a view of the frame, which is ours
        assert not s.proto._buf and s.proto._want is None and s.proto._pieces is None


def test_an_out_of_band_frame_behind_a_partial_one_gets_memory_of_its_own() -> None:
    np = pytest.importorskip("numpy")
    arr = np.ones(20_000)  # 160 KB
    head = frame(1, Ok("x" * 100))
    blob = head + _sent((2, Ok(arr)))
    s = Sink().feed(head[:10], blob[10:])  # the second chunk completes one frame and holds another
    assert [t for t, _ in s.got] == [1, 2] and (s.got[1][1].result == arr).all()
    s.got[1][1].result[0] = 7  # its own memory: writable, and the connection's buffer can move
    s.feed(frame(3, End()))
    assert s.got[2] == (3, End())


def test_bodies_wrapped_by_oob_arrive_as_awaitable_bytes() -> None:
    body = b"b" * 100_000
    blob = _sent((4, Http({"type": "http"}, protocol.oob(body), None)), (5, HttpFull(200, [], protocol.oob(b"s"))))
    s = Sink().feed(blob)
    got = s.got[0][1].body
    assert type(got) is AwaitableBytes and got == body and hash(got) == hash(body)
    assert s.got[1][1].body == b"s"


def _mixed() -> tuple[bytes, bytes, Any, Any]:
    """A frame of two bodies (one from a bytes object, one from a writable buffer), two
    arrays (one writable, one not) and a bytes argument: the bytes sent and what they hold."""
    np = pytest.importorskip("numpy")
    body = bytes(range(256)) * 400  # 102,400 bytes
    arr = np.arange(20_000, dtype=np.float64)
    frozen = np.arange(9_000, dtype=np.int32)
    frozen.flags.writeable = False
    view_body = memoryview(bytearray(b"v" * 70_001))
    msg = Call("f", (protocol.oob(body), arr, protocol.oob(view_body), frozen, protocol.wire(body[::-1])), {}, None)
    return _sent((1, Ok("a")), (2, msg), (3, End())), body, arr, frozen


def _check_mixed(s: Sink, body: bytes, arr: Any, frozen: Any, where: object) -> None:
    assert not s.bad and [t for t, _ in s.got] == [1, 2, 3], where
    got_body, got_arr, got_view_body, got_frozen, got_plain = s.got[1][1].args
    assert type(got_body) is AwaitableBytes and got_body == body, where
    assert type(got_plain) is bytes and got_plain == body[::-1], where
    assert type(got_view_body) is AwaitableBytes and got_view_body == b"v" * 70_001, where
    assert (got_arr == arr).all() and got_arr.flags.writeable and got_arr.flags.aligned, where
    assert (got_frozen == frozen).all() and not got_frozen.flags.writeable, where
    assert s.proto._want is None and s.proto._pieces is None and not s.proto._buf, where


def test_a_large_frame_split_anywhere_gives_bodies_as_bytes_and_arrays_as_writable_views() -> None:
    """Every split point of the frame's layout (header, sizes, pickle, padding, each buffer)
    in a second chunk; read-only buffers arrive as bytes, writable ones as views."""
    blob, body, arr, frozen = _mixed()
    first = len(frame(1, Ok("a")))
    for cut in [*range(first, first + 200), *range(first + 200, len(blob), 997)]:
        _check_mixed(Sink().feed(blob[:cut], blob[cut:]), body, arr, frozen, cut)
    rng = random.Random(7)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(blob)), 12))
        bounds = [0, *cuts, len(blob)]
        _check_mixed(Sink().feed(*(blob[a:b] for a, b in itertools.pairwise(bounds))), body, arr, frozen, cuts)


def test_without_blank_bytes_a_body_is_copied_into_bytes_once_it_arrived(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "BLANK_BYTES", False)
    blob, body, arr, frozen = _mixed()
    _check_mixed(Sink().feed(blob[:100], blob[100:]), body, arr, frozen, "in two")
    _check_mixed(Sink().feed(blob), body, arr, frozen, "whole")


def test_a_large_frame_whose_layout_does_not_add_up_is_skipped() -> None:
    blob = _sent((2, HttpFull(200, [], protocol.oob(b"x" * 100_000))))
    payload = bytearray(blob[HEADER:])
    struct.pack_into("<Q", payload, transport._OOB_META.size, 100_001 | transport.AS_BYTES)  # one byte too many
    bad = blob[:HEADER] + bytes(payload)
    after = frame(3, End())
    for cut in (HEADER + 5, HEADER + 20, 1000):
        s = Sink().feed(bad[:cut], bad[cut:] + after)
        assert [t for t, _ in s.bad] == [2] and "says it holds" in str(s.bad[0][1]), cut
        assert s.got == [(3, End())], cut


def test_send_after_close_is_dropped() -> None:
    proto = FrameProtocol(lambda t, m: None)
    proto.send(1, End())  # not connected: nothing to write to, no error
    ft = FakeTransport()
    proto.connection_made(ft)  # type: ignore[arg-type]
    proto.connection_lost(None)
    proto.send(1, End())
    proto.send_raw(frame(1, End()))
    assert ft.written == [] and proto.closed


# ---- flow control -----------------------------------------------------------------------------


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_drained_returns_at_once_when_not_paused() -> None:
    async def main() -> None:
        proto = FrameProtocol(lambda t, m: None)
        await asyncio.wait_for(proto.drained(), 1)

    run(main())


def test_drained_waits_for_resume_writing() -> None:
    async def main() -> None:
        proto = FrameProtocol(lambda t, m: None)
        proto.pause_writing()
        assert proto.paused
        waiters = [asyncio.ensure_future(proto.drained()) for _ in range(3)]
        await settle()
        assert not any(w.done() for w in waiters)
        proto.resume_writing()
        await asyncio.wait_for(asyncio.gather(*waiters), 1)
        assert not proto.paused
        # paused again: a new wait, released by the next resume
        proto.pause_writing()
        w = asyncio.ensure_future(proto.drained())
        await settle()
        assert not w.done()
        proto.resume_writing()
        await asyncio.wait_for(w, 1)
        proto.resume_writing()  # a resume with nobody waiting is harmless

    run(main())


def test_drained_returns_when_the_connection_is_lost(net: Net) -> None:
    async def main() -> None:
        closed: list[Any] = []
        proto = FrameProtocol(lambda t, m: None, on_close=closed.append)
        proto.pause_writing()
        w = asyncio.ensure_future(proto.drained())
        await settle()
        assert not w.done()
        err = ConnectionResetError()
        proto.connection_lost(err)
        await asyncio.wait_for(w, 1)
        assert closed == [err]
        await asyncio.wait_for(proto.drained(), 1)  # still paused, but closed: no wait

    net.run(main())


async def socket_pair(
    left: Callable[[], asyncio.Protocol], right: Callable[[], asyncio.Protocol]
) -> tuple[asyncio.Transport, asyncio.Transport]:
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ta, _ = await loop.create_unix_connection(left, sock=a)
    tb, _ = await loop.create_unix_connection(right, sock=b)
    return ta, tb


def test_pause_writing_over_a_real_socket(net: Net) -> None:
    """A reader that does not read pauses the writer; reading again resumes it."""

    async def main() -> None:
        got: list[tuple[int, Any]] = []
        writer = FrameProtocol(lambda t, m: None)
        reader = FrameProtocol(lambda t, m: got.append((t, m)))
        tw, tr = await socket_pair(lambda: writer, lambda: reader)
        tr.pause_reading()
        tw.set_write_buffer_limits(high=4096)
        big = Chunk(b"q" * 256 * 1024)
        n = 0
        while not writer.paused:  # fill the socket buffer, then the transport's
            n += 1
            writer.send(n, big)
            assert n < 1000, "the transport never paused"
        w = asyncio.ensure_future(writer.drained())
        await settle()
        assert not w.done()
        tr.resume_reading()
        await asyncio.wait_for(w, 1.5)
        assert not writer.paused
        await until(lambda: len(got) == n, what="every frame")
        assert [t for t, _ in got] == list(range(1, n + 1))
        assert all(m == big for _, m in got)
        tw.close()
        tr.close()

    net.run(main())


def test_a_large_frame_is_read_into_its_own_memory_over_a_real_socket(net: Net) -> None:
    """After its first bytes, the loop reads a large frame straight into the frame's buffer
    (what `get_buffer` hands out is longer than the shared scratch buffer), many MB per read
    where the kernel lets a Unix socket hold that much, and the array decodes in place."""
    np = pytest.importorskip("numpy")

    async def main() -> None:
        got: list[tuple[int, Any]] = []
        sizes: list[int] = []
        reads: list[int] = []
        writer = FrameProtocol(lambda t, m: None)
        reader = FrameProtocol(lambda t, m: got.append((t, m)))
        get_buffer, buffer_updated = reader.get_buffer, reader.buffer_updated

        def spy_get(hint: int) -> memoryview:
            view = get_buffer(hint)
            sizes.append(len(view))
            return view

        def spy_updated(n: int) -> None:
            reads.append(n)
            buffer_updated(n)

        reader.get_buffer = spy_get  # type: ignore[method-assign]
        reader.buffer_updated = spy_updated  # type: ignore[method-assign]
        tw, tr = await socket_pair(lambda: writer, lambda: reader)
        arr = np.arange(2_500_000, dtype=np.float64)  # 20 MB
        body = bytes(range(256)) * 20_000  # 5,120,000 bytes
        writer.send(7, Ok(arr))
        writer.send(8, End())
        writer.send(9, Http({"type": "http"}, protocol.oob(body), None))
        writer.send(10, Ok(protocol.wire(body[:4_000_000])))
        await until(lambda: len(got) == 4, what="all four frames")
        assert got[0][0] == 7 and (got[0][1].result == arr).all() and got[1] == (8, End())
        assert got[0][1].result.flags.writeable
        assert max(sizes) > transport.READ_SIZE, sizes[:5]  # the frame's own buffer
        assert type(got[2][1].body) is AwaitableBytes and got[2][1].body == body
        # after the read that held its start, the kernel reads the rest straight into the bytes
        assert any(len(body) - transport.READ_SIZE <= n <= len(body) for n in sizes), sizes
        assert type(got[3][1].result) is bytes and got[3][1].result == body[:4_000_000]
        assert any(4_000_000 - transport.READ_SIZE <= n <= 4_000_000 for n in sizes), sizes
        wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
        sndbuf = tw.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert sndbuf >= 2 * min(transport.UNIX_SNDBUF, wmem_max)
        if wmem_max >= transport.UNIX_SNDBUF:  # the socket holds 1 MB or more: few, big reads
            assert max(reads) > 512 * 1024 and len(reads) < 200, (len(reads), max(reads))
        tw.close()
        tr.close()

    net.run(main())


# ---- RpcPeer over a real connection -----------------------------------------------------------


class Handler:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.notified = asyncio.Event()

    async def __call__(self, peer: RpcPeer, op: str, args: tuple[Any, ...]) -> Any:
        self.calls.append((op, args))
        if op == "add":
            return args[0] + args[1]
        if op == "sync":
            return "not awaited"
        if op == "wait":
            await self.gate.wait()
            return "released"
        if op == "fail":
            raise ValueError("remote failure")
        if op == "unpicklable_error":
            e = ValueError("with a lock")
            e.lock = threading.Lock()  # type: ignore[attr-defined]
            raise e
        if op == "unloadable":
            return Unloadable()
        if op == "unsendable":
            return threading.Lock()
        if op == "note":
            self.notified.set()
            return None
        if op == "echo":
            return args
        raise KeyError(op)


async def peers(
    ha: Any = None, hb: Any = None
) -> tuple[RpcPeer, RpcPeer]:
    a = RpcPeer(ha, name="a")
    b = RpcPeer(hb, name="b")
    await socket_pair(lambda: a.proto, lambda: b.proto)
    return a, b


def test_rpc_call_and_reply(net: Net) -> None:
    async def main() -> None:
        h = Handler()
        a, _b = await peers(None, h)
        assert await asyncio.wait_for(a.call("add", 2, 3), 1) == 5
        assert await asyncio.wait_for(a.call("echo", LocalThing(1), b"x"), 1) == (LocalThing(1), b"x")
        results = await asyncio.wait_for(asyncio.gather(*(a.call("add", i, i) for i in range(50))), 1)
        assert results == [2 * i for i in range(50)]
        a.close()

    net.run(main())


def test_rpc_sync_handler(net: Net) -> None:
    async def main() -> None:
        a, _b = await peers(None, lambda peer, op, args: (op, args))
        assert await asyncio.wait_for(a.call("x", 1), 1) == ("x", (1,))
        a.close()

    net.run(main())


def test_rpc_calls_in_both_directions_at_once(net: Net) -> None:
    async def main() -> None:
        ha, hb = Handler(), Handler()
        a, b = await peers(ha, hb)
        wa = a.call("wait")  # id 1 from a
        wb = b.call("wait")  # id 1 from b: the same tag, the other direction
        assert await asyncio.wait_for(a.call("add", 1, 1), 1) == 2
        assert await asyncio.wait_for(b.call("add", 2, 2), 1) == 4
        hb.gate.set()
        assert await asyncio.wait_for(wa, 1) == "released"
        assert not wb.done()
        ha.gate.set()
        assert await asyncio.wait_for(wb, 1) == "released"
        a.close()

    net.run(main())


def test_rpc_remote_error(net: Net) -> None:
    async def main() -> None:
        a, b = await peers(None, Handler())
        with pytest.raises(ValueError, match="remote failure"):
            await asyncio.wait_for(a.call("fail"), 1)
        with pytest.raises(KeyError):
            await asyncio.wait_for(a.call("no such op"), 1)
        # an exception that cannot be pickled arrives as its traceback
        with pytest.raises(RemoteCallError, match="with a lock"):
            await asyncio.wait_for(a.call("unpicklable_error"), 1)
        # no handler at all
        with pytest.raises(RemoteCallError, match="accepts no calls"):
            await asyncio.wait_for(b.call("add", 1, 2), 1)
        assert await asyncio.wait_for(a.call("add", 1, 2), 1) == 3  # still usable
        a.close()

    net.run(main())


def test_rpc_undecodable_reply_fails_the_call(net: Net) -> None:
    async def main() -> None:
        a, _b = await peers(None, Handler())
        with pytest.raises(RemoteCallError, match="could not be decoded"):
            await asyncio.wait_for(a.call("unloadable"), 1)
        assert not a._pending
        assert await asyncio.wait_for(a.call("add", 1, 2), 1) == 3

    net.run(main())


def test_rpc_unsendable_reply_fails_the_call(net: Net) -> None:
    async def main() -> None:
        a, _b = await peers(None, Handler())
        with pytest.raises(RemoteCallError, match="could not be sent"):
            await asyncio.wait_for(a.call("unsendable"), 1)
        assert await asyncio.wait_for(a.call("add", 1, 2), 1) == 3

    net.run(main())


def test_rpc_undecodable_call_is_answered(net: Net) -> None:
    async def main() -> None:
        h = Handler()
        a, _b = await peers(None, h)
        with pytest.raises(RemoteCallError, match="could not be decoded by b"):
            await asyncio.wait_for(a.call("echo", Unloadable()), 1)
        assert h.calls == []
        assert await asyncio.wait_for(a.call("add", 1, 2), 1) == 3

    net.run(main())


def test_rpc_undecodable_call_does_not_fail_a_call_with_the_same_id(net: Net) -> None:
    """Both sides number their calls from 1: a request from b that cannot be decoded must
    fail b's call, not a's pending call that happens to carry the same id."""

    async def main() -> None:
        ha, hb = Handler(), Handler()
        a, b = await peers(ha, hb)
        wa = a.call("wait")  # a's call 1, pending in b
        with pytest.raises(RemoteCallError, match="could not be decoded by a"):
            await asyncio.wait_for(b.call("echo", Unloadable()), 1)  # b's call 1
        assert not wa.done()
        hb.gate.set()
        assert await asyncio.wait_for(wa, 1) == "released"

    net.run(main())


def test_rpc_unsendable_call_fails_at_once(net: Net) -> None:
    async def main() -> None:
        a, _b = await peers(None, Handler())
        fut = a.call("echo", threading.Lock())
        assert fut.done()
        with pytest.raises(TypeError):
            fut.result()
        assert not a._pending

    net.run(main())


def test_rpc_notification(net: Net) -> None:
    async def main() -> None:
        h = Handler()
        a, _b = await peers(None, h)
        a.notify("fail")  # fails there: logged, no answer
        a.notify("echo", Unloadable())  # cannot be decoded there: logged, no answer
        a.notify("note")
        await asyncio.wait_for(h.notified.wait(), 1)
        assert [op for op, _ in h.calls] == ["fail", "note"]
        assert not a._pending
        assert await asyncio.wait_for(a.call("add", 1, 2), 1) == 3

    net.run(main())


def test_rpc_peer_close_fails_pending_calls(net: Net) -> None:
    async def main() -> None:
        h = Handler()
        a, b = await peers(None, h)
        closed_a: list[str] = []
        a.on_close(lambda: closed_a.append("a"))
        calls = [a.call("wait") for _ in range(3)]
        await until(lambda: len(h.calls) == 3, what="calls to arrive")
        b.close()  # the other side goes away
        for c in calls:
            with pytest.raises(PeerClosedError):
                await asyncio.wait_for(c, 1)
        assert a.closed and closed_a == ["a"]
        assert not a._pending
        # after the close: fails at once, and a late on_close callback runs at once
        with pytest.raises(PeerClosedError):
            await asyncio.wait_for(a.call("add", 1, 2), 1)
        a.on_close(lambda: closed_a.append("late"))
        assert closed_a == ["a", "late"]

    net.run(main())


def test_rpc_on_close_callback_errors_are_contained(net: Net) -> None:
    async def main() -> None:
        a, _b = await peers(None, Handler())
        ran: list[int] = []

        def boom() -> None:
            raise RuntimeError("callback failed")

        a.on_close(boom)
        a.on_close(lambda: ran.append(1))
        a.close()
        await until(lambda: a.closed)
        assert ran == [1]

    net.run(main())


def test_rpc_over_unix_socket_server(net: Net) -> None:
    path = net.sock("rpc")

    async def main() -> None:
        served: list[RpcPeer] = []

        def make() -> RpcPeer:
            p = RpcPeer(Handler(), name="server")
            served.append(p)
            return p

        server = await transport.serve_unix(path, make)
        try:
            client = await transport.connect_unix(path, RpcPeer(None, name="client"))
            assert await asyncio.wait_for(client.call("add", 20, 22), 1) == 42
            assert len(served) == 1
            client.close()
            await until(lambda: served[0].closed)
        finally:
            server.close()

    net.run(main())


def test_big_buffer_is_writable_memory_of_its_size_with_or_without_numpy() -> None:
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from flotilla._private.transport import big_buffer\n"
        "b = big_buffer(8 << 20)\n"
        "b[-3:] = b'xyz'\n"
        "assert b.nbytes == 8 << 20 and bytes(b[-3:]) == b'xyz' and not b.readonly\n"
        "print(type(b.obj).__name__, 'numpy' in sys.modules)\n"
    )
    plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert plain.stdout.split() == ["mmap", "False"], plain.stderr  # no numpy: huge-page mapping
    pytest.importorskip("numpy")
    with_np = subprocess.run([sys.executable, "-c", "import numpy\n" + script], capture_output=True, text=True, timeout=60)
    assert with_np.stdout.split() == ["ndarray", "True"], with_np.stderr


def test_big_buffer_comes_from_kept_memory_in_a_process_that_keeps_it() -> None:
    import subprocess
    import sys

    script = (
        "from flotilla._private import heap\n"
        "from flotilla._private.transport import _frame_buffer, big_buffer\n"
        "assert heap.keep_freed() == 64\n"
        "b = big_buffer(8 << 20)\n"
        "b[-3:] = b'xyz'\n"
        "assert b.nbytes == 8 << 20 and bytes(b[-3:]) == b'xyz' and not b.readonly\n"
        "f = _frame_buffer(1 << 20)\n"
        "print(type(b.obj).__name__, type(f).__name__, type(big_buffer(64 << 20).obj).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == ["bytearray", "memoryview", "mmap"], out.stderr  # over 32 MiB: mapped


def test_large_bytes_arguments_and_results_travel_out_of_band_as_plain_bytes() -> None:
    """`protocol.wire`: a bytes object (or AwaitableBytes) of 64 KiB or more, as an argument,
    keyword argument or result, or in a list, tuple or dict up to two levels down, is written
    from its own memory and arrives as a plain bytes object; smaller ones stay in the pickle."""
    big, kw, small = bytes(range(256)) * 400, b"k" * 70_000, b"s" * 100
    inner = [b"i" * 70_000]
    args, kwargs = protocol.wire_args((big, small, inner, AwaitableBytes(b"a" * 65_536)), {"kw": kw, "n": 1})
    assert type(args[0]) is pickle.PickleBuffer and args[1] is small and args[2] is not inner
    assert type(args[2]) is list and type(args[2][0]) is pickle.PickleBuffer and type(inner[0]) is bytes
    assert type(args[3]) is pickle.PickleBuffer and type(kwargs["kw"]) is pickle.PickleBuffer and kwargs["n"] == 1
    assert protocol.wire_args((small,), {}) == ((small,), {})
    blob = _sent((1, Call("f", args, kwargs, None)), (2, Ok(protocol.wire(big))), (3, Yield(protocol.wire(kw))))
    for cut in (50, 1000, len(blob) // 2):
        s = Sink().feed(blob[:cut], blob[cut:])
        assert not s.bad and [t for t, _ in s.got] == [1, 2, 3], cut
        call = s.got[0][1]
        assert [type(a) for a in call.args] == [bytes, bytes, list, bytes], cut
        assert call.args[0] == big and call.args[1] == small and call.args[2] == inner and call.args[3] == b"a" * 65_536
        assert type(call.kwargs["kw"]) is bytes and call.kwargs == {"kw": kw, "n": 1}
        assert type(s.got[1][1].result) is bytes and s.got[1][1].result == big
        assert type(s.got[2][1].item) is bytes and s.got[2][1].item == kw
        assert type(call.args[2][0]) is bytes
    size, _ = HEAD.unpack_from(blob, 0)
    assert size & transport.OOB and (size & ~transport.OOB) > len(big) + len(kw)  # out of band


def _out_of_band(value: Any) -> list[int]:
    """The sizes of the buffers `value`, `wire`d, leaves out of the pickle."""
    return [len(b) for b in protocol.encode_parts(Ok(protocol.wire(value)))[1]]


def test_wire_looks_two_levels_into_plain_containers_and_no_further() -> None:
    big = b"b" * 70_000
    assert _out_of_band({"image": big, "n": 1}) == [70_000]
    assert _out_of_band([big, (b"x" * 65_536, 2)]) == [70_000, 65_536]
    assert _out_of_band({"batch": [big, big]}) == [70_000, 70_000]
    assert _out_of_band(([[big]],)) == []  # three levels down: in the pickle
    assert _out_of_band([big] + [0] * protocol.WIRE_ITEMS) == []  # too many items to look at
    assert _out_of_band(collections.OrderedDict(a=big)) == []  # only exact lists, tuples, dicts
    assert _out_of_band({"a": b"s" * 100}) == []
    value = {"a": [big], "t": (1, big), "k": "v"}
    wired = protocol.wire(value)
    assert wired is not value and value == {"a": [big], "t": (1, big), "k": "v"}  # the caller's untouched
    assert type(wired["t"]) is tuple and wired["k"] == "v"
    plain = {"a": [1, 2], "b": "x"}
    assert protocol.wire(plain) is plain
    got = protocol.decode(*_frame_parts(Ok(wired)))
    assert got.result == value and type(got.result["a"][0]) is bytes and type(got.result["t"]) is tuple


def _frame_parts(msg: Any) -> tuple[bytes, list[Any]]:
    payload, bufs = protocol.encode_parts(msg)
    return payload, [bytes(b) for b in bufs]
