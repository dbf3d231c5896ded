"""The Ray backend on several Ray nodes on this machine (`ray.cluster_utils.Cluster`): a head
with no CPUs and two workers with different custom resources."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason='the Ray backend tests need Ray: pip install "flotilla[ray]"')

import httpx  # noqa: E402

import flotilla  # noqa: E402
from flotilla import serve  # noqa: E402
from flotilla.serve.schema import DeploymentID  # noqa: E402
from tests.conftest import free_port, wait_for  # noqa: E402
from tests.ray_backend.conftest import send_unauthenticated_pickle  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def nodes() -> Iterator[dict[str, Any]]:
    from ray.cluster_utils import Cluster

    if flotilla.is_initialized():
        flotilla.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        a = cluster.add_node(num_cpus=2, resources={"zone_a": 2})
        b = cluster.add_node(num_cpus=2, num_gpus=1, resources={"zone_b": 2})  # a GPU in name only
        cluster.wait_for_nodes()
        flotilla.init(backend="ray", address=cluster.address)
        try:
            port = free_port()
            serve.start(http_options={"port": port})
            yield {"url": f"http://127.0.0.1:{port}", "a": a.node_id, "b": b.node_id, "head": cluster.head_node.node_id}
        finally:
            flotilla.shutdown()
    finally:
        cluster.shutdown()


def _node() -> dict[str, Any]:
    import ray

    return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


@serve.deployment(ray_actor_options={"num_cpus": 0.5, "resources": {"zone_a": 1}})
def in_a(request: object = None) -> dict[str, Any]:
    return _node()


@serve.deployment(ray_actor_options={"num_cpus": 0.5, "resources": {"zone_b": 1}})
def in_b(request: object = None) -> dict[str, Any]:
    return _node()


def test_custom_resources_pick_the_node(nodes: dict[str, Any]) -> None:
    ha = serve.run(in_a.bind(), name="a", route_prefix="/a")
    hb = serve.run(in_b.bind(), name="b", route_prefix="/b")
    assert ha.remote().result(timeout_s=30)["node"] == nodes["a"]
    assert hb.remote().result(timeout_s=30)["node"] == nodes["b"]
    with httpx.Client(timeout=30) as c:
        ra, rb = c.get(f"{nodes['url']}/a"), c.get(f"{nodes['url']}/b")
    assert (ra.status_code, rb.status_code) == (200, 200), (ra.text, rb.text)
    assert ra.json()["node"] == nodes["a"]
    assert rb.json()["node"] == nodes["b"]
    res = flotilla.cluster_resources()
    assert (res["CPU"], res["zone_a"], res["zone_b"]) == (4, 2, 2)


@serve.deployment(ray_actor_options={"num_cpus": 0.5, "resources": {"zone_b": 1}})
class Back:
    def where(self) -> dict[str, Any]:
        return _node()


@serve.deployment(ray_actor_options={"num_cpus": 0.5, "resources": {"zone_a": 1}})
class Front:
    def __init__(self, back: Any) -> None:
        self.back = back

    async def __call__(self, request: object = None) -> dict[str, Any]:
        return {"front": _node()["node"], "back": (await self.back.where.remote())["node"]}


def test_composition_across_nodes(nodes: dict[str, Any]) -> None:
    h = serve.run(Front.bind(Back.bind()), name="composed", route_prefix="/composed")
    want = {"front": nodes["a"], "back": nodes["b"]}
    assert h.remote().result(timeout_s=30) == want
    with httpx.Client(timeout=30) as c:
        r = c.get(f"{nodes['url']}/composed")
    assert r.status_code == 200, r.text
    assert r.json() == want


def test_unauthenticated_pickle_is_refused(nodes: dict[str, Any], tmp_path: Any) -> None:
    from flotilla._private.client import Runtime

    h = serve.run(in_a.bind(), name="a", route_prefix="/a")
    assert h.remote().result(timeout_s=30)["node"] == nodes["a"]
    router = Runtime.current().routers[DeploymentID("in_a", "a")]
    addrs = [conn.path for conn in router.replicas.values()]
    assert addrs and all(a.startswith("tcp://") for a in addrs), addrs
    marker = str(tmp_path / "payload-ran")
    got = send_unauthenticated_pickle(addrs[0], marker)
    assert len(got) <= 36, got  # at most the server's HELLO; never an answer to a frame

    def refused() -> float:  # counted, and pushed to the head's /metrics within a second or two
        text = httpx.get(flotilla.metrics_url(), timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("flotilla_auth_failures_total{") and 'component="replica"' in line
                   and 'side="server"' in line)

    wait_for(lambda: refused() >= 1, timeout=15, what="the refused handshake in /metrics")
    assert not os.path.exists(marker), "the unauthenticated pickle was loaded"
    assert h.remote().result(timeout_s=30)["node"] == nodes["a"]  # the replica serves on


def test_gpu_ids_come_from_ray(nodes: dict[str, Any]) -> None:
    @serve.deployment(ray_actor_options={"num_cpus": 0, "num_gpus": 1})
    def gpu() -> dict[str, Any]:
        import ray

        return {**_node(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "ids": ray.get_gpu_ids()}

    got = serve.run(gpu.bind(), name="gpu", route_prefix=None).remote().result(timeout_s=30)
    assert got["node"] == nodes["b"]
    assert [str(i) for i in got["ids"]] == ["0"] and got["cuda"] == "0", got
    serve.delete("gpu")
