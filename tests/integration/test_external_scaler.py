"""Ray 2.60's external scaling API: `POST /api/v1/applications/<app>/deployments/<name>/scale`
on the REST API (127.0.0.1:8265 by default) sets the replica count of a deployment of an
application deployed with `external_scaler_enabled=True`, and answers as Ray's dashboard."""

from __future__ import annotations

import os

import httpx
import pytest

import flotilla
from flotilla import serve
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

MESSAGE = "Scaling request received. Deployment will get scaled asynchronously."


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Pid:
    def __call__(self, *args):
        return os.getpid()


def scale(app: str, dep: str, body: object) -> httpx.Response:
    base = flotilla.dashboard_url()
    assert base is not None
    return httpx.post(f"{base}/api/v1/applications/{app}/deployments/{dep}/scale", json=body, timeout=30)


def running(app: str, dep: str) -> int:
    d = serve.status().applications[app].deployments[dep]
    return d.replica_states.get("RUNNING", 0)


def test_an_external_scaler_sets_the_replica_count(url):
    h = serve.run(Pid.bind(), name="ext", route_prefix="/ext", external_scaler_enabled=True)
    r = scale("ext", "Pid", {"target_num_replicas": 3})
    assert (r.status_code, r.json()) == (200, {"message": MESSAGE})
    wait_for(lambda: running("ext", "Pid") == 3, timeout=60, what="3 RUNNING replicas")
    assert len(set(h.broadcast("__call__").results())) == 3
    details = httpx.get(f"{flotilla.dashboard_url()}/api/serve/applications/", timeout=30).json()
    assert details["applications"]["ext"]["external_scaler_enabled"] is True
    # a redeploy keeps the count the external scaler set (Ray's documented behaviour)
    serve.run(Pid.bind(), name="ext", route_prefix="/ext", external_scaler_enabled=True)
    assert serve.status().applications["ext"].deployments["Pid"].replica_states == {"RUNNING": 3}
    assert scale("ext", "Pid", {"target_num_replicas": 1}).status_code == 200
    wait_for(lambda: running("ext", "Pid") == 1 and sum(serve.status().applications["ext"]
                                                         .deployments["Pid"].replica_states.values()) == 1,
             timeout=60, what="back to 1 replica")
    assert h.remote().result() > 0


def test_the_scaling_api_answers_errors_as_rays(url):
    serve.run(Pid.bind(), name="plain", route_prefix="/plain")
    r = scale("plain", "Pid", {"target_num_replicas": 2})
    assert r.status_code == 412 and "external_scaler_enabled" in r.json()["error"]
    assert running("plain", "Pid") == 1
    serve.run(Pid.bind(), name="ext2", route_prefix="/ext2", external_scaler_enabled=True)
    for app, dep in (("nope", "Pid"), ("ext2", "Nope")):
        r = scale(app, dep, {"target_num_replicas": 2})
        assert (r.status_code, r.json()) == (404, {"error": "Application or Deployment not found"})
    for bad in ({"target_num_replicas": -1}, {"target_num_replicas": 2.5}, {}, [2]):
        r = scale("ext2", "Pid", bad)
        assert r.status_code == 400 and r.json()["error"].startswith("Invalid request body"), (bad, r.text)
    r = httpx.post(f"{flotilla.dashboard_url()}/api/v1/applications/ext2/deployments/Pid/scale", content=b"", timeout=30)
    assert r.json() == {"error": "Invalid request body: Expecting value: line 1 column 1 (char 0)"}  # Ray's text
    # lax, as Ray's pydantic model: "2" and 2.0 are 2, other keys are ignored
    for lax in ({"target_num_replicas": "2"}, {"target_num_replicas": 2.0}, {"target_num_replicas": 2, "x": 1}):
        assert scale("ext2", "Pid", lax).status_code == 200, lax
    wait_for(lambda: running("ext2", "Pid") == 2, timeout=60, what="2 RUNNING replicas")


def test_external_scaling_and_autoscaling_are_mutually_exclusive(url):
    auto = Pid.options(autoscaling_config={"min_replicas": 1, "max_replicas": 2})
    with pytest.raises(ValueError, match=r"mutually exclusive with autoscaling.*'Pid'"):
        serve.run(auto.bind(), name="both", route_prefix="/both", external_scaler_enabled=True)
    assert "both" not in serve.status().applications


@serve.deployment(ray_actor_options={"num_cpus": 0})
class SlowStart:
    def __init__(self):
        import time

        time.sleep(3)  # long enough to read the status while it scales

    def __call__(self, *args):
        return "ok"


def test_the_status_says_what_a_scaling_step_does_as_rays(url):
    serve.run(SlowStart.bind(), name="slow", route_prefix=None, external_scaler_enabled=True)
    assert scale("slow", "SlowStart", {"target_num_replicas": 2}).status_code == 200

    def state() -> tuple[str, str]:
        d = serve.status().applications["slow"].deployments["SlowStart"]
        return d.status, d.message

    wait_for(lambda: state() == ("UPSCALING", "Upscaling from 1 to 2 replicas."), timeout=2.5,
             what=lambda: f"the scaling step in the status, got {state()}")
    wait_for(lambda: running("slow", "SlowStart") == 2, timeout=30, what="2 RUNNING")
    assert serve.status().applications["slow"].deployments["SlowStart"].message == ""
    assert scale("slow", "SlowStart", {"target_num_replicas": 1}).status_code == 200
    d = serve.status().applications["slow"].deployments["SlowStart"]
    assert d.status != "DOWNSCALING" or d.message == "Downscaling from 2 to 1 replicas.", (d.status, d.message)
