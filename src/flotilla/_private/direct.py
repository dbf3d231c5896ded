"""Direct ingress: a replica accepts HTTP itself, on a port it shares with its siblings.

Opt-in with `serve.start(http_options={"direct_ingress": True, "port": ...})`. Each replica of
the HTTP app's ingress deployment binds the port with SO_REUSEPORT and runs uvicorn on its own
event loop; the kernel spreads connections across replicas. A request skips the proxy process
and its two extra hops, so it goes straight into the replica's HTTP handling.

What it gives up (see docs): one HTTP app per port; connections, not requests, are balanced
(a replica serves every request of the connections it accepted); no queueing across replicas
and no 503 backpressure (a replica queues beyond `max_ongoing_requests` itself); the proxy's
metrics; while no replica runs, nothing listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TYPE_CHECKING, Any

from flotilla._private import http_util
from flotilla._private.metrics import RequestIds
from flotilla._private.protocol import END, ERR, HFULL, HSTART, HTTP
from flotilla._private.router import Channel

if TYPE_CHECKING:
    from flotilla._private.replica import Replica



class _Sink:
    """Stands in for a router connection: the replica's reply frames, without pickling."""

    __slots__ = ("ch",)

    def __init__(self) -> None:
        self.ch = Channel()

    def send(self, msg: tuple[Any, ...]) -> None:
        self.ch.push(msg)

    def send_raw(self, data: bytes) -> None:  # pragma: no cover - HTTP replies use send()
        raise RuntimeError("unexpected raw frame on a direct-ingress request")


class DirectIngress:
    def __init__(self, replica: Replica, opts: dict[str, Any]) -> None:
        self.replica = replica
        self.opts = opts
        self.prefix: str = opts["route_prefix"]
        self.ids = RequestIds()

    async def start(self) -> Any:
        import uvicorn

        host, port = self.opts["host"], int(self.opts["port"])
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
        config = uvicorn.Config(
            self, loop="none", http="httptools", lifespan="off", access_log=False, log_level="warning",
            timeout_keep_alive=int(self.opts.get("keep_alive_timeout_s", 5)), server_header=False,
            date_header=False, proxy_headers=False,
        )
        server = uvicorn.Server(config)
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # the head owns signals
        self.task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started and not self.task.done():
            await asyncio.sleep(0.002)
        if self.task.done():
            self.task.result()
        return server

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/-/healthz":
            await http_util.reply(send, *http_util.plain(200, "success"))
            return
        if not http_util.prefix_matches(self.prefix, path):
            await http_util.reply(send, *http_util.plain(404, f"Path '{path}' not found."))
            return
        request_id = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                request_id = v
        if request_id is None:
            request_id = self.ids.next()
        body = await http_util.read_body(receive)
        if body is None:
            return
        fwd = http_util.forward_scope(scope, self.prefix)
        meta = {"request_id": request_id.decode(), "route": self.prefix}
        sink = _Sink()
        key = (id(sink), 0)
        rep = self.replica
        task = asyncio.get_running_loop().create_task(rep._handle(sink, (0, HTTP, fwd, body, meta), key))  # type: ignore[arg-type]
        rep.tasks[key] = task
        rid_header = (b"x-request-id", request_id)
        first = await sink.ch.get()
        code = first[1]
        if code == HFULL:
            await http_util.send_whole(send, first[2], first[3], first[4], rid_header)
            return
        if code == HSTART:
            first[3].append(rid_header)
            await send({"type": "http.response.start", "status": first[2], "headers": first[3]})
            try:
                while True:
                    msg = await sink.ch.get()
                    if msg[1] in (END, ERR):
                        await send({"type": "http.response.body", "body": b""})
                        return
                    await send({"type": "http.response.body", "body": msg[2], "more_body": True})
            finally:
                if not task.done():
                    task.cancel()
        await http_util.reply(send, *http_util.plain(500, "Internal Server Error"))
