"""Per-process metric store, its push to the head, and the head's Prometheus exposition.

Every process (proxy, replicas, head) records into a `Store`: plain dicts keyed by label
tuples, so the request path pays a dict update, never a lock or a prometheus_client call.
A `Pusher` sends the series that changed to the head every `FLOTILLA_METRICS_PUSH_INTERVAL_S`
(absolute values, one-way, over the process's control connection); the head keeps them in an
`Aggregate`, and a scrape renders that aggregate (with the controller's own store) with
prometheus_client's text format, asking no process anything.
"""

from __future__ import annotations

import asyncio
import bisect
import builtins
import itertools
import json
import logging
import operator
import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

logger = logging.getLogger("flotilla.metrics")

#: Latency buckets in ms, as Ray Serve uses for its request latency histograms.
LATENCY_MS_BUCKETS = (
    0.1, 0.25, 0.5, 1, 2.5, 5, 7.5, 10, 25, 50, 75, 100, 150, 200, 250, 300, 400, 500,
    1000, 2000, 5000, 10000, 60000, 120000, 300000, 600000,
)


#: Default of `FLOTILLA_METRICS_PUSH_INTERVAL_S`: how often each process pushes what changed.
PUSH_INTERVAL_S = 1.0
#: Default of `FLOTILLA_METRICS_RETAIN_S`: how long the head keeps the counters and histograms of
#: a process that went away (Ray's metrics agent drops a dead worker's once it has gone
#: `RAY_WORKER_TIMEOUT_S`, 120 s, unreported).
RETAIN_S = 120.0


def enabled() -> bool:
    """Metrics are on unless FLOTILLA_METRICS=0 (read when a process starts)."""
    return os.environ.get("FLOTILLA_METRICS", "1") != "0"


def _env_seconds(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= minimum:  # also NaN
        logger.warning("%s=%r is not a number >= %g; using %g", name, raw, minimum, default)
        return default
    return value


def push_interval_s() -> float:
    """Seconds between two pushes of a process's metrics (`FLOTILLA_METRICS_PUSH_INTERVAL_S`)."""
    return _env_seconds("FLOTILLA_METRICS_PUSH_INTERVAL_S", PUSH_INTERVAL_S, 0.001)


def retain_s() -> float:
    """Seconds a departed process's counters stay exported (`FLOTILLA_METRICS_RETAIN_S`)."""
    return _env_seconds("FLOTILLA_METRICS_RETAIN_S", RETAIN_S, 0.0)


class Store:
    """Counters, gauges and histograms of one process."""

    def __init__(self) -> None:
        # name -> (type, description, label names, buckets)
        self.meta: dict[str, tuple[str, str, tuple[str, ...], tuple[float, ...]]] = {}
        self.values: dict[str, dict[tuple[str, ...], Any]] = {}

    def declare(self, kind: str, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float] = ()) -> None:
        old = self.meta.get(name)
        if old is not None and (old[0] != kind or old[2] != tuple(labels)):
            raise ValueError(
                f"metric {name!r} is already registered as a {old[0]} with tags {old[2]}; "
                f"cannot register it again as a {kind} with tags {tuple(labels)}"
            )
        if old is None:
            self.meta[name] = (kind, doc, tuple(labels), tuple(sorted(buckets)))
            self.values[name] = {}

    def inc(self, name: str, labels: tuple[str, ...], value: float = 1.0) -> None:
        d = self.values[name]
        d[labels] = d.get(labels, 0.0) + value

    def set(self, name: str, labels: tuple[str, ...], value: float) -> None:
        self.values[name][labels] = value

    def observe(self, name: str, labels: tuple[str, ...], value: float) -> None:
        d = self.values[name]
        h = d.get(labels)
        buckets = self.meta[name][3]
        if h is None:
            h = d[labels] = [[0] * (len(buckets) + 1), 0.0, 0]
        h[0][bisect.bisect_left(buckets, value)] += 1
        h[1] += value
        h[2] += 1

    def series(self, name: str, labels: tuple[str, ...]) -> list[Any]:
        """The live `[bucket counts, sum, count]` of one histogram series, created if new: a
        hot path keeps it and calls `observe_into`, skipping the look-ups of `observe`."""
        d = self.values[name]
        h = d.get(labels)
        if h is None:
            h = d[labels] = [[0] * (len(self.meta[name][3]) + 1), 0.0, 0]
        return h  # type: ignore[no-any-return]

    def snapshot(self) -> dict[str, Any]:
        return {
            "meta": dict(self.meta),
            "values": {name: {k: (list(v[0]), v[1], v[2]) if isinstance(v, list) else v for k, v in vals.items()}
                       for name, vals in self.values.items()},
        }

    def changes(self, sent: dict[str, dict[tuple[str, ...], Any]], meta_sent: builtins.set[str]) -> dict[str, Any] | None:
        """The declarations and series that changed since `sent` (updated in place), as
        absolute values; None if nothing did. A histogram changed when its count did.

        Costs one comparison per series and nothing on the request path. The dicts are copied
        before they are walked: user code in sync handlers records from other threads.
        """
        meta = {name: m for name, m in list(self.meta.items()) if name not in meta_sent}
        meta_sent.update(meta)
        values: dict[str, dict[tuple[str, ...], Any]] = {}
        for name, vals in list(self.values.items()):
            last = sent.get(name)
            if last is None:
                last = sent[name] = {}
            changed: dict[tuple[str, ...], Any] | None = None
            for key, v in list(vals.items()):
                if v.__class__ is list:  # histogram: [bucket counts, sum, count]
                    n = v[2]
                    if last.get(key) != n:
                        last[key] = n
                        if changed is None:
                            changed = values[name] = {}
                        changed[key] = (list(v[0]), v[1], n)
                elif last.get(key) != v:
                    last[key] = v
                    if changed is None:
                        changed = values[name] = {}
                    changed[key] = v
        if not meta and not values:
            return None
        return {"meta": meta, "values": values}


class Pusher:
    """Sends this process's metrics to the head every `interval` seconds (default
    `FLOTILLA_METRICS_PUSH_INTERVAL_S`): only the series that changed since the last push, as
    absolute values, so a lost or repeated push can never make a counter go backwards; nothing
    at all when nothing changed. On a new connection (a restarted head) everything is sent again,
    at once. `before()` runs before each push (it sets gauges, e.g. requests in progress).
    """

    def __init__(self, store: Store, link: Any, before: Any = None, interval: float | None = None) -> None:
        self.store = store
        self.link = link  # client.HeadLink
        self.before = before
        self.interval = push_interval_s() if interval is None else interval
        self.pushes = 0
        self._peer: Any = None  # the connection the last push went to
        self._sent: dict[str, dict[tuple[str, ...], Any]] = {}
        self._meta_sent: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self.link.on_up.append(self._reconnected)

    async def _reconnected(self) -> None:
        self.push()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.push()
            except Exception:
                logger.exception("could not push metrics to the head")

    def push(self) -> None:
        """Send what changed now (dropped while the head is away: the next connection gets all)."""
        peer = self.link.peer
        if peer is None or peer.closed:
            return
        full = peer is not self._peer
        if full:
            self._peer = peer
            self._sent = {}
            self._meta_sent = set()
        if self.before is not None:
            self.before()
        delta = self.store.changes(self._sent, self._meta_sent)
        if delta is None:
            return
        delta["full"] = full  # the head starts this process's entry afresh
        try:
            peer.notify("metrics_push", delta)
        except Exception:
            self._peer = None  # send everything again next time
            raise
        self.pushes += 1

    def stop(self) -> None:
        """A last push (what changed since the previous one), then no more."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        try:
            self.push()
        except Exception:
            logger.debug("last metrics push failed", exc_info=True)


#: This process's store.
STORE = Store()


def observe_into(h: list[Any], buckets: tuple[float, ...], value: float) -> None:
    """`Store.observe` on a series kept from `Store.series` (same buckets)."""
    h[0][bisect.bisect_left(buckets, value)] += 1
    h[1] += value
    h[2] += 1


def is_error(status: Any) -> bool:
    """A request's status counts as an error: HTTP 5xx, or "ERROR" for a handle call."""
    return status == "ERROR" or (isinstance(status, int) and status >= 500)


def columns(flat: list[Any], width: int) -> list[list[Any]]:
    """The columns of a flat list of records `width` items each (`flat[i::width]`): how the
    recording paths keep per-request figures without an object per request."""
    return [flat[i::width] for i in range(width)]


def observe_sorted(h: list[Any], buckets: tuple[float, ...], values: list[float]) -> None:
    """`observe_into` of every value of `values`, sorted ascending: one search per bucket
    edge instead of one per value."""
    n = len(values)
    if not n:
        return
    counts = h[0]
    below = 0  # values <= the previous edge
    for i, edge in enumerate(buckets):
        k = bisect.bisect_right(values, edge, below)
        counts[i] += k - below
        below = k
        if k == n:
            break
    else:
        counts[len(buckets)] += n - below
    h[1] += sum(values)
    h[2] += n


def declare_builtins(store: Store) -> None:
    c, g, h = "counter", "gauge", "histogram"
    route = ("route", "method", "application", "status_code")
    store.declare(c, "ray_serve_num_http_requests", "HTTP requests handled by the proxy.", route)
    store.declare(c, "ray_serve_num_http_error_requests", "HTTP requests answered with an error status (>= 400).", ("route", "error_code", "method", "application"))
    store.declare(c, "ray_serve_num_deployment_http_error_requests", "HTTP requests answered with an error status (>= 400), by deployment.",
                  ("deployment", "error_code", "method", "route", "application"))
    store.declare(h, "ray_serve_http_request_latency_ms", "End-to-end latency of HTTP requests at the proxy, ms.", route, LATENCY_MS_BUCKETS)
    store.declare(g, "ray_serve_num_ongoing_http_requests", "HTTP requests in progress at the proxy.", ("node_id",))
    dep = ("deployment", "replica", "route", "application")
    store.declare(c, "ray_serve_deployment_request_counter", "Requests processed by a replica.", dep)
    store.declare(c, "ray_serve_deployment_error_counter", "Requests that raised in a replica.", dep)
    store.declare(h, "ray_serve_deployment_processing_latency_ms", "Time a replica spent on a request, ms.", dep, LATENCY_MS_BUCKETS)


class Aggregate:
    """The head's copy of every process's metrics, kept up to date by their pushes.

    Keyed by connection: a process's entry starts with its first push on a connection and is
    marked departed when that connection closes (the process exited, or was replaced). A
    departed process's gauges are dropped at once (it has nothing in progress); its counters
    and histograms stay exported for `retain_s`, so the requests it served before going away
    still count, then are dropped, as Ray's metrics agent drops a dead worker's metrics.
    `version` changes whenever what `snapshots()` returns may have.
    """

    def __init__(self, retain: float | None = None) -> None:
        self.retain_s = retain_s() if retain is None else retain
        self.procs: dict[int, dict[str, Any]] = {}
        self.version = 0

    def push(self, key: int, delta: dict[str, Any]) -> None:
        p = self.procs.get(key)
        if p is None or delta.get("full"):
            p = self.procs[key] = {"meta": {}, "values": {}, "gone": None}
        p["meta"].update(delta["meta"])
        values = p["values"]
        for name, vals in delta["values"].items():
            d = values.get(name)
            if d is None:
                values[name] = dict(vals)
            else:
                d.update(vals)
        self.version += 1

    def departed(self, key: int) -> None:
        p = self.procs.get(key)
        if p is None or p["gone"] is not None:
            return
        p["gone"] = time.monotonic()
        for name, m in p["meta"].items():
            if m[0] == "gauge":
                p["values"].pop(name, None)
        self.version += 1
        self.expire()

    def expire(self) -> None:
        now = time.monotonic()
        old = [k for k, p in self.procs.items() if p["gone"] is not None and now - p["gone"] >= self.retain_s]
        for k in old:
            del self.procs[k]
        if old:
            self.version += 1

    def snapshots(self) -> list[dict[str, Any]]:
        """Departed processes first, so a live one's gauge wins where labels are the same."""
        self.expire()
        procs = sorted(self.procs.values(), key=lambda p: p["gone"] is None)
        return [{"meta": p["meta"], "values": p["values"]} for p in procs]


AUTH_FAILURES_DOC = ("Refused authentications: handshakes of the authenticated TCP planes (side server or "
                     "client) and HTTP requests without a valid API key (side http).")


def record_auth_failures(store: Store, component: str) -> None:
    """Copy this process's refused handshakes (`auth.failures`, absolute counts) into `store`,
    as `flotilla_auth_failures_total{component, side, reason}`; nothing until there is one."""
    from flotilla._private import auth

    if not auth.failures:
        return
    store.declare("counter", auth.METRIC, AUTH_FAILURES_DOC,
                  ("component", "side", "reason"))
    for (side, reason), n in auth.failures.items():
        store.set(auth.METRIC, (component, side, reason), float(n))


def render(snapshots: Iterable[dict[str, Any]]) -> bytes:
    """Prometheus text for several processes' snapshots (same names are merged).

    A series with the same labels in several snapshots (a restarted proxy and the counters its
    predecessor left, within the retention) is one sample: counters and histograms are
    summed, and the last gauge wins.
    """
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.exposition import generate_latest

    seen: dict[str, tuple[str, str, tuple[str, ...]]] = {}
    merged: dict[str, dict[tuple[str, ...], Any]] = {}
    for snap in snapshots:
        for name, (kind, doc, labels, buckets) in snap["meta"].items():
            if name in seen and seen[name][::2] != (kind, labels):
                logger.warning("metric %s has conflicting definitions across processes; skipping one", name)
                continue
            if name not in seen:
                seen[name] = (kind, doc, labels)
                merged[name] = {}
            dst = merged[name]
            for key, v in snap["values"].get(name, {}).items():
                old = dst.get(key)
                if kind == "histogram":
                    counts, total, n = v
                    if old is not None and old[3] == buckets:
                        counts = [a + b for a, b in zip(old[0], counts, strict=True)]
                        total += old[1]
                        n += old[2]
                    dst[key] = (counts, total, n, buckets)
                elif kind == "counter" and old is not None:
                    dst[key] = old + v
                else:
                    dst[key] = v

    families: list[Any] = []
    for name, (kind, doc, labels) in seen.items():
        cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}[kind]
        fam = cls(name, doc or name, labels=list(labels))
        for key, v in merged[name].items():
            if kind == "histogram":
                counts, total, _n, buckets = v
                cum, acc = [], 0
                for bound, cnt in zip((*buckets, float("inf")), counts, strict=True):
                    acc += cnt
                    cum.append((_fmt(bound), acc))
                fam.add_metric(list(key), cum, total)
            else:
                fam.add_metric(list(key), v)
        families.append(fam)

    class _Collector:
        def collect(self) -> Iterable[Any]:
            return families

    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector())  # type: ignore[arg-type]
    return generate_latest(reg)


def _fmt(bound: float) -> str:
    if bound == float("inf"):
        return "+Inf"
    return repr(float(bound))


#: A scrape's request head larger than this is refused (the connection is closed).
MAX_REQUEST_HEAD = 64 * 1024
#: A client that has not sent its whole request head by then is disconnected.
REQUEST_HEAD_TIMEOUT_S = 10.0
_last_gather_error = ""


class _MetricsHTTP(asyncio.Protocol):
    """One connection to the /metrics endpoint: read a request head, answer, close.

    A bare protocol rather than asyncio streams: a scrape storm costs the head little.
    """

    def __init__(self, gather: Any, token: bytes | None = None) -> None:
        self.gather = gather
        self.token = token  # required as 'Authorization: Bearer <token>' when set
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.timer = asyncio.get_running_loop().call_later(REQUEST_HEAD_TIMEOUT_S, transport.close)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            if len(self.buf) > MAX_REQUEST_HEAD:
                self.answered = True
                assert self.transport is not None
                self.transport.close()
            return
        self.answered = True
        line = self.buf.split(b"\r\n", 1)[0]
        path = line.split(b" ", 2)[1] if line.count(b" ") >= 2 else b"/"
        if self.token is not None:
            from flotilla._private.frontdoor import bearer_ok

            if not bearer_ok(self.buf.split(b"\r\n\r\n", 1)[0], self.token):
                self._reply(b"401 Unauthorized\r\nWWW-Authenticate: Bearer", b"text/plain",
                            b"unauthorized: send 'Authorization: Bearer <token>'\n")
                return
        if path.split(b"?")[0] not in (b"/metrics", b"/"):
            self._reply(b"404 Not Found", b"text/plain", b"not found; try /metrics\n")
            return
        try:
            body = self.gather()
        except Exception:
            self._failed()
            return
        if asyncio.iscoroutine(body):
            asyncio.get_running_loop().create_task(self._reply_later(body))
        else:
            self._reply(b"200 OK", b"text/plain; version=0.0.4; charset=utf-8", body)

    async def _reply_later(self, pending: Any) -> None:
        try:
            body = await pending
        except Exception:
            self._failed()
            return
        self._reply(b"200 OK", b"text/plain; version=0.0.4; charset=utf-8", body)

    def _failed(self) -> None:
        global _last_gather_error
        e = sys.exc_info()[1]
        if repr(e) != _last_gather_error:  # once per cause, not once per scrape
            _last_gather_error = repr(e)
            logger.exception("could not gather the metrics")
        self._reply(b"500 Internal Server Error", b"text/plain", b"could not gather the metrics; see the head's log\n")

    def _reply(self, status: bytes, ctype: bytes, body: bytes) -> None:
        t = self.transport
        assert t is not None
        if t.is_closing():
            return
        t.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        t.close()  # after the buffered answer is written


async def serve_metrics(host: str, port: int, gather: Any, token: bytes | None = None) -> tuple[asyncio.AbstractServer, int]:
    """A minimal HTTP server answering GET /metrics with `gather()` (bytes, or a coroutine
    returning them); with `token`, only to requests bearing it (else 401)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _MetricsHTTP(gather, token), host, port)
    return server, server.sockets[0].getsockname()[1]


class RequestIds:
    """Unique request ids in a UUID's form, as Ray Serve makes them: 80 random bits per
    process and a 48-bit counter (no syscall per id; `next(count)` is safe across threads).
    Make one per process, after any fork."""

    def __init__(self) -> None:
        r = os.urandom(10).hex()
        self.prefix = f"{r[:8]}-{r[8:12]}-{r[12:16]}-{r[16:20]}-"
        self._count = itertools.count(1)

    def next(self) -> bytes:
        """An id as header bytes (the proxy's)."""
        return f"{self.prefix}{next(self._count):012x}".encode()

    def uuid(self) -> str:
        """An id as a str (a handle call's)."""
        return f"{self.prefix}{next(self._count):012x}"


def access_log_sample() -> int:
    """Log 1 request in N (FLOTILLA_ACCESS_LOG_SAMPLE, default 1: every request)."""
    try:
        return max(1, int(os.environ.get("FLOTILLA_ACCESS_LOG_SAMPLE", "1")))
    except ValueError:
        return 1


#: Fields of one access line in `AccessLog.pending`: time, request id, route, status, ms.
LINE_FIELDS = 5


class AccessLog:
    """One line per request, written in batches (the request path only appends to a list).

    Lines wait in one flat list, LINE_FIELDS items each, so no object per line outlives its
    request (the garbage collector never runs for them).
    With FLOTILLA_ACCESS_LOG_SAMPLE=N only every Nth request is logged, and every error
    (status >= 500, or "ERROR" for handle calls) is logged whatever N is.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.pending: list[Any] = []
        self.ready: list[str] = []  # lines formatted already (`keep_columns`), before `pending`
        self._scheduled = False
        self._second = 0
        self._time = ""
        self._prefix = ""
        self.enabled = True
        self.json_context: dict[str, Any] | None = None  # set: one JSON object per line
        self.sample = access_log_sample()
        self._n = 0

    def configure(self, logging_config: dict[str, Any] | None, context: dict[str, Any]) -> None:
        """Apply a `LoggingConfig`: access log on or off, TEXT or JSON lines (with `context`)."""
        config = logging_config or {}
        self.enabled = config.get("enable_access_log", True)
        self.json_context = context if config.get("encoding") == "JSON" else None

    def add(self, request_id: str, route: str, status: Any, ms: float) -> None:
        """Keep one request's line, written with its batch 0.1 s after the batch's first."""
        if self.keep(time.time(), request_id, route, status, ms) and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(0.1, self.flush)

    def keep(self, t: float, request_id: str, route: str, status: Any, ms: float) -> bool:
        """Keep the line of a request that ended at `t` (wall clock) for the next `flush`, which
        the caller runs; formatting waits for it, off the request path. False if not kept."""
        if not self.enabled:
            return False
        if self.sample > 1:
            self._n += 1
            if self._n % self.sample and not is_error(status):
                return False
        self.pending += (t, request_id, route, status, ms)
        return True

    def keep_columns(self, t: Sequence[float], request_ids: Sequence[str], routes: Sequence[str] | str,
                     statuses: Sequence[Any], ms: Sequence[float]) -> None:
        """`keep` of many lines given a column at a time (`routes`: one for all when a str).
        Text lines of one route and status are formatted at once, a second at a time."""
        if not self.enabled or not t:
            return
        n = len(t)
        if isinstance(routes, str):
            if self.sample == 1 and self.json_context is None and statuses.count(statuses[0]) == n:
                text = self._uniform_text(t, request_ids, routes, statuses[0], ms)
                if text is not None:
                    self._settle()  # lines kept before these go first
                    self.ready.append(text)
                    return
            routes = [routes] * n
        if self.sample > 1:
            for line in zip(t, request_ids, routes, statuses, ms, strict=True):
                self.keep(*line)
            return
        block: list[Any] = [None] * (LINE_FIELDS * n)
        block[0::LINE_FIELDS] = t
        block[1::LINE_FIELDS] = request_ids
        block[2::LINE_FIELDS] = routes
        block[3::LINE_FIELDS] = statuses
        block[4::LINE_FIELDS] = ms
        self.pending += block

    def _uniform_text(self, t: Sequence[float], request_ids: Sequence[str], route: str, status: Any,
                      ms: Sequence[float]) -> str | None:
        """The text lines of requests of one route and status, one `%` format per second
        (None when `t` is not in order: `_text` takes them a line at a time)."""
        secs = list(map(int, t))
        n = len(secs)
        if secs.count(secs[0]) == n:
            spans = [(0, n, secs[0])]
        elif sorted(secs) == secs:
            spans = [(bisect.bisect_left(secs, sec), bisect.bisect_right(secs, sec), sec) for sec in sorted(set(secs))]
        else:
            return None
        args: list[Any] = [None] * (3 * n)
        args[0::3] = list(map(operator.mul, map(operator.mod, t, itertools.repeat(1)), itertools.repeat(1000)))
        args[1::3] = request_ids
        args[2::3] = ms
        rest = (",%03d " + f"{self.name} ".replace("%", "%%") + "%s -- "
                + f"{route} {status}".replace("%", "%%") + " %.1fms\n")  # a route may hold a '%'
        return "".join([((self._at(sec).replace("%", "%%") + rest) * (hi - lo)) % tuple(args[3 * lo:3 * hi])
                        for lo, hi, sec in spans])

    def _at(self, now: int) -> str:
        """The line prefix of second `now` (level and time to the second), made once per second."""
        if now != self._second:
            self._second = now
            self._time = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
            self._prefix = "INFO " + self._time
        return self._prefix

    def _text(self, pending: list[Any]) -> str:
        """The lines of `pending` (flat, LINE_FIELDS items each), one string (text lines
        formatted in one loop)."""
        rows = zip(*columns(pending, LINE_FIELDS), strict=True)
        if self.json_context is not None:
            return "".join([self._json(*p) for p in rows])
        second, prefix, out, name = -1, "", [], self.name
        for t, request_id, route, status, ms in rows:
            if int(t) != second:
                second = int(t)
                prefix = self._at(second)
            out.append(f"{prefix},{int(t % 1 * 1000):03d} {name} {request_id} -- {route} {status} {ms:.1f}ms\n")
        return "".join(out)

    def _json(self, t: float, request_id: str, what: str, status: Any, ms: float) -> str:
        """`what`: the method (an HTTP one, "WS" or "CALL") and the route (or path, or the
        called method), as the text line has them."""
        self._at(int(t))
        method, space, route = what.partition(" ")
        if not space:  # a gRPC call's line: its method alone
            method, route = "", what
        return json.dumps({
            "asctime": f"{self._time},{int(t % 1 * 1000):03d}", "levelname": "INFO",
            "message": f"{what} {status} {ms:.1f}ms", **(self.json_context or {}),
            "request_id": request_id, "method": method, "route": route, "status": status,
            "duration_ms": round(ms, 3), "serve_access_log": True, "timestamp_ns": int(t * 1e9),
        }) + "\n"

    @property
    def lines(self) -> list[str]:
        """The lines not written yet."""
        return ("".join(self.ready) + self._text(self.pending)).splitlines(keepends=True)

    def _settle(self) -> None:
        """The lines waiting in `pending`, formatted onto `ready`."""
        if self.pending:
            self.ready.append(self._text(self.pending))
            self.pending = []

    def flush(self) -> None:
        self._scheduled = False
        self._settle()
        ready, self.ready = self.ready, []
        if ready:
            try:
                os.write(2, "".join(ready).encode())
            except OSError:
                pass
