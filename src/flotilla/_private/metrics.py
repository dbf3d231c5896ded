"""Per-process metric store, and the head's Prometheus exposition.

Every process (proxy, replicas, head) records into a `Store`: plain dicts keyed by label
tuples, so the request path pays a dict update, never a lock or a prometheus_client call.
On a scrape the head gathers each process's `snapshot()` over its control connections and
renders them all with prometheus_client's text format.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

logger = logging.getLogger("flotilla.metrics")

#: Latency buckets in ms, as Ray Serve uses for its request latency histograms.
LATENCY_MS_BUCKETS = (
    0.1, 0.25, 0.5, 1, 2.5, 5, 7.5, 10, 25, 50, 75, 100, 150, 200, 250, 300, 400, 500,
    1000, 2000, 5000, 10000, 60000, 120000, 300000, 600000,
)


def enabled() -> bool:
    """Metrics are on unless FLOTILLA_METRICS=0 (read when a process starts)."""
    return os.environ.get("FLOTILLA_METRICS", "1") != "0"


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

    def snapshot(self) -> dict[str, Any]:
        return {
            "meta": dict(self.meta),
            "values": {name: {k: (list(v[0]), v[1], v[2]) if isinstance(v, list) else v for k, v in vals.items()}
                       for name, vals in self.values.items()},
        }


#: This process's store.
STORE = Store()


def declare_builtins(store: Store) -> None:
    c, g, h = "counter", "gauge", "histogram"
    route = ("route", "method", "application", "status_code")
    store.declare(c, "ray_serve_num_http_requests", "HTTP requests handled by the proxy.", route)
    store.declare(c, "ray_serve_num_http_error_requests", "HTTP requests answered with an error status (>= 400).", ("route", "error_code", "method", "application"))
    store.declare(h, "ray_serve_http_request_latency_ms", "End-to-end latency of HTTP requests at the proxy, ms.", route, LATENCY_MS_BUCKETS)
    store.declare(g, "ray_serve_num_ongoing_http_requests", "HTTP requests in progress at the proxy.", ("node_id",))
    dep = ("deployment", "replica", "route", "application")
    store.declare(c, "ray_serve_deployment_request_counter", "Requests processed by a replica.", dep)
    store.declare(c, "ray_serve_deployment_error_counter", "Requests that raised in a replica.", dep)
    store.declare(h, "ray_serve_deployment_processing_latency_ms", "Time a replica spent on a request, ms.", dep, LATENCY_MS_BUCKETS)


def render(snapshots: Iterable[dict[str, Any]]) -> bytes:
    """Prometheus text for several processes' snapshots (same names are merged)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.exposition import generate_latest

    families: dict[str, Any] = {}
    seen: dict[str, tuple[str, tuple[str, ...]]] = {}
    for snap in snapshots:
        for name, (kind, doc, labels, buckets) in snap["meta"].items():
            if name in seen and seen[name] != (kind, labels):
                logger.warning("metric %s has conflicting definitions across processes; skipping one", name)
                continue
            seen[name] = (kind, labels)
            fam = families.get(name)
            if fam is None:
                cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}[kind]
                fam = families[name] = cls(name, doc or name, labels=list(labels))
            for key, v in snap["values"].get(name, {}).items():
                if kind == "histogram":
                    counts, total, _n = v
                    cum, acc = [], 0
                    for bound, cnt in zip((*buckets, float("inf")), counts, strict=True):
                        acc += cnt
                        cum.append((_fmt(bound), acc))
                    fam.add_metric(list(key), cum, total)
                else:
                    fam.add_metric(list(key), v)

    class _Collector:
        def collect(self) -> Iterable[Any]:
            return list(families.values())

    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector())  # type: ignore[arg-type]
    return generate_latest(reg)


def _fmt(bound: float) -> str:
    if bound == float("inf"):
        return "+Inf"
    return repr(float(bound))


async def serve_metrics(host: str, port: int, gather: Any) -> tuple[asyncio.AbstractServer, int]:
    """A minimal HTTP server answering GET /metrics with `await gather()` (bytes)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"/"
            if path.split(b"?")[0] in (b"/metrics", b"/"):
                body = await gather()
                status = b"200 OK"
                ctype = b"text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, ctype = b"not found; try /metrics\n", b"404 Not Found", b"text/plain"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except Exception:
            logger.debug("metrics request failed", exc_info=True)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    return server, server.sockets[0].getsockname()[1]


class RequestIds:
    """Unique request ids: a random per-process prefix and a counter (no syscall per id)."""

    def __init__(self) -> None:
        self.prefix = os.urandom(6).hex()
        self.n = 0

    def next(self) -> bytes:
        self.n += 1
        return f"{self.prefix}{self.n:08x}".encode()


def access_log_sample() -> int:
    """Log 1 request in N (FLOTILLA_ACCESS_LOG_SAMPLE, default 1: every request)."""
    try:
        return max(1, int(os.environ.get("FLOTILLA_ACCESS_LOG_SAMPLE", "1")))
    except ValueError:
        return 1


class AccessLog:
    """One line per request, written in batches (the request path only appends to a list).

    With FLOTILLA_ACCESS_LOG_SAMPLE=N only every Nth request is logged, and every error
    (status >= 500, or "ERROR" for handle calls) is logged whatever N is.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self._scheduled = False
        self._second = 0
        self._prefix = ""
        self.sample = access_log_sample()
        self._n = 0

    def add(self, request_id: str, route: str, status: Any, ms: float) -> None:
        if self.sample > 1:
            self._n += 1
            if self._n % self.sample and status != "ERROR" and not (isinstance(status, int) and status >= 500):
                return
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._prefix = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + " " + self.name
        self.lines.append(f"{self._prefix} {request_id} {route} {status} {ms:.2f}ms\n")
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(0.1, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        lines, self.lines = self.lines, []
        if lines:
            try:
                os.write(2, "".join(lines).encode())
            except OSError:
                pass
