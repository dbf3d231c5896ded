"""Self-healing: the data plane outlives the control plane.

Under load from several client threads, `kill -9` each process of a running cluster and
check what clients see: the head (0 failed requests; a new head re-adopts the replicas and the
proxy; the same driver deploys again), the fork server (0 failed requests; new replicas start
afterwards; the log is not flooded), the proxy (only connections open at that instant are hit;
a new connection succeeds at once, from the backlog of the listening socket that outlives the
proxy). A cluster that is truly gone (keeper killed) fails every call at once; nothing is left
behind by `shutdown` or by a driver that exits. Processes are found by their titles.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import httpx
import pytest

import flotilla
from flotilla import serve
from flotilla._private.client import Runtime
from tests.conftest import descendants, free_port, local_only, running_cluster, title, wait_for
from tests.load import Load, combined, running

pytestmark = pytest.mark.slow
TITLES = local_only("Ray names its worker processes itself")
HEAD_RESTART = local_only("on Ray a head crash ends the session (no restart yet)")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- finding processes by title ---------------------------------------------------------------


def ticks(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def ours(root: int | None = None) -> dict[int, str]:
    """Every live flotilla process below `root` (default: this test process), by title."""
    out = {}
    for pid in descendants(root or os.getpid()):
        t = title(pid)
        if t.startswith("flotilla::") and ticks(pid) is not None:
            out[pid] = t
    return out


def find(name: str, root: int | None = None) -> list[int]:
    return sorted(pid for pid, t in ours(root).items() if t == name)


def one(name: str) -> int:
    pids = wait_for(lambda: find(name), timeout=10, what=f"a process titled {name}")
    assert len(pids) == 1, (name, ours())
    return pids[0]


def gone(procs: dict[int, str]) -> bool:
    return all(ticks(pid) is None for pid in procs)


def head_log() -> Path:
    return Path(Runtime.current().session_dir, "logs", "head.log")


def report(what: str, **figures: Any) -> None:
    line = f"SELF-HEALING {what}: " + ", ".join(f"{k}={v}" for k, v in figures.items())
    print(line)
    out = os.environ.get("FLOTILLA_CHAOS_REPORT")
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


# ---- the app ----------------------------------------------------------------------------------


@serve.deployment(num_replicas=2, graceful_shutdown_wait_loop_s=0.05, ray_actor_options={"num_cpus": 0.5})
class Echo:
    def __init__(self, version: int = 1) -> None:
        self.version = version

    async def __call__(self, *args: Any) -> str:
        await asyncio.sleep(0.002)
        return f"{self.version}:{os.getpid()}"


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
def other(*args: Any) -> str:
    return "other"


def tag(answer: Hashable) -> str:
    return str(answer).split(":")[0]


def pid_of(answer: Hashable) -> int:
    return int(str(answer).split(":")[1])


@pytest.fixture(scope="module")
def cluster() -> Any:
    with running_cluster(num_cpus=8, num_gpus=2) as url:
        yield url


# ---- tests ------------------------------------------------------------------------------------


@TITLES
def test_every_process_has_a_title(url: str) -> None:
    serve.run(Echo.bind(), name="titles", route_prefix="/titles")
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    mine = set(descendants(os.getpid()))
    seen = {}
    for line in ps.splitlines():
        pid_s, _, args = line.strip().partition(" ")
        if int(pid_s) in mine and args.startswith("flotilla::"):
            seen[args.strip()] = seen.get(args.strip(), 0) + 1
    for name in ("flotilla::keeper", "flotilla::head", "flotilla::zygote", "flotilla::proxy"):
        assert seen.get(name) == 1, seen
    assert seen.get("flotilla::replica:titles:Echo") == 2, seen


@HEAD_RESTART
def test_kill_head_under_load(url: str) -> None:
    h = serve.run(Echo.bind(1), name="heal", route_prefix="/heal")
    http = Load.http(url, "/heal", threads=4, max_s=90)
    hl = Load.handle(h, threads=2, max_s=90)
    with running(http, hl):
        http.wait_ok(50)
        hl.wait_ok(20)
        replicas = set(find("flotilla::replica:heal:Echo"))
        proxy = one("flotilla::proxy")
        head = one("flotilla::head")
        t0 = time.monotonic()
        os.kill(head, signal.SIGKILL)
        new_head = wait_for(lambda: [p for p in find("flotilla::head") if p != head], timeout=10,
                            what="a new head")[0]
        st = serve.status()  # waits (briefly) for the new head
        recovered = time.monotonic() - t0
        assert st.applications["heal"].status == "RUNNING", st
        assert recovered < 10, recovered
        # The same replicas and proxy serve on: re-adopted, not replaced.
        assert set(find("flotilla::replica:heal:Echo")) == replicas
        assert find("flotilla::proxy") == [proxy]
        assert Runtime.current().head_pid == new_head
        http.wait_ok(50)
        hl.wait_ok(20)
        # The driver deploys again: an update (a rollout that drains the adopted replicas)...
        serve.run(Echo.bind(2), name="heal", route_prefix="/heal")
        for ld in (http, hl):
            ld.wait_answers(lambda a: tag(a) == "2", n=20, timeout=20)
        # ... and a new app.
        serve.run(other.bind(), name="other", route_prefix="/other")
        assert httpx.get(f"{url}/other", timeout=10).text == "other"
        failed_during = http.failed + hl.failed
    report("kill -9 head", failed=failed_during, recovered_s=f"{recovered:.2f}", ok=http.ok + hl.ok)
    assert http.failed == 0 and hl.failed == 0 and http.stuck == 0 and hl.stuck == 0, combined(http, hl)


@TITLES
def test_kill_zygote_under_load(url: str) -> None:
    h = serve.run(Echo.bind(1), name="zyg", route_prefix="/zyg")
    log = head_log()
    http = Load.http(url, "/zyg", threads=4, max_s=90)
    hl = Load.handle(h, threads=2, max_s=90)
    with running(http, hl):
        http.wait_ok(50)
        before = set(find("flotilla::replica:zyg:Echo"))
        zygote = one("flotilla::zygote")
        size = log.stat().st_size
        t0 = time.monotonic()
        os.kill(zygote, signal.SIGKILL)
        wait_for(lambda: [p for p in find("flotilla::zygote") if p != zygote], timeout=10, what="a new zygote")
        restarted = time.monotonic() - t0
        http.wait_ok(50)
        hl.wait_ok(20)
        assert set(find("flotilla::replica:zyg:Echo")) == before  # nothing died with it
        # A scale-up afterwards forks new replicas from the new zygote.
        serve.run(Echo.options(num_replicas=3).bind(1), name="zyg", route_prefix="/zyg")
        wait_for(lambda: len({pid_of(a) for a in http.recent(60)}) == 3, timeout=20,
                 what=lambda: f"three replicas answering ({http.report()})")
        assert len(find("flotilla::replica:zyg:Echo")) == 3
        grown = log.stat().st_size - size
        zygote_lines = [ln for ln in log.read_text().splitlines()[-400:] if "fork server" in ln]
    report("kill -9 zygote", failed=http.failed + hl.failed, new_zygote_s=f"{restarted:.2f}", log_bytes=grown)
    assert http.failed == 0 and hl.failed == 0 and http.stuck == 0 and hl.stuck == 0, combined(http, hl)
    assert grown < 50_000, grown
    assert len(zygote_lines) == 1, zygote_lines  # one line per restart


def test_kill_proxy_under_load(url: str) -> None:
    serve.run(Echo.bind(1), name="px", route_prefix="/px")
    log = head_log()
    threads = 4
    http = Load.http(url, "/px", threads=threads, max_s=60)
    with running(http):
        http.wait_ok(50)
        proxy = one("flotilla::proxy")
        t0 = time.monotonic()
        os.kill(proxy, signal.SIGKILL)
        # A client that connects now waits in the backlog of the listening socket (held by the
        # head, not the proxy) and is served by the new proxy: no "connection refused".
        r = httpx.get(f"{url}/px", timeout=10, headers={"connection": "close"})
        first_ok = time.monotonic() - t0
        assert r.status_code == 200, r.text
        assert tag(r.text) == "1"
        wait_for(lambda: [p for p in find("flotilla::proxy") if p != proxy], timeout=10, what="a new proxy")
        http.wait_ok(50)
    report("kill -9 proxy", failed=http.failed, connections_open=threads, new_connection_ok_s=f"{first_ok:.3f}")
    # Only the connections open at that instant (one per thread) may have lost a request.
    assert http.failed <= threads and http.stuck == 0, http.report()
    assert first_ok < 3, first_ok
    text = log.read_text()
    assert "HTTP proxy restarted" in text
    assert "could not restart" not in text and " ERROR " not in text.split("HTTP proxy restarted")[-1]


@TITLES
def test_kill_replica_under_load(url: str) -> None:
    serve.run(Echo.bind(1), name="rep", route_prefix="/rep")
    http = Load.http(url, "/rep", threads=4, max_s=60)
    with running(http):
        http.wait_ok(50)
        victim = find("flotilla::replica:rep:Echo")[0]
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len([p for p in find("flotilla::replica:rep:Echo") if p != victim]) == 2, timeout=15,
                 what="a replacement replica")
        replaced = time.monotonic() - t0
        http.wait_ok(50)
    report("kill -9 replica", failed=http.failed, replaced_s=f"{replaced:.2f}")
    assert http.failed <= 4 and http.stuck == 0, http.report()  # at most its requests in flight


@serve.deployment(ray_actor_options={"num_gpus": 1, "num_cpus": 0.25})
class OnGpu:
    def __call__(self, *args: Any) -> str:
        return os.environ.get("CUDA_VISIBLE_DEVICES", "")


@HEAD_RESTART
def test_gpu_ids_survive_a_head_restart(url: str) -> None:
    h = serve.run(OnGpu.bind(), name="gpu", route_prefix=None)
    first = h.remote().result(timeout_s=10)
    assert first in ("0", "1")
    head = one("flotilla::head")
    os.kill(head, signal.SIGKILL)
    wait_for(lambda: [p for p in find("flotilla::head") if p != head], timeout=10, what="a new head")
    # The restarted head re-took the GPU the replica holds: a second replica gets the other one.
    h = serve.run(OnGpu.options(num_replicas=2).bind(), name="gpu", route_prefix=None)
    seen = wait_for(lambda: {h.remote().result(timeout_s=10) for _ in range(20)} == {"0", "1"} and True,
                    timeout=20, what="both GPUs in use")
    assert seen
    assert serve.status().applications["gpu"].deployments["OnGpu"].replica_states == {"RUNNING": 2}


@HEAD_RESTART
def test_status_waits_briefly_for_a_head_that_is_away(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    h = serve.run(Echo.bind(1), name="away", route_prefix=None)
    assert tag(h.remote().result(timeout_s=10)) == "1"
    monkeypatch.setenv("FLOTILLA_HEAD_WAIT_S", "1")
    keeper = one("flotilla::keeper")
    head = one("flotilla::head")
    os.kill(keeper, signal.SIGSTOP)  # nobody restarts the head meanwhile
    try:
        os.kill(head, signal.SIGKILL)
        wait_for(lambda: ticks(head) is None, timeout=10, what="the head gone")
        # Handles keep routing with the replica set they know.
        assert tag(h.remote().result(timeout_s=10)) == "1"
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="head") as e:
            serve.status()
        took = time.monotonic() - t0
        assert 0.5 < took < 5, took
        assert "restart" in str(e.value), e.value
        assert flotilla.is_initialized()
    finally:
        os.kill(keeper, signal.SIGCONT)
    monkeypatch.delenv("FLOTILLA_HEAD_WAIT_S")  # the default wait covers the restart
    assert serve.status().applications["away"].status == "RUNNING"


def test_a_cluster_that_is_gone_fails_at_once() -> None:
    with running_cluster(num_cpus=2):
        h = serve.run(Echo.bind(1), name="gone", route_prefix=None)
        assert tag(h.remote().result(timeout_s=10)) == "1"
        procs = ours()
        keeper = one("flotilla::keeper")
        os.kill(keeper, signal.SIGKILL)
        wait_for(lambda: not flotilla.is_initialized(), timeout=5, what="is_initialized() false")
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="gone"):
            h.remote().result(timeout_s=30)
        with pytest.raises(RuntimeError, match="gone"):
            serve.status()
        assert time.monotonic() - t0 < 2
        wait_for(lambda: gone(procs), timeout=15, what=f"every process gone: {procs}")
        flotilla.init(num_cpus=2)  # a new cluster can start
        assert flotilla.is_initialized()


DRIVER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    from flotilla import serve

    @serve.deployment(num_replicas=2, ray_actor_options={{"num_cpus": 0.5}})
    def f(*args):
        return os.getpid()

    serve.start(http_options={{"port": {port}}})
    serve.run(f.bind())
    print("ready", flush=True)
    sys.stdin.readline()
    """
)


@TITLES
def test_nothing_is_left_after_shutdown_or_driver_exit(tmp_path: Path) -> None:
    with running_cluster(num_cpus=2):
        serve.run(Echo.bind(1), name="left", route_prefix="/left")
        procs = ours()
        assert {t for t in procs.values()} >= {"flotilla::keeper", "flotilla::head", "flotilla::zygote",
                                               "flotilla::proxy", "flotilla::replica:left:Echo"}, procs
        serve.shutdown()  # Serve goes (proxy, replicas); the cluster stays
        wait_for(lambda: sorted(ours().values()) == ["flotilla::head", "flotilla::keeper", "flotilla::zygote"],
                 timeout=15, what=f"only the cluster's own processes left: {ours()}")
    assert not flotilla.is_initialized()
    wait_for(lambda: gone(procs), timeout=15, what=f"every process gone after shutdown: {procs}")

    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(root=ROOT, port=free_port()))
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        procs = ours(proc.pid)
        assert len([t for t in procs.values() if t.startswith("flotilla::replica:")]) == 2, procs
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0
        wait_for(lambda: gone(procs), timeout=15, what=f"every process gone after the driver exited: {procs}")
    finally:
        if proc.poll() is None:
            proc.kill()
