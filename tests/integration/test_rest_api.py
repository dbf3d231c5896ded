"""The head's REST API on a real detached cluster (`flotilla start`): PUT/GET/DELETE
/api/serve/applications/ with configs built from a module in a temporary folder, flotilla's own
endpoints, errors, and the bearer token of a head bound beyond loopback."""

from __future__ import annotations

import copy
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flotilla._private import cluster
from flotilla._private.procfs import start_ticks
from tests.conftest import free_port, local_only, wait_for

pytestmark = [
    pytest.mark.slow,
    local_only("a detached local cluster (flotilla start); on Ray the detached controller actor is tested in "
               "tests/ray_backend"),
]

APPS = "/api/serve/applications/"
ROOT = str(Path(__file__).resolve().parents[2])
STARTUP_S = 60.0
DEPLOY_S = 30.0

APP_MODULE = '''
import os

from flotilla import serve


@serve.deployment
class Echo:
    def __init__(self, name: str = "?") -> None:
        self.name = name
        self.greeting = "none"

    def reconfigure(self, config: dict) -> None:
        self.greeting = config.get("greeting", "none")

    async def __call__(self, request) -> dict:
        return {"name": self.name, "pid": os.getpid(), "greeting": self.greeting}


def build(args: dict):
    return Echo.bind(args.get("name", "?"))


alpha = Echo.bind("alpha")
'''

BASE: dict[str, Any] = {
    "applications": [
        {"name": "alpha", "route_prefix": "/alpha", "import_path": "rest_api_app:alpha",
         "deployments": [{"name": "Echo", "user_config": {"greeting": "hi"}}]},
        {"name": "beta", "route_prefix": "/beta", "import_path": "rest_api_app:build", "args": {"name": "beta"}},
    ]
}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (cluster.NAMESPACE_ENV, cluster.ADDRESS_ENV, cluster.TOKEN_ENV, "FLOTILLA_BACKEND")}
    src = os.path.join(ROOT, "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, ROOT, env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flotilla", *args], env=env or _env(), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


class Cluster:
    def __init__(self, ns: str, rest: str, http: str, record: dict[str, Any], env: dict[str, str]) -> None:
        self.ns, self.rest, self.http, self.record, self.env = ns, rest, http, record, env


def _start(dashboard_host: str = "127.0.0.1", **extra_env: str) -> Cluster:
    ns = f"rest-{secrets.token_hex(4)}"
    http_port, rest_port = free_port(), free_port()
    env = _env(**extra_env)
    proc = _cli("start", "--namespace", ns, "--http-port", str(http_port), "--dashboard-port", str(rest_port),
                "--dashboard-host", dashboard_host, "--num-cpus", "4", env=env, timeout=STARTUP_S)
    assert proc.returncode == 0, f"flotilla start failed: {proc.stdout}{proc.stderr}"
    record = cluster.find(ns)
    assert record is not None, f"no registry record for namespace {ns!r} after flotilla start: {proc.stdout}"
    return Cluster(ns, f"http://127.0.0.1:{rest_port}", f"http://127.0.0.1:{http_port}", record, env)


def _stop(c: Cluster) -> None:
    proc = _cli("shutdown", "-y", "--namespace", c.ns, env=c.env)
    pid, ticks = int(c.record["keeper_pid"]), c.record["keeper_ticks"]
    if proc.returncode != 0 and start_ticks(pid) == ticks:
        os.killpg(pid, signal.SIGTERM) if _leads_group(pid) else os.kill(pid, signal.SIGTERM)
        try:
            wait_for(lambda: start_ticks(pid) != ticks, timeout=30, what=f"keeper {pid} to exit")
        except AssertionError:
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, f"flotilla shutdown failed: {proc.stdout}{proc.stderr}"
    assert start_ticks(pid) != ticks, f"keeper {pid} still runs after flotilla shutdown"
    assert cluster.find(c.ns) is None, "the registry record outlived the cluster"


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except OSError:
        return False


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("rest_app")
    (d / "rest_api_app.py").write_text(textwrap.dedent(APP_MODULE))
    return str(d)


@pytest.fixture(scope="module")
def rc() -> Iterator[Cluster]:
    c = _start()
    try:
        yield c
    finally:
        _stop(c)


@pytest.fixture(scope="module")
def client(rc: Cluster, app_dir: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=rc.rest, timeout=30.0, headers={"X-Flotilla-Cwd": app_dir}) as c:
        yield c


@pytest.fixture(scope="module")
def http(rc: Cluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=rc.http, timeout=30.0) as c:
        yield c


def _apps(client: httpx.Client) -> dict[str, Any]:
    r = client.get(APPS)
    assert r.status_code == 200, r.text
    apps: dict[str, Any] = r.json()["applications"]
    return apps


def _put(client: httpx.Client, config: Any) -> httpx.Response:
    return client.put(APPS, content=json.dumps(config), headers={"Content-Type": "application/json"})


def _wait_running(client: httpx.Client, names: set[str], replicas: int = 1) -> dict[str, Any]:
    """Every app in `names` RUNNING (and no other app), each deployment with `replicas` RUNNING replicas."""

    def ready() -> dict[str, Any] | None:
        apps = _apps(client)
        if set(apps) != names:
            return None
        for a in apps.values():
            if a["status"] != "RUNNING":
                return None
            for d in a["deployments"].values():
                if [r["state"] for r in d["replicas"]] != ["RUNNING"] * replicas:
                    return None
        return apps

    result: dict[str, Any] = wait_for(ready, timeout=DEPLOY_S, interval=0.1, what=f"apps {sorted(names)} RUNNING")
    return result


def _pids(apps: dict[str, Any], name: str) -> list[int]:
    return sorted(r["pid"] for r in apps[name]["deployments"]["Echo"]["replicas"])


def _ask(http: httpx.Client, route: str) -> dict[str, Any]:
    r = http.get(route)
    assert r.status_code == 200, f"{route}: {r.status_code} {r.text}"
    out: dict[str, Any] = r.json()
    return out


@pytest.fixture
def base(client: httpx.Client) -> dict[str, Any]:
    """BASE applied and running (a no-op when it already is); the applications as GET shows them."""
    r = _put(client, BASE)
    assert r.status_code == 200, r.text
    assert r.content == b"", "Ray's dashboard answers an accepted PUT with an empty body"
    return _wait_running(client, {"alpha", "beta"})


def test_put_deploys_two_applications(base: dict[str, Any], http: httpx.Client) -> None:
    alpha, beta = base["alpha"], base["beta"]
    assert _ask(http, "/alpha") == {"name": "alpha", "pid": _pids(base, "alpha")[0], "greeting": "hi"}
    assert _ask(http, "/beta") == {"name": "beta", "pid": _pids(base, "beta")[0], "greeting": "none"}
    assert alpha["route_prefix"] == "/alpha" and beta["route_prefix"] == "/beta"
    assert alpha["source"] == "declarative" and alpha["external_scaler_enabled"] is False  # Ray's values
    assert alpha["deployed_app_config"]["import_path"] == "rest_api_app:alpha"
    assert alpha["deployed_app_config"]["deployments"] == [{"name": "Echo", "user_config": {"greeting": "hi"}}]
    assert beta["deployed_app_config"]["args"] == {"name": "beta"}
    dep = alpha["deployments"]["Echo"]
    assert dep["status"] == "HEALTHY" and dep["target_num_replicas"] == 1
    assert dep["deployment_config"]["user_config"] == {"greeting": "hi"}
    assert None not in dep["deployment_config"].values() and dep["required_resources"] == {"CPU": 1.0}
    (replica,) = dep["replicas"]
    assert replica["state"] == "RUNNING" and isinstance(replica["pid"], int) and replica["pid"] > 0
    assert replica["replica_id"]
    assert abs(replica["start_time_s"] - time.time()) < 600, "start_time_s is not epoch seconds"
    assert alpha["last_deployed_time_s"] > 0


def test_get_shape(client: httpx.Client, rc: Cluster, base: dict[str, Any]) -> None:
    body = client.get(APPS).json()
    assert "deploy_mode" not in body  # Ray 2.60 has none
    assert body["controller_info"]["pid"] == rc.record["pid"]
    assert body["http_options"]["port"] == int(rc.http.rsplit(":", 1)[1])
    assert body["proxies"] and all(p["status"] == "HEALTHY" for p in body["proxies"].values())
    # As Ray's docs parse it: `ServeInstanceDetails(**response.json())`.
    from flotilla.serve.schema import APIType, ServeInstanceDetails

    details = ServeInstanceDetails(**body)
    alpha = details.applications["alpha"]
    assert alpha.status == "RUNNING" and alpha.source is APIType.DECLARATIVE
    assert alpha.deployments["Echo"].replicas[0].state == "RUNNING"


def test_same_put_again_changes_nothing(client: httpx.Client, http: httpx.Client, base: dict[str, Any]) -> None:
    r = _put(client, BASE)
    assert r.status_code == 200, r.text
    after = _apps(client)
    for name in ("alpha", "beta"):
        assert after[name]["status"] == "RUNNING", after[name]
        assert _pids(after, name) == _pids(base, name)
        assert after[name]["last_deployed_time_s"] == base[name]["last_deployed_time_s"]
    assert _ask(http, "/alpha")["pid"] == _pids(base, "alpha")[0]


def test_changed_user_config_reconfigures_in_place(client: httpx.Client, http: httpx.Client,
                                                    base: dict[str, Any]) -> None:
    (pid,) = _pids(base, "alpha")
    cfg = copy.deepcopy(BASE)
    cfg["applications"][0]["deployments"][0]["user_config"] = {"greeting": "hello"}
    r = _put(client, cfg)
    assert r.status_code == 200, r.text
    wait_for(lambda: _ask(http, "/alpha")["greeting"] == "hello", timeout=DEPLOY_S, interval=0.1,
             what="alpha to answer with the new user_config")
    assert _ask(http, "/alpha") == {"name": "alpha", "pid": pid, "greeting": "hello"}
    apps = _wait_running(client, {"alpha", "beta"})
    assert _pids(apps, "alpha") == [pid]
    assert _pids(apps, "beta") == _pids(base, "beta")
    assert apps["alpha"]["deployments"]["Echo"]["deployment_config"]["user_config"] == {"greeting": "hello"}
    assert apps["alpha"]["deployed_app_config"]["deployments"][0]["user_config"] == {"greeting": "hello"}


def test_num_replicas_scales_up_keeping_the_old_replica(client: httpx.Client, base: dict[str, Any]) -> None:
    (pid,) = _pids(base, "alpha")
    cfg = copy.deepcopy(BASE)
    cfg["applications"][0]["deployments"][0]["num_replicas"] = 2
    r = _put(client, cfg)
    assert r.status_code == 200, r.text

    def two() -> list[int] | None:
        apps = _apps(client)
        a = apps.get("alpha")
        if a is None or a["status"] != "RUNNING":
            return None
        reps = a["deployments"]["Echo"]["replicas"]
        ok = len(reps) == 2 and all(rep["state"] == "RUNNING" for rep in reps)
        return sorted(rep["pid"] for rep in reps) if ok else None

    pids = wait_for(two, timeout=DEPLOY_S, interval=0.1, what="two RUNNING alpha replicas")
    assert pid in pids and len(set(pids)) == 2
    assert _apps(client)["alpha"]["deployments"]["Echo"]["target_num_replicas"] == 2


def test_external_scaler_enabled_in_a_config_lets_the_scaling_api_set_replicas(client: httpx.Client,
                                                                               base: dict[str, Any]) -> None:
    scale_url = "/api/v1/applications/alpha/deployments/Echo/scale"
    r = client.post(scale_url, json={"target_num_replicas": 2})
    assert r.status_code == 412 and "external_scaler_enabled" in r.json()["error"]  # not enabled yet
    cfg = copy.deepcopy(BASE)
    cfg["applications"][0]["external_scaler_enabled"] = True
    assert _put(client, cfg).status_code == 200
    wait_for(lambda: _apps(client)["alpha"]["external_scaler_enabled"] is True, timeout=DEPLOY_S,
             what="alpha deployed with external_scaler_enabled")
    r = client.post(scale_url, json={"target_num_replicas": 2})
    assert r.status_code == 200, r.text
    wait_for(lambda: [rep["state"] for rep in _apps(client)["alpha"]["deployments"]["Echo"]["replicas"]]
             == ["RUNNING"] * 2, timeout=DEPLOY_S, interval=0.1, what="two RUNNING alpha replicas")
    assert _apps(client)["alpha"]["deployments"]["Echo"]["target_num_replicas"] == 2


def _counts(client: httpx.Client) -> dict[str, tuple[int, int]]:
    """Per application: its Echo's (target_num_replicas, RUNNING replicas)."""
    out = {}
    for name, a in _apps(client).items():
        d = a["deployments"]["Echo"]
        out[name] = (d["target_num_replicas"], sum(r["state"] == "RUNNING" for r in d["replicas"]))
    return out


def test_target_capacity_scales_every_config_application(client: httpx.Client, rc: Cluster,
                                                         base: dict[str, Any]) -> None:
    """Ray's `target_capacity`: each replica count of the config's applications at that percent,
    rounded half up, never below 1 but at 0; autoscaling bounds too; changing only it rebuilds nothing."""
    cfg = copy.deepcopy(BASE)
    cfg["target_capacity"] = 50
    cfg["applications"][0]["deployments"][0].update(num_replicas=4, ray_actor_options={"num_cpus": 0})
    cfg["applications"][1]["deployments"] = [{"name": "Echo", "ray_actor_options": {"num_cpus": 0}, "autoscaling_config": {
        "min_replicas": 2, "max_replicas": 6, "upscale_delay_s": 600, "downscale_delay_s": 600}}]
    assert _put(client, cfg).status_code == 200
    want = {"alpha": (2, 2), "beta": (1, 1)}  # 4 x 50% = 2; autoscaling min 2 x 50% = 1
    wait_for(lambda: _counts(client) == want, timeout=DEPLOY_S, interval=0.1, what=f"replicas {want}")
    assert client.get(APPS).json()["target_capacity"] == 50
    out = _cli("status", "--namespace", rc.ns, env=rc.env)
    assert out.returncode == 0 and "target_capacity: 50" in out.stdout, out.stdout + out.stderr
    pids = _pids(_apps(client), "alpha")
    for tc, want in ((90, {"alpha": (4, 4), "beta": (2, 2)}),  # 3.6 -> 4, 1.8 -> 2
                     (0, {"alpha": (0, 0), "beta": (0, 0)}),
                     (None, {"alpha": (4, 4), "beta": (2, 2)})):
        cfg["target_capacity"] = tc
        assert _put(client, cfg).status_code == 200
        wait_for(lambda want=want: _counts(client) == want, timeout=DEPLOY_S, interval=0.1,
                 what=f"replicas {want} at target_capacity {tc}")
        assert client.get(APPS).json()["target_capacity"] == tc
        if tc == 90:
            assert set(pids) < set(_pids(_apps(client), "alpha")), "scaled up, not rebuilt"
    assert _apps(client)["alpha"]["source"] == "declarative"


def test_num_replicas_auto_shows_as_rays_details(client: httpx.Client, base: dict[str, Any]) -> None:
    cfg = copy.deepcopy(BASE)
    cfg["applications"][0]["deployments"][0]["num_replicas"] = "auto"
    assert _put(client, cfg).status_code == 200
    dc = wait_for(lambda: (d := _apps(client)["alpha"]["deployments"]["Echo"]["deployment_config"]).get(
        "autoscaling_config") and d, timeout=DEPLOY_S, interval=0.1, what="alpha autoscaling")
    assert "num_replicas" not in dc, dc  # Ray lists the autoscaling_config "auto" stands for, not "auto"
    ac = dc["autoscaling_config"]
    assert (ac["min_replicas"], ac["max_replicas"], ac["target_ongoing_requests"]) == (1, 100, 2.0)
    assert "target_latency_ms" not in ac and "target_queue_delay_ms" not in ac  # flotilla's, shown when set


@pytest.mark.parametrize(("patch", "field"), [
    (lambda c: c["applications"][0]["deployments"][0].update(num_replicas="two"),
     "applications[0].deployments[0].num_replicas"),
    (lambda c: c["applications"][1].update(bogus_key=1), "applications[1].bogus_key"),
])
def test_bad_field_is_400_naming_it_and_changes_nothing(client: httpx.Client, base: dict[str, Any], patch: Any,
                                                        field: str) -> None:
    applied = client.get("/api/flotilla/config/").json()
    cfg = copy.deepcopy(BASE)
    cfg["applications"][0]["route_prefix"] = "/changed"  # would change alpha if it were applied
    patch(cfg)
    r = _put(client, cfg)
    assert r.status_code == 400, r.text
    assert field in r.text
    assert client.get("/api/flotilla/config/").json() == applied
    after = _apps(client)
    for name in ("alpha", "beta"):
        assert after[name]["status"] == "RUNNING"
        assert after[name]["route_prefix"] == base[name]["route_prefix"]
        assert _pids(after, name) == _pids(base, name)
        assert after[name]["last_deployed_time_s"] == base[name]["last_deployed_time_s"]


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]"])
def test_put_not_a_config_is_400(client: httpx.Client, base: dict[str, Any], body: bytes) -> None:
    applied = client.get("/api/flotilla/config/").json()
    r = client.put(APPS, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert "request body" in r.text
    assert client.get("/api/flotilla/config/").json() == applied
    assert set(_apps(client)) == {"alpha", "beta"}


def test_import_failure_is_deploy_failed_and_others_keep_serving(client: httpx.Client, http: httpx.Client,
                                                                 base: dict[str, Any]) -> None:
    cfg = copy.deepcopy(BASE)
    cfg["applications"][1]["import_path"] = "no_such_module_for_rest_test:app"
    r = _put(client, cfg)
    assert r.status_code == 200, r.text

    def failed() -> dict[str, Any] | None:
        beta = _apps(client)["beta"]
        return beta if beta["status"] == "DEPLOY_FAILED" else None

    beta = wait_for(failed, timeout=DEPLOY_S, interval=0.1, what="beta DEPLOY_FAILED")
    assert "no_such_module_for_rest_test" in beta["message"]
    assert beta["message"].startswith("Deploying app 'beta' failed with exception:\nTraceback (most recent call last)")
    apps = _apps(client)
    assert apps["alpha"]["status"] == "RUNNING"
    assert _ask(http, "/alpha")["pid"] == _pids(base, "alpha")[0]
    # what ran before keeps running
    assert _ask(http, "/beta")["name"] == "beta"
    status = client.get("/api/flotilla/status/").json()
    assert status["applications"]["beta"]["status"] == "DEPLOY_FAILED"
    assert "no_such_module_for_rest_test" in status["applications"]["beta"]["message"]


def test_a_syntax_error_shows_its_traceback_and_line(client: httpx.Client, base: dict[str, Any],
                                                     app_dir: str) -> None:
    """As Ray's status: the message has the import's traceback, with the offending line."""
    Path(app_dir, "rest_syntax_error.py").write_text("from flotilla import serve\n\nx = (1 + 2\n")
    cfg = copy.deepcopy(BASE)
    cfg["applications"][1]["import_path"] = "rest_syntax_error:app"
    assert _put(client, cfg).status_code == 200
    beta = wait_for(lambda: (b := _apps(client)["beta"])["status"] == "DEPLOY_FAILED" and b, timeout=DEPLOY_S,
                    interval=0.1, what="beta DEPLOY_FAILED")
    msg = beta["message"]
    assert "Traceback (most recent call last)" in msg and "x = (1 + 2" in msg and "SyntaxError" in msg, msg


def test_put_without_an_application_removes_it(client: httpx.Client, http: httpx.Client,
                                               base: dict[str, Any]) -> None:
    cfg = copy.deepcopy(BASE)
    del cfg["applications"][1]
    r = _put(client, cfg)
    assert r.status_code == 200, r.text
    apps = _wait_running(client, {"alpha"})
    assert _pids(apps, "alpha") == _pids(base, "alpha")
    wait_for(lambda: http.get("/beta").status_code == 404, timeout=DEPLOY_S, interval=0.1, what="/beta gone")
    assert [a["name"] for a in client.get("/api/flotilla/config/").json()["applications"]] == ["alpha"]


def test_status_and_config_shapes(client: httpx.Client, base: dict[str, Any]) -> None:
    status = client.get("/api/flotilla/status/")
    assert status.status_code == 200 and status.headers["content-type"] == "application/json"
    s = status.json()
    assert set(s) >= {"proxies", "applications", "target_capacity"}
    assert set(s["applications"]) == {"alpha", "beta"}
    alpha = s["applications"]["alpha"]
    assert alpha["status"] == "RUNNING" and alpha["last_deployed_time_s"] > 0
    assert set(alpha["deployments"]) == {"Echo"}
    assert alpha["deployments"]["Echo"]["status"] == "HEALTHY"
    config = client.get("/api/flotilla/config/").json()
    assert [a["name"] for a in config["applications"]] == ["alpha", "beta"]
    assert config["applications"][1]["import_path"] == "rest_api_app:build"
    assert config["applications"][1]["args"] == {"name": "beta"}
    info = client.get("/api/flotilla/cluster/").json()
    assert info["dashboard_url"] == client.base_url.__str__().rstrip("/")
    assert "token" not in info


def test_delete_removes_everything(client: httpx.Client, http: httpx.Client, base: dict[str, Any]) -> None:
    r = client.delete(APPS)
    assert r.status_code == 200 and r.content == b"", r.text  # as Ray's dashboard: no body
    wait_for(lambda: _apps(client) == {}, timeout=DEPLOY_S, interval=0.1, what="no applications")
    assert client.get("/api/flotilla/config/").json() is None
    assert http.get("/alpha").status_code == 404


def test_unknown_path_wrong_method_and_healthz(client: httpx.Client) -> None:
    r = client.get("/api/no/such/thing/")
    assert r.status_code == 404, r.text
    r = client.post(APPS, content=b"{}")
    assert r.status_code == 405, r.text
    assert "PUT" in r.text and "GET" in r.text
    r = client.get("/api/flotilla/shutdown/")
    assert r.status_code == 405, r.text
    r = client.get("/-/healthz")
    assert r.status_code == 200 and r.text.strip() == "success"
    # keep-alive: several requests on one connection
    assert all(client.get("/-/healthz").status_code == 200 for _ in range(3))
    # no trailing slash is the same endpoint
    assert client.get(APPS.rstrip("/")).status_code == 200


# ---- a head bound beyond loopback needs the token -------------------------------------------
TOKEN = "secret-token"


@pytest.fixture
def secured() -> Iterator[Cluster]:
    c = _start("0.0.0.0", **{cluster.TOKEN_ENV: TOKEN})
    try:
        yield c
    finally:
        _stop(c)


def test_token_required_beyond_loopback(secured: Cluster) -> None:
    assert secured.record["token"] == TOKEN
    with httpx.Client(base_url=secured.rest, timeout=30.0) as c:
        r = c.get(APPS)
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"].lower().startswith("bearer")
        assert TOKEN not in r.text
        r = c.get(APPS, headers={"Authorization": "Bearer wrong-token"})
        assert r.status_code == 401
        r = c.get(APPS, headers={"Authorization": f"Basic {TOKEN}"})
        assert r.status_code == 401
        r = c.post("/api/flotilla/shutdown/")
        assert r.status_code == 401
        r = c.get(APPS, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.json()["applications"] == {}
        assert c.get("/-/healthz").status_code == 200
    # the CLI reads the token from the local registry record (no FLOTILLA_TOKEN in its env)
    env = _env()
    assert cluster.TOKEN_ENV not in env
    proc = _cli("status", "--namespace", secured.ns, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "proxies" in proc.stdout
    # ... and without the record, a wrong token is refused
    proc = _cli("status", "-a", secured.rest, env=_env(**{cluster.TOKEN_ENV: "wrong"}))
    assert proc.returncode != 0 and "Bearer" in proc.stderr


def test_a_browser_opens_the_dashboard_with_the_token_once(secured: Cluster) -> None:
    with httpx.Client(base_url=secured.rest, timeout=30.0) as c:
        r = c.get("/")
        assert r.status_code == 401 and "/?token=" in r.text
        assert c.get("/", params={"token": "wrong"}).status_code == 401
        r = c.get("/", params={"token": TOKEN})
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"flotilla_token={TOKEN};") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        jar = {"flotilla_token": TOKEN}
        assert b"/static/dashboard.js" in c.get("/", cookies=jar).content
        assert c.get("/api/flotilla/dashboard/", cookies=jar).json()["applications"] == {}
        # the cookie reads; it never changes anything (a bearer token does)
        assert c.post("/api/flotilla/shutdown/", cookies=jar).status_code == 401
        assert c.delete(APPS, cookies={"flotilla_token": TOKEN}).status_code == 401
