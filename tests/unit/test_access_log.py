"""The access log's batch formatting (`AccessLog.keep_columns`): a batch of one route and
status is formatted a second at a time with one `%` format, and must give exactly the lines
that keeping the same requests one at a time gives: across second boundaries, with a `%`
in the route, out of order, after lines kept singly, and under sampling and JSON."""

from __future__ import annotations

import random
from typing import Any

import pytest

from flotilla._private.metrics import AccessLog


def _batch(n: int, start: float, span_s: float, ordered: bool = True) -> tuple[list[float], list[str], list[float]]:
    rng = random.Random(n)
    t = [start + rng.random() * span_s for _ in range(n)]
    if ordered:
        t.sort()
    return t, [f"req-{i}" for i in range(n)], [rng.random() * 50 for _ in range(n)]


@pytest.mark.parametrize("route,span_s,ordered", [
    ("POST /", 0.5, True),  # one second
    ("GET /items", 3.0, True),  # four seconds
    ("GET /a%20b%s%d", 2.0, True),  # '%' in the route
    ("GET /", 3.0, False),  # out of order: a line at a time
])
def test_a_uniform_batch_gives_the_lines_of_single_keeps(route: str, span_s: float, ordered: bool) -> None:
    t, rids, ms = _batch(500, 1_700_000_000.2, span_s, ordered)
    batched, single = AccessLog("proxy head"), AccessLog("proxy head")
    batched.keep(t[0] - 1, "before", "GET /x", 404, 1.0)
    single.keep(t[0] - 1, "before", "GET /x", 404, 1.0)
    batched.keep_columns(t, rids, route, [200] * len(t), ms)
    for row in zip(t, rids, [route] * len(t), [200] * len(t), ms, strict=True):
        single.keep(*row)
    assert bool(batched.ready) == ordered  # formatted at once when in order
    assert batched.lines == single.lines
    assert batched.lines[0].split()[5] == "before" and len(batched.lines) == len(t) + 1


def test_flush_writes_the_lines_in_the_order_kept(capfd: Any) -> None:
    log = AccessLog("app_Model r1")
    log.keep(1_700_000_000.0, "first", "m", "OK", 1.0)
    log.keep_columns([1_700_000_000.5, 1_700_000_000.6], ["a", "b"], "m", ["OK", "OK"], [2.0, 3.0])
    log.keep(1_700_000_000.7, "last", "m", "ERROR", 4.0)
    log.flush()
    ids = [line.split()[5] for line in capfd.readouterr().err.splitlines()]
    assert ids == ["first", "a", "b", "last"]
    assert not log.ready and not log.pending


def test_mixed_statuses_sampling_and_json_take_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    t, rids, ms = _batch(40, 1_700_000_000.0, 1.0)
    mixed = AccessLog("proxy")
    mixed.keep_columns(t, rids, "GET /", [200, 500] * 20, ms)
    assert not mixed.ready and len(mixed.lines) == 40
    js = AccessLog("proxy")
    js.configure({"encoding": "JSON"}, {"component_name": "proxy"})
    js.keep_columns(t, rids, "GET /", [200] * 40, ms)
    assert not js.ready and all(line.startswith("{") for line in js.lines)
    monkeypatch.setenv("FLOTILLA_ACCESS_LOG_SAMPLE", "4")
    sampled = AccessLog("proxy")
    sampled.keep_columns(t, rids, "GET /", [200] * 40, ms)
    assert len(sampled.lines) == 10


def test_lines_are_rays(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Serve's access line: `INFO <time,ms> <app>_<deployment> <replica> <request id> --
    <method> <route> <status> <ms, one decimal>ms`; a batch and single keeps alike."""
    monkeypatch.setenv("TZ", "UTC")
    import time

    time.tzset()
    try:
        one, many = AccessLog("app_Model r1"), AccessLog("app_Model r1")
        one.keep(1_700_000_000.25, "rid-1", "GET /app", 200, 9.84)
        many.keep_columns([1_700_000_000.25], ["rid-1"], "GET /app", [200], [9.84])
        want = "INFO 2023-11-14 22:13:20,250 app_Model r1 rid-1 -- GET /app 200 9.8ms\n"
        assert one.lines == many.lines == [want]
        js = AccessLog("app_Model r1")
        js.configure({"encoding": "JSON"}, {"application": "app", "deployment": "app_Model", "replica": "r1"})
        js.keep(1_700_000_000.25, "rid-1", "CALL __call__", "OK", 1.0)
        import json

        rec = json.loads(js.lines[0])
        assert (rec["asctime"], rec["message"], rec["deployment"], rec["request_id"]) == (
            "2023-11-14 22:13:20,250", "CALL __call__ OK 1.0ms", "app_Model", "rid-1")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
