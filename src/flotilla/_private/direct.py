"""Direct ingress: a replica accepts HTTP itself, on a port it shares with its siblings.

Opt-in with `serve.start(http_options={"direct_ingress": True, "port": ...})`. The head holds
one listening socket for the port (`listener.py`); each replica of the HTTP app's ingress
deployment runs uvicorn on a duplicate of it, so all of them accept from one queue. A request
skips the proxy process and its two extra hops, so it goes straight into the replica's HTTP
handling.

Draining (scale-down, rollout, delete): the replica stops accepting at once (connections in
the backlog go to its siblings), answers the requests still arriving on connections it
already has with `Connection: close`, and waits until those connections are closed.

What it gives up (see docs): one HTTP app per port; connections, not requests, are balanced
(a replica serves every request of the connections it accepted); no queueing across replicas
and no 503 backpressure (a replica queues beyond `max_ongoing_requests` itself); the proxy's
metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
from pickle import PickleBuffer
from typing import TYPE_CHECKING, Any

from flotilla._private import asgiroutes, frontdoor, http_util, httpguard, listener
from flotilla._private.metrics import RequestIds
from flotilla._private.protocol import Http, HttpFull, HttpStart, WsCredit, WsOpen, WsOut
from flotilla._private.router import Channel, WsLink

if TYPE_CHECKING:
    from flotilla._private.replica import Replica

_CLOSE = (b"connection", b"close")
#: Longest a draining replica keeps an idle keep-alive connection open (the keep-alive timeout,
#: 90 s by default, would hold the drain up to graceful_shutdown_timeout_s).
DRAIN_IDLE_S = 5.0


class _Sink:
    """Stands in for a router connection: the replica's reply messages, without pickling."""

    __slots__ = ("ch",)

    paused = False
    closed = False

    def __init__(self, ch: Channel) -> None:
        self.ch = ch

    def send(self, tag: int, msg: tuple[Any, ...]) -> None:
        if type(msg) is HttpFull and type(msg.body) is PickleBuffer:  # protocol.oob: not pickled here
            msg = msg._replace(body=memoryview(msg.body))
        self.ch.push(msg)

    async def drained(self) -> None:
        return None


class _WsSink(_Sink):
    """A websocket's reply messages, in-process: WsCredit goes to the client-side window."""

    __slots__ = ()

    def send(self, tag: int, msg: tuple[Any, ...]) -> None:
        if msg.__class__ is WsCredit:
            if self.ch.on_credit is not None:
                self.ch.on_credit(msg.n)
            return
        self.ch.push(msg)
        if msg.__class__ is not WsOut:
            self.ch.finish()


class DirectIngress:
    def __init__(self, replica: Replica, opts: dict[str, Any]) -> None:
        self.replica = replica
        self.opts = opts
        self.prefix: str = opts["route_prefix"]
        tmpl = replica.route_templates
        self.names = asgiroutes.Names(self.prefix, tmpl) if tmpl else None
        self.ids = RequestIds()
        self.server: Any = None
        self.task: asyncio.Task[None] | None = None
        self.closing = False
        self._n = 0

    async def start(self) -> Any:
        import uvicorn

        sock = await asyncio.get_running_loop().run_in_executor(None, listener.receive, self.opts["fd_sock"])
        bounded, _ = httpguard.protocol_class(self.opts, f"replica:{self.replica.replica_id}", lean=True)
        config = uvicorn.Config(
            frontdoor.wrap(self, self.opts, "replica"), **frontdoor.uvicorn_ssl(self.opts), loop="none", http=bounded, lifespan="off", access_log=False, log_level="warning",
            timeout_keep_alive=self.opts.get("keep_alive_timeout_s", 90), server_header=False,
            date_header=False, proxy_headers=False,
        )
        server = self.server = uvicorn.Server(config)
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]  # the head owns signals
        self.task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started and not self.task.done():
            await asyncio.sleep(0.002)
        if self.task.done():
            self.task.result()
        return server

    async def drain(self) -> None:
        """Stop accepting; existing connections close after their next response."""
        self.closing = True
        for s in getattr(self.server, "servers", ()):
            s.close()
        loop = asyncio.get_running_loop()
        for conn in list(self.server.server_state.connections) if self.server is not None else ():
            cycle = getattr(conn, "cycle", None)
            if cycle is None or cycle.response_complete:
                # Idle keep-alive connection: its client may be sending a request on it now, so
                # it closes after its keep-alive timeout, but at most DRAIN_IDLE_S from now.
                timer, close = getattr(conn, "timeout_keep_alive_task", None), getattr(conn, "timeout_keep_alive_handler", None)
                if timer is not None and close is not None and timer.when() - loop.time() > DRAIN_IDLE_S:
                    timer.cancel()
                    conn.timeout_keep_alive_task = loop.call_later(DRAIN_IDLE_S, close)
                continue
            cycle.keep_alive = False

    def open_connections(self) -> int:
        return len(self.server.server_state.connections) if self.server is not None else 0

    async def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self.task, 5)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await self._websocket(scope, receive, send)
            return
        path, root = http_util.mount_scope(self.opts.get("root_path") or "", scope)
        if path == "/-/healthz":
            await http_util.reply(send, *http_util.plain(200, "success"))
            return
        extra: list[tuple[bytes, bytes]] = [_CLOSE] if self.closing else []
        if not http_util.prefix_matches(self.prefix, path):
            await http_util.reply(send, *http_util.plain(404, f"Path '{scope['path']}' not found."))
            return
        request_id = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                request_id = v
        if request_id is None:
            request_id = self.ids.next()
        rid_header = (b"x-request-id", request_id)
        limit = self.opts.get("max_request_body_bytes")
        body = await http_util.read_body(receive, scope, limit)
        if body is None:
            return
        if body is http_util.TOO_LARGE:
            await http_util.reply(send, *http_util.too_large(limit), rid_header)
            return
        fwd = http_util.forward_scope(scope, self.prefix, root)
        route = self.names.name(scope["method"], path) if self.names is not None else self.prefix
        meta = {"request_id": request_id.decode("latin-1"), "route": route}
        rep = self.replica
        self._n += 1
        tag = self._n
        key = (id(self), tag)

        def grant(n: int) -> None:
            w = rep.windows.get(key)
            if w is not None:
                w.give(n)

        ch = Channel(grant)
        sink = _Sink(ch)
        task = asyncio.get_running_loop().create_task(rep._handle(sink, tag, Http(fwd, body, meta), key))
        rep.tasks[key] = (task, sink, tag)
        first = await ch.get()
        cls = first.__class__
        if cls is HttpFull:
            headers = first.headers
            headers.extend(extra)
            await http_util.send_whole(send, first.status, headers, first.body, rid_header)
            return
        if cls is HttpStart:
            headers = [*first.headers, rid_header, *extra]
            await send({"type": "http.response.start", "status": first.status, "headers": headers})
            try:
                await http_util.relay_stream(send, ch)
            finally:
                if not task.done():
                    task.cancel()
            return
        await http_util.reply(send, *http_util.plain(500, "Internal Server Error"), rid_header)

    async def _websocket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """A WebSocket accepted here: run it on this replica, as one request (`ws.serve`)."""
        from flotilla._private import ws

        path, root = http_util.mount_scope(self.opts.get("root_path") or "", scope)
        if not http_util.prefix_matches(self.prefix, path):
            await ws.deny(send, scope, 404, f"Path '{scope['path']}' not found.")
            return
        request_id = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                request_id = v
        route = self.names.name("WS", path) if self.names is not None else self.prefix
        meta = {"request_id": (request_id or self.ids.next()).decode("latin-1"), "route": route}
        rep = self.replica
        self._n += 1
        tag = self._n
        key = (id(self), tag)
        loop = asyncio.get_running_loop()

        def grant(n: int) -> None:
            w = rep.windows.get(key)
            if w is not None:
                w.give(n)

        def cancel() -> None:
            if not task.done():
                task.cancel()
            ch.finish()

        ch = Channel(grant, cancel)
        sink = _WsSink(ch)
        link = WsLink(ch, lambda m: rep.ws_feed(key, m), sink)
        ch.on_credit = link.give
        msg = WsOpen(ws.forward_scope(scope, self.prefix, root), meta)
        task = loop.create_task(rep._handle(sink, tag, msg, key))
        rep.tasks[key] = (task, sink, tag)
        try:
            link.first = await ch.get()
            await ws.relay(send, receive, link)
        finally:
            if not task.done():
                task.cancel()
