"""Connection and header bounds for the HTTP servers (the proxy, and direct ingress in replicas).

`protocol_class(options, server)` returns uvicorn's httptools protocol with these limits:

- `max_connections` open connections. At the limit a new connection closes the connection that
  has waited longest for a request (idle keep-alive, or still sending its headers); when every
  connection has a request in progress, the new one gets 503 and is closed. Either way the
  process never holds more descriptors than the limit, and idle or slow clients cannot lock
  out new ones. The limit is lowered to fit RLIMIT_NOFILE (`raise_nofile_limit` raises the
  soft limit to the hard one first).
- `max_request_header_bytes`: a request line plus headers over it gets 431 and the connection
  is closed without reading more (counted as they arrive, so a 50 MB header is never buffered).
- `request_header_timeout_s`: the request line and headers must arrive within this long of the
  connection opening, or of the first byte of the next request on a kept-alive connection
  (slowloris); then 408 (if anything arrived) and close. Between requests
  `keep_alive_timeout_s` applies (uvicorn's keep-alive timer).

Counters (per process, in /metrics, label `server` = "proxy" or "replica:<id>"):
`flotilla_http_connections_refused`, `flotilla_http_connections_evicted`,
`flotilla_http_connections_timed_out` (`phase` = "headers" | "keep_alive"),
`flotilla_http_header_too_large`, and the gauge `flotilla_http_open_connections`.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from flotilla._private.metrics import STORE

logger = logging.getLogger("flotilla.http")

DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_HEADER_TIMEOUT_S = 10.0
#: Descriptors kept free for everything but client connections (logs, sockets to replicas).
FD_RESERVE = 256


def raise_nofile_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def fit_connections(wanted: int, nofile: int) -> int:
    """`wanted`, lowered so the connections fit in `nofile` descriptors with a reserve."""
    reserve = min(FD_RESERVE, nofile // 4)
    return max(1, min(wanted, nofile - reserve))


def _reply(status: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


def declare_metrics() -> None:
    c = "counter"
    srv = ("server",)
    STORE.declare(c, "flotilla_http_connections_refused", "Connections refused with 503 at max_connections (none idle to close).", srv)
    STORE.declare(c, "flotilla_http_connections_evicted", "Idle or header-sending connections closed at max_connections to admit a new one.", srv)
    STORE.declare(c, "flotilla_http_connections_timed_out", "Connections closed by a timeout: headers (request_header_timeout_s) or keep_alive (keep_alive_timeout_s).", ("server", "phase"))
    STORE.declare(c, "flotilla_http_header_too_large", "Requests answered 431: line and headers over max_request_header_bytes.", srv)
    STORE.declare("gauge", "flotilla_http_open_connections", "Open client connections.", srv)


class Guard:
    """The limits and the shared state of one HTTP server's connections."""

    def __init__(self, options: dict[str, Any], server: str) -> None:
        nofile = raise_nofile_limit()
        wanted = int(options.get("max_connections") or DEFAULT_MAX_CONNECTIONS)
        self.max_connections = fit_connections(wanted, nofile)
        if self.max_connections < wanted:
            logger.warning("max_connections lowered from %d to %d to fit RLIMIT_NOFILE=%d", wanted, self.max_connections, nofile)
        self.max_header_bytes = int(options.get("max_request_header_bytes") or DEFAULT_MAX_HEADER_BYTES)
        self.header_timeout_s = float(options.get("request_header_timeout_s") or DEFAULT_HEADER_TIMEOUT_S)
        self.label = (server,)
        # Connections waiting for a request's headers, oldest first (dicts keep insertion order).
        self.waiting: dict[BoundedHttpToolsProtocol, None] = {}
        self.open: set[BoundedHttpToolsProtocol] = set()
        self.too_large = _reply(
            b"431 Request Header Fields Too Large",
            f"Request line and headers over {self.max_header_bytes} bytes (max_request_header_bytes).".encode())
        declare_metrics()

    def wait(self, proto: BoundedHttpToolsProtocol) -> None:
        self.waiting.pop(proto, None)
        self.waiting[proto] = None

    def evict_one(self) -> bool:
        """Close the connection that has waited longest for a request; False if none waits."""
        for proto in self.waiting:
            del self.waiting[proto]
            STORE.inc("flotilla_http_connections_evicted", self.label)
            proto.transport.abort()
            return True
        return False

    def count(self) -> None:
        STORE.set("flotilla_http_open_connections", self.label, float(len(self.open)))


_FULL = _reply(b"503 Service Unavailable", b"Too many open connections (max_connections); retry later.")
_TIMEOUT = _reply(b"408 Request Timeout", b"The request headers did not arrive in time (request_header_timeout_s).")


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with `Guard`'s limits (set on a subclass by `protocol_class`)."""

    guard: Guard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._in_headers = False  # a request has begun and its headers are not complete
        self._header_bytes = 0  # bytes of the current request's headers seen so far
        self._received = False  # anything arrived since the connection waits for a request
        self._began = False  # a request began during the current feed_data
        self._chunk = 0  # length of the data being fed
        self._refused = False

    # ---- connection ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        g = self.guard
        if len(g.open) >= g.max_connections and not g.evict_one():
            self._refused = True
            self.transport = transport
            STORE.inc("flotilla_http_connections_refused", g.label)
            transport.write(_FULL)
            transport.close()
            return
        super().connection_made(transport)
        g.open.add(self)
        g.count()
        self._await_request()
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        if self._refused:
            return
        super().connection_lost(exc)

    def _forget(self) -> None:
        g = self.guard
        g.open.discard(self)
        g.waiting.pop(self, None)
        self._cancel_header_timer()
        g.count()

    def handle_websocket_upgrade(self) -> None:
        self._forget()  # the connection now belongs to the WebSocket protocol
        super().handle_websocket_upgrade()

    def _await_request(self) -> None:
        self._in_headers = False
        self._header_bytes = 0
        self._received = False
        self.guard.wait(self)

    # ---- header time ----------------------------------------------------------------------------
    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.guard.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not (self._in_headers or self in self.guard.waiting):
            return
        self.guard.waiting.pop(self, None)
        STORE.inc("flotilla_http_connections_timed_out", (*self.guard.label, "headers"))
        if self._received:
            self.transport.write(_TIMEOUT)
        self.transport.close()

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():
            STORE.inc("flotilla_http_connections_timed_out", (*self.guard.label, "keep_alive"))
        super().timeout_keep_alive_handler()

    # ---- header size ----------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        counting = self._in_headers  # the request began in an earlier chunk: all of this is header
        self._received = True
        self._began = False
        self._chunk = len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            if self._header_bytes > self.guard.max_header_bytes:
                self._reject_too_large()
                return
            self._bad_request()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._in_headers or self in self.guard.waiting:
            # Still no complete request line and headers (bare CRLFs count too): on a kept-alive
            # connection their clock starts now; a request whose headers arrive in one read
            # never pays for a timer.
            self._arm_header_timer()
            if self._in_headers and counting and not self._began:
                self._header_bytes += len(data)
                if self._header_bytes > self.guard.max_header_bytes:
                    self._reject_too_large()

    def _bad_request(self) -> None:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)

    def _reject_too_large(self) -> None:
        self.guard.waiting.pop(self, None)
        self._cancel_header_timer()
        self._in_headers = False
        STORE.inc("flotilla_http_header_too_large", self.guard.label)
        self.transport.write(self.guard.too_large)
        self.transport.close()

    # ---- parser callbacks -----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._began = True
        self._header_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self.guard.waiting.pop(self, None)
        self._cancel_header_timer()
        limit = self.guard.max_header_bytes
        if not (self._began and self._chunk <= limit):  # else they fit in one read under the limit
            size = len(self.url)
            for k, v in self.headers:
                size += len(k) + len(v) + 4
            if size > limit:
                self._header_bytes = size
                raise _TooLarge()
        self._begin_request()

    def _begin_request(self) -> None:
        """The request line and headers are in, within bounds: uvicorn's request cycle
        (`lean_http.LeanProtocol` takes plain requests another way)."""
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if not pipelined and not self.transport.is_closing() and not self._in_headers:
            self._await_request()


class _TooLarge(Exception):
    pass


def protocol_class(options: dict[str, Any], server: str, lean: bool = False, large_bodies: int | None = None,
                   body_views: bool = False) -> tuple[type[BoundedHttpToolsProtocol], Guard]:
    """A protocol class for uvicorn's `http=` with the limits in `options` (HTTPOptions fields);
    `lean`: plain requests skip uvicorn's ASGI cycle (`lean_http`, which says what
    `large_bodies` and `body_views` do)."""
    guard = Guard(options, server)
    base: type[BoundedHttpToolsProtocol] = BoundedHttpToolsProtocol
    attrs: dict[str, Any] = {"guard": guard}
    if lean:
        from flotilla._private.lean_http import LeanProtocol

        base = LeanProtocol
        attrs.update(large_bodies=large_bodies, body_views=body_views)
    cls = type("BoundedHttpTools", (base,), attrs)
    return cls, guard
