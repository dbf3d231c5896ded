"""Ray 2.60's application-level autoscaling policy: a config file's `autoscaling_policy` is one
function that decides every autoscaling deployment of the application at once (here the
config is PUT to the cluster's REST API, as `serve deploy` sends it)."""

from __future__ import annotations

import json
import textwrap

import httpx
import pytest

import flotilla
from flotilla import serve
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

APP = '''
from flotilla import serve

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Preprocessor:
    def __call__(self, x):
        return x

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Model:
    def __call__(self, x):
        return x

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Driver:
    def __init__(self, pre, model):
        self.pre, self.model = pre, model

    async def __call__(self, request):
        return await self.model.remote(await self.pre.remote(1))

app = Driver.bind(Preprocessor.bind(), Model.bind())
'''

POLICY = '''
import json

def coordinated(contexts):
    """Preprocessor: 2 replicas; Model: twice that (clamped to its max of 3); the contexts seen
    are written down for the test."""
    seen = {f"{d.app_name}/{d.name}": [c.deployment_name, c.capacity_adjusted_max_replicas,
                                        sorted({type(r).__name__ for r in c.running_replicas})]
            for d, c in contexts.items()}
    with open(SEEN, "w") as f:
        json.dump(seen, f)
    pre = next(d for d in contexts if d.name == "Preprocessor")
    model = next(d for d in contexts if d.name == "Model")
    return {pre: 2, model: 4}, {pre: {"calls": 1}}
'''


def test_an_application_policy_decides_for_all_its_autoscaling_deployments(url, tmp_path, monkeypatch):
    (tmp_path / "coord_app.py").write_text(textwrap.dedent(APP))
    seen = tmp_path / "seen.json"
    (tmp_path / "coord_policy.py").write_text(textwrap.dedent(POLICY) + f"\nSEEN = {str(seen)!r}\n")
    config = {"applications": [{
        "name": "coord", "route_prefix": "/coord", "import_path": "coord_app:app",
        "runtime_env": {"env_vars": {}},
        "autoscaling_policy": {"policy_function": "coord_policy:coordinated"},
        "deployments": [
            # Ray applies each deployment's delays to the policy's targets: none here
            {"name": "Preprocessor", "autoscaling_config": {"min_replicas": 1, "max_replicas": 5, "upscale_delay_s": 0}},
            {"name": "Model", "autoscaling_config": {"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 0}},
        ],
    }]}
    r = httpx.put(f"{flotilla.dashboard_url()}/api/serve/applications/", json=config, timeout=60,
                  headers={"x-flotilla-cwd": str(tmp_path)})
    assert r.status_code == 200, r.text

    def counts() -> dict[str, int]:
        app = serve.status().applications.get("coord")
        deps = app.deployments if app is not None else {}
        return {n: deps[n].replica_states.get("RUNNING", 0) if n in deps else 0 for n in ("Preprocessor", "Model", "Driver")}

    wait_for(lambda: counts() == {"Preprocessor": 2, "Model": 3, "Driver": 1}, timeout=60,
             what=lambda: f"2 Preprocessor and 3 (clamped from 4) Model replicas, got {counts()}")
    # one call with both autoscaling deployments (Driver has no autoscaling_config); replica ids as Ray's
    wait_for(lambda: json.loads(seen.read_text()) == {"coord/Preprocessor": ["Preprocessor", 5, ["ReplicaID"]],
                                                      "coord/Model": ["Model", 3, ["ReplicaID"]]},
             timeout=10, what=lambda: f"the policy's contexts: {seen.read_text()}")
