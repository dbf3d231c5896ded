"""The Ray backend on a cluster that Ray's autoscaler grows and shrinks: Ray's fake multi-node
provider on this machine (what `ray.cluster_utils.AutoscalingCluster` sets up), started here
without `ray stop` so that it touches no other Ray instance on the machine."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason='the Ray backend tests need Ray: pip install "flotilla[ray]"')

import flotilla  # noqa: E402
from flotilla import serve  # noqa: E402
from tests.conftest import free_port  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(240)]

#: The fake provider's node id for the head, and the provider class (the "fake_multinode"
#: type would need its example.yaml, which Ray's wheel does not ship).
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"
PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"


def _descendants(pid: int) -> list[int]:
    """The processes below `pid` (through /proc children lists), deepest last."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            continue
        out.extend(kids)
        todo.extend(kids)
    return out


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
    saved = {k: os.environ.get(k) for k in ("RAY_FAKE_CLUSTER", "AUTOSCALER_UPDATE_INTERVAL_S")}
    os.environ.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "gcs_server_port": port, "include_dashboard": False, "autoscaling_config": str(path),
            "env_vars": {"RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID},
        })
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    monitor = cluster.head_node.all_processes["monitor"][0].process.pid
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        flotilla.init(backend="ray", address=cluster.address)
        yield {"head": cluster.head_node.node_id, "monitor": monitor}
    finally:
        try:
            if flotilla.is_initialized():
                flotilla.shutdown()
            ray.shutdown()
        finally:
            nodes = _descendants(monitor)  # worker nodes the provider started, if any are left
            cluster.shutdown()
            for pid in reversed(nodes):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass


def _where() -> dict[str, Any]:
    return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


@serve.deployment(ray_actor_options={"num_cpus": 2})
def big(request: object = None) -> dict[str, Any]:
    return _where()


def test_autoscaler_adds_a_node_and_releases_it(autoscaling: dict[str, Any]) -> None:
    t0 = time.monotonic()
    assert len(_alive_nodes()) == 1
    serve.run(big.bind(), name="big", route_prefix=None, _blocking=False)

    def waiting() -> str:
        st = serve.status().applications["big"].deployments["big"]
        return st.message if st.status == "UPDATING" and "cannot be scheduled" in st.message else ""

    msg = _poll(waiting, 30, "the deployment to say it waits for resources")
    assert "CPU" in msg, msg
    _poll(lambda: serve.status().applications["big"].status == "RUNNING", 90, "the app to run")
    t_up = time.monotonic() - t0
    assert len(_alive_nodes()) == 2
    got = serve.get_app_handle("big").remote().result(timeout_s=30)
    assert got["node"] != autoscaling["head"]
    serve.delete("big")
    _poll(lambda: len(_alive_nodes()) == 1, 90, "the autoscaler to release the idle node")
    print(f"up in {t_up:.1f}s, down in {time.monotonic() - t0 - t_up:.1f}s")
