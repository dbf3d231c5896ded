"""The dashboard's JSON endpoints on a real cluster: the snapshot, the series, replica logs,
a replica killed under load, and who may call them."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

import flotilla
from flotilla import serve
from tests.conftest import RAY_BACKEND, free_port, local_only, running_cluster, wait_for


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with running_cluster(num_cpus=4, num_gpus=2) as url:
        yield url


def get(path: str, **headers: str) -> Any:
    base = flotilla.dashboard_url()
    assert base
    req = urllib.request.Request(base + path, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
        return json.loads(body) if r.headers.get("content-type", "").startswith("application/json") else body


def status_of(path: str, method: str = "GET", **headers: str) -> int:
    req = urllib.request.Request(str(flotilla.dashboard_url()) + path, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@serve.deployment(num_replicas=2, max_ongoing_requests=8)
class Echo:
    def __call__(self, request: Any) -> str:
        print("dashboard-test: handled a request", flush=True)
        return "ok"


@serve.deployment
class Failing:
    def __call__(self, request: Any) -> str:
        raise ValueError("always")


def deployment(snap: dict[str, Any], app: str, name: str) -> dict[str, Any]:
    return dict(snap["applications"][app]["deployments"][name])


def send(url: str, n: int) -> None:
    for _ in range(n):
        with urllib.request.urlopen(url, timeout=10) as r:
            r.read()


def test_the_dashboard_runs_by_default_on_8265_or_a_free_port(url: str) -> None:
    base = flotilla.dashboard_url()
    assert base is not None and base.startswith("http://127.0.0.1:")
    page = get("/")
    assert b"flotilla" in page and b"/static/dashboard.js" in page
    assert b"function" in get("/static/dashboard.js")
    assert get("/static/dashboard.css")
    info = get("/api/flotilla/cluster/")
    assert info["dashboard_url"] == base


def test_snapshot_series_and_logs_follow_traffic(url: str) -> None:
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    send(f"{url}/echo", 200)

    def busy() -> Any:
        ts = get("/api/flotilla/timeseries/")
        rps = ts["deployments"].get("echo/Echo", {}).get("rps", [])
        return ts if any(v for v in rps) else None

    ts = wait_for(busy, timeout=15, interval=0.2, what="a sample with requests/s")
    col = ts["deployments"]["echo/Echo"]
    assert set(col) == {"rps", "p50_ms", "p99_ms", "error_rate", "queued", "running", "replicas", "target"}
    assert all(len(v) == len(ts["t"]) for v in col.values())
    assert sum(v or 0 for v in col["rps"]) * ts["interval_s"] == pytest.approx(200, rel=0.05)
    assert col["replicas"][-1] == 2 and col["target"][-1] == 2
    assert any(v is not None and v > 0 for v in col["p99_ms"])
    later = get(f"/api/flotilla/timeseries/?since={ts['t'][-1]}")
    assert all(t > ts["t"][-1] for t in later["t"])

    snap = get("/api/flotilla/dashboard/")
    assert snap["applications"]["echo"]["status"] == "RUNNING"
    assert snap["applications"]["echo"]["route_prefix"] == "/echo"
    assert snap["applications"]["echo"]["ingress"] == "Echo"
    dep = deployment(snap, "echo", "Echo")
    assert dep["status"] == "HEALTHY" and dep["target"] == 2 and dep["replica_states"] == {"RUNNING": 2}
    assert dep["config"]["max_ongoing_requests"] == 8 and dep["restarts"] == 0
    assert len(dep["replicas"]) == 2
    for r in dep["replicas"]:
        assert r["state"] == "RUNNING" and isinstance(r["pid"], int) and r["pending_reason"] is None
    assert snap["resources"]["total"]["CPU"] == 4
    assert snap["resources"]["available"]["CPU"] == 2
    assert snap["cluster"]["metrics_url"].endswith("/metrics")

    # the same figures as `serve.status()` (one source)
    st = serve.status().applications["echo"].deployments["Echo"]
    assert dep["status"] == st.status.value

    rid = dep["replicas"][0]["id"]
    log = get(f"/api/flotilla/logs/?replica={rid}&lines=50")
    assert log["replica"] == rid and log["path"].endswith(f"{rid}.log")
    assert len(log["text"].splitlines()) <= 50
    mark = log["offset"]
    send(f"{url}/echo", 40)

    def followed() -> Any:
        got = get(f"/api/flotilla/logs/?replica={rid}&offset={mark}")
        return got if "dashboard-test: handled a request" in got["text"] else None

    more = wait_for(followed, timeout=10, interval=0.1, what="new log lines after the offset")
    assert more["offset"] > mark


def test_errors_show_as_an_error_rate(url: str) -> None:
    serve.run(Failing.bind(), name="failing", route_prefix="/failing")
    for _ in range(20):
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{url}/failing", timeout=10)

    def rated() -> Any:
        col = get("/api/flotilla/timeseries/")["deployments"].get("failing/Failing", {})
        return [v for v in col.get("error_rate", []) if v]

    assert wait_for(rated, timeout=15, interval=0.2, what="a non-zero error rate") == [1.0]


def test_a_replica_killed_under_load_shows_as_restarted(url: str) -> None:
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    victim = deployment(get("/api/flotilla/dashboard/"), "echo", "Echo")["replicas"][0]
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                send(f"{url}/echo", 1)
            except OSError:
                pass

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        os.kill(victim["pid"], signal.SIGKILL)

        def replaced() -> Any:
            dep = deployment(get("/api/flotilla/dashboard/"), "echo", "Echo")
            running = [r for r in dep["replicas"] if r["state"] == "RUNNING"]
            return dep if dep["restarts"] >= 1 and len(running) == 2 and victim["id"] not in {r["id"] for r in running} else None

        dep = wait_for(replaced, timeout=30, interval=0.2, what="the killed replica replaced")
    finally:
        stop.set()
        for t in threads:
            t.join()
    death = dep["recent_deaths"][-1]
    assert death["id"] == victim["id"] and death["pid"] == victim["pid"]
    assert ("actor died" if RAY_BACKEND else "killed by signal 9 (SIGKILL)") in death["reason"], death
    assert time.time() - death["time_s"] < 60
    assert f"replica {victim['id']} ready" in get(f"/api/flotilla/logs/?replica={victim['id']}&lines=200")["text"]


def test_unknown_replica_and_bad_parameters(url: str) -> None:
    assert status_of("/api/flotilla/logs/?replica=nope") == 404
    assert status_of("/api/flotilla/timeseries/?since=yesterday") == 400
    assert status_of("/static/nothing.js") == 404


def test_a_web_page_elsewhere_cannot_change_the_cluster(url: str) -> None:
    # A browser sends Origin with a cross-site POST; without it (curl, the CLI) it is allowed.
    assert status_of("/api/flotilla/shutdown/", "POST", Origin="http://evil.example") == 403
    assert status_of("/api/serve/applications/", "DELETE", Origin="http://evil.example") == 403
    assert get("/api/flotilla/dashboard/")["applications"] is not None  # still up
    # reading is still allowed from anywhere on loopback (a GET changes nothing)
    assert status_of("/api/flotilla/dashboard/", Origin="http://evil.example") == 200


@serve.deployment(ray_actor_options={"num_gpus": 1})
class OnGpu:
    def __call__(self, request: Any) -> str:
        return "gpu"


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 3})
class Big:
    def __call__(self, request: Any) -> str:
        return "big"


@local_only("GPU ids and pending replicas are this machine's resource pool")
def test_gpu_ids_and_why_a_replica_is_pending(url: str) -> None:
    serve.run(OnGpu.bind(), name="gpu", route_prefix="/gpu")
    serve.run(Big.bind(), name="big", route_prefix="/big", _blocking=False)

    def pending() -> Any:
        snap = get("/api/flotilla/dashboard/")
        reps = deployment(snap, "big", "Big")["replicas"] if "big" in snap["applications"] else []
        return snap if any(r["state"] == "PENDING" for r in reps) else None

    snap = wait_for(pending, timeout=20, interval=0.2, what="a pending replica")
    gpu_rep = deployment(snap, "gpu", "OnGpu")["replicas"][0]
    assert len(gpu_rep["gpu_ids"]) == 1
    gpus = {g["id"]: g for g in snap["resources"]["gpus"]}
    assert set(gpus) == {0, 1}
    used = gpus[gpu_rep["gpu_ids"][0]]
    assert used["free"] == 0 and used["replicas"] == [gpu_rep["id"]]
    big = deployment(snap, "big", "Big")
    waiting = [r for r in big["replicas"] if r["state"] == "PENDING"]
    assert len(waiting) == 1 and "CPU" in waiting[0]["pending_reason"], waiting
    assert "cannot be scheduled" in big["message"]


def test_traffic_splits_are_shown(url: str) -> None:
    serve.run(Echo.bind(), name="blue", route_prefix="/blue")
    serve.run(Echo.bind(), name="green", route_prefix="/green")
    serve.set_traffic("colors", {"blue": 0.9, "green": 0.1})
    try:
        split = get("/api/flotilla/dashboard/")["traffic"]["colors"]
        assert split["traffic"] == {"blue": 0.9, "green": 0.1} and split["route_prefix"] == "/colors"
    finally:
        serve.delete_traffic("colors")


@local_only("dashboard options of a private local cluster")
def test_include_dashboard_false_and_a_taken_port() -> None:
    flotilla.shutdown()
    try:
        flotilla.init(num_cpus=1, include_dashboard=False)
        assert flotilla.dashboard_url() is None
        flotilla.shutdown()
        port = free_port()
        flotilla.init(num_cpus=1, dashboard_port=port)
        assert flotilla.dashboard_url() == f"http://127.0.0.1:{port}"
        flotilla.shutdown()
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", port))
            taken.listen()
            with pytest.raises(RuntimeError, match=f"{port}"):
                flotilla.init(num_cpus=1, dashboard_port=port)
    finally:
        flotilla.shutdown()
