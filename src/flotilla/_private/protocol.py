"""The typed messages that travel in frames, and their wire form.

Every frame carries a tag (the request or call id it belongs to) in its header, outside the
pickle, so a frame whose payload cannot be decoded still fails the one request it belongs to
(see `transport.FrameProtocol`). A message is a `NamedTuple`; on the wire it is the plain tuple
`(code, *fields)`, which pickles several times faster than the named tuple itself.

Data plane, router -> replica (tag = request id):
  Call, Stream, Http       start a request (Stream: a generator; items come back as Yield)
  Cancel                   the caller gave up; stop the request
  Credit                   the caller consumed n stream items: the replica may send n more
  DrainAck (tag 0)         answer to Drain: nothing more will be sent on this connection
Data plane, replica -> router:
  Ok, Err                  the end of a Call (Err also ends any other request)
  HttpFull                 a whole HTTP response
  HttpStart, Chunk..., End a streaming HTTP response;  Yield..., End  a generator
  Abort                    a stream broke after it started (the HTTP response must be aborted)
  Rejected                 the replica is draining and did not start the request: retry it
  Drain (tag 0)            the replica is draining: send it nothing new, answer DrainAck
WebSockets (one socket = one request id, holding one slot on its replica until it ends):
  WsOpen                   router -> replica: start the app on a forwarded websocket scope
  WsIn                     router -> replica: a client ASGI message (`websocket.receive`,
                           at most STREAM_WINDOW ahead of WsCredit; `websocket.disconnect`)
  WsCredit                 replica -> router: the app consumed n `websocket.receive` messages
  WsOut                    replica -> router: an ASGI message the app sent (accept, send,
                           close, http.response.*), within the router's Credit window
  End / Err / Rejected     replica -> router: the app returned / failed / never started
  Cancel                   router -> replica: the client is gone and the app did not end
Control plane (`transport.RpcPeer`, tag = call id, 0 for a notification; an answer's tag
is the call id with bit 31 set):
  Request, Reply, Failure
"""

from __future__ import annotations

import contextlib
import pickle
from typing import Any, NamedTuple

import cloudpickle

from flotilla.serve.exceptions import RayServeException

STREAM_WINDOW = 32  # stream items a replica may send ahead of the caller's Credit


class Call(NamedTuple):
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    meta: dict[str, Any] | None


class Stream(NamedTuple):
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    meta: dict[str, Any] | None


class Http(NamedTuple):
    scope: dict[str, Any]
    body: bytes
    meta: dict[str, Any] | None


class Cancel(NamedTuple):
    pass


class Credit(NamedTuple):
    n: int


class DrainAck(NamedTuple):
    pass


class Ok(NamedTuple):
    result: Any


class Err(NamedTuple):
    """A failed request. `error` is the pickled exception (decoded by the caller, so a class
    the caller cannot load still leaves type name, message and traceback), `error_type` the
    pickled class when the instance itself could not be pickled and rebuilt."""

    type_name: str
    message: str
    traceback: str
    error: bytes | None = None
    error_type: bytes | None = None


class HttpFull(NamedTuple):
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class HttpStart(NamedTuple):
    status: int
    headers: list[tuple[bytes, bytes]]


class Chunk(NamedTuple):
    data: bytes


class Yield(NamedTuple):
    item: Any


class End(NamedTuple):
    pass


class Abort(NamedTuple):
    reason: str


class Rejected(NamedTuple):
    pass


class Drain(NamedTuple):
    pass


class WsOpen(NamedTuple):
    scope: dict[str, Any]
    meta: dict[str, Any] | None


class WsIn(NamedTuple):
    message: dict[str, Any]


class WsOut(NamedTuple):
    message: dict[str, Any]


class WsCredit(NamedTuple):
    n: int


class Request(NamedTuple):
    op: str
    args: tuple[Any, ...]


class Reply(NamedTuple):
    value: Any


class Failure(NamedTuple):
    error: Any  # an exception, or its formatted traceback when it cannot be pickled


MESSAGES: tuple[type[tuple[Any, ...]], ...] = (
    Call, Stream, Http, Cancel, Credit, DrainAck,
    Ok, Err, HttpFull, HttpStart, Chunk, Yield, End, Abort, Rejected, Drain,
    Request, Reply, Failure,
    WsOpen, WsIn, WsOut, WsCredit,  # appended: the codes above keep their values
)
_CODES: dict[type, int] = {cls: i for i, cls in enumerate(MESSAGES)}
_new = tuple.__new__


class UnknownMessageError(ValueError):
    """A frame decoded to something that is not one of our messages."""


#: A pickle's reference to a name in `__main__` (protocol 4+: the module name as a short
#: string): the C pickler writes one for an object whose class the driver's script defines,
#: which no other process can look up; such a pickle is made again with cloudpickle, which
#: sends those classes (and functions) by value.
_MAIN_REF = b"\x8c\x08__main__"


def dumps(obj: Any) -> bytes:
    """Pickle with the C pickler; fall back to cloudpickle for lambdas, local classes, and
    anything of `__main__`."""
    try:
        data = pickle.dumps(obj, protocol=5)
    except Exception:
        return cloudpickle.dumps(obj, protocol=5)
    return data if _MAIN_REF not in data else cloudpickle.dumps(obj, protocol=5)


_pdumps = pickle.dumps
_ploads = pickle.loads


def encode(msg: tuple[Any, ...]) -> bytes:
    """The payload of a frame holding `msg`."""
    t = (_CODES[msg.__class__], *msg)
    try:
        data: bytes = _pdumps(t, 5)
    except Exception:
        return cloudpickle.dumps(t, protocol=5)  # type: ignore[no-any-return]
    return data if _MAIN_REF not in data else cloudpickle.dumps(t, protocol=5)


#: Bytes fields at least this large are wrapped (`oob`) to travel out of band, as numpy arrays
#: and other protocol-5 buffers always do: after the pickle, written from their own memory.
OOB_MIN = 1 << 16


def oob(data: bytes | bytearray | memoryview) -> Any:
    """`data` as a body field: large ones wrapped, read-only, so that they travel out of band
    and the receiver reads them straight into the `AwaitableBytes` it gets (transport.py)."""
    if len(data) < OOB_MIN:
        return data
    return pickle.PickleBuffer(memoryview(data).toreadonly())


#: Container levels (exact lists, tuples and dicts) `wire` looks into for large bytes objects,
#: and the most items a container may have for it to look.
WIRE_DEPTH = 2
WIRE_ITEMS = 64
_CONTAINERS = frozenset((list, tuple, dict))


def _wired(value: Any, depth: int) -> bool:
    """Whether `wire` would change `value`: a large bytes object, or an exact list, tuple or
    dict of at most WIRE_ITEMS items holding an exact one within `depth` more levels."""
    cls = value.__class__
    if cls is list or cls is tuple or cls is dict:
        if not depth or len(value) > WIRE_ITEMS:
            return False
        items = value.values() if cls is dict else value
        kinds = set(map(type, items))  # (one pass in C: most containers hold neither)
        if bytes in kinds and any(v.__class__ is bytes and len(v) >= OOB_MIN for v in items):
            return True
        if depth > 1 and not kinds.isdisjoint(_CONTAINERS):
            return any(v.__class__ in _CONTAINERS and _wired(v, depth - 1) for v in items)
        return False
    return isinstance(value, bytes) and len(value) >= OOB_MIN


def wire(value: Any, depth: int = WIRE_DEPTH) -> Any:
    """A value about to be sent: its large bytes objects, alone or in lists, tuples and dicts
    up to `depth` levels down, wrapped so that they travel out of band and arrive as bytes
    objects the receiver's kernel wrote (pickle keeps bytes in band). Containers that hold
    one are copied, shallowly, with the wrapped objects in them; others are sent as they are."""
    if not _wired(value, depth):
        return value
    cls = value.__class__
    if cls is dict:
        return {k: wire(v, depth - 1) for k, v in value.items()}
    if cls is not list and cls is not tuple:
        return pickle.PickleBuffer(value)
    wired = [wire(v, depth - 1) for v in value]
    return wired if cls is list else tuple(wired)


class ResponsePending(RayServeException):
    """Raised while pickling a call's arguments that hold a `DeploymentResponse` (in a list, a
    dict, ...) with no outcome yet: the router waits for it (`settled`) and sends the call
    again, the response then travelling as its outcome. Anywhere else (a user's own
    `pickle.dumps`), it is the user's error: a RayServeException, as Ray's."""

    def __init__(self, response: Any) -> None:
        super().__init__(
            "a DeploymentResponse with no result yet cannot be pickled: pass it as an argument "
            "of a handle call (at any depth; the call waits for it, except streaming and "
            "broadcast calls), or pickle its result (`await response`, `response.result()`)")
        self.response = response

    async def settled(self) -> None:
        """Once the response has its outcome, whatever it is (an error travels with it)."""
        with contextlib.suppress(Exception):
            await self.response


def wire_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A call's arguments with their large bytes objects `wire`d (an argument is a level)."""
    for a in args:
        if (a.__class__ in _CONTAINERS or isinstance(a, bytes)) and _wired(a, WIRE_DEPTH):
            args = tuple(map(wire, args))
            break
    for v in kwargs.values():
        if (v.__class__ in _CONTAINERS or isinstance(v, bytes)) and _wired(v, WIRE_DEPTH):
            kwargs = {k: wire(v) for k, v in kwargs.items()}
            break
    return args, kwargs


def encode_parts(msg: tuple[Any, ...]) -> tuple[bytes, list[memoryview]]:
    """`msg` pickled, and the buffers it holds (numpy arrays, `oob` bodies), left out of the
    pickle (protocol 5) to be written after it from their own memory."""
    t = (_CODES[msg.__class__], *msg)
    found: list[pickle.PickleBuffer] = []
    try:
        payload = _pdumps(t, 5, buffer_callback=found.append)
        if _MAIN_REF in payload:
            raise pickle.PicklingError("refers to __main__")
    except Exception:
        found.clear()
        payload = cloudpickle.dumps(t, protocol=5, buffer_callback=found.append)
    return payload, [b.raw() for b in found] if found else _NONE


_NONE: list[memoryview] = []


def decode(payload: bytes | bytearray | memoryview, buffers: list[memoryview] | None = None) -> Any:
    """The message in a frame's payload (with its out-of-band `buffers`, in order); raises if it
    cannot be unpickled or is not ours."""
    t = _ploads(payload, buffers=buffers)
    try:
        return _new(MESSAGES[t[0]], t[1:])
    except (TypeError, IndexError, KeyError):
        raise UnknownMessageError(f"not a flotilla message: {type(t).__name__}") from None
