"""Where the Ray backend puts replicas, on a `ray.cluster_utils.Cluster` of two workers (the head
has no CPUs): `max_replicas_per_node`, and a placement group per replica
(`placement_group_bundles`, `placement_group_strategy`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason='the Ray backend tests need Ray: pip install "flotilla[ray]"')

import flotilla  # noqa: E402
from flotilla import serve  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def nodes() -> Iterator[dict[str, Any]]:
    from ray.cluster_utils import Cluster

    if flotilla.is_initialized():
        flotilla.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        a = cluster.add_node(num_cpus=2)
        b = cluster.add_node(num_cpus=2, labels={"zone": "b"})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)  # to read placement groups here
        flotilla.init(backend="ray", address=cluster.address)
        try:
            yield {"workers": {a.node_id, b.node_id}, "head": cluster.head_node.node_id, "zone_b": b.node_id}
        finally:
            flotilla.shutdown()
            ray.shutdown()
    finally:
        cluster.shutdown()


def _poll(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def test_per_node_share_and_pending_shapes() -> None:
    from flotilla._private.ray_supervisor import _shape, per_node_share

    for n in range(1, 101):
        share = round(per_node_share(n) * 10_000)  # Ray's fixed point: 4 decimals
        assert share * n <= 10_000 < share * (n + 1), n
    pending = {"CPU": 0.5, "node:__internal_implicit_resource_flotilla:s:a:d": 0.3333, "object_store_memory": 1e8}
    assert _shape(pending) == _shape({"CPU": 0.5}) == {"CPU": 0.5}
    assert _shape({"GPU": 1.5, "accelerator_type:A100": 0.001}) == {"GPU": 2.0}


@serve.deployment(max_replicas_per_node=1, ray_actor_options={"num_cpus": 0.5})
class One:
    def __call__(self) -> str:
        return str(ray.get_runtime_context().get_node_id())


def _replica_nodes(app: str, want: int) -> set[str]:
    h = serve.get_app_handle(app)
    seen: set[str] = set()
    deadline = time.monotonic() + 20
    while len(seen) < want and time.monotonic() < deadline:
        seen.add(h.remote().result(timeout_s=30))
    return seen


def test_max_replicas_per_node(nodes: dict[str, Any]) -> None:
    serve.run(One.options(num_replicas=2).bind(), name="one", route_prefix=None)
    assert _replica_nodes("one", 2) == nodes["workers"]
    serve.run(One.options(num_replicas=3).bind(), name="one", route_prefix=None, _blocking=False)

    def waiting() -> str:
        st = serve.status().applications["one"].deployments["One"]
        # A new num_replicas alone scales up (UPSCALING), as in Ray Serve.
        return st.message if st.status == "UPSCALING" and "cannot be scheduled" in st.message else ""

    msg = _poll(waiting, 30, "the third replica to be reported unscheduled")
    assert "1 replica(s) that cannot be scheduled" in msg and "max_replicas_per_node" in msg, msg
    assert serve.status().applications["one"].deployments["One"].replica_states == {"RUNNING": 2, "STARTING": 1}
    assert _replica_nodes("one", 2) == nodes["workers"]  # the two serve on
    serve.delete("one")


def test_placement_group_per_replica(nodes: dict[str, Any]) -> None:
    # Declared once the Ray backend runs: STRICT_SPREAD is honoured there, so no warning.
    from ray.util import placement_group_table

    @serve.deployment(
        ray_actor_options={"num_cpus": 0.5},
        placement_group_bundles=[{"CPU": 0.5}, {"CPU": 1}],
        placement_group_strategy="STRICT_SPREAD",
    )
    class Spread:
        def __call__(self) -> dict[str, Any]:
            from ray.util.placement_group import get_current_placement_group

            @ray.remote(num_cpus=1)
            def child() -> tuple[str, str | None]:
                pg = get_current_placement_group()
                return str(ray.get_runtime_context().get_node_id()), pg.id.hex() if pg else None

            pg = get_current_placement_group()
            node, child_pg = ray.get(child.remote())  # captured: bundle 1, the one with a CPU free
            return {"node": str(ray.get_runtime_context().get_node_id()), "pg": pg.id.hex() if pg else None,
                    "child_node": node, "child_pg": child_pg}

    got = serve.run(Spread.bind(), name="spread", route_prefix=None).remote().result(timeout_s=60)
    assert got["pg"] and got["child_pg"] == got["pg"], got
    assert {got["node"], got["child_node"]} == nodes["workers"], got  # STRICT_SPREAD: one bundle each
    table = placement_group_table()
    assert table[got["pg"]]["state"] == "CREATED"
    assert table[got["pg"]]["strategy"] == "STRICT_SPREAD"
    assert [b for b in table[got["pg"]]["bundles"].values()] == [{"CPU": 0.5}, {"CPU": 1.0}]
    # The replica dies: its group goes, and its replacement gets a group of its own.
    [name] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if ":spread:Spread:" in a["name"]]
    ray.kill(ray.get_actor(name, namespace="flotilla"))
    _poll(lambda: placement_group_table()[got["pg"]]["state"] == "REMOVED", 20, "the dead replica's group to go")
    h = serve.get_app_handle("spread")
    again = _poll(lambda: serve.status().applications["spread"].status == "RUNNING" and h.remote().result(timeout_s=30),
                  60, "a new replica")
    assert again["pg"] not in (None, got["pg"]) and again["child_pg"] == again["pg"], again
    serve.delete("spread")
    _poll(lambda: placement_group_table()[again["pg"]]["state"] == "REMOVED", 20, "the placement group to go")


@serve.deployment(ray_actor_options={"num_cpus": 1}, placement_group_bundles=[{"CPU": 1}, {"CPU": 2}],
                  placement_group_strategy="STRICT_PACK")
class TooBig:
    def __call__(self) -> str:
        return "never"


def test_placement_group_that_fits_nowhere_waits(nodes: dict[str, Any]) -> None:
    serve.run(TooBig.bind(), name="toobig", route_prefix=None, _blocking=False)

    def waiting() -> str:
        st = serve.status().applications["toobig"].deployments["TooBig"]
        return st.message if "cannot be scheduled" in st.message else ""

    msg = _poll(waiting, 30, "the replica to be reported unscheduled")
    assert "CPU: 3" in msg and "placement group [{CPU: 1}, {CPU: 2}] (STRICT_PACK)" in msg, msg
    serve.delete("toobig")


def test_bundle_label_selector_picks_the_labelled_node(nodes: dict[str, Any]) -> None:
    app = One.options(max_replicas_per_node=None, num_replicas=4, placement_group_bundles=[{"CPU": 0.5}],
                      placement_group_bundle_label_selector=[{"zone": "b"}])
    h = serve.run(app.bind(), name="labelled", route_prefix=None)
    where = h.broadcast("__call__").results()
    assert len(where) == 4 and set(where) == {nodes["zone_b"]}  # every replica on the node labelled zone=b
    serve.delete("labelled")


def test_a_custom_router_sees_each_replicas_node_and_ranks_by_locality(nodes: dict[str, Any], tmp_path) -> None:
    import json

    from flotilla.serve.request_router import LocalityMixin, RequestRouter

    class Local(LocalityMixin, RequestRouter):
        def initialize_state(self, **kwargs):
            self.log = kwargs["log"]

        async def choose_replicas(self, candidate_replicas, pending_request=None):
            ranks = self.rank_replicas_via_locality(candidate_replicas)
            with open(self.log, "a") as f:
                f.write(json.dumps([[r.node_id for r in rank] for rank in ranks]) + "\n")
            return ranks

    log = tmp_path / "ranks.jsonl"
    app = One.options(max_replicas_per_node=1, num_replicas=2,
                      request_router_config={"request_router_class": Local, "request_router_kwargs": {"log": str(log)}})
    h = serve.run(app.bind(), name="local", route_prefix=None)
    assert h.remote().result(timeout_s=30) in nodes["workers"]
    ranks = [json.loads(line) for line in log.read_text().splitlines()]
    # this driver runs on the head, which has no replica: both are in the last rank, by node
    assert ranks[-1][0] == [] and sorted(ranks[-1][2]) == sorted(nodes["workers"])
    serve.delete("local")
