"""Length-prefixed pickle frames over stream sockets (Unix sockets locally).

One frame is a 4-byte little-endian length followed by a pickle (protocol 5). Frames are
only exchanged over sockets in the session's private directory (mode 0700), so no stranger
can send us a pickle.

`FrameProtocol` is the asyncio protocol both ends use; `RpcPeer` adds request/response
calls in both directions on one connection (the control plane). The data plane (router
<-> replica) uses `FrameProtocol` directly with its own message tuples, see `router.py`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import cloudpickle

logger = logging.getLogger(__name__)

_HEADER = 4
_MAX_FRAME = 1 << 31


def dumps(obj: Any) -> bytes:
    """Pickle with the C pickler; fall back to cloudpickle for lambdas, local classes, ..."""
    try:
        return pickle.dumps(obj, protocol=5)
    except Exception:
        return cloudpickle.dumps(obj, protocol=5)


def frame(obj: Any) -> bytes:
    payload = dumps(obj)
    return len(payload).to_bytes(_HEADER, "little") + payload


class FrameProtocol(asyncio.Protocol):
    """Parses frames and hands each decoded object to `on_message`."""

    def __init__(
        self,
        on_message: Callable[[Any], None],
        on_close: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        self._on_message = on_message
        self._on_close = on_close
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        if not buf:
            # Fast path: the chunk holds exactly whole frames (the common case).
            n = len(data)
            pos = 0
            while n - pos >= _HEADER:
                size = int.from_bytes(data[pos : pos + _HEADER], "little")
                end = pos + _HEADER + size
                if end > n:
                    break
                self._deliver(data[pos + _HEADER : end])
                pos = end
            if pos < n:
                buf += data[pos:]
            return
        buf += data
        pos = 0
        n = len(buf)
        while n - pos >= _HEADER:
            size = int.from_bytes(buf[pos : pos + _HEADER], "little")
            end = pos + _HEADER + size
            if end > n:
                break
            self._deliver(bytes(buf[pos + _HEADER : end]))
            pos = end
        del buf[:pos]

    def _deliver(self, payload: bytes) -> None:
        try:
            msg = pickle.loads(payload)
        except Exception:
            logger.exception("dropping a frame that could not be unpickled")
            return
        self._on_message(msg)

    def send(self, obj: Any) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(frame(obj))

    def send_raw(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self._on_close is not None:
            self._on_close(exc)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class RemoteCallError(Exception):
    """A control-plane call failed on the other side; the message carries its traceback."""


class PeerClosedError(ConnectionError):
    """The connection closed before the call was answered."""


Handler = Callable[["RpcPeer", str, tuple[Any, ...]], Awaitable[Any] | Any]

_REQ, _OK, _ERR = 0, 1, 2


class RpcPeer:
    """Request/response calls in both directions over one `FrameProtocol` connection."""

    def __init__(self, handler: Handler | None = None, name: str = "peer") -> None:
        self._handler = handler
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._on_close_cbs: list[Callable[[], None]] = []
        self.name = name
        self.proto = FrameProtocol(self._on_message, self._on_closed)

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
        rid = next(self._ids)
        self._pending[rid] = fut
        self.proto.send((_REQ, rid, op, args))
        return fut

    def notify(self, op: str, *args: Any) -> None:
        """Fire-and-forget call (request id 0: no answer is sent)."""
        self.proto.send((_REQ, 0, op, args))

    def _on_message(self, msg: Any) -> None:
        kind = msg[0]
        if kind == _REQ:
            _, rid, op, args = msg
            asyncio.get_running_loop().create_task(self._serve(rid, op, args))
            return
        fut = self._pending.pop(msg[1], None)
        if fut is None or fut.done():
            return
        if kind == _OK:
            fut.set_result(msg[2])
        else:
            err = msg[2]
            fut.set_exception(err if isinstance(err, BaseException) else RemoteCallError(err))

    async def _serve(self, rid: int, op: str, args: tuple[Any, ...]) -> None:
        try:
            if self._handler is None:
                raise RemoteCallError(f"{self.name} accepts no calls")
            result = self._handler(self, op, args)
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                result = await result
        except Exception as e:
            if rid:
                try:
                    pickle.dumps(e)
                    payload: Any = e
                except Exception:
                    payload = "".join(traceback.format_exception(e))
                self.proto.send((_ERR, rid, payload))
            else:
                logger.exception("notification %r failed", op)
            return
        if rid:
            self.proto.send((_OK, rid, result))

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


async def connect_unix(path: str, peer: RpcPeer) -> RpcPeer:
    loop = asyncio.get_running_loop()
    await loop.create_unix_connection(lambda: peer.proto, path)
    return peer


async def serve_unix(path: str, make_peer: Callable[[], RpcPeer]) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(lambda: make_peer().proto, path)
