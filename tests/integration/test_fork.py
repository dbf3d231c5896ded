"""A process forked from a driver (os.fork, multiprocessing's 'fork', a pre-forking web
server): its handle calls join the parent's cluster instead of hanging on the parent's
threads, which the child does not have, and it does not keep the parent's cluster alive."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from flotilla import serve
from tests.conftest import RAY_BACKEND, alive, wait_for

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DRIVER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {root!r})
    from flotilla import serve
    from flotilla._private.client import Runtime

    @serve.deployment
    def double(x):
        return 2 * x

    h = serve.run(double.bind(), name="forked", route_prefix=None)
    assert h.remote(1).result(timeout_s=30) == 2
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: calls, says what it got, and outlives its parent
        os.close(r)
        try:
            said = str(h.remote(21).result(timeout_s=30))
        except Exception as e:
            said = f"{{type(e).__name__}}: {{e}}"
        os.write(w, (said.replace(chr(10), " ") + chr(10)).encode())
        end = time.monotonic() + 60
        while time.monotonic() < end:  # calls until the cluster ends with the parent
            try:
                h.remote(1).result(timeout_s=10)
            except Exception as e:
                with open({after!r}, "w") as f:
                    f.write(type(e).__name__)
                break
            time.sleep(0.05)
        time.sleep(120)
        os._exit(0)
    os.close(w)
    print(pid, flush=True)
    print(Runtime.current().process.pid, flush=True)
    print(os.read(r, 4096).decode().strip(), flush=True)
    assert h.remote(5).result(timeout_s=30) == 10  # the parent's own connections still work
    print("parent done", flush=True)
    """
)


def test_a_forked_child_calls_through_the_parents_cluster_and_does_not_keep_it_alive(tmp_path) -> None:
    script = tmp_path / "driver.py"
    after = tmp_path / "after.txt"
    script.write_text(DRIVER.format(root=ROOT, after=str(after)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        keeper = int(proc.stdout.readline())
        said = proc.stdout.readline().strip()
        if RAY_BACKEND:  # Ray cannot be used across a fork: a clear error at once, no hang
            assert "forked from a flotilla driver on the Ray backend" in said and "spawn" in said, said
        else:
            assert said == "42", said
        assert proc.stdout.readline().strip() == "parent done"
        assert proc.wait(30) == 0
        # the parent is gone; its child lives on, holding no pipe or connection of the cluster's
        assert alive({child})
        wait_for(lambda: not alive({keeper}), timeout=20, what="the parent's cluster to end while its child lives")
        if not RAY_BACKEND:  # the child's calls fail at once now, as a driver's whose cluster is gone
            wait_for(after.exists, timeout=20, what="the child's call after the cluster ended")
            wait_for(lambda: after.read_text() != "", timeout=5, what="its error written")
            # whichever the child hears of first: the cluster gone, or its replicas
            assert after.read_text() in ("ClusterGoneError", "DeploymentUnavailableError", "ActorDiedError")
    finally:
        if proc.poll() is None:
            proc.kill()
        if child:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


@serve.deployment
def triple(x: int) -> int:
    return 3 * x


def _worker(x: int) -> int:
    return serve.get_app_handle("pool").remote(x).result(timeout_s=30)


@pytest.mark.skipif(RAY_BACKEND, reason="Ray cannot be used across a fork (the error is tested above)")
def test_a_fork_pool_calls_a_deployment(url: str) -> None:
    h = serve.run(triple.bind(), name="pool", route_prefix=None)
    assert h.remote(1).result(timeout_s=30) == 3
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(_worker, range(8), chunksize=1) == [3 * x for x in range(8)]
    # the children dropped their copies of this driver's connections, not the connections
    assert [h.remote(x).result(timeout_s=30) for x in range(20)] == [3 * x for x in range(20)]


@serve.deployment
class Leaf:
    def __call__(self) -> str:
        return "leaf"


def _replica_child(q: multiprocessing.Queue, handle: object) -> None:
    try:
        got = (handle.remote().result(timeout_s=20),  # type: ignore[attr-defined]
               serve.get_deployment_handle("Leaf", "forks").remote().result(timeout_s=20))
        q.put(got)
    except BaseException as e:
        q.put(f"{type(e).__name__}: {e}")


@serve.deployment
class Forker:
    def __init__(self, leaf: object) -> None:
        self.leaf = leaf

    def __call__(self) -> object:
        ctx = multiprocessing.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_replica_child, args=(q, self.leaf))
        p.start()
        try:
            return q.get(timeout=40)
        finally:
            p.join(10)


def test_a_child_forked_by_a_replicas_code_calls_through_the_cluster() -> None:
    """It used to wait on the replica's event loop thread, which the child does not have:
    each call hung until its timeout."""
    h = serve.run(Forker.bind(Leaf.bind()), name="forks", route_prefix=None)
    assert h.remote().result(timeout_s=60) == ("leaf", "leaf")
    assert h.remote().result(timeout_s=60) == ("leaf", "leaf")  # and the replica's own links still work
