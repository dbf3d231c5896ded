"""The operating surface, driven as a user drives it: the real `flotilla` CLI in subprocesses.

`flotilla start` (a detached cluster), `deploy` of a config file, `status`, `config`, `build`,
`run config.yaml`, `shutdown`; drivers attaching with `address="auto"`; namespaces side by side.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any
from unittest.mock import ANY

import httpx
import pytest
import yaml

from tests.conftest import alive, descendants, free_port, local_only, title, wait_for

pytestmark = [
    pytest.mark.slow,
    local_only("a detached local cluster (flotilla start); on Ray the detached controller actor plays "
               "that part (tests/ray_backend/test_detached.py)"),
]

APP = '''
import os
from flotilla import serve


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Greeter:
    def __init__(self, greeting="hello"):
        self.greeting = greeting

    def reconfigure(self, config):
        self.greeting = config.get("greeting", self.greeting)

    def __call__(self, request):
        return {"greeting": self.greeting, "pid": os.getpid(), "env": os.environ.get("GREETER_ENV")}


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
def echo(request):
    return "echo"


greeter = Greeter.bind()
echo_app = echo.bind()


def make(args):
    return Greeter.bind(args.get("greeting", "built"))
'''


def cli(*args: str, env: dict[str, str] | None = None, cwd: str | None = None, timeout: float = 90,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flotilla", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd, input=input)


def ok(*args: str, **kw: Any) -> str:
    r = cli(*args, **kw)
    assert r.returncode == 0, f"flotilla {' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}"
    return r.stdout


def status(ns: str) -> dict[str, Any]:
    return yaml.safe_load(ok("status", "--namespace", ns))


def app_states(ns: str) -> dict[str, str]:
    return {name: a["status"] for name, a in (status(ns).get("applications") or {}).items()}


def record(ns: str) -> dict[str, Any]:
    from flotilla._private import cluster

    info = cluster.find(ns)
    assert info is not None, f"no cluster record for namespace {ns}"
    return info


class Cluster:
    def __init__(self, ns: str, http_port: int, rest_port: int, out: str) -> None:
        self.ns, self.http_port, self.rest_port, self.out = ns, http_port, rest_port, out
        self.url = f"http://127.0.0.1:{http_port}"
        self.rest = f"http://127.0.0.1:{rest_port}"
        self.keeper = record(ns)["keeper_pid"]


def start_cluster(ns: str, *extra: str) -> Cluster:
    http_port, rest_port = free_port(), free_port()
    out = ok("start", "--namespace", ns, "--http-port", str(http_port), "--dashboard-port", str(rest_port),
             "--num-cpus", "4", *extra)
    return Cluster(ns, http_port, rest_port, out)


def _reap(p: subprocess.Popen[str]) -> None:
    """Kill a foreground `flotilla run` if a test left it running, and close its pipes."""
    if p.poll() is None:
        p.kill()
        p.wait()
    for stream in (p.stdout, p.stderr):
        if stream is not None:
            stream.close()


@contextlib.contextmanager
def foreground(*args: str, cwd: str, serving_at: str, env: dict[str, str] | None = None
               ) -> Iterator[subprocess.Popen[str]]:
    """`flotilla run ARGS` in the foreground, once its first line says it serves at
    `serving_at`; stopped with SIGTERM after (exit code 0), what it wrote on stderr kept as
    `p.errors`, its pipes closed."""
    p = subprocess.Popen([sys.executable, "-m", "flotilla", "run", *args], cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert serving_at in line, line + (p.stderr.read() if p.poll() is not None and p.stderr else "")
        yield p
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
        p.errors = p.stderr.read() if p.stderr else ""  # type: ignore[attr-defined]
    finally:
        _reap(p)


def stop_cluster(c: Cluster) -> None:
    r = cli("shutdown", "-y", "--namespace", c.ns)
    if r.returncode != 0:  # never leave a cluster behind
        for pid in descendants(c.keeper) | {c.keeper}:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("project")
    (d / "greetapp.py").write_text(APP)
    return str(d)


@pytest.fixture(scope="module")
def cl() -> Iterator[Cluster]:
    c = start_cluster(f"cli-{secrets.token_hex(3)}")
    try:
        yield c
    finally:
        stop_cluster(c)


def write_config(project: str, name: str, greeter: dict[str, Any] | None = None, apps: str = "both",
                 **http: Any) -> str:
    config: dict[str, Any] = {"applications": []}
    if http:
        config["http_options"] = http
    if apps in ("both", "greet"):
        config["applications"].append({
            "name": "greet", "route_prefix": "/greet", "import_path": "greetapp:greeter",
            "runtime_env": {"env_vars": {"GREETER_ENV": "from-config"}},
            "deployments": [{"name": "Greeter", **(greeter or {"num_replicas": 1, "user_config": {"greeting": "hi"}})}],
        })
    if apps in ("both", "echo"):
        config["applications"].append({"name": "echo", "route_prefix": "/echo", "import_path": "greetapp:echo_app"})
    path = os.path.join(project, name)
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def greeter_pids(c: Cluster, n: int) -> set[int]:
    """The pids answering /greet, once `n` distinct ones have (bounded)."""
    seen: set[int] = set()

    def enough() -> bool:
        seen.add(httpx.get(f"{c.url}/greet", timeout=10).json()["pid"])
        return len(seen) >= n

    wait_for(enough, timeout=30, what=f"{n} Greeter replicas answering")
    return seen


def test_start_deploy_status_http_config_and_a_changed_config(cl: Cluster, project: str) -> None:
    assert f"http://127.0.0.1:{cl.http_port}" in cl.out and f"dashboard:  http://127.0.0.1:{cl.rest_port}" in cl.out
    assert f'flotilla.init(address="auto", namespace="{cl.ns}")' in cl.out
    path = write_config(project, "two.yaml")
    out = ok("deploy", path, "--namespace", cl.ns, cwd=project)
    assert "greet" in out and "echo" in out
    wait_for(lambda: app_states(cl.ns) == {"greet": "RUNNING", "echo": "RUNNING"}, timeout=60,
             what="both applications RUNNING")
    st = status(cl.ns)
    dep = st["applications"]["greet"]["deployments"]["Greeter"]
    assert dep["status"] == "HEALTHY" and dep["replica_states"] == {"RUNNING": 1}
    assert list(st["proxies"].values()) == ["HEALTHY"]
    reply = httpx.get(f"{cl.url}/greet", timeout=10).json()
    assert reply["greeting"] == "hi" and reply["env"] == "from-config"
    assert httpx.get(f"{cl.url}/echo", timeout=10).text == "echo"
    first_pid = reply["pid"]
    first_time = st["applications"]["greet"]["last_deployed_time_s"]

    # the same file again: nothing changes
    ok("deploy", path, "--namespace", cl.ns, cwd=project)
    assert app_states(cl.ns) == {"greet": "RUNNING", "echo": "RUNNING"}
    assert status(cl.ns)["applications"]["greet"]["last_deployed_time_s"] == first_time
    assert httpx.get(f"{cl.url}/greet", timeout=10).json()["pid"] == first_pid

    # applied config, as given
    shown = list(yaml.safe_load_all(ok("config", "--namespace", cl.ns)))
    assert [d["name"] for d in shown] == ["greet", "echo"]
    assert shown[0]["deployments"] == [{"name": "Greeter", "num_replicas": 1, "user_config": {"greeting": "hi"}}]
    assert yaml.safe_load(ok("config", "--namespace", cl.ns, "-n", "echo"))["import_path"] == "greetapp:echo_app"

    # 1 -> 2 replicas and a new user_config: the running replica is reconfigured in place
    changed = write_config(project, "two-changed.yaml", {"num_replicas": 2, "user_config": {"greeting": "hey"}})
    ok("deploy", changed, "--namespace", cl.ns, cwd=project)
    wait_for(lambda: httpx.get(f"{cl.url}/greet", timeout=10).json()["greeting"] == "hey", timeout=30,
             what="the new user_config")
    pids = greeter_pids(cl, 2)
    assert first_pid in pids, "the running replica was replaced instead of reconfigured in place"
    wait_for(lambda: status(cl.ns)["applications"]["greet"]["deployments"]["Greeter"]["replica_states"]
             == {"RUNNING": 2}, timeout=30, what="2 RUNNING replicas")
    assert all(httpx.get(f"{cl.url}/greet", timeout=10).json()["greeting"] == "hey" for _ in range(6))
    assert yaml.safe_load_all(ok("config", "--namespace", cl.ns)).__next__()["deployments"][0]["num_replicas"] == 2

    # an application left out of the file is removed, as in Ray
    ok("deploy", write_config(project, "greet-only.yaml", {"num_replicas": 2, "user_config": {"greeting": "hey"}},
                              apps="greet"), "--namespace", cl.ns, cwd=project)
    wait_for(lambda: app_states(cl.ns) == {"greet": "RUNNING"}, timeout=30, what="echo removed")
    assert httpx.get(f"{cl.url}/echo", timeout=10).status_code == 404
    assert first_pid in greeter_pids(cl, 2)  # the unchanged application was left alone


def test_a_bad_config_is_refused_naming_the_file_and_field(cl: Cluster, project: str) -> None:
    before = app_states(cl.ns)
    bad = os.path.join(project, "bad.yaml")
    with open(bad, "w") as f:
        yaml.safe_dump({"applications": [{"name": "x", "import_path": "greetapp:greeter",
                                          "deployments": [{"name": "Greeter", "num_replicas": "two"}]}]}, f)
    r = cli("deploy", bad, "--namespace", cl.ns, cwd=project)
    assert r.returncode != 0
    assert "bad.yaml" in r.stderr and "applications[0].deployments[0].num_replicas" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout and len(r.stderr.strip().splitlines()) == 1
    with open(bad, "w") as f:
        f.write("applications: [name: x\n")
    r = cli("deploy", bad, "--namespace", cl.ns, cwd=project)
    assert r.returncode != 0 and "bad.yaml" in r.stderr and "Traceback" not in r.stderr
    r = cli("deploy", os.path.join(project, "missing.yaml"), "--namespace", cl.ns)
    assert r.returncode != 0 and "missing.yaml" in r.stderr
    assert app_states(cl.ns) == before


def test_an_application_that_does_not_import_fails_alone(cl: Cluster, project: str) -> None:
    path = os.path.join(project, "broken.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"applications": [
            {"name": "greet", "route_prefix": "/greet", "import_path": "greetapp:greeter"},
            {"name": "broken", "route_prefix": "/broken", "import_path": "no_such_module_here:app"},
        ]}, f)
    ok("deploy", path, "--namespace", cl.ns, cwd=project)
    wait_for(lambda: app_states(cl.ns).get("broken") == "DEPLOY_FAILED", timeout=60, what="broken DEPLOY_FAILED")
    assert "no_such_module_here" in status(cl.ns)["applications"]["broken"]["message"]
    wait_for(lambda: app_states(cl.ns).get("greet") == "RUNNING", timeout=60, what="greet RUNNING")
    assert httpx.get(f"{cl.url}/greet", timeout=10).status_code == 200


DRIVER = '''
import sys
import flotilla
from flotilla import serve

flotilla.init(address="auto", namespace=sys.argv[1])
print(serve.get_app_handle("greet").remote(None).result()["greeting"], flush=True)
print(serve.status().applications["greet"].status.value, flush=True)

@serve.deployment(ray_actor_options={"num_cpus": 0.25})
def mine(request):
    return "from a driver"

serve.run(mine.bind(), name="driver-app", route_prefix="/mine")
print("deployed", flush=True)
'''


def test_drivers_attach_and_the_cluster_outlives_them(cl: Cluster, project: str) -> None:
    ok("deploy", write_config(project, "greet-only2.yaml", apps="greet"), "--namespace", cl.ns, cwd=project)
    wait_for(lambda: app_states(cl.ns) == {"greet": "RUNNING"}, timeout=60, what="greet RUNNING")
    script = os.path.join(project, "driver.py")
    with open(script, "w") as f:
        f.write(DRIVER)
    r = subprocess.run([sys.executable, script, cl.ns], capture_output=True, text=True, timeout=90, cwd=project)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["hi", "RUNNING", "deployed"]
    # the driver exited: its application and the config's keep serving
    assert httpx.get(f"{cl.url}/mine", timeout=10).text == "from a driver"
    assert httpx.get(f"{cl.url}/greet", timeout=10).status_code == 200
    assert app_states(cl.ns) == {"greet": "RUNNING", "driver-app": "RUNNING"}
    # a driver killed outright leaves it running too
    p = subprocess.Popen([sys.executable, "-c", "import flotilla, sys, time\n"
                          f"flotilla.init(address='auto', namespace={cl.ns!r})\nprint('up', flush=True)\ntime.sleep(60)"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "up"
    p.kill()
    p.wait(10)
    p.stdout.close()
    assert httpx.get(f"{cl.url}/mine", timeout=10).text == "from a driver"
    # FLOTILLA_ADDRESS attaches a plain flotilla.init() too
    r = subprocess.run([sys.executable, "-c", "import flotilla; from flotilla import serve\nflotilla.init()\n"
                        "print(sorted(serve.status().applications))"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "FLOTILLA_ADDRESS": "auto", "FLOTILLA_NAMESPACE": cl.ns})
    assert r.returncode == 0 and r.stdout.strip() == "['driver-app', 'greet']", r.stderr
    # as Ray's: a config replaces the config's applications, not those a driver deployed
    ok("deploy", write_config(project, "echo-only3.yaml", apps="echo"), "--namespace", cl.ns, cwd=project)
    wait_for(lambda: app_states(cl.ns) == {"echo": "RUNNING", "driver-app": "RUNNING"}, timeout=60,
             what="greet replaced by echo, driver-app kept")
    assert httpx.get(f"{cl.url}/mine", timeout=10).text == "from a driver"
    assert httpx.delete(f"http://127.0.0.1:{cl.rest_port}/api/serve/applications/", timeout=60).status_code == 200
    wait_for(lambda: app_states(cl.ns) == {}, timeout=60, what="every application deleted")


def test_errors_are_one_line_with_a_nonzero_exit(project: str) -> None:
    ns = f"none-{secrets.token_hex(3)}"
    for args in (["status", "--namespace", ns], ["deploy", write_config(project, "any.yaml"), "--namespace", ns],
                 ["config", "--namespace", ns], ["shutdown", "-y", "--namespace", ns]):
        r = cli(*args)
        assert r.returncode != 0 or args[0] == "shutdown", args  # as `serve shutdown`: nothing to stop is no error
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"flotilla start --namespace {ns}" in r.stderr, r.stderr
    assert "nothing to shut down" in r.stderr
    r = cli("status", "-a", f"http://127.0.0.1:{free_port()}")
    assert r.returncode != 0 and "no flotilla cluster answers" in r.stderr
    r = subprocess.run([sys.executable, "-c", f"import flotilla\nflotilla.init(address='auto', namespace={ns!r})"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "ConnectionError" in r.stderr and "flotilla start" in r.stderr


def test_two_namespaces_side_by_side_stay_isolated(cl: Cluster, project: str) -> None:
    other = start_cluster(f"cli2-{secrets.token_hex(3)}")
    try:
        assert other.keeper != cl.keeper
        ok("deploy", write_config(project, "echo-only.yaml", apps="echo"), "--namespace", other.ns, cwd=project)
        wait_for(lambda: app_states(other.ns) == {"echo": "RUNNING"}, timeout=60, what="echo RUNNING")
        assert "echo" not in app_states(cl.ns)
        assert httpx.get(f"{other.url}/echo", timeout=10).text == "echo"
        assert httpx.get(f"{other.url}/greet", timeout=10).status_code == 404
        code = ("import flotilla, sys; from flotilla import serve\n"
                "flotilla.init(address='auto', namespace=sys.argv[1])\nprint(sorted(serve.status().applications))")
        r = subprocess.run([sys.executable, "-c", code, other.ns], capture_output=True, text=True, timeout=60)
        assert r.stdout.strip() == "['echo']", r.stderr
        assert record(other.ns)["session_dir"] != record(cl.ns)["session_dir"]
        assert cli("start", "--namespace", other.ns).returncode != 0  # one cluster per namespace
    finally:
        stop_cluster(other)


def test_build_writes_a_config_that_deploys(cl: Cluster, project: str) -> None:
    out = os.path.join(project, "built.yaml")
    ok("build", "greetapp:greeter", "-o", out, cwd=project)
    with open(out) as f:
        built = yaml.safe_load(f)
    app = built["applications"][0]
    assert app["import_path"] == "greetapp:greeter" and app["route_prefix"] == "/"
    assert app["deployments"][0]["name"] == "Greeter"
    assert app["deployments"][0]["ray_actor_options"]["num_cpus"] == 0.5
    ok("deploy", out, "--namespace", cl.ns, cwd=project)
    wait_for(lambda: app_states(cl.ns) == {"app1": "RUNNING"}, timeout=60, what="the built config RUNNING")
    assert httpx.get(f"{cl.url}/", timeout=10).json()["greeting"] == "hello"
    r = cli("build", "greetapp:nothing", cwd=project)
    assert r.returncode != 0 and "greetapp:nothing" in r.stderr and "Traceback" not in r.stderr


def test_run_serves_a_config_file_in_the_foreground(project: str) -> None:
    port = free_port()
    path = write_config(project, "run.yaml", apps="both", port=port)
    p = subprocess.Popen([sys.executable, "-m", "flotilla", "run", path], cwd=project, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "FLOTILLA_ADDRESS": ""})
    try:
        assert p.stdout is not None
        lines = [p.stdout.readline() for _ in range(3)]
        assert any(f"http://127.0.0.1:{port}/greet" in line for line in lines), lines
        assert any(line.startswith("Dashboard: http://127.0.0.1:") for line in lines), lines
        board = next(line for line in lines if line.startswith("Dashboard: ")).split()[1]
        assert httpx.get(f"{board}/api/flotilla/dashboard/", timeout=10).json()["applications"].keys() == {"greet", "echo"}
        assert httpx.get(f"http://127.0.0.1:{port}/echo", timeout=10).text == "echo"
        tree = descendants(p.pid)
        assert tree
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
        wait_for(lambda: not alive(tree), timeout=30, what="no process left after flotilla run")
    finally:
        _reap(p)


def test_run_of_a_config_keeps_serving_the_applications_that_deploy(project: str) -> None:
    """As `serve run config.yaml`: one application failing leaves the others serving."""
    port = free_port()
    path = os.path.join(project, "one-bad.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"http_options": {"port": port}, "applications": [
            {"name": "greet", "route_prefix": "/greet", "import_path": "greetapp:greeter"},
            {"name": "bad", "route_prefix": "/bad", "import_path": "greetapp:nothing"}]}, f)
    env = {**os.environ, "FLOTILLA_ADDRESS": ""}
    with foreground(path, cwd=project, serving_at=f"http://127.0.0.1:{port}/greet", env=env) as p:
        assert httpx.get(f"http://127.0.0.1:{port}/greet", timeout=10).json()["greeting"] == "hello"
    assert "Application 'bad' failed to deploy" in p.errors  # type: ignore[attr-defined]


def test_shutdown_leaves_no_process_and_frees_the_ports(project: str) -> None:
    c = start_cluster(f"cli3-{secrets.token_hex(3)}")
    try:
        ok("deploy", write_config(project, "sd.yaml", apps="echo"), "--namespace", c.ns, cwd=project)
        wait_for(lambda: app_states(c.ns) == {"echo": "RUNNING"}, timeout=60, what="echo RUNNING")
        tree = descendants(c.keeper) | {c.keeper}
        assert len(tree) >= 5  # keeper, head, zygote, proxy, replica
        r = cli("shutdown", "--namespace", c.ns, input="n\n")  # asks first
        assert r.returncode != 0 and httpx.get(f"{c.url}/echo", timeout=10).text == "echo"
        assert "Cluster" in ok("shutdown", "-y", "--namespace", c.ns)
        wait_for(lambda: not alive(tree), timeout=30, what="every process of the cluster gone")
        import socket

        for port in (c.http_port, c.rest_port):  # free for a new listener (as servers bind: SO_REUSEADDR)
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                s.listen()
        from flotilla._private import cluster

        assert cluster.find(c.ns) is None
        assert not os.path.exists(cluster.record_path(c.ns))
    finally:
        stop_cluster(c)


def test_status_json_api_matches_the_cli(cl: Cluster) -> None:
    data = httpx.get(f"{cl.rest}/api/flotilla/status/", timeout=10).json()
    assert data == json.loads(json.dumps(status(cl.ns)))


def test_run_on_a_running_cluster_deletes_only_what_it_deployed(cl: Cluster, project: str) -> None:
    ok("deploy", write_config(project, "echo-kept.yaml", apps="echo"), "--namespace", cl.ns, cwd=project)
    wait_for(lambda: app_states(cl.ns) == {"echo": "RUNNING"}, timeout=60, what="echo RUNNING")
    with foreground("greetapp:greeter", "--name", "fg", "--route-prefix", "/fg", "--namespace", cl.ns,
                    cwd=project, serving_at=f"{cl.url}/fg"):
        assert httpx.get(f"{cl.url}/fg", timeout=10).json()["greeting"] == "hello"
    assert app_states(cl.ns) == {"echo": "RUNNING"}  # its own application went, the cluster stays
    assert httpx.get(f"{cl.url}/echo", timeout=10).text == "echo"


def test_run_passes_key_value_arguments_to_an_application_builder(cl: Cluster, project: str) -> None:
    """As `serve run module:builder key=value`."""
    with foreground("greetapp:make", "greeting=from the cli", "--name", "built", "--route-prefix", "/built",
                    "--namespace", cl.ns, cwd=project, serving_at=f"{cl.url}/built"):
        assert httpx.get(f"{cl.url}/built", timeout=10).json()["greeting"] == "from the cli"
    r = cli("run", "greetapp:greeter", "greeting=x", "--namespace", cl.ns, cwd=project)
    assert r.returncode != 0 and "builder" in r.stderr
    r = cli("run", "greetapp:make", "no-equals-sign", "--namespace", cl.ns, cwd=project)
    assert r.returncode == 1 and "Invalid application argument 'no-equals-sign', must be of the form '<key>=<val>'." \
        in r.stderr, r.stderr  # Ray's words


def test_deploy_takes_an_import_path_with_builder_arguments(cl: Cluster, project: str) -> None:
    """As `serve deploy module:builder key=value`: one application, "default" at "/"."""
    out = ok("deploy", "greetapp:make", "greeting=deployed", "--namespace", cl.ns, cwd=project)
    assert "default" in out
    wait_for(lambda: app_states(cl.ns) == {"default": "RUNNING"}, timeout=60, what="default RUNNING")
    assert httpx.get(f"{cl.url}/", timeout=10).json()["greeting"] == "deployed"
    for missing in ("no-such-file.yaml", "missing.yaml"):
        r = cli("deploy", missing, "--namespace", cl.ns, cwd=project)
        assert r.returncode != 0 and "no such file" in r.stderr
    # Ray's dotted form (package.module.attribute) too, and Ray's words for the request sent
    out = ok("deploy", "greetapp.greeter", "--namespace", cl.ns, cwd=project)
    assert out.startswith("Sent deploy request successfully.\n"), out
    wait_for(lambda: httpx.get(f"{cl.url}/", timeout=10).json()["greeting"] == "hello", timeout=60,
             what="the dotted import path deployed")
    # serve deploy's --name and runtime_env options, for an import path
    ok("deploy", "greetapp:greeter", "--name", "named", "--runtime-env-json",
       '{"env_vars": {"GREETER_ENV": "from-deploy"}}', "--namespace", cl.ns, cwd=project)
    wait_for(lambda: app_states(cl.ns) == {"named": "RUNNING"}, timeout=60, what="named RUNNING")
    assert httpx.get(f"{cl.url}/", timeout=10).json()["env"] == "from-deploy"


def test_deploy_imports_from_the_commands_pythonpath(cl: Cluster, tmp_path) -> None:
    lib, elsewhere = tmp_path / "lib", tmp_path / "elsewhere"
    lib.mkdir()
    elsewhere.mkdir()
    (lib / "libapp.py").write_text(
        "from flotilla import serve\n\n"
        "@serve.deployment(ray_actor_options={'num_cpus': 0.25})\n"
        "def lib(request):\n    return 'from lib'\n\napp = lib.bind()\n")
    path = tmp_path / "lib.yaml"
    path.write_text(yaml.safe_dump({"applications": [
        {"name": "lib", "route_prefix": "/lib", "import_path": "libapp:app"}]}))
    ok("deploy", str(path), "--namespace", cl.ns, cwd=str(elsewhere), env={"PYTHONPATH": str(lib)})
    wait_for(lambda: app_states(cl.ns) == {"lib": "RUNNING"}, timeout=60, what="lib RUNNING")
    assert httpx.get(f"{cl.url}/lib", timeout=10).text == "from lib"


GRPC_PROTO = """syntax = "proto3";
package clitest;
message Ping { string text = 1; }
service Echo { rpc Say(Ping) returns (Ping); }
"""
GRPC_APP = """from flotilla import serve


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class Echo:
    def Say(self, request):
        import clitest_pb2

        return clitest_pb2.Ping(text="said " + request.text)


app = Echo.bind()
"""


def test_start_with_grpc_ingress_and_deploy_a_grpc_app(tmp_path) -> None:
    grpc = pytest.importorskip("grpc")
    protoc = pytest.importorskip("grpc_tools.protoc")
    (tmp_path / "clitest.proto").write_text(GRPC_PROTO)
    assert protoc.main(["grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={tmp_path}",
                        f"--grpc_python_out={tmp_path}", str(tmp_path / "clitest.proto")]) == 0
    (tmp_path / "grpcapp.py").write_text(GRPC_APP)
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({"applications": [
        {"name": "echo", "route_prefix": "/echo", "import_path": "grpcapp:app"}]}))
    ns, gport = f"cli4-{secrets.token_hex(3)}", free_port()
    http_port, rest_port = free_port(), free_port()
    out = ok("start", "--namespace", ns, "--http-port", str(http_port), "--dashboard-port", str(rest_port),
             "--num-cpus", "2", "--grpc-port", str(gport),
             "--grpc-servicer-functions", "clitest_pb2_grpc.add_EchoServicer_to_server", cwd=str(tmp_path))
    c = Cluster(ns, http_port, rest_port, out)
    try:
        assert f"127.0.0.1:{gport}" in out
        ok("deploy", str(tmp_path / "g.yaml"), "--namespace", ns, cwd=str(tmp_path))
        wait_for(lambda: app_states(ns) == {"echo": "RUNNING"}, timeout=60, what="echo RUNNING")
        import sys as _sys

        _sys.path.insert(0, str(tmp_path))
        try:
            import clitest_pb2
            import clitest_pb2_grpc

            with grpc.insecure_channel(f"127.0.0.1:{gport}") as ch:
                reply = clitest_pb2_grpc.EchoStub(ch).Say(clitest_pb2.Ping(text="hi"), timeout=30)
            assert reply.text == "said hi"
        finally:
            _sys.path.remove(str(tmp_path))
    finally:
        stop_cluster(c)


def test_start_with_two_proxies(project: str) -> None:
    c = start_cluster(f"cli4-{secrets.token_hex(3)}", "--num-proxies", "2")
    try:
        wait_for(lambda: sum(title(p) == "flotilla::proxy" for p in descendants(c.keeper)) == 2
                 and status(c.ns)["proxies"] == {"head": "HEALTHY"}, timeout=30, what="two healthy proxies")
        ok("deploy", write_config(project, "two.yaml", apps="echo"), "--namespace", c.ns, cwd=project)
        wait_for(lambda: app_states(c.ns) == {"echo": "RUNNING"}, timeout=60, what="echo RUNNING")
        assert all(httpx.get(f"{c.url}/echo", timeout=10).text == "echo" for _ in range(20))
    finally:
        stop_cluster(c)
    assert "--num-proxies" in ok("start", "--help")


def test_run_imports_from_app_dir_and_redeploys_on_reload(cl: Cluster, tmp_path) -> None:
    """As `serve run -d DIR --reload`: the module comes from DIR, and saving a change to it
    redeploys the application."""
    app_dir = tmp_path / "code"
    app_dir.mkdir()
    (app_dir / "reloadapp.py").write_text(APP)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    with foreground("reloadapp:greeter", "-d", str(app_dir), "--reload", "--name", "rl", "--route-prefix", "/rl",
                    "--namespace", cl.ns, cwd=str(elsewhere), serving_at=f"{cl.url}/rl") as p:
        assert httpx.get(f"{cl.url}/rl", timeout=10).json()["greeting"] == "hello"
        (app_dir / "reloadapp.py").write_text(APP.replace('greeting="hello"', 'greeting="reloaded"'))
        wait_for(lambda: httpx.get(f"{cl.url}/rl", timeout=10).json()["greeting"] == "reloaded", timeout=60,
                 what="the changed code serving")
        assert p.poll() is None
    assert "rl" not in app_states(cl.ns)


def test_run_non_blocking_deploys_and_returns(cl: Cluster, project: str) -> None:
    """As `serve run --non-blocking` on a running cluster: deploys, returns, the app stays."""
    r = cli("run", "greetapp:greeter", "--non-blocking", "--name", "nb", "--route-prefix", "/nb",
            "--runtime-env-json", '{"env_vars": {"GREETER_ENV": "from-cli"}}', "--namespace", cl.ns, cwd=project)
    assert r.returncode == 0, r.stderr
    assert "ignored" not in r.stderr, r.stderr  # the running proxy's options are not asked to change
    assert app_states(cl.ns)["nb"] == "RUNNING"
    assert httpx.get(f"{cl.url}/nb", timeout=10).json() == {"greeting": "hello", "env": "from-cli",
                                                           "pid": ANY}
    r = cli("run", "greetapp:greeter", "--runtime-env-json", '{"pip": ["x"]}', "--namespace", cl.ns, cwd=project)
    assert r.returncode != 0 and "pip" in r.stderr and "env_vars and working_dir" in r.stderr
