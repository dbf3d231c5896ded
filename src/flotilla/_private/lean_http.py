"""Plain HTTP/1.1 requests without uvicorn's per-request ASGI cycle (the proxy's hot path).

Per request, uvicorn's httptools protocol makes a `RequestResponseCycle` with an
`asyncio.Event`, starts the app in a wrapper coroutine as soon as the headers are in, hands
the body over through the event, checks each response header with two regular expressions,
and writes the status line and headers, then the body, in two socket writes.

`LeanProtocol` keeps uvicorn's connection handling (parser, keep-alive timer, pipelining,
WebSocket upgrades, graceful shutdown) and `httpguard`'s bounds, and takes a *plain* request
another way: one with a body of at most `LEAN_BODY_BYTES` (declared by Content-Length, not
chunked), no `Expect: 100-continue`, no upgrade and no request of the connection still in
progress. Its body is gathered as it arrives; the app starts when the request is complete, on
a `LeanCycle`, whose `receive` returns the body at once and then waits for a disconnect, and
whose `whole()` writes a complete response (status line, headers, body) in one write. Any
ASGI app runs on it unchanged; every other request takes uvicorn's cycle.

The app's task can be cancelled the moment its client goes away (`LeanCycle.watch`): the
proxy uses it instead of a timer and a watcher task per request.
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
from time import perf_counter
from typing import Any
from urllib.parse import unquote

import httptools

from flotilla._private.httpguard import BoundedHttpToolsProtocol
from flotilla._private.transport import big_buffer

logger = logging.getLogger("flotilla.http")

#: Larger request bodies (or chunked ones) are streamed to the app by uvicorn's cycle, unless
#: the protocol takes large bodies (`large_bodies`): then they are received into one buffer.
LEAN_BODY_BYTES = 1 << 20
#: Larger response bodies are written after their headers rather than copied behind them.
JOIN_BODY_BYTES = 1 << 16

_BAD_NAME = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")  # not an RFC 9110 token character
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # control characters other than tab
_STATUS_LINES: dict[int, bytes] = {}


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        line = f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")
        if len(_STATUS_LINES) < 1000:
            _STATUS_LINES[status] = line
    return line


class LeanProtocol(BoundedHttpToolsProtocol):
    """uvicorn's httptools protocol (with `httpguard`'s bounds) that runs plain requests on a
    `LeanCycle`.

    `large_bodies`: bodies over `LEAN_BODY_BYTES` and up to this many bytes are plain too,
    received into one buffer of their declared size (lazily backed memory: pages are taken as
    bytes arrive) instead of chunk by chunk; None: they take uvicorn's cycle. `body_views`:
    such a body reaches the app as a memoryview of that buffer, not copied into bytes (for an
    app that only forwards it: the proxy without middlewares)."""

    large_bodies: int | None = None
    body_views = False

    def _begin_request(self) -> None:
        current = self.cycle
        if (self.expect_100_continue or (current is not None and not current.response_complete)
                or self.parser.should_upgrade() or self.limit_concurrency is not None):
            super()._begin_request()
            return
        size = 0
        for name, value in self.headers:
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    size = -1
                if size < 0 or (size > LEAN_BODY_BYTES and (self.large_bodies is None or size > self.large_bodies)):
                    super()._begin_request()
                    return
            elif name == b"transfer-encoding":
                super()._begin_request()
                return
        parser = self.parser
        scope = self.scope
        version = parser.get_http_version()
        scope["method"] = parser.get_method().decode("ascii")
        if version != "1.1":
            scope["http_version"] = version
        url = httptools.parse_url(self.url)
        raw = url.path
        path = raw.decode("ascii")
        if "%" in path:
            path = unquote(path)
        root = self.root_path
        scope["path"] = root + path
        scope["raw_path"] = root.encode("ascii") + raw if root else raw
        scope["query_string"] = url.query or b""
        cycle = LeanCycle(self, scope, version != "1.0" and parser.should_keep_alive())
        if size > LEAN_BODY_BYTES:
            try:
                cycle.reserve(size)
            except (OSError, ValueError, MemoryError):  # no address space for it: chunk by chunk
                super()._begin_request()
                return
        self.cycle = cycle  # type: ignore[assignment]

    def on_body(self, body: bytes) -> None:
        cycle: Any = self.cycle
        if cycle.__class__ is LeanCycle:
            cycle.add(body)
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        cycle: Any = self.cycle
        if cycle.__class__ is LeanCycle:
            cycle.start()
            return
        super().on_message_complete()


class LeanCycle:
    """One plain request and its response, as an ASGI `receive`/`send` pair plus `whole()`.

    uvicorn's protocol reads and sets `response_complete`, `disconnected` and `keep_alive`,
    and calls `message_event.set()` when the connection is lost, as on its own cycle."""

    __slots__ = ("_body", "_chunked", "_ended", "_fill", "_left", "cancel_on_gone", "disconnected", "keep_alive",
                 "proto", "response_complete", "response_started", "scope", "sent_at", "task")

    def __init__(self, proto: LeanProtocol, scope: Any, keep_alive: bool) -> None:
        self.proto = proto
        self.scope = scope
        self.keep_alive = keep_alive
        self.response_started = False
        self.response_complete = False
        self.disconnected = False
        #: A task to cancel when the client goes away before the response is complete.
        self.cancel_on_gone: asyncio.Task[Any] | None = None
        #: The task running the app (`asyncio.current_task()` there, without its getpid).
        self.task: asyncio.Task[None] | None = None
        self._body: bytes | bytearray | memoryview | None = b""
        self._fill = -1  # bytes received into a reserved buffer (-1: none reserved)
        self._ended: asyncio.Event | None = None  # made only when `receive` has to wait
        self._chunked = False
        self._left = 0  # body bytes still owed under a Content-Length
        #: `perf_counter()` just before the response's last write (0.0 until then): where the
        #: proxy's end-to-end time ends, as the write can hand the CPU to the waking client.
        self.sent_at = 0.0

    @property
    def message_event(self) -> LeanCycle:
        return self

    def watch(self) -> asyncio.Task[None] | None:
        """Cancel the app's task if the client goes away before `unwatch`; returns the task."""
        self.cancel_on_gone = self.task
        return self.task

    def unwatch(self) -> None:
        self.cancel_on_gone = None

    def set(self) -> None:
        """The connection was lost (uvicorn's protocol: `cycle.message_event.set()`)."""
        if self._ended is not None:
            self._ended.set()
        task = self.cancel_on_gone
        if task is not None and self.disconnected:
            self.cancel_on_gone = None
            task.cancel()

    # ---- request ------------------------------------------------------------------------------
    def reserve(self, size: int) -> None:
        """Receive a body of `size` bytes into one buffer of that size (`big_buffer`: backed
        page by page as it is written)."""
        self._body = big_buffer(size)
        self._fill = 0

    def add(self, data: bytes) -> None:
        fill = self._fill
        if fill >= 0:
            self._body[fill:fill + len(data)] = data  # type: ignore[index]
            self._fill = fill + len(data)
            return
        body = self._body
        if not body:
            self._body = data
        elif body.__class__ is bytes:
            grown = bytearray(body)
            grown += data
            self._body = grown
        else:
            body += data  # type: ignore[operator]

    def start(self) -> None:
        proto = self.proto
        task = self.task = proto.loop.create_task(self.run(proto.app))
        tasks = proto.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def run(self, app: Any) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except BaseException as e:
            logger.error("Exception in ASGI application", exc_info=e)
            if not self.response_started:
                await self.whole(500, [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")],
                                 b"Internal Server Error")
            else:
                self.proto.transport.close()
        else:
            if not self.response_started and not self.disconnected:
                logger.error("ASGI callable returned without starting response.")
                await self.whole(500, [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")],
                                 b"Internal Server Error")
            elif not self.response_complete and not self.disconnected:
                logger.error("ASGI callable returned without completing response.")
                self.proto.transport.close()
        finally:
            self.cancel_on_gone = None
            self.task = None

    async def receive(self) -> dict[str, Any]:
        body = self._body
        if body is not None:
            self._body = None
            if body.__class__ is not bytes and not (self._fill >= 0 and self.proto.body_views):
                body = bytes(body)
            return {"type": "http.request", "body": body, "more_body": False}
        if not self.disconnected and not self.response_complete:
            ended = self._ended
            if ended is None:
                ended = self._ended = asyncio.Event()
            await ended.wait()
        return {"type": "http.disconnect"}

    # ---- response -----------------------------------------------------------------------------
    def _head(self, status: int, headers: Any, extra: tuple[bytes, bytes] | None, length: int | None) -> bytes:
        """The status line and headers; sets how the body is framed. `length`: the whole
        body's, when the response is written at once (framed by Content-Length if the app
        gave neither Content-Length nor Transfer-Encoding)."""
        parts = [status_line(status)]
        defaults = self.proto.server_state.default_headers
        if defaults:
            headers = [*defaults, *headers]
        if extra is not None:
            headers = [*headers, extra]
        framed = False
        close = False
        names = []
        values = []
        for name, value in headers:
            name = name.lower()
            names.append(name)
            values.append(value)
            if name == b"content-length":
                if not framed:
                    framed = True
                    self._left = int(value)
            elif name == b"transfer-encoding":
                if value.lower() == b"chunked" and not framed:
                    framed = True
                    self._chunked = True
            elif name == b"connection" and b"close" in [t.strip().lower() for t in value.split(b",")]:
                self.keep_alive = False
                close = True
            parts += (name, b": ", value, b"\r\n")
        if _BAD_NAME.search(b"".join(names)):
            raise RuntimeError("Invalid HTTP header name.")
        if _BAD_VALUE.search(b"\t".join(values)):
            raise RuntimeError("Invalid HTTP header value.")
        if not self.keep_alive and not close:
            parts.append(b"connection: close\r\n")
        if not framed and self.scope["method"] != "HEAD" and status not in (204, 304):
            if length is None:
                self._chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
            else:
                self._left = length
                parts += (b"content-length: ", str(length).encode(), b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    async def whole(self, status: int, headers: Any, body: bytes, extra: tuple[bytes, bytes] | None = None) -> int:
        """Write a complete response (with `extra` as one more header) in one write; returns
        its status."""
        proto = self.proto
        if proto.flow.write_paused and not self.disconnected:
            await proto.flow.drain()
        if self.disconnected:
            return status
        if self.response_started:
            raise RuntimeError("Unexpected whole response after the response started.")
        self.response_started = True
        head = self._head(status, headers, extra, len(body))
        data = self._framed(body, False)
        self.sent_at = perf_counter()
        if len(data) > JOIN_BODY_BYTES:
            proto.transport.write(head)
            proto.transport.write(data)
        else:
            proto.transport.write(head + data)
        self._complete()
        return status

    async def send(self, message: dict[str, Any]) -> None:
        proto = self.proto
        if proto.flow.write_paused and not self.disconnected:
            await proto.flow.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{kind}'.")
            self.response_started = True
            proto.transport.write(self._head(message["status"], message.get("headers", ()), None, None))
            return
        if self.response_complete:
            raise RuntimeError(f"Unexpected ASGI message '{kind}' sent, after response already completed.")
        if kind != "http.response.body":
            raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{kind}'.")
        more = message.get("more_body", False)
        data = self._framed(message.get("body", b""), more)
        if not more:
            self.sent_at = perf_counter()
        if data:
            proto.transport.write(data)
        if not more:
            self._complete()

    def _framed(self, body: bytes, more: bool) -> bytes:
        """What to write for one part of the body: chunk-encoded, or counted against the
        Content-Length (which the last part must fill exactly); nothing for HEAD."""
        if self.scope["method"] == "HEAD":
            return b""
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            return data if more else data + b"0\r\n\r\n"
        if len(body) > self._left:
            raise RuntimeError("Response content longer than Content-Length")
        self._left -= len(body)
        if not more and self._left:
            raise RuntimeError("Response content shorter than Content-Length")
        return body

    def _complete(self) -> None:
        self.response_complete = True
        self.cancel_on_gone = None
        if self._ended is not None:
            self._ended.set()
        proto = self.proto
        if not self.keep_alive:
            proto.transport.close()
        proto.on_response_complete()
