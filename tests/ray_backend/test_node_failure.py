"""Ray nodes that go away, and scale-down that empties nodes: a `ray.cluster_utils.Cluster` of
its own (each test adds and removes its nodes, which the other modules' clusters must not see)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason='the Ray backend tests need Ray: pip install "flotilla[ray]"')

import httpx  # noqa: E402

import flotilla  # noqa: E402
from flotilla import serve  # noqa: E402
from flotilla.exceptions import ActorDiedError  # noqa: E402
from flotilla.serve.schema import ApplicationStatus, DeploymentID, ReplicaState  # noqa: E402
from tests.conftest import free_port, wait_for  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    from ray.cluster_utils import Cluster

    if flotilla.is_initialized():
        flotilla.shutdown()
    # A node that stops answering is declared dead within seconds (Ray's default: about 15 s).
    health = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": health})
    try:
        c.wait_for_nodes()
        flotilla.init(backend="ray", address=c.address)
        try:
            port = free_port()
            # HeadOnly: HTTP goes through the head node's proxy, which no test here loses (a
            # lost node's own proxy drops its connections: test_proxies.py covers that).
            serve.start(http_options={"port": port}, proxy_location="HeadOnly")
            yield {"cluster": c, "url": f"http://127.0.0.1:{port}"}
        finally:
            flotilla.shutdown()
    finally:
        c.shutdown()


def _add(c: Any, **resources: float) -> Any:
    node = c.add_node(num_cpus=1, resources=resources)
    c.wait_for_nodes()
    return node


def _where() -> dict[str, str]:
    return {"node": ray.get_runtime_context().get_node_id(), "replica": serve.get_replica_context().replica_tag}


def _replicas(h: Any, n: int, timeout: float = 60.0) -> dict[str, str]:
    """Replica id -> node id, asking until `n` distinct replicas answered."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < n and time.monotonic() < deadline:
        for resp in [h.where.remote() for _ in range(4 * n)]:
            got = resp.result(timeout_s=30)
            seen[got["replica"]] = got["node"]
    assert len(seen) >= n, seen
    return seen


def _settled(app: str, name: str, n: int) -> bool:
    st = serve.status().applications.get(app)
    if st is None or st.status is not ApplicationStatus.RUNNING:
        return False
    d = st.deployments[name]
    return d.replica_states == {ReplicaState.RUNNING: n} and d.target_num_replicas == n


def _routed(app: str, name: str) -> set[str]:
    """The replica ids this process's router for the deployment knows."""
    from flotilla._private.client import Runtime

    return set(Runtime.current().routers[DeploymentID(name, app)].replicas.copy())


# ---------------------------------------------------------------------------------------
# A node dies under load
# ---------------------------------------------------------------------------------------

MAX_ONGOING = 2


@serve.deployment(num_replicas=4, max_ongoing_requests=MAX_ONGOING, ray_actor_options={"num_cpus": 0.25, "resources": {"slot": 1}})
class Worker:
    async def __call__(self, request: object = None) -> dict[str, str]:
        await asyncio.sleep(0.02)
        return _where()

    def where(self) -> dict[str, str]:
        return _where()


class Load:
    """Bounded request loops in threads: handle calls and HTTP through the proxy."""

    def __init__(self, h: Any, url: str, handle_threads: int = 4, http_threads: int = 2, max_s: float = 120.0) -> None:
        self.h, self.url, self.max_s = h, url, max_s
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok: list[tuple[float, str]] = []  # (time, node)
        self.failed: list[tuple[float, str]] = []  # (time, error text)
        self.threads = [threading.Thread(target=self._handle_loop, daemon=True) for _ in range(handle_threads)]
        self.threads += [threading.Thread(target=self._http_loop, daemon=True) for _ in range(http_threads)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _record(self, node: str | None, err: str) -> None:
        with self.lock:
            if node is not None:
                self.ok.append((time.monotonic(), node))
            else:
                self.failed.append((time.monotonic(), err))

    def _running(self, start: float) -> bool:
        return not self.stop.is_set() and time.monotonic() - start < self.max_s

    def _handle_loop(self) -> None:
        start = time.monotonic()
        while self._running(start):
            try:
                self._record(self.h.remote().result(timeout_s=30)["node"], "")
            except ActorDiedError as e:
                self._record(None, f"handle: {e}")
            except Exception as e:
                self._record(None, f"handle, unexpected: {type(e).__name__}: {e}")

    def _http_loop(self) -> None:
        start = time.monotonic()
        with httpx.Client(timeout=30) as c:
            while self._running(start):
                try:
                    r = c.get(self.url)
                except httpx.HTTPError as e:
                    self._record(None, f"http, unexpected: {type(e).__name__}: {e}")
                    continue
                if r.status_code == 200:
                    self._record(r.json()["node"], "")
                else:
                    self._record(None, f"http {r.status_code}: {r.text}")

    def count_ok(self, after: float = 0.0) -> int:
        with self.lock:
            return sum(1 for t, _ in self.ok if t > after)


def _freeze(node: Any) -> list[int]:
    """SIGSTOP the node's raylet and every process under it (its workers): the node is gone
    without closing a socket, as a machine that lost its network."""
    raylet = node.all_processes["raylet"][0].process.pid
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    pids, todo = [], [raylet]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, ()))
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


@pytest.mark.parametrize("how", ["removed", "frozen"])
def test_node_lost_under_load(cluster: dict[str, Any], how: str) -> None:
    c = cluster["cluster"]
    n1, n2 = _add(c, slot=2), _add(c, slot=2)
    nodes = [n1, n2]
    try:
        _lose_a_node_under_load(cluster, how, nodes)
    finally:
        serve.delete("load")
        for node in nodes:
            c.remove_node(node, allow_graceful=False)


def _lose_a_node_under_load(cluster: dict[str, Any], how: str, nodes: list[Any]) -> None:
    c = cluster["cluster"]
    n1, n2 = nodes
    h = serve.run(Worker.bind(), name="load", route_prefix="/load")
    where = _replicas(h, 4)
    per_node = Counter(where.values())
    assert per_node == {n1.node_id: 2, n2.node_id: 2}, per_node
    n3 = _add(c, slot=2)  # room for the replacements
    nodes.append(n3)
    doomed = {rid for rid, node in where.items() if node == n1.node_id}
    frozen: list[int] = []
    try:
        with Load(h, f"{cluster['url']}/load") as load:
            wait_for(lambda: load.count_ok() >= 50, timeout=60, what="load under way")
            t0 = time.monotonic()
            if how == "removed":
                nodes.remove(n1)
                c.remove_node(n1)
            else:
                frozen = _freeze(n1)
            t_lost = time.monotonic()
            t_settled = wait_for(lambda: _settled("load", "Worker", 4) and not doomed & _routed("load", "Worker")
                                 and time.monotonic(), timeout=120, interval=0.05, what="4 RUNNING replicas again")
            wait_for(lambda: load.count_ok(after=t_settled) >= 50, timeout=60, what="requests after the replacement")
    finally:
        if frozen:
            nodes.remove(n1)
            c.remove_node(n1, allow_graceful=False)
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    failed = load.failed
    bound = MAX_ONGOING * len(doomed) * 2  # two routers (the driver and the proxy) may fill each replica
    print(f"\nnode {how}: took {t_lost - t0:.2f}s; 4 RUNNING again {t_settled - t0:.2f}s after it began; "
          f"{len(load.ok)} ok, {len(failed)} failed (bound {bound})")
    for t, err in failed:
        print(f"  +{t - t0:.2f}s {err.splitlines()[0][:160]}")
    assert len(failed) <= bound, failed
    for _, err in failed:
        assert "died" in err and any(rid in err for rid in doomed), err  # only what ran on the lost node
    assert load.count_ok(after=t_lost) >= 50
    assert not any(node == n1.node_id for t, node in load.ok if t > t_settled)
    survivors = _replicas(h, 4)
    assert Counter(survivors.values()) == {n2.node_id: 2, n3.node_id: 2}, survivors


# ---------------------------------------------------------------------------------------
# Scale-down empties the node with the fewest replicas first
# ---------------------------------------------------------------------------------------


@serve.deployment(ray_actor_options={"num_cpus": 0, "resources": {"pack": 1}})
class Packed:
    def where(self) -> dict[str, str]:
        return _where()


def _scale(n: int) -> Any:
    h = serve.run(Packed.options(num_replicas=n).bind(), name="packed", route_prefix=None)
    wait_for(lambda: _settled("packed", "Packed", n), timeout=120, interval=0.05, what=f"{n} RUNNING replicas")
    return h


def test_scale_down_empties_the_node_with_fewest_replicas(cluster: dict[str, Any]) -> None:
    c = cluster["cluster"]
    nodes = [_add(c, pack=1)]
    try:
        _scale_down(c, nodes)
    finally:
        serve.delete("packed")
        for node in nodes:
            c.remove_node(node, allow_graceful=False)


def _scale_down(c: Any, nodes: list[Any]) -> None:
    small = nodes[0]
    _scale(1)  # the oldest replica, alone on its node: the one-node rules would keep it longest
    big = _add(c, pack=3)
    nodes.append(big)
    h = _scale(4)
    before = _replicas(h, 4)
    assert Counter(before.values()) == {small.node_id: 1, big.node_id: 3}, before
    h = _scale(3)
    after = _replicas(h, 3)
    assert set(after.values()) == {big.node_id}, after
    assert set(after) < set(before)
    h = _scale(2)
    assert set(_replicas(h, 2).values()) == {big.node_id}
