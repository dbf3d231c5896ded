"""The pure parts of `flotilla tune`: percentiles, candidates, picking within the SLO, output."""

from __future__ import annotations

import math

import pytest

from flotilla._private import tune
from flotilla._private.tune import LevelResult, Setting, Trial


def level(rps: float, p95: float, errors: int = 0, conc: int = 4) -> LevelResult:
    return LevelResult(concurrency=conc, requests=int(rps * 2), errors=errors, seconds=2.0, p50_ms=p95 / 2,
                       p95_ms=p95, p99_ms=p95 * 1.5, cpu_ms_per_request=1.0, loadgen_cpu=0.3)


@pytest.mark.parametrize(("values", "q", "want"), [
    ([], 50, math.nan),
    ([7.0], 95, 7.0),
    ([1.0, 2.0, 3.0, 4.0, 5.0], 50, 3.0),
    ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
    ([5.0, 1.0, 4.0, 2.0, 3.0], 0, 1.0),
    ([5.0, 1.0, 4.0, 2.0, 3.0], 100, 5.0),
    (list(range(1, 101)), 95, 95.05),
    (list(range(1, 101)), 99, 99.01),
    ([1.0, 2.0], 150, 2.0),
])
def test_percentile(values: list[float], q: float, want: float) -> None:
    got = tune.percentile(values, q)
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)


def test_summarize_is_in_milliseconds() -> None:
    assert tune.summarize([0.001] * 10) == pytest.approx((1.0, 1.0, 1.0))


@pytest.mark.parametrize(("result", "ok"), [
    (None, False),
    (level(100, 10), True),
    (level(100, 50), True),
    (level(100, 50.1), False),
    (level(100, 10, errors=1), False),
    (level(0, 10), False),
])
def test_within_slo(result: LevelResult | None, ok: bool) -> None:
    assert tune.within_slo(result, 50) is ok


def test_best_level_takes_most_throughput_within_slo() -> None:
    levels = [level(100, 5, conc=1), level(300, 20, conc=4), level(350, 80, conc=16)]
    assert tune.best_level(levels, 50) is levels[1]
    assert tune.best_level(levels, 100) is levels[2]
    assert tune.best_level(levels, 1) is levels[0]  # none within: the first, to show why
    assert tune.best_level([], 50) is None


def test_pick_best() -> None:
    a = Trial(Setting(1, 1, 5), level(100, 10))
    b = Trial(Setting(2, 1, 5), level(200, 60))
    c = Trial(Setting(2, 0.5, 5), level(150, 40))
    d = Trial(Setting(2, 0.5, 8), None, "deploy failed")
    e = Trial(Setting(1, 0.5, 8), level(150, 40))
    assert tune.pick_best([a, b, c, d, e], 50) is c  # b is over the SLO; c before e on a tie
    assert tune.pick_best([a, b, c], 100) is b
    assert tune.pick_best([b, d], 50) is None
    assert tune.pick_best([], 50) is None


@pytest.mark.parametrize(("dim", "best", "cores", "want"), [
    ("num_replicas", Setting(1, 1, 5), 2, [(1, 1, 5), (2, 1, 5)]),
    ("num_replicas", Setting(2, 0.5, 5), 4, [(2, 0.5, 5), (1, 0.5, 5), (3, 0.5, 5), (4, 0.5, 5)]),
    ("num_replicas", Setting(3, 1, 5), 2, [(1, 1, 5), (2, 1, 5)]),  # 3 x 1 CPU does not fit 2 cores
    ("num_cpus", Setting(2, 1, 5), 2, [(2, 1, 5), (2, 0.5, 5)]),
    ("num_cpus", Setting(1, 0.5, 5), 2, [(1, 0.5, 5), (1, 1, 5), (1, 2, 5)]),
    ("num_cpus", Setting(3, 0.5, 5), 4, [(3, 0.5, 5), (3, 1, 5), (3, 1.33, 5)]),
    ("max_ongoing_requests", Setting(2, 1, 5), 2, [(2, 1, 5), (2, 1, 2), (2, 1, 8), (2, 1, 32)]),
    ("max_ongoing_requests", Setting(2, 1, 8), 2, [(2, 1, 8), (2, 1, 2), (2, 1, 32)]),
])
def test_stage_candidates(dim: str, best: Setting, cores: int, want: list[tuple[float, float, int]]) -> None:
    got = tune.stage_candidates(dim, best, cores)
    assert [(s.num_replicas, s.num_cpus, s.max_ongoing_requests) for s in got] == want
    assert got[0] == best or not best.fits(cores)


def test_stage_candidates_unknown_dimension() -> None:
    with pytest.raises(ValueError, match="unknown dimension"):
        tune.stage_candidates("num_gpus", Setting(1, 1, 5), 2)


@pytest.mark.parametrize(("setting", "want"), [
    (Setting(1, 1, 1), [2]),  # at least two clients
    (Setting(1, 1, 5), [1, 2, 6]),
    (Setting(2, 1, 5), [1, 3, 12]),
    (Setting(2, 1, 100), [1, 8, 64]),  # capped
])
def test_concurrency_levels(setting: Setting, want: list[int]) -> None:
    got = tune.concurrency_levels(setting)
    assert got == want or (setting.max_ongoing_requests == 1 and got[-1] == 2)
    assert got == sorted(set(got))


@pytest.mark.parametrize(("remaining", "left", "want"), [
    (60.0, 6, 10.0),
    (10.0, 5, 3.0),  # below the minimum share: the minimum, while there is that much
    (2.0, 5, 0.0),
    (60.0, 0, 0.0),
])
def test_trial_budget(remaining: float, left: int, want: float) -> None:
    assert tune.trial_budget(remaining, left) == pytest.approx(want)


def test_format_table_marks_chosen_and_over_slo() -> None:
    a = Trial(Setting(1, 1, 5), level(100, 10))
    b = Trial(Setting(2, 1, 5), level(200, 60))
    c = Trial(Setting(2, 0.5, 8), None, "deploy failed")
    lines = tune.format_table([a, b, c], 50, chosen=a).splitlines()
    assert lines[0].split()[:3] == ["setting", "conc", "req/s"]
    assert "CPU ms/req" in lines[0] and "errors" in lines[0]
    assert lines[2].startswith("replicas=1 cpus=1 max_ongoing=5") and lines[2].endswith("<- chosen")
    assert "200" in lines[3] and lines[3].endswith("over SLO")
    assert lines[4].endswith("(deploy failed)") and " - " in lines[4]
    assert len({len(lines[0]), len(lines[1])}) == 1 or len(lines[1]) >= len(lines[0]) - 2


@pytest.mark.parametrize(("done", "total", "hashes", "pct"), [(0, 10, 0, "0%"), (5, 10, 15, "50%"), (20, 10, 30, "100%")])
def test_progress_bar(done: float, total: float, hashes: int, pct: str) -> None:
    bar = tune.progress_bar(done, total, "trial 1")
    assert bar.count("#") == hashes and bar.count("#") + bar.count(".") == 30
    assert pct in bar and bar.endswith("trial 1")


def test_tuned_config_sets_the_options_of_one_deployment() -> None:
    base = {"applications": [{"name": "default", "deployments": [
        {"name": "Ingress", "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5, "memory": 100}},
        {"name": "Model", "num_replicas": 1},
    ]}]}
    out = tune.tuned_config(base, "Ingress", Setting(1, 2.0, 8))
    assert out["applications"][0]["deployments"][0] == {
        "name": "Ingress", "num_replicas": 1, "max_ongoing_requests": 8,
        "ray_actor_options": {"num_cpus": 2.0, "memory": 100},
    }
    assert out["applications"][0]["deployments"][1] == {"name": "Model", "num_replicas": 1}
    assert base["applications"][0]["deployments"][0]["num_replicas"] == 2  # not changed
    with pytest.raises(ValueError, match="no deployment"):
        tune.tuned_config(base, "Nope", Setting(1, 1, 5))


def test_tuned_config_drops_autoscaling() -> None:
    base = {"applications": [{"deployments": [{"name": "A", "autoscaling_config": {"max_replicas": 4}}]}]}
    entry = tune.tuned_config(base, "A", Setting(2, 1, 5))["applications"][0]["deployments"][0]
    assert "autoscaling_config" not in entry and entry["num_replicas"] == 2


@pytest.mark.parametrize(("code", "cores", "want"), [
    (Setting(2, 0.5, 5), 2, [Setting(2, 0.5, 5), tune.DEFAULTS]),
    (tune.DEFAULTS, 2, [tune.DEFAULTS]),
    (Setting(1, 0.5, 5), 0, [Setting(1, 0.5, 5)]),  # the code's options always; the defaults only if they fit
])
def test_first_candidates(code: Setting, cores: int, want: list[Setting]) -> None:
    assert tune.first_candidates(code, cores) == want


def test_sweep_lists_every_level() -> None:
    t = Trial(Setting(1, 1, 5), level(100, 10, conc=4), levels=(level(50, 2, conc=1), level(100, 10, errors=2, conc=4)))
    assert t.sweep() == "1: 50 req/s p95 2.0 ms | 4: 100 req/s p95 10.0 ms 2 errors"


@pytest.mark.parametrize(("levels", "want"), [
    ([level(100, 5, conc=8), level(200, 60, conc=64)], 23),
    ([level(100, 5, conc=2), level(200, 60, conc=3)], None),  # nothing between
    ([level(100, 5, conc=8), level(200, 40, conc=64)], None),  # the last one met the SLO
    ([level(100, 60, conc=8), level(200, 70, conc=64)], None),  # neither did
    ([level(200, 60, conc=64)], None),
])
def test_bisect_level(levels: list[LevelResult], want: int | None) -> None:
    assert tune.bisect_level(levels, 50) == want


def test_finalists_are_the_best_two_and_the_references() -> None:
    code, plain = Setting(2, 0.5, 5), tune.DEFAULTS
    trials = [
        Trial(code, level(300, 10)), Trial(plain, level(100, 60)), Trial(Setting(2, 1, 5), level(400, 10)),
        Trial(Setting(2, 1, 8), level(350, 10)), Trial(Setting(2, 1, 32), level(500, 90)), Trial(Setting(1, 2, 5), None),
    ]
    got = [t.setting for t in tune.finalists(trials, 50, keep=(code, plain))]
    assert got == [Setting(2, 1, 5), Setting(2, 1, 8), code, plain]  # plain missed the SLO: measured again anyway
    assert [t.setting for t in tune.finalists(trials, 50, keep=(Setting(1, 2, 5),), top=1)] == [Setting(2, 1, 5)]


def test_median_result_takes_the_median_round_and_every_error() -> None:
    rounds = [level(300, 10), level(100, 20, errors=1), level(200, 15)]
    med = tune.median_result(rounds)
    assert med is not None and med.rps == 200 and med.p95_ms == 15 and med.errors == 1
    assert tune.median_result(rounds[:2]).rps == 100  # type: ignore[union-attr]  # the lower of two
    assert tune.median_result([]) is None


def test_batched_methods_are_found_with_their_code_options() -> None:
    from flotilla import serve
    from flotilla._private.tuner import batched_methods

    class Base:
        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
        async def handle(self, items: list[int]) -> list[int]:
            return items

    class Model(Base):
        async def __call__(self, x: int) -> int:
            return await self.handle(x)

    got = batched_methods(Model)
    assert list(got) == ["handle"]
    assert got["handle"]["max_batch_size"] == 8 and got["handle"]["batch_wait_timeout_s"] == 0.01
    assert batched_methods(object) == {}


def test_cluster_cpu_ticks_covers_the_process_tree() -> None:
    import os
    import subprocess
    import sys

    from flotilla._private.tuner import cluster_cpu_ticks

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        got = cluster_cpu_ticks(os.getpid())
        assert os.getpid() in got and child.pid in got and got[os.getpid()] >= 0
        assert os.getppid() not in got
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(("raw", "status", "keep", "rest"), [
    (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokNEXT", 200, True, b"NEXT"),
    (b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\nNEXT", 503, True, b"NEXT"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nNEXT", 200, True, b"NEXT"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\nxNEXT", 200, False, b"NEXT"),
    (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", 200, False, b""),
])
def test_read_response(raw: bytes, status: int, keep: bool, rest: bytes) -> None:
    import asyncio

    from flotilla._private.tuner import _read_response

    async def go() -> tuple[int, bool, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        got = await _read_response(reader)
        return (*got, await reader.read())

    assert asyncio.run(go()) == (status, keep, rest)
