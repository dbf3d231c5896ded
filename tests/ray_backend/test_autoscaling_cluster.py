"""The Ray backend on a cluster that Ray's autoscaler grows and shrinks: Ray's fake multi-node
provider on this machine (what `ray.cluster_utils.AutoscalingCluster` sets up), started here
without `ray stop` so that it touches no other Ray instance on the machine."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason='the Ray backend tests need Ray: pip install "flotilla[ray]"')

import flotilla  # noqa: E402
from flotilla import serve  # noqa: E402
from tests.conftest import env_vars, free_port  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(240)]

#: The fake provider's node id for the head, and the provider class (the "fake_multinode"
#: type would need its example.yaml, which Ray's wheel does not ship).
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"
PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"


def _processes_of(session_dir: str) -> list[int]:
    """The processes whose command line names `session_dir` (this cluster's own folder): the
    worker nodes the provider started are not children of anything here."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if session_dir.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def _alive_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n["Alive"]]


def _poll(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def autoscaling(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from ray.cluster_utils import Cluster

    if flotilla.is_initialized():
        flotilla.shutdown()
    ip = ray.util.get_node_ip_address()
    port = free_port()
    config = {
        "cluster_name": "flotilla-autoscaling-test",
        "max_workers": 2,
        "provider": {"type": "external", "module": PROVIDER, "gcs_address": f"{ip}:{port}",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "worker": {"resources": {"CPU": 2, "object_store_memory": 100 * 1024 * 1024},
                       "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.05,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }
    path = tmp_path_factory.mktemp("autoscaler") / "config.json"
    path.write_text(json.dumps(config))
    with env_vars(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1"):
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "gcs_server_port": port, "include_dashboard": False, "autoscaling_config": str(path),
            "env_vars": {"RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID},
        })
    session_dir = cluster.head_node.get_session_dir_path()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        flotilla.init(backend="ray", address=cluster.address)
        yield {"head": cluster.head_node.node_id}
    finally:
        try:
            if flotilla.is_initialized():
                flotilla.shutdown()
            ray.shutdown()
        finally:
            cluster.shutdown()
            for pid in _processes_of(session_dir):  # worker nodes still up (a failed test)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _where() -> dict[str, Any]:
    return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


@serve.deployment(ray_actor_options={"num_cpus": 2})
def big(request: object = None) -> dict[str, Any]:
    return _where()


def test_autoscaler_adds_a_node_and_releases_it(autoscaling: dict[str, Any]) -> None:
    assert len(_alive_nodes()) == 1
    serve.run(big.bind(), name="big", route_prefix=None, _blocking=False)

    def waiting() -> str:
        st = serve.status().applications["big"].deployments["big"]
        return st.message if st.status == "UPDATING" and "cannot be scheduled" in st.message else ""

    msg = _poll(waiting, 30, "the deployment to say it waits for resources")
    assert "CPU" in msg, msg
    _poll(lambda: serve.status().applications["big"].status == "RUNNING", 90, "the app to run")
    assert len(_alive_nodes()) == 2
    got = serve.get_app_handle("big").remote().result(timeout_s=30)
    assert got["node"] != autoscaling["head"]
    serve.delete("big")
    _poll(lambda: len(_alive_nodes()) == 1, 90, "the autoscaler to release the idle node")


@serve.deployment(num_replicas=2, max_replicas_per_node=1, ray_actor_options={"num_cpus": 0.25})
def one_per_node(request: object = None) -> dict[str, Any]:
    return _where()


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class Spread:
    """Its second bundle is on another node than the first (STRICT_SPREAD)."""

    def __call__(self, request: object = None) -> dict[str, Any]:
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        def node() -> str:  # defined here: pickled by value for the task's worker
            return str(ray.get_runtime_context().get_node_id())

        strategy = PlacementGroupSchedulingStrategy(get_current_placement_group(), placement_group_bundle_index=1)
        other = ray.get(ray.remote(num_cpus=0.25)(node).options(scheduling_strategy=strategy).remote())
        return {"node": node(), "other": other}


def test_autoscaler_sees_per_node_limits_and_placement_groups(autoscaling: dict[str, Any]) -> None:
    """The head (1 CPU) holds one replica of each; the per-node limit and STRICT_SPREAD need a
    second node, which the autoscaler adds."""
    assert len(_alive_nodes()) == 1
    spread = Spread.options(placement_group_bundles=[{"CPU": 0.25}, {"CPU": 0.25}],
                            placement_group_strategy="STRICT_SPREAD")
    serve.run(one_per_node.bind(), name="per-node", route_prefix=None, _blocking=False)
    serve.run(spread.bind(), name="spread", route_prefix=None, _blocking=False)
    for app in ("per-node", "spread"):
        _poll(lambda app=app: serve.status().applications[app].status == "RUNNING", 90, f"{app} to run")
    assert len(_alive_nodes()) == 2
    h = serve.get_app_handle("per-node")
    seen: set[str] = set()
    deadline = time.monotonic() + 20
    while len(seen) < 2 and time.monotonic() < deadline:
        seen.add(h.remote().result(timeout_s=30)["node"])
    assert autoscaling["head"] in seen and len(seen) == 2, seen
    got = serve.get_app_handle("spread").remote().result(timeout_s=30)
    assert got["node"] != got["other"] and autoscaling["head"] in (got["node"], got["other"]), got
    serve.delete("per-node")
    serve.delete("spread")
    _poll(lambda: len(_alive_nodes()) == 1, 90, "the autoscaler to release the idle node")
