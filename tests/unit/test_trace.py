"""The trace ring and the nesting of one request's events (`trace.assemble`)."""

from __future__ import annotations

import pytest

from flotilla._private import trace


def test_ring_keeps_the_last_events_in_order() -> None:
    ring = trace.Ring(3)
    for i in range(5):
        ring.add(("a" if i % 2 else "b", "x", i))
    assert ring.find("b") == [["b", "x", 2], ["b", "x", 4]]
    assert ring.find("a") == [["a", "x", 3]]
    off = trace.Ring(0)
    off.add(("a",))
    assert off.find("a") == []


def _sources() -> dict[str, list[list]]:
    # proxy -> A (replica ra) -> B (replica rb); wall clock in seconds, durations in ms.
    return {
        "proxy": [["r1", "call", "app", "A", 0.5, 95.0, 100.095], ["r1", "http", "/", "app", 200, 100.0, 100.1]],
        "ra": [["r1", "replica", "app", "A", "ra", 0.2, 0.0, 50.0, 40.0, 92.0, 100.094],
               ["r1", "call", "app", "B", 0.1, 40.0, 100.07]],
        "rb": [["r1", "replica", "app", "B", "rb", 0.3, 5.0, 33.0, 0.0, 38.5, 100.0695]],
    }


def test_assemble_nests_calls_and_sums_to_e2e() -> None:
    t = trace.assemble("r1", _sources())
    assert t is not None
    assert t["e2e_ms"] == 100.0 and t["deployment"] == "A" and t["replica"] == "ra" and t["status"] == 200
    assert t["stages"] == pytest.approx({"router_queue": 0.5, "replica_queue": 0.2, "batch_wait": 0.0,
                                         "user_code": 50.0, "downstream": 40.0, "other": 9.3})
    [b] = t["downstream_calls"]
    assert b["deployment"] == "B" and b["replica"] == "rb" and b["e2e_ms"] == 40.0
    assert sum(b["stages"].values()) == pytest.approx(40.0)
    assert b["stages"]["batch_wait"] == 5.0 and b["stages"]["other"] == pytest.approx(1.6)
    assert "request r1" in trace.format_trace(t) and "call app/B" in trace.format_trace(t)


def test_assemble_trims_stages_longer_than_the_call() -> None:
    src = _sources()
    src["ra"][0][7] = 70.0  # the replica's closing clock read came late
    t = trace.assemble("r1", src)
    assert t is not None
    assert sum(t["stages"].values()) == pytest.approx(100.0)
    # trimmed to the proxy's call (95 ms); the proxy's own 5 ms stay "other"
    assert t["stages"]["other"] == pytest.approx(5.0) and t["stages"]["user_code"] == pytest.approx(54.3)


def test_assemble_without_the_proxy_and_unknown() -> None:
    src = _sources()
    del src["proxy"]
    t = trace.assemble("r1", src)
    assert t is not None and t["deployment"] == "A" and t["e2e_ms"] == 92.0 and t["status"] is None
    assert trace.assemble("r2", {}) is None


def test_replica_stages_with_batch_wait_downstream_and_router_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica splits its handler time into batch wait (read from batching's BATCH_WAIT_S,
    where it exists), downstream calls (added up in the request's meta) and user code, when
    it folds what it recorded; the router's wait (in meta) counts in its latency samples at
    once."""
    import asyncio
    import contextvars

    from flotilla._private import replica as rmod
    from flotilla._private.protocol import Call

    wait: contextvars.ContextVar[float] = contextvars.ContextVar("BATCH_WAIT_S", default=0.0)
    monkeypatch.setattr(rmod, "_BATCH_WAIT", wait)

    async def main() -> None:
        rep = rmod.Replica({"replica_id": "r-1", "deployment": "D", "app": "a"})
        rep.latency = trace.LatencyRing(8)
        wait.set(0.020)
        meta = {"request_id": "req-bw", trace.DOWNSTREAM_KEY: 0.030, trace.ROUTER_QUEUE_KEY: 0.005}
        t_in = 100.0
        t0 = t_in + 0.001  # 1 ms in the replica's queue
        monkeypatch.setattr(rmod.time, "perf_counter", lambda: t0 + 0.100)  # a 100 ms handler
        rep._record(Call("__call__", (), {}, meta), meta, "OK", t0, t_in)
        assert trace.RING.find("req-bw") == []  # kept for the fold, which a trace look-up runs first
        rep._fold()
        [ev] = trace.RING.find("req-bw")
        _, kind, app, dep, rid, rq, bw, user, ds, total, _wall = ev
        assert (kind, app, dep, rid) == ("replica", "a", "D", "r-1")
        assert rq == pytest.approx(1.0) and bw == pytest.approx(20.0) and ds == pytest.approx(30.0)
        assert user == pytest.approx(50.0) and total == pytest.approx(101.0)
        lat, queue, n = rep.latency.p95(10.0, now=t0 + 0.100)
        assert n == 1 and lat == pytest.approx(106.0) and queue == pytest.approx(6.0)

    asyncio.run(main())
