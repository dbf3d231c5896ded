"""The trace ring and the nesting of one request's events (`trace.assemble`)."""

from __future__ import annotations

import pytest

from flotilla._private import trace


def test_ring_keeps_the_last_events_in_order() -> None:
    ring = trace.Ring(3)
    for i in range(5):
        ring.extend([("a" if i % 2 else "b", "x", i)])
    assert ring.find("b") == [["b", "x", 2], ["b", "x", 4]]
    assert ring.find("a") == [["a", "x", 3]]
    off = trace.Ring(0)
    off.extend([("a",)])
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


def test_assemble_from_the_proxys_http_event_alone() -> None:
    """The proxy records its call in its http event (deployment, router queue ms): the same
    tree as from a separate call event, the root call lasting the whole request."""
    src = _sources()
    src["proxy"] = [["r1", "http", "/", "app", 200, 100.0, 100.1, "A", 0.5]]
    t = trace.assemble("r1", src)
    assert t is not None
    assert t["e2e_ms"] == 100.0 and t["deployment"] == "A" and t["replica"] == "ra" and t["status"] == 200
    assert t["stages"] == pytest.approx({"router_queue": 0.5, "replica_queue": 0.2, "batch_wait": 0.0,
                                         "user_code": 50.0, "downstream": 40.0, "other": 9.3})
    assert [c["deployment"] for c in t["downstream_calls"]] == ["B"]
    src["proxy"] = [["r1", "http", "/nowhere", "", 404, 1.0, 100.1, "", 0.0]]
    t = trace.assemble("r1", {"proxy": src["proxy"]})
    assert t is not None and t["status"] == 404 and t["deployment"] is None


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


@pytest.mark.parametrize("cap,before,batch", [(5, 0, 3), (5, 3, 4), (5, 2, 5), (5, 1, 12), (0, 0, 3), (4, 4, 4)])
def test_ring_keeps_the_last_cap_events_dropping_whole_batches(cap: int, before: int, batch: int) -> None:
    """A batch (`extend`, `columns`) is kept or dropped whole: the ring holds the newest
    events in order, at least `cap` of them, and no batch it would not need for `cap`."""
    ring = trace.Ring(cap)
    for i in range(before):
        ring.extend([("r", i)])
    ring.extend([("r", 100 + i) for i in range(batch)])
    got = [e[1] for e in ring.find("r")]
    every = list(range(before)) + [100 + i for i in range(batch)]
    if cap == 0:
        assert got == []
        return
    assert got == every[len(every) - len(got):]
    assert len(got) >= min(cap, len(every))
    assert len(got) <= cap or got == [100 + i for i in range(batch)]
    assert ring.n == len(got)


def test_ring_columns_make_events_only_when_found() -> None:
    ring = trace.Ring(100)
    made: list[int] = []
    ids = ["a", "b", "a"]

    def event(i: int) -> tuple[str, int]:
        made.append(i)
        return (ids[i], i)

    ring.columns(ids, event)
    assert made == []
    assert ring.find("a") == [["a", 0], ["a", 2]] and made == [0, 2]
    assert ring.find("zz") == [] and made == [0, 2]


def test_the_common_batch_folds_a_column_at_a_time_to_what_the_loop_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_fold` of a batch of one route without batch wait, downstream calls or errors, a
    column at a time, gives the histograms, counters, trace events and access lines that the
    per-request loop gives for the same batch."""
    import asyncio

    from flotilla._private import replica as rmod
    from flotilla._private.metrics import STORE
    from flotilla._private.protocol import Http

    times = [(10.0 + i * 0.01, 10.0 + i * 0.01 + q, 10.0 + i * 0.01 + q + d)
             for i, (q, d) in enumerate([(0.00001, 0.0001), (0.0002, 0.0003), (0.001, 0.004),
                                         (0.0, 0.0009), (0.003, 0.2), (0.0004, 2.0)])]

    def run(dep: str, columns: bool) -> tuple[dict, list, list]:
        async def main() -> tuple[dict, list, list]:
            rep = rmod.Replica({"replica_id": f"{dep}-1", "deployment": dep, "app": "a"})
            if not columns:
                monkeypatch.setattr(rep, "_fold_columns", lambda done, to_wall: False)
            monkeypatch.setattr(rep.access, "flush", lambda: None)
            for i, (t_in, t0, t1) in enumerate(times):
                meta = {"request_id": f"{dep}-req-{i}", "route": "/p"}
                monkeypatch.setattr(rmod.time, "perf_counter", lambda t1=t1: t1)
                rep._record(Http({"path": "/p"}, b"", meta), meta, 200, t0, t_in)
            monkeypatch.undo()
            monkeypatch.setattr(rmod.time, "time", lambda: 1000.0)
            monkeypatch.setattr(rmod.time, "perf_counter", lambda: 20.0)
            folded: list[bool] = []
            by_columns = rep._fold_columns
            monkeypatch.setattr(rep, "_fold_columns",
                                lambda done, to_wall: folded.append(columns and by_columns(done, to_wall)) or folded[-1])
            monkeypatch.setattr(rep.access, "flush", lambda: None)
            rep._fold()
            assert folded == [columns]
            labels = (dep, f"{dep}-1", "/p", "a")
            series = {
                "latency": STORE.values["ray_serve_deployment_processing_latency_ms"][labels],
                "count": STORE.values["ray_serve_deployment_request_counter"][labels],
                **{stage: STORE.values[trace.METRIC][(dep, "a", stage)] for stage in ("replica_queue", "user_code")},
            }
            events = [e[1:] for i in range(len(times)) for e in trace.RING.find(f"{dep}-req-{i}")]
            lines = rep.access.lines
            monkeypatch.undo()
            return series, events, lines

        return asyncio.run(main())

    col, loop = run("Col", True), run("Loop", False)
    assert col[0]["count"] == loop[0]["count"] == len(times)
    for name in ("latency", "replica_queue", "user_code"):
        assert col[0][name][0] == loop[0][name][0], name  # bucket counts
        assert col[0][name][1] == pytest.approx(loop[0][name][1]) and col[0][name][2] == loop[0][name][2]
    assert [e[:3] for e in col[1]] == [["replica", "a", "Col"]] * len(times)
    assert [x for e in col[1] for x in e[4:]] == pytest.approx([x for e in loop[1] for x in e[4:]])
    assert [line.replace("Col-", "Loop-").replace("a_Col", "a_Loop") for line in col[2]] == loop[2]
    assert [line.split()[-6:-2] for line in col[2]] == [[f"Col-req-{i}", "--", "GET", "/p"] for i in range(len(times))]
