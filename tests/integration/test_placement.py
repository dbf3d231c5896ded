"""Resources: GPU ids in CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS, env vars, pending replicas."""

from __future__ import annotations

import os

import pytest

from flotilla import serve
from tests.conftest import wait_for

pytestmark = pytest.mark.slow


@serve.deployment
class Env:
    def __call__(self, name):
        return os.environ.get(name)


def test_whole_gpus_get_distinct_ids(url):
    h = serve.run(Env.options(num_replicas=2, ray_actor_options={"num_gpus": 1}).bind(), name="gpu", route_prefix=None)
    ids = {h.remote("CUDA_VISIBLE_DEVICES").result() for _ in range(40)}
    assert ids == {"0", "1"}


def test_fractional_gpus_share_ids(url):
    h = serve.run(Env.options(num_replicas=2, ray_actor_options={"num_gpus": 0.5}).bind(), name="half", route_prefix=None)
    ids = {h.remote("CUDA_VISIBLE_DEVICES").result() for _ in range(40)}
    assert len(ids) == 1 and ids.pop() in ("0", "1")


def test_omp_threads_and_env_vars(url):
    h = serve.run(
        Env.options(ray_actor_options={"num_cpus": 2, "runtime_env": {"env_vars": {"MY_VAR": "hello"}}}).bind(),
        name="env", route_prefix=None,
    )
    assert h.remote("OMP_NUM_THREADS").result() == "2"
    assert h.remote("MY_VAR").result() == "hello"
    h = serve.run(Env.options(name="frac", ray_actor_options={"num_cpus": 0.5}).bind(), name="env2", route_prefix=None)
    assert h.remote("OMP_NUM_THREADS").result() == "1"


def test_custom_resources_and_accelerator_type(url):
    h = serve.run(
        Env.options(num_replicas=2, ray_actor_options={"resources": {"custom_res": 1}, "accelerator_type": "A100"}).bind(),
        name="custom", route_prefix=None,
    )
    assert h.remote("OMP_NUM_THREADS").result() == "1"


def test_replica_that_does_not_fit_stays_pending_and_says_why(url):
    # 8 CPUs: the first two replicas run, the third waits.
    h = serve.run(
        Env.options(num_replicas=3, ray_actor_options={"num_cpus": 3}).bind(),
        name="big", route_prefix=None, _blocking=False,
    )

    def two_running():
        dep = serve.status().applications["big"].deployments["Env"]
        return dep.replica_states.get("RUNNING") == 2 and dep

    dep = wait_for(two_running, what="two running replicas")
    app = serve.status().applications["big"]
    assert app.status == "DEPLOYING"
    assert dep.status == "UPDATING"
    assert dep.replica_states == {"RUNNING": 2, "STARTING": 1}
    # (on Ray, once Ray has reported the third one pending: a second at most)
    msg = wait_for(lambda: serve.status().applications["big"].deployments["Env"].message, timeout=10, what="a message")
    assert "CPU" in msg and "needs 3" in msg and "2 available" in msg
    # The replicas that did start already serve.
    assert h.remote("OMP_NUM_THREADS").result() == "3"


def test_impossible_request_never_fits(url):
    serve.run(
        Env.options(ray_actor_options={"resources": {"no_such_thing": 1}}).bind(),
        name="never", route_prefix=None, _blocking=False,
    )
    dep = wait_for(lambda: serve.status().applications["never"].deployments["Env"].message, what="a message")
    assert "no_such_thing" in dep and "never fit" in dep
    assert serve.status().applications["never"].status == "DEPLOYING"
