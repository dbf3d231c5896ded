"""The Ray backend on a private local Ray instance: `flotilla.init(backend="ray", num_cpus=4)`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

ray = pytest.importorskip("ray", reason='the Ray backend tests need Ray: pip install "flotilla[ray]"')

import httpx  # noqa: E402

import flotilla  # noqa: E402
from flotilla import serve  # noqa: E402
from tests.conftest import free_port, wait_for  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    if flotilla.is_initialized():
        flotilla.shutdown()
    flotilla.init(backend="ray", num_cpus=4)
    try:
        port = free_port()
        serve.start(http_options={"port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        flotilla.shutdown()


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 1})
class Who:
    def __call__(self, request: object = None) -> dict[str, object]:
        import ray

        ctx = ray.get_runtime_context()
        return {"actor": ctx.get_actor_id(), "node": ctx.get_node_id(), "pid": os.getpid(),
                "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}


def test_replicas_are_actors_handles_and_http(url: str) -> None:
    assert flotilla.cluster_resources()["CPU"] == 4
    h = serve.run(Who.bind(), name="who", route_prefix="/who")
    seen = [h.remote().result(timeout_s=30) for _ in range(40)]
    assert all(s["actor"] for s in seen), seen[:2]
    assert len({s["actor"] for s in seen}) == 2
    assert len({s["pid"] for s in seen}) == 2
    assert os.getpid() not in {s["pid"] for s in seen}
    with httpx.Client(timeout=30) as c:
        got = [c.get(f"{url}/who") for _ in range(20)]
    assert all(r.status_code == 200 for r in got), got[0].text
    assert {r.json()["actor"] for r in got} <= {s["actor"] for s in seen}
    st = serve.status().applications["who"]
    assert st.status == "RUNNING"
    assert st.deployments["Who"].replica_states == {"RUNNING": 2}
    # Ray holds the replicas' CPUs: flotilla reads Ray's view, it does not keep its own.
    wait_for(lambda: flotilla.available_resources().get("CPU", 0) <= 2, timeout=10, what="Ray's free CPUs")
    serve.delete("who")
    wait_for(lambda: flotilla.available_resources().get("CPU", 0) >= 4, timeout=20, what="CPUs freed")


def test_unschedulable_replica_is_starting_with_the_missing_resource(url: str) -> None:
    @serve.deployment(ray_actor_options={"num_cpus": 0, "resources": {"zone_c": 1}})
    def pinned() -> str:
        return "never"

    serve.run(pinned.bind(), name="pending", route_prefix=None, _blocking=False)

    def message() -> str:
        dep = serve.status().applications["pending"].deployments["pinned"]
        if not dep.replica_states:
            return ""  # not created yet
        assert dep.replica_states == {"STARTING": 1}, dep
        return dep.message if "zone_c" in dep.message else ""

    msg = wait_for(message, timeout=20, interval=0.2, what="a status naming zone_c")
    assert "cannot be scheduled yet" in msg
    assert serve.status().applications["pending"].status == "DEPLOYING"
    serve.delete("pending")
    assert "pending" not in serve.status().applications


def test_the_local_backend_never_imports_ray(tmp_path: object) -> None:
    """`flotilla.init()` + `serve.run` with Ray installed: no flotilla process imports it."""
    script = textwrap.dedent(
        """
        import json, os, sys
        import flotilla
        from flotilla import serve

        @serve.deployment
        def f() -> bool:
            return "ray" in sys.modules

        flotilla.init(num_cpus=2)
        h = serve.run(f.bind(), route_prefix=None)
        in_replica = h.remote().result(timeout_s=30)

        def loaded(pid):
            try:
                with open(f"/proc/{pid}/maps") as fh:
                    return "_raylet" in fh.read()
            except OSError:
                return False

        def tree(root):
            kids = {}
            for name in os.listdir("/proc"):
                if name.isdigit():
                    try:
                        with open(f"/proc/{name}/stat") as fh:
                            kids.setdefault(int(fh.read().rsplit(")", 1)[1].split()[1]), []).append(int(name))
                    except OSError:
                        pass
            out, todo = [], [root]
            while todo:
                p = todo.pop()
                out.append(p)
                todo.extend(kids.get(p, []))
            return out

        procs = tree(os.getpid())
        print(json.dumps({"driver": "ray" in sys.modules, "replica": in_replica, "procs": len(procs),
                          "with_raylet": [p for p in procs if loaded(p)]}))
        flotilla.shutdown()
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("FLOTILLA_BACKEND", "RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["procs"] >= 4, got  # driver, keeper, head, zygote, replica, ...
    assert got == {**got, "driver": False, "replica": False, "with_raylet": []}, got


def test_backend_selection_errors() -> None:
    with pytest.raises(ValueError, match="unknown flotilla backend"):
        flotilla.init(backend="kubernetes")
    with pytest.raises(ValueError, match="joining an existing Ray cluster"):
        flotilla.init(backend="ray", address="127.0.0.1:1", num_cpus=2)


@serve.deployment(ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": {"GREETING": "hej"}}},
                  graceful_shutdown_wait_loop_s=0.05)
class Fragile:
    def __init__(self, version: int = 1) -> None:
        self.version = version

    def __call__(self, request: object = None) -> tuple[int, str | None, int]:
        return os.getpid(), os.environ.get("GREETING"), self.version

    def crash(self) -> None:
        os._exit(1)


def test_a_dead_actor_fails_its_request_and_is_replaced(url: str) -> None:
    from flotilla.exceptions import RayActorError

    h = serve.run(Fragile.bind(), name="fragile", route_prefix=None)
    pid, greeting, _ = h.remote().result(timeout_s=30)
    assert greeting == "hej"  # the runtime_env went to Ray as it was
    with pytest.raises(RayActorError):
        h.crash.remote().result(timeout_s=30)

    def replaced() -> bool:
        try:
            return h.remote().result(timeout_s=10)[0] != pid
        except RayActorError:
            return False

    wait_for(replaced, timeout=30, interval=0.2, what="a new actor")
    wait_for(lambda: serve.status().applications["fragile"].deployments["Fragile"].replica_states == {"RUNNING": 1},
             timeout=30, what="RUNNING again")
    # A new version rolls out: new actors first, the old one drains, then is killed.
    h = serve.run(Fragile.bind(2), name="fragile", route_prefix=None)
    assert h.remote().result(timeout_s=30)[2] == 2
    serve.delete("fragile")


def test_constructor_failure_is_deploy_failed(url: str) -> None:
    @serve.deployment(ray_actor_options={"num_cpus": 0.5})
    class Broken:
        def __init__(self) -> None:
            raise ZeroDivisionError("ctor exploded")

    with pytest.raises(RuntimeError, match="ctor exploded"):
        serve.run(Broken.bind(), name="broken", route_prefix=None)
    app = serve.status().applications["broken"]
    assert app.status == "DEPLOY_FAILED"
    assert "ZeroDivisionError" in app.deployments["Broken"].message
    assert "logs/flotilla/" in app.deployments["Broken"].message  # where its log is
    serve.delete("broken")


def test_a_rollout_on_a_full_cluster_makes_room_and_fails_no_request(url: str) -> None:
    """4 CPUs, 2 replicas of 2 CPUs: the new version's actors cannot be placed until an old
    replica drains, so the controller stops one old replica at a time (as locally)."""
    import threading

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 2}, graceful_shutdown_wait_loop_s=0.05)
    class Full:
        def __init__(self, version: int) -> None:
            self.version = version

        def __call__(self, request: object = None) -> int:
            return self.version

    h = serve.run(Full.bind(1), name="full", route_prefix=None)
    assert h.remote().result(timeout_s=30) == 1
    errors: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                h.remote().result(timeout_s=30)
            except BaseException as e:
                errors.append(e)

    t = threading.Thread(target=load)
    t.start()
    try:
        serve.run(Full.bind(2), name="full", route_prefix=None, _blocking=False)
        wait_for(lambda: serve.status().applications["full"].deployments["Full"].replica_states == {"RUNNING": 2}
                 and h.remote().result(timeout_s=30) == 2, timeout=60, interval=0.2, what="v2 rolled out")
        wait_for(lambda: all(h.remote().result(timeout_s=30) == 2 for _ in range(10)), timeout=20, what="only v2")
    finally:
        stop.set()
        t.join(30)
    assert errors == []
    serve.delete("full")
