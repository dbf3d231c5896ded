"""`fork_after_init`: replicas forked from a template in which the constructor already ran.

A deployment whose constructor sleeps 2 s and fills a 300 MB array scales 1 -> 8 in well under
a second, its replicas share the array (their PSS adds up to about one copy), and each ran
`__post_fork__`. A template that is not fork-safe (a thread left running, GPUs asked for)
falls back with a warning (a `fork-fallback` finding), and its replicas construct their own
objects. With min_replicas=0 the template stays warm: the first request waits for a fork. On
the Ray backend the option falls back, saying so.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from flotilla import serve
from flotilla._private.procfs import process_memory
from tests.conftest import RAY_BACKEND, local_only, sampling_cluster, title, wait_for

pytestmark = pytest.mark.slow
ARRAY_MB = 300
MB = 1 << 20


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with sampling_cluster(num_cpus=4, num_gpus=1) as url:
        yield url


@serve.deployment(fork_after_init=True, ray_actor_options={"num_cpus": 0})
class Big:
    def __init__(self, marks: str, sleep_s: float = 2.0) -> None:
        time.sleep(sleep_s)
        self.arr = np.ones(ARRAY_MB * MB // 8)
        self.marks = marks
        self.built_in = os.getpid()
        Path(marks, f"built-{os.getpid()}").touch()

    def __post_fork__(self) -> None:
        Path(self.marks, f"post-{os.getpid()}").touch()

    def __call__(self, request: object = None) -> dict[str, float]:
        return {"pid": os.getpid(), "built_in": self.built_in, "sum": float(self.arr[:4].sum())}


def _dep(app: str, name: str) -> serve.schema.DeploymentStatusOverview:
    return serve.status().applications[app].deployments[name]


def _running(app: str, name: str) -> int:
    st = serve.status().applications.get(app)
    dep = st.deployments.get(name) if st is not None else None
    return dep.replica_states.get(serve.schema.ReplicaState.RUNNING, 0) if dep is not None else 0


def _pids(prefix: str) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and title(int(p)).startswith(prefix)]


def _fallback(app: str, name: str) -> str:
    for f in _dep(app, name).findings:
        if f["code"] == "fork-fallback":
            return f["message"]
    return ""


@local_only("templates fork on this machine; on Ray the option falls back (tested below)")
def test_scale_out_forks_in_milliseconds_and_shares_the_weights(url: str, tmp_path: Path) -> None:
    serve.run(Big.options(num_replicas=1).bind(str(tmp_path)), name="fork", route_prefix="/fork")
    assert httpx.get(f"{url}/fork").json()["sum"] == 4.0
    t0 = time.monotonic()
    serve.run(Big.options(num_replicas=8).bind(str(tmp_path)), name="fork", route_prefix="/fork", _blocking=False)
    wait_for(lambda: _running("fork", "Big") == 8, timeout=30, interval=0.005, what="8 replicas RUNNING")
    took = time.monotonic() - t0
    assert took < 1.0, f"1 -> 8 replicas took {took:.2f}s"

    replicas = _pids("flotilla::replica:fork:Big")
    templates = _pids("flotilla::template:fork:Big")
    assert len(replicas) == 8 and len(templates) == 1
    assert [p.name for p in tmp_path.glob("built-*")] == [f"built-{templates[0]}"]  # one constructor run
    assert {p.name for p in tmp_path.glob("post-*")} == {f"post-{pid}" for pid in replicas}
    answers = {httpx.get(f"{url}/fork").json()["built_in"] for _ in range(20)}
    assert answers == {templates[0]}
    mem = [process_memory(pid) for pid in replicas]
    pss = sum(m.pss for m in mem if m is not None)
    shared = min(m.shared for m in mem if m is not None)
    # Eight separate copies would be 2400 MB of PSS; shared copy-on-write, the replicas' shares
    # of the one array add up to 8/9 of it, plus each interpreter's own pages.
    assert pss < 1.6 * ARRAY_MB * MB, f"the 8 replicas' PSS is {pss / MB:.0f} MB"
    assert shared > 0.9 * ARRAY_MB * MB, f"a replica shares only {shared / MB:.0f} MB"

    def told() -> serve.schema.DeploymentStatusOverview | None:  # the same, as the status tells it
        st = _dep("fork", "Big")
        return st if len(st.replica_memory) == 8 and st.template_memory is not None else None

    st = wait_for(told, timeout=10, what="replica_memory and template_memory in the status")
    everyone = [st.template_memory, *st.replica_memory.values()]
    assert all(m.shared_bytes > 0.9 * ARRAY_MB * MB and m.uss_bytes < 0.1 * ARRAY_MB * MB for m in everyone), everyone
    total = sum(m.pss_bytes for m in everyone)  # the template and its replicas: about one copy
    assert ARRAY_MB * MB < total < 1.6 * ARRAY_MB * MB, f"{total / MB:.0f} MB"
    print(f"1 -> 8 in {took * 1000:.0f} ms; PSS of 8 replicas {pss / MB:.0f} MB, with the template {total / MB:.0f} MB; "
          f"USS per replica {max(m.uss_bytes for m in everyone[1:]) / MB:.1f} MB at most")

    serve.delete("fork")
    wait_for(lambda: not _pids("flotilla::template:fork:Big") and not _pids("flotilla::replica:fork:Big"),
             timeout=30, what="the template and replicas gone after delete")


@serve.deployment(fork_after_init=True, ray_actor_options={"num_cpus": 0})
class Threaded:
    def __init__(self) -> None:
        self.stop = threading.Event()
        threading.Thread(target=self.stop.wait, name="user-worker", daemon=True).start()
        self.built_in = os.getpid()

    def __call__(self, request: object = None) -> dict[str, int]:
        return {"pid": os.getpid(), "built_in": self.built_in}


def test_a_thread_left_running_falls_back_with_a_warning(url: str) -> None:
    serve.run(Threaded.options(num_replicas=2).bind(), name="threaded", route_prefix="/threaded")
    msg = wait_for(lambda: _fallback("threaded", "Threaded"), timeout=30, what="a fork-fallback finding")
    assert "fork_after_init is off" in msg
    if not RAY_BACKEND:
        assert "user-worker" in msg and "thread" in msg
        assert not _pids("flotilla::template:threaded")
    for _ in range(10):
        got = httpx.get(f"{url}/threaded").json()
        assert got["pid"] == got["built_in"]  # each replica ran the constructor itself


@serve.deployment(fork_after_init=True, ray_actor_options={"num_cpus": 0, "num_gpus": 1})
class OnGpu:
    def __call__(self, request: object = None) -> str:
        return os.environ.get("CUDA_VISIBLE_DEVICES", "")


@local_only("the cluster declares a GPU; on Ray, this machine has none to place the replica on")
def test_a_gpu_replica_falls_back_with_a_warning(url: str) -> None:
    serve.run(OnGpu.bind(), name="gpu", route_prefix="/gpu")
    assert "GPUs" in wait_for(lambda: _fallback("gpu", "OnGpu"), timeout=10, what="a fork-fallback finding")
    assert httpx.get(f"{url}/gpu").text == "0"


@local_only("templates fork on this machine")
def test_scale_from_zero_forks_from_the_warm_template(url: str, tmp_path: Path) -> None:
    sleep_s = 3.0
    app = Big.options(autoscaling_config={"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0,
                                          "downscale_delay_s": 600}).bind(str(tmp_path), sleep_s)
    serve.run(app, name="zero", route_prefix="/zero")
    assert _running("zero", "Big") == 0
    wait_for(lambda: list(tmp_path.glob("built-*")), timeout=30, what="the template's constructor")
    t0 = time.monotonic()
    got = httpx.get(f"{url}/zero", timeout=60).json()
    took = time.monotonic() - t0
    assert got["built_in"] != got["pid"] and got["sum"] == 4.0
    assert took < sleep_s / 2, f"the first request from zero took {took:.2f}s"


@serve.deployment(fork_after_init=True, ray_actor_options={"num_cpus": 0})
class Broken:
    def __init__(self) -> None:
        raise ValueError("no weights here")

    def __call__(self, request: object = None) -> str:
        return "never"


def test_a_failing_constructor_fails_the_deployment_as_without_the_option(url: str) -> None:
    with pytest.raises(RuntimeError, match="no weights here"):
        serve.run(Broken.bind(), name="broken", route_prefix="/broken")
    st = _dep("broken", "Broken")
    assert st.status == serve.schema.DeploymentStatus.DEPLOY_FAILED
    assert "no weights here" in st.message


@serve.deployment
class Doubler:
    def __call__(self, x: int) -> int:
        return 2 * x


@serve.deployment(fork_after_init=True, ray_actor_options={"num_cpus": 0})
class Composed:
    def __init__(self, doubler: serve.handle.DeploymentHandle) -> None:
        self.doubler = doubler
        self.built_in = os.getpid()

    async def __call__(self, request: object = None) -> dict[str, int]:
        return {"pid": os.getpid(), "built_in": self.built_in, "value": await self.doubler.remote(21)}


@local_only("templates fork on this machine")
def test_a_handle_given_to_the_constructor_works_in_forked_replicas(url: str) -> None:
    serve.run(Composed.options(num_replicas=2).bind(Doubler.bind()), name="composed", route_prefix="/composed")
    for _ in range(6):
        got = httpx.get(f"{url}/composed").json()
        assert got["value"] == 42 and got["built_in"] != got["pid"]
    assert not _fallback("composed", "Composed")


@local_only("templates are processes of this machine")
def test_a_killed_template_is_replaced_and_its_replicas_keep_serving(url: str, tmp_path: Path) -> None:
    serve.run(Big.options(num_replicas=2).bind(str(tmp_path), 0.0), name="kill", route_prefix="/kill")
    [old] = _pids("flotilla::template:kill:Big")
    os.kill(old, 9)
    wait_for(lambda: _pids("flotilla::template:kill:Big") not in ([], [old]), timeout=30,
             what="a new template")
    for _ in range(10):
        assert httpx.get(f"{url}/kill").json()["sum"] == 4.0
    serve.run(Big.options(num_replicas=4).bind(str(tmp_path), 0.0), name="kill", route_prefix="/kill")
    [new] = _pids("flotilla::template:kill:Big")
    built_in = {httpx.get(f"{url}/kill").json()["built_in"] for _ in range(40)}
    assert new in built_in and built_in <= {old, new}


@local_only("templates fork on this machine")
def test_a_version_replaced_while_its_template_builds_leaves_nothing_stuck(url: str, tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    v2 = tmp_path / "v2"
    v1.mkdir()
    v2.mkdir()
    serve.run(Big.options(num_replicas=1).bind(str(v1), 2.0), name="swap", route_prefix="/swap", _blocking=False)
    wait_for(lambda: _pids("flotilla::template:swap:Big"), timeout=10, what="v1's template")
    serve.run(Big.options(num_replicas=1).bind(str(v2), 0.0), name="swap", route_prefix="/swap")
    st = wait_for(lambda: (d := _dep("swap", "Big")).replica_states == {serve.schema.ReplicaState.RUNNING: 1} and d,
                  timeout=30, what="one RUNNING replica of v2 and nothing else")
    assert st.status == serve.schema.DeploymentStatus.HEALTHY
    got = httpx.get(f"{url}/swap").json()
    assert got["built_in"] != got["pid"] and Path(v2, f"built-{got['built_in']}").exists()
    wait_for(lambda: len(_pids("flotilla::template:swap:Big")) == 1, timeout=10, what="v1's template gone")
