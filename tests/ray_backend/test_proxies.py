"""One HTTP proxy per Ray node (`proxy_location`), on a `ray.cluster_utils.Cluster` on this
machine: every node's proxy binds 127.0.0.1 on the same port (SO_REUSEPORT), so the kernel
spreads new connections among them."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason='the Ray backend tests need Ray: pip install "flotilla[ray]"')

import httpx  # noqa: E402

import flotilla  # noqa: E402
from flotilla import serve  # noqa: E402
from tests.conftest import free_port  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    from ray.cluster_utils import Cluster

    if flotilla.is_initialized():
        flotilla.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        a = c.add_node(num_cpus=1)
        b = c.add_node(num_cpus=1)
        c.wait_for_nodes()
        ray.init(address=c.address, namespace="flotilla-tests", log_to_driver=False)  # to inspect actors
        flotilla.init(backend="ray", address=c.address)
        try:
            yield {"cluster": c, "nodes": {c.head_node.node_id, a.node_id, b.node_id}, "a": a.node_id,
                   "b": b.node_id}
        finally:
            if flotilla.is_initialized():
                flotilla.shutdown()
            ray.shutdown()
    finally:
        c.shutdown()


def _wait(what: str, cond: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _proxy_actors() -> dict[str, str]:
    """Alive proxy actors: node id -> actor name."""
    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == "flotilla" and ":proxy:" in a["name"]:
            out[a["name"].split(":proxy:")[1].rsplit(":", 1)[0]] = a["name"]
    return out


def _info(name: str) -> dict[str, Any]:
    return ray.get(ray.get_actor(name, namespace="flotilla").info.remote(), timeout=30)


def _healthy(nodes: set[str]) -> Callable[[], bool]:
    def check() -> bool:
        st = serve.status().proxies
        return set(st) == nodes and all(s == "HEALTHY" for s in st.values())

    return check


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.5})
def hello(request: object = None) -> str:
    return "hi"


def _get(url: str) -> int:
    """One request on a new connection (so the kernel picks a proxy for each)."""
    return httpx.get(url, timeout=30).status_code


class Load:
    """Requests one after another (each on a new connection) from a thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failed: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                code = _get(self.url)
            except httpx.HTTPError as e:
                self.failed.append(repr(e))
                continue
            if code == 200:
                self.ok += 1
            else:
                self.failed.append(str(code))

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(60)


@pytest.fixture(scope="module")
def every_node(cluster: dict[str, Any]) -> Iterator[dict[str, Any]]:
    port = free_port()
    serve.start(http_options={"port": port})  # proxy_location: EveryNode by default
    serve.run(hello.bind(), name="hello", route_prefix="/hello")
    _wait("a HEALTHY proxy per node", _healthy(cluster["nodes"]))
    yield {**cluster, "url": f"http://127.0.0.1:{port}/hello"}
    if flotilla.is_initialized():
        serve.shutdown()


def test_a_proxy_on_every_node(every_node: dict[str, Any]) -> None:
    nodes = every_node["nodes"]
    actors = _proxy_actors()
    head_node = (set(serve.status().proxies) - set(actors)).pop()  # the head's own proxy is no actor
    assert set(actors) == nodes - {head_node}, (actors, nodes)
    for node, name in actors.items():
        info = _info(name)
        assert info["node_id"] == node and info["serving"], info
    before = {node: _info(name)["requests"] for node, name in actors.items()}
    codes = [_get(every_node["url"]) for _ in range(60)]
    assert codes == [200] * 60
    after = {node: _info(name)["requests"] for node, name in actors.items()}
    assert all(after[n] > before[n] for n in actors), (before, after)  # each node's proxy served some


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_a_killed_proxy_comes_back(every_node: dict[str, Any], how: str) -> None:
    # The two nodes other than the head's (the driver's node, whichever Ray gave it) have actors.
    _wait("a HEALTHY proxy per node", _healthy(every_node["nodes"]))
    others = sorted(_proxy_actors())
    assert len(others) == 2, others
    node = others[0] if how == "ray.kill" else others[1]
    name = _wait("the proxy actor", lambda: _proxy_actors().get(node))
    with Load(every_node["url"]) as load:
        _wait("some requests", lambda: load.ok >= 20)
        if how == "ray.kill":
            ray.kill(ray.get_actor(name, namespace="flotilla"), no_restart=True)
        else:
            os.kill(_info(name)["pid"], signal.SIGKILL)  # every node is this machine
        _wait("its replacement", lambda: _proxy_actors().get(node, name) != name)
        _wait("a HEALTHY proxy per node again", _healthy(every_node["nodes"]))
        new = _proxy_actors()[node]
        served = _wait("the new proxy serving", lambda: _info(new)["requests"] > 0)
        n = load.ok
        _wait("more requests", lambda: load.ok >= n + 20)
    assert served and _info(new)["node_id"] == node
    # A request in flight on the killed proxy (one at a time here) may fail; no other.
    assert len(load.failed) <= 1, load.failed


def test_nodes_that_join_get_a_proxy_and_leave_with_it(every_node: dict[str, Any]) -> None:
    c = every_node["cluster"]
    extra = c.add_node(num_cpus=0)
    c.wait_for_nodes()
    nodes = every_node["nodes"] | {extra.node_id}
    _wait("a HEALTHY proxy on the new node", _healthy(nodes))
    assert _info(_proxy_actors()[extra.node_id])["node_id"] == extra.node_id
    c.remove_node(extra)
    _wait("the gone node's proxy dropped", _healthy(every_node["nodes"]))
    assert extra.node_id not in _proxy_actors()
    assert _get(every_node["url"]) == 200


def test_head_only_and_disabled(cluster: dict[str, Any]) -> None:
    serve.shutdown()  # the module's EveryNode proxies, if any, are stopped with everything
    _wait("no proxy actor left", lambda: not _proxy_actors(), timeout=10)
    port = free_port()
    serve.start(http_options={"port": port}, proxy_location="HeadOnly")
    serve.run(hello.bind(), name="hello", route_prefix="/hello")
    st = serve.status().proxies
    assert len(st) == 1 and set(st) < cluster["nodes"] and list(st.values()) == ["HEALTHY"], st
    time.sleep(1.5)  # a node poll would have started actors by now
    assert not _proxy_actors()
    assert _get(f"http://127.0.0.1:{port}/hello") == 200
    serve.shutdown()
    serve.start(proxy_location="Disabled")
    assert serve.status().proxies == {}
    time.sleep(1.5)
    assert not _proxy_actors()
    serve.shutdown()


def test_serve_shutdown_stops_every_proxy_actor(cluster: dict[str, Any]) -> None:
    if not flotilla.is_initialized():  # an earlier serve.shutdown() stopped the controller
        flotilla.init(backend="ray", address=cluster["cluster"].address)
    serve.start(http_options={"port": free_port()})
    _wait("a HEALTHY proxy per node", _healthy(cluster["nodes"]))
    pids = [_info(name)["pid"] for name in _proxy_actors().values()]
    assert len(pids) == 2
    flotilla.shutdown()  # the controller is a detached actor: this driver only disconnects
    time.sleep(1.0)
    assert len(_proxy_actors()) == 2
    flotilla.init(backend="ray", address=cluster["cluster"].address)
    serve.shutdown()
    _wait("no proxy actor left", lambda: not _proxy_actors(), timeout=10)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    _wait("their processes gone", lambda: all(gone(p) for p in pids), timeout=10)
