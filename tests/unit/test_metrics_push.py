"""Pushed metrics: what a process sends (only changes, absolute values), the head's aggregate
(departed processes, retention) and the exposition of merged series."""

from __future__ import annotations

import asyncio
import pickle
import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from flotilla._private import metrics
from flotilla._private.metrics import Aggregate, Pusher, Store, render


def store() -> Store:
    s = Store()
    s.declare("counter", "reqs", "Requests.", ("app",))
    s.declare("gauge", "busy", "In progress.", ("app",))
    s.declare("histogram", "lat_ms", "Latency.", ("app",), (1, 10))
    return s


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text.decode()) for s in fam.samples}


def test_changes_sends_only_what_changed_as_absolute_values() -> None:
    s = store()
    sent: dict[str, Any] = {}
    meta_sent: set[str] = set()
    s.inc("reqs", ("a",))
    s.set("busy", ("a",), 2.0)
    s.observe("lat_ms", ("a",), 5.0)
    first = s.changes(sent, meta_sent)
    assert first is not None and set(first["meta"]) == {"reqs", "busy", "lat_ms"}
    assert first["values"] == {"reqs": {("a",): 1.0}, "busy": {("a",): 2.0}, "lat_ms": {("a",): ([0, 1, 0], 5.0, 1)}}
    assert s.changes(sent, meta_sent) is None  # nothing changed: nothing to send
    s.inc("reqs", ("a",))
    s.inc("reqs", ("b",))
    s.set("busy", ("a",), 2.0)  # the same value: not a change
    assert s.changes(sent, meta_sent) == {"meta": {}, "values": {"reqs": {("a",): 2.0, ("b",): 1.0}}}
    s.observe("lat_ms", ("a",), 50.0)
    s.declare("counter", "new_total", "", ())
    delta = s.changes(sent, meta_sent)
    assert delta is not None and list(delta["meta"]) == ["new_total"]
    assert delta["values"] == {"lat_ms": {("a",): ([0, 1, 1], 55.0, 2)}}


class FakePeer:
    def __init__(self) -> None:
        self.closed = False
        self.sent: list[dict[str, Any]] = []

    def notify(self, op: str, delta: dict[str, Any]) -> None:
        assert op == "metrics_push"
        self.sent.append(pickle.loads(pickle.dumps(delta)))  # as it travels


class FakeLink:
    def __init__(self) -> None:
        self.peer: FakePeer | None = FakePeer()
        self.on_up: list[Any] = []


def test_pusher_sends_everything_again_to_a_new_connection() -> None:
    s = store()
    link = FakeLink()
    gauge = [0.0]
    p = Pusher(s, link, lambda: s.set("busy", ("a",), gauge[0]), interval=1.0)
    s.inc("reqs", ("a",), 5)
    p.push()
    first = link.peer
    assert first is not None and len(first.sent) == 1 and first.sent[0]["full"]
    p.push()
    assert len(first.sent) == 1  # nothing changed
    gauge[0] = 3.0
    p.push()
    assert first.sent[-1] == {"meta": {}, "values": {"busy": {("a",): 3.0}}, "full": False}
    link.peer = None  # the head is away: nothing is sent, nothing is lost
    s.inc("reqs", ("a",))
    p.push()
    second = link.peer = FakePeer()  # a restarted head
    p.push()
    assert len(second.sent) == 1 and second.sent[0]["full"]
    assert second.sent[0]["values"]["reqs"] == {("a",): 6.0}
    assert set(second.sent[0]["meta"]) == {"reqs", "busy", "lat_ms"}


def test_pusher_pushes_periodically_and_once_more_on_stop() -> None:
    async def main() -> None:
        s = store()
        link = FakeLink()
        p = Pusher(s, link, interval=0.01)
        p.start()
        s.inc("reqs", ("a",))
        await asyncio.sleep(0.1)
        assert link.peer is not None and link.peer.sent[-1]["values"]["reqs"] == {("a",): 1.0}
        s.inc("reqs", ("a",))
        p.stop()
        assert link.peer.sent[-1]["values"]["reqs"] == {("a",): 2.0}
        await link.on_up[0]()  # reconnected to the same peer: nothing new to send
        assert link.peer.sent[-1]["values"]["reqs"] == {("a",): 2.0}

    asyncio.run(main())


def test_aggregate_keeps_a_departed_process_counters_for_the_retention_only() -> None:
    s = store()
    s.inc("reqs", ("a",), 4)
    s.set("busy", ("a",), 1.0)
    agg = Aggregate(retain=0.2)
    delta = s.changes({}, set())
    assert delta is not None
    agg.push(1, {**delta, "full": True})
    v0 = agg.version
    assert samples(render(agg.snapshots()))[("busy", (("app", "a"),))] == 1.0
    agg.departed(1)
    assert agg.version > v0
    out = samples(render(agg.snapshots()))
    assert out[("reqs_total", (("app", "a"),))] == 4.0
    assert ("busy", (("app", "a"),)) not in out  # its gauges go at once
    time.sleep(0.25)
    assert render(agg.snapshots()).count(b"reqs_total{") == 0
    assert agg.procs == {}


def test_render_merges_series_with_the_same_labels() -> None:
    old, new = store(), store()  # e.g. a proxy that was replaced, within the retention
    old.inc("reqs", ("a",), 10)
    old.observe("lat_ms", ("a",), 5.0)
    old.set("busy", ("a",), 7.0)
    new.inc("reqs", ("a",), 3)
    new.inc("reqs", ("b",), 1)
    new.observe("lat_ms", ("a",), 50.0)
    new.set("busy", ("a",), 1.0)
    out = samples(render([old.snapshot(), new.snapshot()]))
    assert out[("reqs_total", (("app", "a"),))] == 13.0
    assert out[("reqs_total", (("app", "b"),))] == 1.0
    assert out[("lat_ms_count", (("app", "a"),))] == 2.0
    assert out[("lat_ms_sum", (("app", "a"),))] == 55.0
    assert out[("lat_ms_bucket", (("app", "a"), ("le", "10.0")))] == 1.0
    assert out[("busy", (("app", "a"),))] == 1.0  # the last gauge wins


def test_intervals_from_the_environment(monkeypatch: Any) -> None:
    monkeypatch.setenv("FLOTILLA_METRICS_PUSH_INTERVAL_S", "0.5")
    monkeypatch.setenv("FLOTILLA_METRICS_RETAIN_S", "0")
    assert metrics.push_interval_s() == 0.5 and metrics.retain_s() == 0.0
    monkeypatch.setenv("FLOTILLA_METRICS_PUSH_INTERVAL_S", "0")
    monkeypatch.setenv("FLOTILLA_METRICS_RETAIN_S", "soon")
    assert metrics.push_interval_s() == metrics.PUSH_INTERVAL_S and metrics.retain_s() == metrics.RETAIN_S


def test_the_metrics_endpoint() -> None:
    async def get(port: int, *parts: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for part in parts:
            writer.write(part)
            await asyncio.sleep(0.01)
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return data

    async def main() -> None:
        fail = [False]

        def gather() -> bytes:
            if fail[0]:
                raise RuntimeError("boom")
            return b"up 1\n"

        async def gather_async() -> bytes:
            return b"up 2\n"

        server, port = await metrics.serve_metrics("127.0.0.1", 0, gather)
        server2, port2 = await metrics.serve_metrics("127.0.0.1", 0, gather_async)
        try:
            ok = await get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and ok.endswith(b"\r\n\r\nup 1\n")
            assert b"Content-Length: 5\r\n" in ok and b"text/plain; version=0.0.4" in ok
            ok2 = await get(port2, b"GET /metrics?x=1 HTTP/1.1\r\nHo", b"st: x\r\n\r\n")
            assert ok2.startswith(b"HTTP/1.1 200 OK\r\n") and ok2.endswith(b"up 2\n")
            assert (await get(port, b"GET /nope HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
            fail[0] = True
            assert (await get(port, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 500 ")
            assert await get(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (metrics.MAX_REQUEST_HEAD + 10)) == b""
        finally:
            server.close()
            server2.close()

    asyncio.run(main())


def test_observe_sorted_counts_as_observe_into_each() -> None:
    """On bucket edges, between them, past the last and with nothing."""
    buckets = (0.1, 1.0, 10.0)
    for values in ([], [0.05], [0.1], [0.1, 0.1000001, 1.0, 5.0, 10.0, 10.5, 99.0], [11.0, 12.0], [0.0] * 4):
        one: list[Any] = [[0] * 4, 0.0, 0]
        many: list[Any] = [[0] * 4, 0.0, 0]
        for v in values:
            metrics.observe_into(one, buckets, v)
        metrics.observe_sorted(many, buckets, sorted(values))
        assert many == one, values
