"""The seed-era (Ray 1.x) API: `Deployment.deploy()`, `get_deployment`, `list_deployments`,
the client `serve.start()` returns, and the seed-001 examples run as scripts."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import Any

import httpx
import pytest

from flotilla import serve
from flotilla.serve.legacy import HandleRequest, ServeControllerClient
from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_example(name: str) -> str:
    """Run `examples/<name>` as a script (its own cluster, on a free port); its stdout."""
    env = {**os.environ, "RAY_SERVE_DEFAULT_HTTP_PORT": str(free_port()),
           "PYTHONPATH": os.pathsep.join(p for p in (os.path.join(ROOT, "src"), ROOT, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_seed_square_example_answers_at_its_name_and_the_404_says_where() -> None:
    lines = run_example("seed_square.py").splitlines()
    assert lines[0] == "{'result': 49}"
    assert lines[1].startswith("404 Path '/SquareModel' not found. Ping http://.../-/routes for available routes. "
                               "Routes: /square (application 'square')"), lines[1]


def test_seed_echo_example_prints_the_request() -> None:
    assert run_example("seed_echo_client.py").splitlines() == ["{'msg': 'hello'}"]


@serve.deployment(name="square", num_replicas=2)
class SquareModel:
    def __call__(self, request):
        data = request.json()  # synchronous, as Ray 1.x's request had it
        return {"result": data["num"] ** 2}


@serve.deployment(user_config={"scale": 1})
class Scaled:
    def __init__(self, base: int = 0) -> None:
        self.base = base
        self.scale = 0

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.scale = config["scale"]

    async def __call__(self, request):
        data = await request.json()  # the modern spelling works on the same request
        return {"y": self.base + data["x"] * self.scale, "pid": os.getpid()}


def test_deploy_serves_at_the_deployment_name_over_http_and_handles(url: str) -> None:
    SquareModel.deploy()
    assert serve.status().applications["square"].status == "RUNNING"  # .deploy() blocks until then
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/square", json={"num": 7}).json() == {"result": 49}
        r = c.post("/SquareModel", json={"num": 7})
        assert r.status_code == 404
        assert "/square (application 'square')" in r.text, r.text
    client = serve.start()
    assert isinstance(client, ServeControllerClient)
    assert client.get_handle("square").remote({"num": 3}).result() == {"result": 9}


def test_route_prefix_option(url: str) -> None:
    SquareModel.options(name="sq_a", route_prefix="/custom").deploy()
    Scaled.options(route_prefix=None).deploy(5)  # handles only
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/custom", json={"num": 2}).json() == {"result": 4}
        assert c.post("/sq_a", json={"num": 2}).status_code == 404
        assert c.get("/-/routes").json() == {"/custom": "sq_a"}
    out = serve.start().get_handle("Scaled").remote({"x": 2}).result()
    assert out["y"] == 7
    assert serve.get_deployment("sq_a").route_prefix == "/custom"
    assert serve.get_deployment("Scaled").route_prefix is None


def test_a_route_prefix_option_under_serve_run_is_used_or_said_to_be_ignored(url: str) -> None:
    """serve.run used to serve at "/" with no word of the deployment's route_prefix."""
    with pytest.warns(UserWarning, match=r"route_prefix='/custom'.*served there.*serve.run\(\.\.\., route_prefix='/custom'\)"):
        serve.run(SquareModel.options(route_prefix="/custom").bind(), name="opt")
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/custom", json={"num": 3}).json() == {"result": 9}
        assert c.post("/", json={"num": 3}).status_code == 404
    with pytest.warns(UserWarning, match=r"ignores.*served at '/given'"):
        serve.run(SquareModel.options(route_prefix="/custom").bind(), name="opt", route_prefix="/given")
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/given", json={"num": 4}).json() == {"result": 16}
        assert c.post("/custom", json={"num": 4}).status_code == 404


def test_get_and_list_deployments_reflect_what_runs(url: str) -> None:
    Scaled.options(num_replicas=2, user_config={"scale": 3}, ray_actor_options={"num_cpus": 0.5}).deploy(1)
    d = serve.get_deployment("Scaled")
    assert (d.name, d.num_replicas, d.user_config, d.route_prefix) == ("Scaled", 2, {"scale": 3}, "/Scaled")
    assert d.ray_actor_options == {"num_cpus": 0.5}
    assert set(serve.list_deployments()) == {"Scaled"}
    with pytest.raises(KeyError, match=r"'Nope' does not exist; deployments: Scaled"):
        serve.get_deployment("Nope")
    with pytest.raises(KeyError, match="Nope"):
        serve.start().get_handle("Nope")
    # A modern application's deployments are listed too.
    serve.run(SquareModel.bind(), name="modern", route_prefix="/modern")
    assert set(serve.list_deployments()) == {"Scaled", "square"}
    assert serve.get_deployment("square").route_prefix == "/modern"


def test_redeploy_updates_in_place_and_keeps_constructor_arguments(url: str) -> None:
    Scaled.deploy(100)
    h = serve.start().get_handle("Scaled")
    first = h.remote({"x": 1}).result()
    assert first["y"] == 101
    # A new user_config is applied in place: the same replica answers with it.
    serve.get_deployment("Scaled").options(user_config={"scale": 10}).deploy()
    again = h.remote({"x": 1}).result()
    assert again == {"y": 110, "pid": first["pid"]}
    # Scaling keeps the running constructor arguments (from get_deployment) too.
    serve.get_deployment("Scaled").options(num_replicas=2).deploy()  # returns once 2 run, as Ray's does
    wait_for(lambda: serve.status().applications["Scaled"].deployments["Scaled"].replica_states == {"RUNNING": 2},
             timeout=30, what="2 replicas running")
    pids: set[int] = set()
    wait_for(lambda: len(pids.add(h.remote({"x": 1}).result()["pid"]) or pids) == 2, what="both replicas answering")
    assert first["pid"] in pids  # the first replica was kept
    assert all(h.remote({"x": 1}).result()["y"] == 110 for _ in range(4))
    assert serve.get_deployment("Scaled").num_replicas == 2


def test_delete(url: str) -> None:
    SquareModel.deploy()
    Scaled.deploy()
    SquareModel.delete()
    assert set(serve.list_deployments()) == {"Scaled"}
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/square", json={"num": 2})
        assert r.status_code == 404 and "/Scaled" in r.text
    serve.start().delete_deployment("Scaled")
    assert serve.list_deployments() == {}
    with httpx.Client(base_url=url, timeout=30) as c:
        assert "No application has a route" in c.post("/square", json={"num": 2}).text


@serve.deployment
class Broken:
    def __init__(self) -> None:
        raise RuntimeError("the seed model file is missing")

    def __call__(self, request):
        return "never"


def test_deploy_failed_raises(url: str) -> None:
    with pytest.raises(RuntimeError, match="the seed model file is missing"):
        Broken.deploy()
    assert serve.status().applications["Broken"].status == "DEPLOY_FAILED"


@serve.deployment
class Inspect:
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return [type(a).__name__ for a in args], sorted(kwargs)

    def other(self, request):
        return request.json()["k"]


def test_client_handles_wrap_a_single_argument_only(url: str) -> None:
    Inspect.deploy()
    h = serve.start(detached=False).get_handle("Inspect")
    assert h.remote(1).result() == (["HandleRequest"], [])
    assert h.remote(1, 2).result() == (["int", "int"], [])
    assert h.remote(a=1).result() == ([], ["a"])
    assert h.other.remote({"k": "v"}).result() == "v"
    # Plain handles and serve.run applications are untouched.
    assert serve.get_app_handle("Inspect").remote(1).result() == (["int"], [])
    assert HandleRequest([1]).json() == [1]


def test_seed_traffic_example_splits_80_20_then_switches_to_v2() -> None:
    predict, recommend = run_example("seed_traffic.py").splitlines()
    route, _, counts = predict.partition(" ")
    split = ast.literal_eval(counts)  # a printed dict of str -> int
    assert route == "/predict" and sum(split.values()) == 1000, predict
    assert 740 <= split["OldModel"] <= 860 and split["OldModel"] + split["NewModel"] == 1000, predict
    assert recommend == "/recommend {'v2': 1000}", recommend


def test_seed_feature_blocks_run_as_written() -> None:
    lines = run_example("seed_features.py").splitlines()
    assert lines == ["dict_keys(['churn_prob'])", "{'msg': 'handled'}", "2", "{'ok': True}"], lines
