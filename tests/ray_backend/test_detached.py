"""The controller as a detached Ray actor: applications outlive the driver that deployed them;
other drivers attach, and `serve.shutdown()` from any of them ends everything."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason='the Ray backend tests need Ray: pip install "flotilla[ray]"')

import httpx  # noqa: E402

import flotilla  # noqa: E402
from flotilla import serve  # noqa: E402
from flotilla._private.client import ClusterGoneError, Runtime  # noqa: E402
from flotilla._private.ray_controller import CONTROLLER_NAME  # noqa: E402
from tests.conftest import free_port  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]

DRIVER = """
import os, sys
import flotilla
from flotilla import serve

flotilla.init(backend="ray", address=sys.argv[1])

@serve.deployment(num_replicas=2)
class Hello:
    def __call__(self, request=None):
        return {"hello": "world", "pid": os.getpid()}

serve.start(http_options={"port": int(sys.argv[2])})
h = serve.run(Hello.bind(), name="hello", route_prefix="/hello")
print("PID", h.remote().result(timeout_s=60)["pid"], flush=True)
"""

ATTACH = """
import sys
import flotilla
from flotilla._private.client import Runtime

flotilla.init(backend="ray", address=sys.argv[1])
print("HEAD", Runtime.current().head_pid, flush=True)
"""


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    from ray.cluster_utils import Cluster

    if flotilla.is_initialized():
        flotilla.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    try:
        ray.init(address=c.address, namespace="flotilla-tests", log_to_driver=False)  # to list actors
        yield c.address
    finally:
        flotilla.shutdown()
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()


def _python(code: str, *args: str, tmp: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    script = tmp / f"driver-{time.monotonic_ns()}.py"
    script.write_text(textwrap.dedent(code))
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=str(tmp))


def _wait(what: str, cond: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    parents[int(name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out.update(kids)
        todo.extend(kids)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _flotilla_actors() -> list[dict[str, Any]]:
    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "flotilla" or a["name"] == CONTROLLER_NAME]


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=10).status_code
    except httpx.HTTPError:
        return 0


def test_apps_outlive_their_driver(address: str, tmp_path: Path) -> None:
    port = free_port()
    first = _python(DRIVER, address, str(port), tmp=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    replica_pid = int(first.stdout.split("PID")[1].split()[0])
    url = f"http://127.0.0.1:{port}/hello"
    # The driver has exited: the application still answers HTTP.
    assert _wait("the app answering after its driver exited", lambda: _get(url) == 200)
    assert httpx.get(url, timeout=10).json()["hello"] == "world"

    # A second driver (this process) attaches: same status, handles work.
    flotilla.init(backend="ray", address=address)
    st = serve.status()
    assert st.applications["hello"].status == "RUNNING", st
    h = serve.get_app_handle("hello")
    pids = {h.remote().result(timeout_s=30)["pid"] for _ in range(20)}
    assert replica_pid in pids and len(pids) == 2, pids
    head_pid = Runtime.current().head_pid
    workers = _descendants(head_pid)  # the zygote and the head node's HTTP proxy
    assert workers and all(_alive(p) for p in workers)

    # It can deploy and delete.
    @serve.deployment
    def other(request: object = None) -> str:
        return "other"

    assert serve.run(other.bind(), name="other", route_prefix="/other").remote().result(timeout_s=30) == "other"
    serve.delete("hello")
    assert set(serve.status().applications) == {"other"}
    assert _wait("/hello gone", lambda: _get(url) == 404)
    assert httpx.get(f"http://127.0.0.1:{port}/other", timeout=10).text == "other"

    # flotilla.shutdown() only disconnects this driver; a third one still sees "other".
    flotilla.shutdown()
    again = _python(ATTACH, address, tmp=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert int(again.stdout.split("HEAD")[1].split()[0]) == head_pid
    assert _get(f"http://127.0.0.1:{port}/other") == 200

    # serve.shutdown() from any driver ends the controller and every actor and process it had.
    flotilla.init(backend="ray", address=address)
    replica_pids = {p for p in pids if p != replica_pid} | {replica_pid}
    serve.shutdown()
    assert not flotilla.is_initialized()
    assert _wait("no flotilla actor left", lambda: not _flotilla_actors()), _flotilla_actors()
    gone = workers | replica_pids | {head_pid}
    assert _wait("no flotilla process left", lambda: not any(_alive(p) for p in gone)), [
        p for p in gone if _alive(p)]
    assert _get(f"http://127.0.0.1:{port}/other") == 0

    # The next serve.run starts a new controller on the same cluster.
    assert serve.run(other.bind(), name="other", route_prefix=None).remote().result(timeout_s=30) == "other"
    assert Runtime.current().head_pid != head_pid
    serve.shutdown()
    assert _wait("no flotilla actor left", lambda: not _flotilla_actors())


def test_two_drivers_at_once_share_one_controller(address: str, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}")
    script = tmp_path / "attach.py"
    script.write_text(textwrap.dedent(ATTACH))
    procs = [subprocess.Popen([sys.executable, str(script), address], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path)) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-3000:] for _, e in outs]
    heads = {int(o.split("HEAD")[1].split()[0]) for o, _ in outs}
    assert len(heads) == 1, outs
    flotilla.init(backend="ray", address=address)
    assert Runtime.current().head_pid in heads
    flotilla.shutdown()
    # Another namespace: another controller, alongside.
    flotilla.init(backend="ray", address=address, namespace="flotilla-other")
    assert Runtime.current().head_pid not in heads
    names = {(a["namespace"], a["name"]) for a in _flotilla_actors()}
    assert {("flotilla", CONTROLLER_NAME), ("flotilla-other", CONTROLLER_NAME)} <= names, names
    serve.shutdown()
    flotilla.init(backend="ray", address=address)
    serve.shutdown()
    assert _wait("no flotilla actor left", lambda: not _flotilla_actors())


def test_a_dead_controller_is_a_clear_error(address: str) -> None:
    flotilla.init(backend="ray", address=address)

    @serve.deployment
    def f() -> int:
        return 1

    serve.start(http_options={"port": free_port()})
    h = serve.run(f.bind(), name="f", route_prefix="/f")
    assert h.remote().result(timeout_s=30) == 1
    head_pid = Runtime.current().head_pid
    workers = _descendants(head_pid)  # the zygote and the HTTP proxy
    assert len(workers) >= 2
    ray.kill(ray.get_actor(CONTROLLER_NAME, namespace="flotilla"), no_restart=True)

    def gone() -> str:
        try:
            serve.status()
        except ClusterGoneError as e:
            return str(e)
        return ""

    msg = _wait("ClusterGoneError", gone)
    assert CONTROLLER_NAME in msg and "died or was stopped" in msg, msg
    assert not flotilla.is_initialized()
    with pytest.raises(ClusterGoneError, match=CONTROLLER_NAME):
        h.remote().result(timeout_s=30)
    flotilla.shutdown()
    assert _wait("no flotilla actor left", lambda: not _flotilla_actors())
    left = workers | {head_pid}
    assert _wait("no flotilla process left", lambda: not any(_alive(p) for p in left)), [p for p in left if _alive(p)]
