"""The control plane with real processes: a failed rollout leaves the old version serving,
reconfigure keeps replicas routable (serialised, latest config wins, bounded in time),
replicas' subprocesses die with them, GPUs map through the parent's CUDA_VISIBLE_DEVICES,
and SIGTERM to the head drains everything and leaves no process and no session folder."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import httpx
import pytest

import flotilla
from flotilla import serve
from flotilla._private import session
from flotilla._private.client import Runtime
from flotilla.serve.schema import ReplicaState
from tests.conftest import RAY_BACKEND, alive, descendants, free_port, running_cluster, wait_for
from tests.load import Load, combined, running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

APP = "ro"
PREFIX = "/ro"


def replica_states(dep: str) -> dict[str, int]:
    app = serve.status().applications.get(APP)
    if app is None or dep not in app.deployments:
        return {}
    return {ReplicaState(s).value: n for s, n in app.deployments[dep].replica_states.items()}


def tag(answer: Hashable) -> str:
    return str(answer).split(":")[0]


def pid(answer: Hashable) -> int:
    return int(str(answer).split(":")[1])


def head_pid() -> int:
    return Runtime.current().head_pid


# ---- failed rollout ---------------------------------------------------------------------------


@serve.deployment(num_replicas=2, graceful_shutdown_wait_loop_s=0.05, ray_actor_options={"num_cpus": 0.5})
class Model:
    def __init__(self, version: int, broken: bool = False) -> None:
        if broken:
            raise RuntimeError(f"weights for v{version} are missing")
        self.version = version

    async def __call__(self, *args: Any) -> str:
        await asyncio.sleep(0.002)
        return f"{self.version}:{os.getpid()}"


def test_failed_rollout_keeps_v1_serving_then_v3_rolls_out(url: str) -> None:
    h = serve.run(Model.bind(1), name=APP, route_prefix=PREFIX)
    http = Load.http(url, PREFIX, threads=4, max_s=45)
    hl = Load.handle(h, threads=2, max_s=45)
    with running(http, hl):
        wait_for(lambda: len({pid(a) for a in http.values}) == 2, timeout=15, what=lambda: f"both v1 replicas answering ({http.report()})")
        v1 = {pid(a) for a in http.values}
        with pytest.raises(RuntimeError, match="weights for v2 are missing"):
            serve.run(Model.bind(2, broken=True), name=APP, route_prefix=PREFIX)
        app = serve.status().applications[APP]
        assert app.status == "DEPLOY_FAILED"
        dep = app.deployments["Model"]
        assert dep.status == "DEPLOY_FAILED"
        assert "Traceback" in dep.message and "RuntimeError: weights for v2 are missing" in dep.message, dep.message
        # The old replicas are untouched: the same two processes keep answering, as v1.
        http.wait_ok(40)
        hl.wait_ok(10)
        assert {pid(a) for a in http.recent(40)} == v1 and {tag(a) for a in http.values} == {"1"}
        # The failed version's replicas are gone (on Ray, once `ray.kill` has been seen through).
        wait_for(lambda: replica_states("Model") == {"RUNNING": 2}, timeout=10, what="failed replicas gone")
        if not RAY_BACKEND:  # no process of it is left: zygote, proxy and the two v1 replicas
            assert len(alive(descendants(head_pid()))) == 4
        # A good version after the failed one rolls out normally.
        serve.run(Model.bind(3), name=APP, route_prefix=PREFIX)
        assert serve.status().applications[APP].status == "RUNNING"
        for ld in (http, hl):
            ld.wait_answers(lambda a: tag(a) == "3", n=20, timeout=15)
        wait_for(lambda: replica_states("Model") == {"RUNNING": 2}, timeout=15, what="v1 drained")
    assert http.failed == 0 and hl.failed == 0 and http.stuck == 0 and hl.stuck == 0, combined(http, hl)
    assert {tag(a) for a in http.values} == {"1", "3"}, http.report()


@serve.deployment(num_replicas=2, user_config={"ok": True, "tag": "a"}, ray_actor_options={"num_cpus": 0.5})
class Picky:
    def reconfigure(self, cfg: dict[str, Any]) -> None:
        if not cfg["ok"]:
            raise ValueError(f"config {cfg['tag']} is bad")
        self.tag = cfg["tag"]

    async def __call__(self, *args: Any) -> str:
        return f"{self.tag}:{os.getpid()}"


def test_a_user_config_that_reconfigure_refuses_fails_the_update_and_keeps_replicas_serving(url: str) -> None:
    h = serve.run(Picky.bind(), name=APP, route_prefix=PREFIX)
    hl = Load.handle(h, threads=2, max_s=45)
    with running(hl):
        hl.wait_answers(lambda a: tag(a) == "a", n=10, timeout=15)
        pids = {pid(a) for a in hl.values}
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="config b is bad"):
            serve.run(Picky.options(user_config={"ok": False, "tag": "b"}).bind(), name=APP, route_prefix=PREFIX)
        assert time.monotonic() - t0 < 20
        app = serve.status().applications[APP]
        assert app.status == "DEPLOY_FAILED" and app.deployments["Picky"].status == "DEPLOY_FAILED"
        assert "config b is bad" in app.deployments["Picky"].message
        hl.wait_ok(10)
        assert {pid(a) for a in hl.recent(20)} <= pids and {tag(a) for a in hl.values} == {"a"}
        assert replica_states("Picky") == {"RUNNING": 2}
        serve.run(Picky.options(user_config={"ok": True, "tag": "c"}).bind(), name=APP, route_prefix=PREFIX)
        assert serve.status().applications[APP].status == "RUNNING"
        hl.wait_answers(lambda a: tag(a) == "c", n=10, timeout=15)
    assert hl.failed == 0 and hl.stuck == 0, hl.report()


# ---- reconfigure ------------------------------------------------------------------------------


@serve.deployment(num_replicas=2, user_config={"tag": "a", "delay": 0}, ray_actor_options={"num_cpus": 0.5})
class Tunable:
    def __init__(self) -> None:
        self.tag = ""
        self.active = 0
        self.most_active = 0
        self.applied: list[str] = []

    async def reconfigure(self, cfg: dict[str, Any]) -> None:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            await asyncio.sleep(cfg["delay"])
            self.tag = cfg["tag"]
            self.applied.append(cfg["tag"])
        finally:
            self.active -= 1

    async def __call__(self, *args: Any) -> str:
        return f"{self.tag}:{os.getpid()}"

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "applied": self.applied, "most_active": self.most_active}


def test_reconfigure_under_load_keeps_replicas_routable(url: str) -> None:
    h = serve.run(Tunable.bind(), name=APP, route_prefix=PREFIX)
    http = Load.http(url, PREFIX, threads=4, max_s=45)
    hl = Load.handle(h, threads=2, max_s=45)
    with running(http, hl):
        wait_for(lambda: len({pid(a) for a in http.values}) == 2, timeout=15, what=lambda: f"both replicas answering ({http.report()})")
        pids = {pid(a) for a in http.values}
        # A slow reconfigure: both replicas are UPDATING, and both keep answering meanwhile.
        serve.run(Tunable.options(user_config={"tag": "b", "delay": 1.5}).bind(), name=APP, route_prefix=PREFIX, _blocking=False)
        wait_for(lambda: replica_states("Tunable") == {"UPDATING": 2}, timeout=10, what="both replicas UPDATING")
        mark = http.ok
        wait_for(lambda: http.ok >= mark + 40 and {pid(a) for a in http.recent(40)} == pids, timeout=10,
                 what=lambda: f"both UPDATING replicas answering ({http.report()})")
        assert replica_states("Tunable") == {"UPDATING": 2}, "the reconfigure ended before the check"
        wait_for(lambda: replica_states("Tunable") == {"RUNNING": 2}, timeout=15, what="back to RUNNING")
        for ld in (http, hl):
            ld.wait_answers(lambda a: tag(a) == "b", n=20, timeout=10)
        # Three configs in a row: one call at a time per replica, and the latest wins (d is
        # superseded while c runs, so it is never applied).
        for t, delay in (("c", 0.5), ("d", 0.5), ("e", 0.0)):
            serve.run(Tunable.options(user_config={"tag": t, "delay": delay}).bind(), name=APP, route_prefix=PREFIX, _blocking=False)
        for ld in (http, hl):
            ld.wait_answers(lambda a: tag(a) == "e", n=20, timeout=15)
        wait_for(lambda: replica_states("Tunable") == {"RUNNING": 2}, timeout=15, what="back to RUNNING")
    assert http.failed == 0 and hl.failed == 0 and http.stuck == 0 and hl.stuck == 0, combined(http, hl)
    assert {pid(a) for a in http.values} == pids  # reconfigured in place, never restarted
    infos: dict[int, dict[str, Any]] = {}
    info = h.options(method_name="info")
    wait_for(lambda: (infos.update({(i := info.remote().result())["pid"]: i}) or len(infos) == 2), timeout=10)
    for i in infos.values():
        assert i["most_active"] == 1, i
        assert i["applied"][:2] == ["a", "b"] and i["applied"][-1] == "e" and "d" not in i["applied"], i


# ---- process groups ---------------------------------------------------------------------------


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, health_check_period_s=0.5)
class WithHelper:
    def __init__(self) -> None:
        self.helper = subprocess.Popen(["sleep", "60"])

    def __call__(self, *args: Any) -> tuple[int, int]:
        return os.getpid(), self.helper.pid


def test_user_subprocesses_die_with_their_replica(url: str) -> None:
    h = serve.run(WithHelper.bind(), name=APP, route_prefix=None)
    replica, helper = h.remote().result()
    os.kill(replica, signal.SIGKILL)  # a crash: the helper goes too
    wait_for(lambda: not alive({replica, helper}), timeout=10, what="replica and its helper gone after kill -9")
    replica2, helper2 = wait_for(lambda: (lambda a: a if a[0] != replica else None)(h.remote().result()), timeout=15)
    serve.delete(APP)  # a graceful stop: the helper goes too
    wait_for(lambda: not alive({replica2, helper2}), timeout=10, what="replica and its helper gone after delete")


# ---- own clusters -----------------------------------------------------------------------------


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.5, "num_gpus": 1})
def which_gpu() -> tuple[str, int]:
    return os.environ["CUDA_VISIBLE_DEVICES"], os.getpid()


def test_gpu_ids_map_through_the_parents_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with running_cluster(num_cpus=2, num_gpus=2):
        h = serve.run(which_gpu.bind(), name=APP, route_prefix=None)
        seen: dict[int, str] = {}
        wait_for(lambda: (seen.update({(a := h.remote().result())[1]: a[0]}) or len(seen) == 2), timeout=15)
        assert sorted(seen.values()) == ["2", "3"], seen


@serve.deployment(num_replicas=1, user_config={"hang": False}, ray_actor_options={"num_cpus": 0.5})
class Hangs:
    def __init__(self) -> None:
        self.calls = 0

    def reconfigure(self, cfg: dict[str, Any]) -> None:
        self.calls += 1
        if cfg["hang"] and self.calls > 1:  # only an in-place update hangs, not the start
            time.sleep(60)

    def __call__(self, *args: Any) -> int:
        return os.getpid()


def test_a_reconfigure_that_hangs_is_bounded_and_the_replica_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOTILLA_RECONFIGURE_TIMEOUT_S", "1")
    with running_cluster(num_cpus=2):
        h = serve.run(Hangs.bind(), name=APP, route_prefix=None)
        first = h.remote().result()
        t0 = time.monotonic()
        serve.run(Hangs.options(user_config={"hang": True}).bind(), name=APP, route_prefix=None)
        assert time.monotonic() - t0 < 15
        second = h.remote().result()
        assert second != first
        wait_for(lambda: not alive({first}), timeout=10, what="the hung replica killed")
        log = Path(Runtime.current().session_dir, "logs", "head.log").read_text()
        assert "did not finish within 1s; replacing it" in log


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, graceful_shutdown_timeout_s=10)
class Slow:
    def __init__(self, marks: str) -> None:
        self.marks = Path(marks)

    async def __call__(self, *args: Any) -> str:
        (self.marks / f"started-{time.time_ns()}").touch()
        await asyncio.sleep(1.0)
        return "done"

    def __del__(self) -> None:
        (self.marks / "deleted").touch()


def test_sigterm_to_the_head_drains_and_leaves_nothing(tmp_path: Path) -> None:
    if flotilla.is_initialized():
        flotilla.shutdown()
    flotilla.init(num_cpus=2)
    try:
        port = free_port()
        serve.start(http_options={"port": port})
        h = serve.run(Slow.bind(str(tmp_path)), name=APP, route_prefix="/")
        rt = Runtime.current()
        head = head_pid()
        tree = descendants(head) | {head}
        assert len(tree) >= 4  # head, zygote, proxy, replica
        folder = rt.session_dir
        resp = h.remote()
        http: dict[str, Any] = {}

        def post() -> None:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/", timeout=15)
                http["answer"] = (r.status_code, r.text)
            except Exception as e:
                http["answer"] = repr(e)

        client = threading.Thread(target=post)
        client.start()
        wait_for(lambda: len(list(tmp_path.glob("started-*"))) == 2, timeout=10, what="both requests running")
        os.kill(head, signal.SIGTERM)
        assert resp.result(timeout_s=15) == "done"  # in flight: drained, not dropped
        client.join(15)
        assert http.get("answer") == (200, "done"), "an HTTP request in flight is answered, not cut"
        wait_for(lambda: not alive(tree), timeout=20, what="every process gone after SIGTERM")
        assert (tmp_path / "deleted").exists()  # __del__ ran: a graceful stop
        assert rt.process is not None and rt.process.wait(10) == 0
        assert not os.path.exists(folder)
        kept = Path(session.logs_root(), os.path.basename(folder))
        assert (kept / "head.log").exists() and "SIGTERM" in (kept / "head.log").read_text()
    finally:
        flotilla.shutdown()
