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
    batched, single = AccessLog("proxy"), AccessLog("proxy")
    batched.keep(t[0] - 1, "before", "GET /x", 404, 1.0)
    single.keep(t[0] - 1, "before", "GET /x", 404, 1.0)
    batched.keep_columns(t, rids, route, [200] * len(t), ms)
    for row in zip(t, rids, [route] * len(t), [200] * len(t), ms, strict=True):
        single.keep(*row)
    assert bool(batched.ready) == ordered  # formatted at once when in order
    assert batched.lines == single.lines
    assert batched.lines[0].split()[3] == "before" and len(batched.lines) == len(t) + 1


def test_flush_writes_the_lines_in_the_order_kept(capfd: Any) -> None:
    log = AccessLog("replica")
    log.keep(1_700_000_000.0, "first", "m", "OK", 1.0)
    log.keep_columns([1_700_000_000.5, 1_700_000_000.6], ["a", "b"], "m", ["OK", "OK"], [2.0, 3.0])
    log.keep(1_700_000_000.7, "last", "m", "ERROR", 4.0)
    log.flush()
    ids = [line.split()[3] for line in capfd.readouterr().err.splitlines()]
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
