"""Ray options that used to be accepted and ignored, checked on real processes: placement per
node, replica logging (level, JSON encoding, access log, folder), the proxy's root_path and
location, and `_local_testing_mode`."""

from __future__ import annotations

import asyncio
import glob
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request

from flotilla import serve
from flotilla._private.client import Runtime
from tests.conftest import RAY_BACKEND, running_cluster, wait_for

pytestmark = pytest.mark.slow

ROOT = "/serve"


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """This module's proxy is mounted under ROOT (HTTPOptions.root_path)."""
    with running_cluster({"root_path": ROOT}, num_cpus=8, num_gpus=2) as url:
        yield url


@serve.deployment
class Talker:
    async def __call__(self, word, delay: float = 0.0) -> int:
        if not isinstance(word, str):  # an HTTP request
            word = word.query_params["w"]
        if delay:
            await asyncio.sleep(delay)
        log = logging.getLogger("user.talker")
        log.debug("debug %s", word)
        logging.getLogger("ray.serve").debug("serve-debug %s", word)
        log.info("info %s", word, extra={"k1": "v1", "ray_serve_extra_fields": {"k2": "v2"}})
        log.info("marked %s", word, extra={"serve_access_log": True})  # dropped with the access log
        if word == "level?":
            return logging.getLogger("ray.serve").level
        return os.getpid()


@serve.deployment
class Outer:
    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, word: str) -> int:
        logging.getLogger("user.outer").info("outer %s", word)
        return await self.inner.remote(word)


def replica_log(app: str, deployment: str = "Talker", logs: str | None = None) -> str:
    folder = logs or os.path.join(Runtime.current().session_dir, "logs")
    return "".join(Path(p).read_text() for p in glob.glob(f"{folder}/replica_{app}_{deployment}_*.log"))


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_max_replicas_per_node_leaves_the_extra_replica_pending(url):
    h = serve.run(
        Talker.options(num_replicas=2, max_replicas_per_node=1).bind(),
        name="per_node", route_prefix=None, _blocking=False,
    )

    def one_running():
        dep = serve.status().applications["per_node"].deployments["Talker"]
        return dep.replica_states.get("RUNNING") == 1 and "max_replicas_per_node=1" in dep.message and dep

    dep = wait_for(one_running, what="one running replica and a message")
    assert dep.replica_states == {"RUNNING": 1, "STARTING": 1}
    assert ("of it on one node" if RAY_BACKEND else "this machine counts as one node") in dep.message
    assert serve.status().applications["per_node"].status == "DEPLOYING"
    assert isinstance(h.remote("hi").result(), int)


@serve.deployment
class Env:
    def __call__(self, name: str) -> str | None:
        return os.environ.get(name)


def test_placement_group_bundles_reserve_every_bundle(url):
    h = serve.run(Env.options(placement_group_bundles=[{"CPU": 1, "GPU": 1}, {"GPU": 1}]).bind(),
                  name="pg", route_prefix=None)
    if not RAY_BACKEND:  # on Ray the replica's actor has its own num_gpus (0); the bundles are its children's
        assert h.remote("CUDA_VISIBLE_DEVICES").result() == "0,1"
    # Both GPUs are held: another replica that wants one waits, and says why.
    serve.run(Env.options(ray_actor_options={"num_gpus": 1}).bind(), name="pg2", route_prefix=None, _blocking=False)
    msg = wait_for(lambda: serve.status().applications["pg2"].deployments["Env"].message, what="a message")
    assert "GPU" in msg and "cannot be scheduled" in msg


def test_default_logging_is_text_at_info_with_access_lines(url):
    h = serve.run(Talker.bind(), name="plain", route_prefix=None)
    h.remote("w0").result()
    text = wait_for(lambda: (t := replica_log("plain")).count(" -- CALL __call__ OK ") >= 1 and "info w0" in t and t,
                    what="info and access lines")
    assert "debug w0" not in text and not json_lines(text)
    # Ray Serve's lines: LEVEL <time> <app>_<deployment> <replica> <request id> -- <message>
    (info,) = [line for line in text.splitlines() if line.endswith("-- info w0")]
    (access,) = [line for line in text.splitlines() if " -- CALL __call__ OK " in line]
    for line in (info, access):
        level, _day, _time, component, replica, rid, dashes = line.split()[:7]
        assert (level, component, dashes) == ("INFO", "plain_Talker", "--") and len(replica) == 8 and rid
    assert access.endswith("ms") and access.split()[5] == info.split()[5]  # the same request


def test_json_encoding_and_debug_level(url):
    serve.run(
        Talker.options(logging_config={"encoding": "JSON", "log_level": "DEBUG"}).bind(),
        name="json", route_prefix="/json",
    )
    r = httpx.get(f"{url}{ROOT}/json?w=w1", headers={"X-Request-ID": "rid-w1"}, timeout=30)
    assert r.status_code == 200

    def logged():
        records = json_lines(replica_log("json"))
        access = [r for r in records if r.get("serve_access_log")]
        return access and any(r["message"] == "info w1" for r in records) and records

    records = wait_for(logged, what="JSON log records")
    by_message = {r["message"]: r for r in records}
    debug = by_message["debug w1"]
    assert debug["levelname"] == "DEBUG" and "name" not in debug  # as Ray's: the user's logger is not named
    assert debug["deployment"] == "json_Talker" and debug["application"] == "json"  # Ray's <app>_<deployment>
    assert debug["replica"] and debug["request_id"] == "rid-w1" and debug["route"] == "/json"
    assert debug["timestamp_ns"] > 0 and debug["component_name"] == "replica"
    assert "serve-debug w1" in by_message
    info = by_message["info w1"]
    assert (info["k1"], info["k2"]) == ("v1", "v2")  # extra= fields and ray_serve_extra_fields, as Ray's
    access = next(r for r in records if r.get("serve_access_log"))
    assert (access["route"], access["status"], access["request_id"]) == ("/json", 200, "rid-w1")
    # Nothing about this request was written as text.
    assert all(line.startswith("{") for line in replica_log("json").splitlines() if "w1" in line)


def test_access_log_off(url):
    h = serve.run(Talker.options(logging_config={"enable_access_log": False}).bind(), name="quiet", route_prefix=None)
    h.remote("a").result()
    # The replica writes access lines 0.1 s after a request; "b" logs only after 0.3 s on the
    # same event loop, so once "info b" is in the file, "a"'s access line would be too.
    h.remote("b", delay=0.3).result()
    text = wait_for(lambda: "info b" in (t := replica_log("quiet")) and t, what="info b")
    assert "info a" in text and " __call__ " not in text
    assert "marked a" not in text  # the user's records marked serve_access_log go too, as in Ray


def test_run_logging_config_applies_to_deployments_without_their_own(url):
    inner = Talker.options(logging_config={"encoding": "TEXT", "log_level": "DEBUG"}).bind()
    h = serve.run(Outer.bind(inner), name="layered", route_prefix=None, logging_config={"encoding": "JSON"})
    h.remote("w2").result()
    outer = wait_for(lambda: [r for r in json_lines(replica_log("layered", "Outer")) if r["message"] == "outer w2"],
                     what="Outer's JSON line")
    assert outer[0]["deployment"] == "layered_Outer"
    text = wait_for(lambda: "info w2" in (t := replica_log("layered")) and t, what="Talker's text line")
    assert "debug w2" in text and not json_lines(text)


def test_logging_config_changes_in_place(url):
    h = serve.run(Talker.bind(), name="relevel", route_prefix=None)
    pid = h.remote("x1").result()
    assert h.remote("level?").result() == logging.INFO  # Ray's replicas set the serve logger's level
    h = serve.run(Talker.options(logging_config={"log_level": "DEBUG"}).bind(), name="relevel", route_prefix=None)
    assert h.remote("x2").result() == pid  # same replica, reconfigured
    assert h.remote("level?").result() == logging.DEBUG
    text = wait_for(lambda: "info x2" in (t := replica_log("relevel")) and t, what="info x2")
    assert "debug x1" not in text and "debug x2" in text


def test_logs_dir(url, tmp_path):
    h = serve.run(Talker.options(logging_config={"logs_dir": str(tmp_path)}).bind(), name="elsewhere", route_prefix=None)
    h.remote("w3").result()
    wait_for(lambda: "info w3" in replica_log("elsewhere", logs=str(tmp_path)), what="log file in logs_dir")
    assert replica_log("elsewhere") == ""


api = FastAPI()


@api.get("/hello")
def hello(request: Request):
    return {"root_path": request.scope.get("root_path"), "path": request.url.path}


@serve.deployment
@serve.ingress(api)
class Hello:
    pass


@serve.deployment
class Info:
    async def __call__(self, request):
        return {"path": request.url.path, "root_path": request.scope.get("root_path")}


def test_root_path_mounts_every_route_under_it(url):
    serve.run(Hello.bind(), name="hello", route_prefix="/")
    serve.run(Info.bind(), name="info", route_prefix="/info")
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.get(f"{ROOT}/hello")
        assert r.status_code == 200 and r.json() == {"root_path": ROOT, "path": f"{ROOT}/hello"}
        r = c.get(f"{ROOT}/info/x")
        assert r.json() == {"path": f"{ROOT}/info/x", "root_path": f"{ROOT}/info"}
        assert c.get(f"{ROOT}/-/healthz").text == "success"
        assert c.get(f"{ROOT}/-/routes").json() == {"/": "hello", "/info": "info"}
        # As Ray: a reverse proxy in front strips the root, so a request without it is the app's
        # path under the root (links and FastAPI's docs point through the proxy).
        r = c.get("/info/x")
        assert r.json() == {"path": f"{ROOT}/info/x", "root_path": f"{ROOT}/info"}
        r = c.get("/hello")
        assert r.status_code == 200 and r.json() == {"root_path": ROOT, "path": f"{ROOT}/hello"}
        assert c.get("/-/healthz").text == "success"


def test_local_testing_mode_runs_normally_and_warns_once(url):
    with pytest.warns(UserWarning, match="_local_testing_mode") as caught:
        h = serve.run(Talker.bind(), name="ltm", route_prefix=None, _local_testing_mode=True)
    assert len([w for w in caught if "_local_testing_mode" in str(w.message)]) == 1
    assert isinstance(h.remote("z").result(), int)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        serve.run(Talker.bind(), name="ltm", route_prefix=None, _local_testing_mode=True)


def test_start_logging_config_applies_to_the_proxy(url, tmp_path):
    port = int(url.rsplit(":", 1)[1])
    serve.shutdown()
    try:
        with pytest.warns(UserWarning, match=r"serve\.start\(logging_config=\.\.\.\).*head"):
            serve.start(http_options={"root_path": ROOT, "port": port},
                        logging_config={"encoding": "JSON", "logs_dir": str(tmp_path)})
        serve.run(Talker.bind(), name="proxied", route_prefix="/p")
        r = httpx.get(f"{url}{ROOT}/p?w=p1", headers={"X-Request-ID": "rid-p1"}, timeout=30)
        assert r.status_code == 200
        log = tmp_path / "proxy.log"

        def access_line():
            lines = json_lines(log.read_text()) if log.exists() else []
            return [x for x in lines if x.get("request_id") == "rid-p1"]

        line = wait_for(access_line, what="the proxy's JSON access line")[0]
        assert line["serve_access_log"] and line["component_name"] == "proxy" and line["status"] == 200
        assert (line["method"], line["route"]) == ("GET", f"{ROOT}/p")
    finally:
        serve.shutdown()
        serve.start(http_options={"root_path": ROOT, "port": port})


def test_a_second_start_with_another_port_warns_that_it_is_ignored(url, caplog: pytest.LogCaptureFixture):
    port = int(url.rsplit(":", 1)[1])
    with caplog.at_level(logging.WARNING, logger="flotilla"):
        serve.start(http_options={"root_path": ROOT, "port": port})
        assert "ignored" not in caplog.text
        serve.start(http_options={"port": port + 1})
    assert f"ignored port={port + 1}" in caplog.text and f":{port}" in caplog.text
    r = httpx.get(f"{url}{ROOT}/-/healthz", timeout=30)  # the proxy answers; no route yet, as Ray's
    assert (r.status_code, r.text) == (503, "Route table is not populated yet.")


def test_location_disabled_starts_no_proxy(url):
    port = int(url.rsplit(":", 1)[1])
    serve.shutdown()
    try:
        serve.start(http_options={"location": "Disabled", "port": port})
        h = serve.run(Talker.bind(), name="nohttp", route_prefix="/x")
        assert isinstance(h.remote("q").result(), int)
        assert serve.status().proxies == {}
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/x", timeout=5)
        serve.shutdown()
        serve.start(proxy_location="Disabled")
        serve.run(Talker.bind(), name="nohttp2", route_prefix="/y")
        assert serve.status().proxies == {}
        serve.shutdown()
        serve.start("Disabled", {"port": port})  # Ray 2's order: proxy_location, http_options
        serve.run(Talker.bind(), name="nohttp3", route_prefix="/z")
        assert serve.status().proxies == {}
    finally:
        serve.shutdown()
        serve.start(http_options={"root_path": ROOT, "port": port})
    assert httpx.get(f"{url}{ROOT}/-/healthz", timeout=30).text == "Route table is not populated yet."
