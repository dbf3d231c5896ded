"""The config doctor's checks and the live findings, table-tested with crafted inputs."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from flotilla import serve
from flotilla._private import doctor
from flotilla._private.doctor import DepSpec, Finding
from flotilla._private.findings import (
    Interval,
    Watch,
    batch_underfilled,
    gil_bound,
    latency_outside_code,
    unbalanced,
)

MACHINE = {"CPU": 8.0, "GPU": 0.0, "memory": 16e9}


def codes(found: list[Finding]) -> list[tuple[str, str]]:
    return [(f.code, f.deployment) for f in found]


@pytest.mark.parametrize(("specs", "totals", "want"), [
    ([DepSpec("A", replicas=8)], MACHINE, []),
    ([DepSpec("A", replicas=10)], MACHINE, [("oversubscribed-cpu", "A")]),
    ([DepSpec("A", replicas=4, demand={"CPU": 1}), DepSpec("B", replicas=3, demand={"CPU": 2})], MACHINE,
     [("oversubscribed-cpu", "B")]),
    ([DepSpec("A", replicas=2, demand={"CPU": 1, "GPU": 1})], {**MACHINE, "GPU": 1.0}, [("oversubscribed-gpu", "A")]),
    ([DepSpec("A", replicas=2, demand={"CPU": 1, "memory": 10e9})], MACHINE, [("oversubscribed-memory", "A")]),
    ([DepSpec("A", replicas=2, demand={"CPU": 1, "tpu": 1})], {**MACHINE, "tpu": 1.0}, [("oversubscribed-resource", "A")]),
    ([DepSpec("A", replicas=1, max_replicas=20, min_replicas=1)], MACHINE, [("oversubscribed-at-peak", "A")]),
    ([DepSpec("A", replicas=1, max_replicas=8, min_replicas=1)], MACHINE, []),
])
def test_resources(specs: list[DepSpec], totals: dict[str, float], want: list[tuple[str, str]]) -> None:
    found = doctor.check_resources(specs, totals)
    assert codes(found) == want
    assert all(f.fix for f in found)


def test_pending_count_and_fix_name_the_numbers() -> None:
    (f,) = doctor.check_resources([DepSpec("A", replicas=10)], MACHINE)
    assert "2 will stay PENDING" in f.message and "num_replicas=8" in f.fix and f.severity == "warning"


@pytest.mark.parametrize(("specs", "cores", "inherited", "want"), [
    ([DepSpec("A", replicas=8)], 8, None, []),  # 8 x OMP 1
    ([DepSpec("A", replicas=4, demand={"CPU": 4})], 8, None, [("omp-oversubscribed", "A")]),  # 4 x 4 = 16
    ([DepSpec("A", replicas=4, demand={"CPU": 4}, omp_threads=2)], 8, None, []),  # the user's env_vars win
    ([DepSpec("A", replicas=4)], 8, 4, [("omp-oversubscribed", "A")]),  # inherited OMP_NUM_THREADS=4
    ([DepSpec("A", replicas=0, demand={"CPU": 4})], 2, None, []),  # scaled to zero
])
def test_omp(specs: list[DepSpec], cores: float, inherited: int | None, want: list[tuple[str, str]]) -> None:
    found = doctor.check_omp(specs, cores, inherited)
    assert codes(found) == want
    if found:
        assert "OMP_NUM_THREADS=" in found[0].fix


@pytest.mark.parametrize(("spec", "budget", "want"), [
    (DepSpec("A", max_ongoing_requests=5, max_batch_size=16, batch_wait_timeout_s=0.01), None, ["batch-never-full"]),
    (DepSpec("A", max_ongoing_requests=16, max_batch_size=16, batch_wait_timeout_s=0.01), None, []),
    (DepSpec("A", max_ongoing_requests=16, max_batch_size=16, batch_wait_timeout_s=0.2), 50.0, ["batch-wait-over-budget"]),
    (DepSpec("A", max_ongoing_requests=16, max_batch_size=16, batch_wait_timeout_s=0.02), 50.0, []),
    (DepSpec("A"), 1.0, []),
])
def test_batching(spec: DepSpec, budget: float | None, want: list[str]) -> None:
    assert [f.code for f in doctor.check_batching([spec], budget)] == want


@pytest.mark.parametrize(("target", "limit", "want"), [(8.0, 4, ["target-above-limit"]), (2.0, 4, []), (None, 4, [])])
def test_autoscaling_target(target: float | None, limit: int, want: list[str]) -> None:
    spec = DepSpec("A", target_ongoing_requests=target, max_ongoing_requests=limit)
    assert [f.code for f in doctor.check_autoscaling([spec])] == want


@pytest.mark.parametrize(("spec", "request_timeout", "startup", "want"), [
    (DepSpec("A", min_replicas=0, constructor_s=40.0), 30.0, 1800.0, ["cold-start-too-slow"]),
    (DepSpec("A", min_replicas=1, constructor_s=40.0), 30.0, 1800.0, []),
    (DepSpec("A", min_replicas=0, constructor_s=10.0), 30.0, 1800.0, []),
    (DepSpec("A", min_replicas=0, constructor_s=40.0), None, 1800.0, []),
    (DepSpec("A", constructor_s=40.0), None, 30.0, ["constructor-too-slow"]),
    (DepSpec("A", min_replicas=0), 30.0, 1800.0, []),  # not measured
])
def test_cold_start(spec: DepSpec, request_timeout: float | None, startup: float, want: list[str]) -> None:
    assert [f.code for f in doctor.check_cold_start([spec], request_timeout, startup)] == want


@pytest.mark.parametrize(("specs", "gpus", "want"), [
    ([DepSpec("A", demand={"CPU": 1, "GPU": 0.5}, replicas=2)], 1, []),
    ([DepSpec("A", demand={"CPU": 1, "GPU": 0.4}, replicas=2)], 1, [("gpu-fraction-waste", "A")]),
    # 0.6 + 0.6 + 0.4 + 0.4 = 2.0 fits the sum of 2 GPUs, and packs (0.6 + 0.4 on each)
    ([DepSpec("A", demand={"CPU": 1, "GPU": 0.6}, replicas=2), DepSpec("B", demand={"CPU": 1, "GPU": 0.4}, replicas=2)],
     2, [("gpu-fraction-waste", "A"), ("gpu-fraction-waste", "B")]),
    # 3 x 0.6 = 1.8 of 2 GPUs, but only one 0.6 fits per GPU
    ([DepSpec("A", demand={"CPU": 1, "GPU": 0.6}, replicas=3)], 2, [("gpu-fraction-waste", "A"), ("gpu-fractions-dont-pack", "")]),
])
def test_gpu_packing(specs: list[DepSpec], gpus: float, want: list[tuple[str, str]]) -> None:
    assert codes(doctor.check_gpu_packing(specs, gpus)) == want


def test_specs_from_app_read_code_options_and_batch_methods() -> None:
    @serve.deployment(num_replicas=3, max_ongoing_requests=32,
                      ray_actor_options={"num_cpus": 2, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "3"}}})
    class Model:
        def __init__(self, helper: Any) -> None:
            self.helper = helper

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
        async def predict(self, xs: list[int]) -> list[int]:
            return xs

    @serve.deployment(autoscaling_config={"min_replicas": 0, "max_replicas": 5, "target_ongoing_requests": 2})
    def helper(x: int) -> int:
        return x

    model, help_ = doctor.specs_from_app(Model.bind(helper.bind()))
    assert (model.name, model.replicas, model.num_cpus, model.omp_threads) == ("Model", 3, 2.0, 3)
    assert (model.max_batch_size, model.batch_wait_timeout_s, model.max_ongoing_requests) == (16, 0.05, 32)
    assert (help_.name, help_.min_replicas, help_.max_replicas, help_.target_ongoing_requests) == ("helper", 0, 5, 2.0)


def test_spec_from_a_running_deployments_config() -> None:
    cfg = {"name": "X", "num_replicas": 2, "max_ongoing_requests": 3, "ray_actor_options": {"num_cpus": 0.5},
           "max_batch_size": None, "not_an_option": 1}
    spec = doctor.spec_from_config("X", cfg)
    assert (spec.replicas, spec.num_cpus, spec.max_ongoing_requests) == (2, 0.5, 3)


def test_measure_constructor_in_a_child() -> None:
    @serve.deployment
    class Slow:
        def __init__(self) -> None:
            time.sleep(0.2)

    @serve.deployment
    class Stuck:
        def __init__(self) -> None:
            time.sleep(30)

    took = doctor.measure_constructor(Slow.bind(), timeout=5)
    assert took is not None and 0.15 < took < 3
    assert doctor.measure_constructor(Stuck.bind(), timeout=0.3) == 0.3


def test_deploy_warnings_once_per_version(caplog: pytest.LogCaptureFixture) -> None:
    @serve.deployment(num_replicas=20, name="Oversized")
    def f(x: int) -> int:
        return x

    app = f.bind()
    with caplog.at_level(logging.WARNING, logger="flotilla"):
        first = doctor.deploy_warnings(app, "wapp", MACHINE, {"Oversized": "v1"})
        again = doctor.deploy_warnings(app, "wapp", MACHINE, {"Oversized": "v1"})
        changed = doctor.deploy_warnings(app, "wapp", MACHINE, {"Oversized": "v2"})
    assert [f.code for f in first] == ["oversubscribed-cpu"] and again == [] and len(changed) == 1
    assert sum("oversubscribed-cpu" in r.getMessage() for r in caplog.records) == 2


def test_report_lists_each_finding_with_its_fix() -> None:
    text = doctor.report({"app": [Finding("x-code", "warning", "D", "broken.", "set y=1.")]})
    assert "WARNING x-code  (app/D)" in text and "fix: set y=1." in text and "1 warning(s)" in text
    assert "No problems found" in doctor.report({"app": []})


# ---- live findings ---------------------------------------------------------------------------
def ivs(cores: float, running: int, n: int = 5) -> list[Interval]:
    return [Interval(1.0, cores, running)] * n


@pytest.mark.parametrize(("reserved", "replicas", "found"), [
    (2, {"r1": ivs(1.0, 3)}, True),  # busy, one core of two
    (4, {"r1": ivs(1.1, 3), "r2": ivs(0.9, 2)}, True),
    (2, {"r1": ivs(1.9, 3)}, False),  # uses both cores
    (1, {"r1": ivs(1.0, 3)}, False),  # reserves one
    (2, {"r1": ivs(1.0, 0)}, False),  # idle
    (2, {"r1": ivs(0.1, 3)}, False),  # waits on I/O
    (2, {"r1": ivs(1.0, 3, n=2)}, False),  # too few samples
    (2, {"r1": ivs(1.0, 3), "r2": ivs(1.8, 3)}, False),  # one replica uses more than a core
])
def test_gil_bound(reserved: float, replicas: dict[str, list[Interval]], found: bool) -> None:
    f = gil_bound("D", reserved, replicas)
    assert (f is not None) == found
    if f is not None:
        assert f.code == "gil-bound" and "num_cpus=1" in f.fix


@pytest.mark.parametrize(("replicas", "found"), [
    ({"a": ivs(0.5, 4), "b": ivs(0.0, 0)}, True),
    ({"a": ivs(0.5, 4), "b": ivs(0.5, 4)}, False),
    ({"a": ivs(0.5, 2), "b": ivs(0.0, 0)}, False),
    ({"a": ivs(0.5, 4)}, False),
])
def test_unbalanced(replicas: dict[str, list[Interval]], found: bool) -> None:
    assert (unbalanced("D", 4, replicas) is not None) == found


@pytest.mark.parametrize(("e2e", "proc", "n", "found"), [
    (100.0, 20.0, 100, True),
    (30.0, 20.0, 100, False),
    (12.0, 4.0, 100, False),  # less than 10 ms outside
    (100.0, 20.0, 5, False),  # too few requests
    (None, 20.0, 100, False),
])
def test_latency_outside_code(e2e: float | None, proc: float | None, n: float, found: bool) -> None:
    assert (latency_outside_code("D", e2e, proc, n) is not None) == found


def test_batch_underfilled() -> None:
    assert batch_underfilled("D", 0.2) is not None
    assert batch_underfilled("D", 0.9) is None and batch_underfilled("D", None) is None


def _snap(proc_sum: float, proc_n: float, e2e_sum: float, e2e_n: float, fill: float | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "ray_serve_deployment_processing_latency_ms": ["histogram", "", ["deployment", "replica", "route", "application"], []],
        "ray_serve_http_request_latency_ms": ["histogram", "", ["route", "method", "application", "status_code"], []],
    }
    values: dict[str, Any] = {
        "ray_serve_deployment_processing_latency_ms": {("D", "r1", "/", "app"): [[], proc_sum, proc_n]},
        "ray_serve_http_request_latency_ms": {("/", "GET", "app", "200"): [[], e2e_sum, e2e_n]},
    }
    if fill is not None:
        meta["flotilla_batch_fill_ratio"] = ["gauge", "", ["deployment", "replica", "application"], None]
        values["flotilla_batch_fill_ratio"] = {("D", "r1", "app"): fill}
    return {"meta": meta, "values": values}


def test_watch_with_an_injected_clock() -> None:
    w = Watch(window=10.0)
    for t in range(6):  # one core of two, busy
        w.add("r1", float(t), cpu_s=1.0 * t, running=2)
    w.observe_metrics(0.0, [_snap(0, 0, 0, 0)])
    w.observe_metrics(5.0, [_snap(100 * 20.0, 100, 100 * 120.0, 100, fill=0.25)])
    assert w.cores("r1") == pytest.approx(1.0)
    got = {f.code for f in w.findings("app", "D", 2.0, 4, ["r1"], ingress=True)}
    assert got == {"gil-bound", "latency-outside-code", "batch-underfilled"}
    # the window slides: later samples at 2 cores clear the finding
    for t in range(6, 20):
        w.add("r1", float(t), cpu_s=5.0 + 2.0 * (t - 5), running=2)
    assert "gil-bound" not in {f.code for f in w.findings("app", "D", 2.0, 4, ["r1"], ingress=False)}
    w.keep([])
    assert w.cores("r1") is None


def test_watch_restarts_a_replaced_process_and_dropped_counters() -> None:
    w = Watch(window=10.0)
    w.add("r1", 0.0, 50.0, 1)
    w.add("r1", 1.0, 2.0, 1)  # CPU went backwards: a new process
    assert w.intervals("r1") == []
    w.observe_metrics(0.0, [_snap(1000, 100, 5000, 100)])
    w.observe_metrics(1.0, [_snap(10, 1, 50, 1)])
    assert w.mean_ms(("app", "D")) == (None, 0.0)


def test_the_doctor_command_on_a_config_file(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from flotilla.cli import main

    (tmp_path / "doc_app_mod.py").write_text(
        "from flotilla import serve\n"
        "@serve.deployment(ray_actor_options={'num_cpus': 1})\n"
        "class M:\n"
        "    def __call__(self, x):\n"
        "        return x\n"
        "app = M.bind()\n")
    (tmp_path / "cfg.yaml").write_text(
        "applications:\n- name: a\n  import_path: doc_app_mod:app\n"
        "  deployments:\n  - name: M\n    num_replicas: 6\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = CliRunner()
    out = runner.invoke(main, ["doctor", "cfg.yaml", "--num-cpus", "4"])
    assert out.exit_code == 0, out.output
    assert "oversubscribed-cpu  (a/M)" in out.output and "2 will stay PENDING" in out.output
    assert "num_replicas=4" in out.output
    assert runner.invoke(main, ["doctor", "cfg.yaml", "--num-cpus", "4", "--strict"]).exit_code == 1
    ok = runner.invoke(main, ["doctor", "doc_app_mod:app", "--num-cpus", "4", "--strict"])
    assert ok.exit_code == 0 and "No problems found" in ok.output, ok.output


def test_check_cluster_uses_targets_and_adds_live_findings() -> None:
    details = {
        "http_options": {"request_timeout_s": 5},
        "applications": {"app": {"deployments": {
            "D": {"target_num_replicas": 6, "deployment_config": {"name": "D", "num_replicas": 1,
                                                                  "ray_actor_options": {"num_cpus": 1}}},
        }}},
    }
    status = {"applications": {"app": {"deployments": {"D": {"findings": [
        {"code": "gil-bound", "severity": "warning", "message": "m.", "fix": "f."}]}}}}}
    found = doctor.check_cluster(details, {"CPU": 4.0}, status)
    assert codes(found["app"]) == [("oversubscribed-cpu", "D"), ("gil-bound", "D")]


def test_group_cpu_reads_this_process_groups_cpu_seconds() -> None:
    import os

    from flotilla._private.procfs import group_cpu, group_rss

    pgid = os.getpgrp()
    before = group_cpu([pgid])[pgid]
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    after = group_cpu([pgid])[pgid]
    assert after - before >= 0.1
    assert group_rss([pgid])[pgid] > 0 and group_cpu([]) == {}
