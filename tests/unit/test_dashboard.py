"""The dashboard's pure parts: counter increments per process, the aligned series, log reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flotilla._private import dashboard as d
from flotilla._private.canary import quantile
from flotilla._private.metrics import LATENCY_MS_BUCKETS

DEP = ("deployment", "replica", "route", "application")
NB = len(LATENCY_MS_BUCKETS) + 1


def proc(requests: float, errors: float = 0.0, hist: list[int] | None = None, replica: str = "r1",
         dep: str = "M", app: str = "a") -> dict[str, Any]:
    key = (dep, replica, "/", app)
    h = hist or [0] * NB
    return {
        "meta": {d.REQUESTS: ("counter", "", DEP, ()), d.ERRORS: ("counter", "", DEP, ()),
                 d.LATENCY: ("histogram", "", DEP, LATENCY_MS_BUCKETS)},
        "values": {d.REQUESTS: {key: requests}, d.ERRORS: {key: errors}, d.LATENCY: {key: (h, 0.0, sum(h))}},
        "gone": None,
    }


def hist(at_ms: float, n: int) -> list[int]:
    out = [0] * NB
    i = next(i for i, b in enumerate(LATENCY_MS_BUCKETS) if at_ms <= b)
    out[i] = n
    return out


@pytest.mark.parametrize(
    ("case", "before", "after", "primed", "want"),
    [
        ("first call only remembers", {}, {1: proc(100)}, False, None),
        ("growth", {1: proc(100)}, {1: proc(130)}, True, 30),
        ("two processes add", {1: proc(10), 2: proc(5, replica="r2")},
         {1: proc(20), 2: proc(8, replica="r2")}, True, 13),
        ("a new process counts whole", {1: proc(10)}, {1: proc(10), 2: proc(7, replica="r2")}, True, 7),
        ("a process that went away costs nothing", {1: proc(10), 2: proc(50, replica="r2")}, {1: proc(12)}, True, 2),
        ("a counter that went back counts from zero", {1: proc(100)}, {1: proc(4)}, True, 4),
    ],
)
def test_increments(case: str, before: dict[int, Any], after: dict[int, Any], primed: bool, want: float | None) -> None:
    last, _ = d.increments({}, before, False)
    _, grown = d.increments(last, after, primed)
    if want is None:
        assert grown == {}
    else:
        assert grown[("a", "M")].requests == want, case


def test_increments_errors_and_latency_quantiles() -> None:
    last, _ = d.increments({}, {1: proc(10, 1, hist(2, 10))}, False)
    _, grown = d.increments(last, {1: proc(110, 11, [a + b for a, b in zip(hist(2, 10), hist(2, 100), strict=True)])}, True)
    c = grown[("a", "M")]
    assert (c.requests, c.errors) == (100, 10)
    f = c.figures(2.0)
    assert f["rps"] == 50 and f["error_rate"] == 0.1
    assert 1 < f["p50_ms"] <= 2.5 and 1 < f["p99_ms"] <= 2.5  # type: ignore[operator]


def test_figures_without_traffic_are_none_not_zero_latency() -> None:
    f = d.Counts().figures(1.0)
    assert f == {"rps": 0.0, "p50_ms": None, "p99_ms": None, "error_rate": None}


def test_quantile_interpolates_in_its_bucket() -> None:
    assert quantile([1.0, 2.0], [0, 10, 0], 0.5) == pytest.approx(1.5)
    assert quantile([1.0, 2.0], [0, 0, 4], 0.99) == 2.0  # +Inf: the last finite bound
    assert quantile([1.0], [0, 0], 0.5) is None


def test_gauges_per_deployment_and_replica() -> None:
    labels = ("deployment", "replica", "application")
    p = {"meta": {d.RUNNING: ("gauge", "", labels, ()), d.QUEUED_IN_REPLICA: ("gauge", "", labels, ())},
         "values": {d.RUNNING: {("M", "r1", "a"): 3.0, ("M", "r2", "a"): 1.0}, d.QUEUED_IN_REPLICA: {("M", "r1", "a"): 2.0}},
         "gone": None}
    gone = dict(p, gone=1.0)
    per_dep, per_replica = d.gauges([p, gone])
    assert per_dep == {("a", "M"): 4.0}
    assert per_replica == {"r1": (3.0, 2.0), "r2": (1.0, 0.0)}


def test_series_stays_aligned_and_bounded() -> None:
    s = d.Series(interval_s=1.0, window_s=4)
    s.add(1.0, {"a/M": {"rps": 1.0}})
    s.add(2.0, {"a/M": {"rps": 2.0}, "a/N": {"rps": 5.0}})
    out = s.since()
    assert out["t"] == [1.0, 2.0]
    assert out["deployments"]["a/N"]["rps"] == [None, 5.0]
    assert out["deployments"]["a/M"]["replicas"] == [None, None]
    for t in (3.0, 4.0, 5.0):
        s.add(t, {"a/M": {"rps": t}})
    out = s.since()
    assert out["t"] == [2.0, 3.0, 4.0, 5.0]  # the window: 4 samples
    assert out["deployments"]["a/M"]["rps"] == [2.0, 3.0, 4.0, 5.0]
    assert out["deployments"]["a/N"]["rps"] == [5.0, None, None, None]
    s.add(6.0, {"a/M": {"rps": 6.0}})
    assert "a/N" not in s.since()["deployments"]  # gone for a whole window
    later = s.since(4.0)
    assert later["t"] == [5.0, 6.0] and later["deployments"]["a/M"]["rps"] == [5.0, 6.0]
    assert s.since(99.0)["t"] == []


def test_read_log_tail_and_follow(tmp_path: Path) -> None:
    path = tmp_path / "replica.log"
    path.write_text("".join(f"line {i}\n" for i in range(1000)))
    tail = d.read_log(str(path), None, 3)
    assert tail["text"] == "line 997\nline 998\nline 999\n" and tail["truncated"]
    with path.open("a") as f:
        f.write("line 1000\n")
    more = d.read_log(str(path), tail["offset"], 200)
    assert more["text"] == "line 1000\n" and more["offset"] == path.stat().st_size
    assert d.read_log(str(path), more["offset"], 200)["text"] == ""
    path.write_text("rotated\n")  # shorter than the offset: read from its start
    assert d.read_log(str(path), more["offset"], 200)["text"] == "rotated\n"


def test_read_log_in_chunks_ends_on_a_line(tmp_path: Path) -> None:
    path = tmp_path / "big.log"
    line = "x" * 99 + "\n"
    path.write_text(line * (2 * d.LOG_CHUNK // 100 + 10))
    got = d.read_log(str(path), 0, 200)
    assert got["truncated"] and got["text"].endswith("\n") and len(got["text"]) <= d.LOG_CHUNK
    rest = d.read_log(str(path), got["offset"], 200)
    assert rest["text"].startswith("x")
