"""The proxy's per-request recording (`Proxy._record`) keeps a tuple; `Proxy.fold` turns a
batch of them into the request counters, latency histograms, access log lines and trace
events, at once when asked (a metrics push, a trace lookup) and else FOLD_S later."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from flotilla._private import trace
from flotilla._private.metrics import STORE
from flotilla._private.proxy import FOLD_S, Proxy
from flotilla.serve.schema import DeploymentID


def _count(name: str, labels: tuple[str, ...]) -> float:
    return STORE.values[name].get(labels, 0.0)


def _hist_count(labels: tuple[str, ...]) -> int:
    h = STORE.values["ray_serve_http_request_latency_ms"].get(labels)
    return 0 if h is None else h[2]


def _meta(rid: bytes, queued_s: float | None = None) -> dict[str, Any]:
    """The meta the proxy makes for a routed request (the router adds its queue time)."""
    meta: dict[str, Any] = {"request_id": rid.decode(), "route": "/"}
    if queued_s is not None:
        meta[trace.ROUTER_QUEUE_KEY] = queued_s
    return meta


def test_a_batch_folds_into_counters_histograms_access_lines_and_trace_events() -> None:
    p = Proxy({})
    m = ("/fold", DeploymentID("D", "foldapp"))
    ok, err = ("/fold", "GET", "foldapp", "200"), ("/fold", "POST", "foldapp", "503")
    nowhere = ("", "GET", "", "404")
    before = (_count("ray_serve_num_http_requests", ok), _count("ray_serve_num_http_requests", err),
              _count("ray_serve_num_http_error_requests", ("/fold", "503", "POST", "foldapp")), _hist_count(ok),
              _count("ray_serve_num_http_requests", nowhere))
    t0 = time.perf_counter() - 0.002  # each request took about 2 ms

    async def main() -> None:
        for i in range(5):
            rid = f"fold-ok-{i}".encode()
            p._record({"method": "GET", "path": f"/fold/{i}"}, m, None, 200, t0, rid, _meta(rid))
        p._record({"method": "POST", "path": "/fold/x"}, m, None, 503, t0, b"fold-err", _meta(b"fold-err", 0.004))
        p._record({"method": "GET", "path": "/nowhere"}, None, None, 404, t0, b"fold-404", None)
        # nothing reaches the metrics on the request path
        assert _count("ray_serve_num_http_requests", ok) == before[0]
        assert not trace.RING.find("fold-err")
        p.fold()

    asyncio.run(main())
    assert _count("ray_serve_num_http_requests", ok) == before[0] + 5
    assert _count("ray_serve_num_http_requests", err) == before[1] + 1
    assert _count("ray_serve_num_http_error_requests", ("/fold", "503", "POST", "foldapp")) == before[2] + 1
    assert _count("ray_serve_num_http_requests", nowhere) == before[4] + 1
    assert _hist_count(ok) == before[3] + 5
    h = STORE.values["ray_serve_http_request_latency_ms"][ok]
    assert h[1] / h[2] >= 1.5  # the mean latency: about 2 ms
    events = trace.RING.find("fold-err")
    assert len(events) == 1 and events[0][1:5] == ["http", "/fold", "foldapp", 503]
    assert abs(events[0][6] - time.time()) < 5  # wall time of the request's end
    assert events[0][7:] == ["D", 4.0]  # the deployment called and the router's queue ms
    assert trace.RING.find("fold-404")[0][7:] == ["", 0.0]
    assert not p._done


def test_access_lines_are_written_by_the_fold(capfd: Any) -> None:
    p = Proxy({})
    m = ("/acc", DeploymentID("D", "accapp"))

    async def main() -> None:
        p._record({"method": "GET", "path": "/acc/1"}, m, None, 200, time.perf_counter(), b"acc-1", _meta(b"acc-1"))
        p.fold()

    asyncio.run(main())
    assert "acc-1 -- GET /acc/1 200" in capfd.readouterr().err


def test_a_kept_request_is_folded_fold_s_later_without_a_push() -> None:
    p = Proxy({})
    m = ("/late", DeploymentID("D", "lateapp"))
    labels = ("/late", "GET", "lateapp", "200")
    before = _count("ray_serve_num_http_requests", labels)

    async def main() -> float:
        p._record({"method": "GET", "path": "/late"}, m, None, 200, time.perf_counter(), b"late-1", _meta(b"late-1"))
        t = time.monotonic()
        while _count("ray_serve_num_http_requests", labels) == before:
            assert time.monotonic() - t < 5 * FOLD_S + 1, "never folded"
            await asyncio.sleep(0.01)
        return time.monotonic() - t

    took = asyncio.run(main())
    assert FOLD_S * 0.5 <= took <= 5 * FOLD_S + 1


def test_a_batch_of_one_kind_folds_by_columns_with_the_same_figures() -> None:
    """The common batch (one route, method, application, status) takes the column path: the
    same counters, latency and router-queue histograms, access lines and trace events."""
    p = Proxy({})
    m = ("/cols", DeploymentID("C", "colsapp"))
    labels = ("/cols", "GET", "colsapp", "200")
    queue = trace.series(DeploymentID("C", "colsapp"), "router_queue")
    before = (_count("ray_serve_num_http_requests", labels), _hist_count(labels), queue[2], queue[1])
    t0 = time.perf_counter() - 0.002

    async def main() -> None:
        for i in range(50):
            rid = f"cols-{i}".encode()
            p._record({"method": "GET", "path": "/cols"}, m, None, 200, t0, rid,
                      _meta(rid, 0.003 if i == 7 else None))
        p.fold()

    asyncio.run(main())
    assert _count("ray_serve_num_http_requests", labels) == before[0] + 50
    assert _hist_count(labels) == before[1] + 50
    assert queue[2] == before[2] + 50 and abs(queue[1] - before[3] - 3.0) < 1e-6
    e = trace.RING.find("cols-7")
    assert len(e) == 1 and e[0][1:5] == ["http", "/cols", "colsapp", 200] and e[0][7:] == ["C", 3.0]
    assert e[0][5] >= 1.5
    assert trace.RING.find("cols-8")[0][8] == 0.0


def test_a_batch_that_never_queued_counts_zeros_in_the_router_queue_histogram() -> None:
    p = Proxy({})
    m = ("/noq", DeploymentID("N", "noqapp"))
    queue = trace.series(DeploymentID("N", "noqapp"), "router_queue")
    before = (queue[2], queue[1], queue[0][0])

    async def main() -> None:
        for i in range(30):
            rid = f"noq-{i}".encode()
            p._record({"method": "GET", "path": "/noq"}, m, None, 200, time.perf_counter(), rid, _meta(rid))
        p.fold()

    asyncio.run(main())
    assert (queue[2], queue[1], queue[0][0]) == (before[0] + 30, before[1], before[2] + 30)
    assert trace.RING.find("noq-3")[0][8] == 0.0


@pytest.mark.parametrize(("status", "error"), [(1000, False), (1001, False), (1011, True), (3000, True),
                                                (4001, True), (403, True), (101, False)])
def test_a_websocket_is_an_error_as_ray_counts_it(status, error):
    from flotilla._private.proxy import ws_error

    assert ws_error(status) is error
