"""WebSockets: one client socket carried to one replica, both ways, over the data plane.

Client side (the proxy, or a replica's direct ingress): `relay` forwards the app's messages
(`WsOut`, from a `router.WsLink`) to the client and the client's messages (`WsIn`) to the app,
each direction within a window of `STREAM_WINDOW` messages, so a slow side slows the other.
The replica dying, or the app failing, closes the client's socket with 1011; a replica that
drains lets its sockets go on up to `graceful_shutdown_timeout_s`, then closes them with 1001.

Replica side: `serve` runs the app (a `@serve.ingress` app, or a plain ASGI `__call__(scope,
receive, send)`) on the forwarded scope with a `receive` fed by `WsIn` and a `send` that
answers `WsOut`; it ends with `End` (or `Err` when the app raised).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from flotilla._private.errors import error_reply
from flotilla._private.protocol import STREAM_WINDOW, End, Err, WsCredit, WsOut

logger = logging.getLogger("flotilla.ws")

#: After the client disconnected, how long the app may take to end before it is cancelled.
DISCONNECT_GRACE_S = 5.0
INTERNAL_ERROR = 1011
GOING_AWAY = 1001  # the replica's graceful_shutdown_timeout_s ended with the socket open
_CONNECT = {"type": "websocket.connect"}


def forward_scope(scope: dict[str, Any], prefix: str, root: str) -> dict[str, Any]:
    """The picklable part of a websocket scope, root_path set as for HTTP."""
    from flotilla._private.http_util import forward_scope as http_forward

    fwd = http_forward(scope, prefix, root)
    fwd["subprotocols"] = list(scope.get("subprotocols") or ())
    if "websocket.http.response" in (scope.get("extensions") or {}):
        fwd["extensions"] = {"websocket.http.response": {}}
    return fwd


async def deny(send: Any, scope: dict[str, Any], status: int, text: str) -> int:
    """Refuse a socket before it is accepted: an HTTP response where the server can send one,
    else a close (which the server answers with 403)."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        body = text.encode()
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "websocket.http.response.body", "body": body})
        return status
    await send({"type": "websocket.close", "code": 1008})
    return 403


async def relay(send: Any, receive: Any, link: Any) -> int:
    """Carry one socket between the client (`send`, `receive`) and the app (`link`); returns
    its outcome for metrics: the close code, or the HTTP status of a refusal."""
    state = {"code": 1006}
    loop = asyncio.get_running_loop()
    out = loop.create_task(_pump_out(send, link, state))
    inn = loop.create_task(_pump_in(receive, link, state))
    try:
        await asyncio.wait((out, inn), return_when=asyncio.FIRST_COMPLETED)
        if not out.done():  # the client went away: give the app a moment to see it and end
            try:
                await asyncio.wait_for(asyncio.shield(out), DISCONNECT_GRACE_S)
            except TimeoutError:
                pass
        return state["code"]
    finally:
        for t in (out, inn):
            if not t.done():
                t.cancel()
        if not link.ch.ended:
            link.ch.cancel()  # Cancel to the replica; its slot comes back


async def _pump_out(send: Any, link: Any, state: dict[str, Any]) -> None:
    """The app's messages to the client, until the app ends."""
    msg = link.first
    link.first = None
    accepted = closed = False
    while True:
        if msg is None:
            msg = await link.ch.get()
        cls = msg.__class__
        if cls is WsOut:
            m = msg.message
            t = m["type"]
            if not closed:
                if t == "websocket.accept":
                    accepted = True
                    state["code"] = 101
                elif t == "websocket.close":
                    closed = True
                    state["code"] = m.get("code") or 1000
                elif t == "websocket.http.response.start":
                    state["code"] = m["status"]
                    closed = True  # the body follows; nothing else may
                    with contextlib.suppress(OSError):
                        await send(m)
                    msg = None
                    continue
                try:
                    await send(m)
                except OSError:
                    closed = True  # the client is gone; the app learns from websocket.disconnect
            elif t == "websocket.http.response.body":
                with contextlib.suppress(OSError):
                    await send(m)
        elif cls is End:
            if not closed:
                if accepted:
                    state["code"] = 1000
                    with contextlib.suppress(OSError):
                        await send({"type": "websocket.close", "code": 1000})
                else:  # returned without accepting: refused
                    state["code"] = 403
                    with contextlib.suppress(OSError):
                        await send({"type": "websocket.close", "code": 1000})
            return
        else:  # Err, Failed (the replica died): 1011; cut at the end of a drain: 1001
            if cls is Err and msg.type_name in ("ActorDiedError", "TaskCancelledError"):  # the replica stopped it
                code = GOING_AWAY
            else:
                code = INTERNAL_ERROR
                logger.warning("a websocket broke off: %s", getattr(msg, "message", None) or getattr(msg, "error", None) or msg)
            if not closed:
                state["code"] = code
                with contextlib.suppress(OSError):
                    await send({"type": "websocket.close", "code": code})
            return
        msg = None


async def _pump_in(receive: Any, link: Any, state: dict[str, Any]) -> None:
    """The client's messages to the app, until the client disconnects."""
    while True:
        m = await receive()
        t = m["type"]
        if t == "websocket.receive":
            await link.send_in(m)
        elif t == "websocket.disconnect":
            if state["code"] in (101, 1006):
                state["code"] = m.get("code", 1005)
            if not link.ch.ended:
                await link.send_in({"type": "websocket.disconnect", "code": m.get("code", 1005)})
            return


# ---- replica side -------------------------------------------------------------------------
class WebSocketGone(OSError):
    """`send` after the socket closed (Starlette turns it into WebSocketDisconnect)."""


class Inbox:
    """The client's messages for the app; each `websocket.receive` taken is credited back."""

    __slots__ = ("_grant", "_items", "_taken", "_waiter", "gone")

    def __init__(self, grant: Callable[[int], None]) -> None:
        self._items: deque[dict[str, Any]] = deque((_CONNECT,))
        self._waiter: asyncio.Future[None] | None = None
        self._grant = grant
        self._taken = 0
        self.gone = False  # disconnected (by the client, or the app closed)

    def push(self, message: dict[str, Any]) -> None:
        if self.gone:
            return
        if message["type"] == "websocket.disconnect":
            self.gone = True
        self._items.append(message)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def get(self) -> dict[str, Any]:
        while not self._items:
            if self.gone:
                return {"type": "websocket.disconnect", "code": 1005}
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        m = self._items.popleft()
        if m["type"] == "websocket.receive":
            self._taken += 1
            if self._taken >= STREAM_WINDOW // 2:
                self._grant(self._taken)
                self._taken = 0
        return m


def asgi_entry(replica: Any) -> Any:
    """The ASGI app a replica runs for websockets: its `@serve.ingress` app, else a plain
    `__call__(scope, receive, send)`, else None."""
    if replica.asgi_app is not None:
        return replica.asgi_app
    fn = replica.obj if replica.is_function else getattr(replica.obj, "__call__", None)  # noqa: B004
    if fn is None:
        return None
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    return fn if len(params) == 3 and inspect.iscoroutinefunction(fn) else None


async def serve(replica: Any, proto: Any, tag: int, key: tuple[int, int], scope: dict[str, Any]) -> str:
    """Run the app for one socket (its slot is held); returns "OK" or "ERROR"."""
    from flotilla._private.replica import _Window

    window = replica.windows[key] = _Window()
    inbox = replica.inboxes[key] = Inbox(lambda n: proto.send(tag, WsCredit(n)))
    app = asgi_entry(replica)
    closed = False

    async def send(message: dict[str, Any]) -> None:
        nonlocal closed
        if inbox.gone or closed:
            raise WebSocketGone("the websocket is closed")
        t = message["type"]
        if t == "websocket.close" or (t == "websocket.http.response.body" and not message.get("more_body")):
            closed = True
        await window.take()
        proto.send(tag, WsOut(dict(message)))
        if closed:
            inbox.push({"type": "websocket.disconnect", "code": message.get("code", 1000)})
        if proto.paused:
            await proto.drained()

    try:
        if app is None:
            logger.warning("deployment '%s' has no ASGI app for websockets (use @serve.ingress, or "
                           "__call__(self, scope, receive, send))", replica.dep_name)
            await send({"type": "websocket.close", "code": 1000})
        else:
            await app(scope, inbox.get, send)
    except asyncio.CancelledError:
        raise
    except BaseException as e:
        if not isinstance(e, WebSocketGone):
            logger.exception("websocket %s failed", scope.get("path"))
            proto.send(tag, error_reply(e))
            return "ERROR"
    finally:
        replica.inboxes.pop(key, None)
    proto.send(tag, End())
    return "OK"
