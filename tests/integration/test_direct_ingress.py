"""Direct ingress: replicas accept HTTP on a shared port, with no proxy process."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from flotilla import serve
from flotilla._private.client import Runtime
from flotilla.serve.exceptions import ConfigError
from tests.conftest import alive, descendants, local_only, running_cluster, wait_for

pytestmark = [pytest.mark.slow, local_only("direct ingress shares this machine's listening socket")]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with running_cluster({"direct_ingress": True}, num_cpus=4) as url:
        yield url


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.5})
class Direct:
    async def __call__(self, request):
        if request.url.path.endswith("/fail"):
            raise RuntimeError("boom")
        return {"pid": os.getpid(), "path": request.url.path, "root": request.scope["root_path"],
                "rid": serve.get_request_context().request_id}

    def ping(self):
        return "pong"


def test_replicas_serve_http_themselves(url):
    h = serve.run(Direct.bind(), name="direct", route_prefix="/d")
    pids = set()
    for _ in range(40):
        with httpx.Client(base_url=url, timeout=10) as c:  # new connections spread across replicas
            r = c.get("/d/x", headers={"X-Request-ID": "abc"})
            assert r.status_code == 200 and r.headers["x-request-id"] == "abc"
            body = r.json()
            assert body["path"] == "/d/x" and body["root"] == "/d" and body["rid"] == "abc"
            pids.add(body["pid"])
    assert len(pids) == 2
    with httpx.Client(base_url=url, timeout=10) as c:
        assert c.get("/elsewhere").status_code == 404
        assert c.get("/d/fail").status_code == 500
        assert c.get("/-/healthz").text == "success"
    # No proxy process: the head's children are the zygote, whose children are the replicas.
    head = Runtime.current().head_pid
    assert len(alive(descendants(head))) == 3
    # Handles still work, and a second HTTP app is refused (one app per port).
    assert h.ping.remote().result() == "pong"
    with pytest.raises(ConfigError, match="one HTTP application"):
        serve.run(Direct.bind(), name="second", route_prefix="/other")
    serve.run(Direct.options(name="Other").bind(), name="handles_only", route_prefix=None)
    wait_for(lambda: serve.status().applications["handles_only"].status == "RUNNING", what="handle-only app")


_api = FastAPI()


@serve.deployment
@serve.ingress(_api)
class Named:
    @_api.get("/users/{user_id}")
    def user(self, user_id: str) -> PlainTextResponse:
        from flotilla.serve.context import _get_serve_request_context

        return PlainTextResponse(_get_serve_request_context().route)


def test_a_replica_serving_http_names_requests_by_its_route_templates(url):
    serve.run(Named.bind(), name="named", route_prefix="/n")
    assert httpx.get(f"{url}/n/users/42", timeout=30).text == "/n/users/{user_id}"


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, graceful_shutdown_timeout_s=60)
class Idle:
    def __init__(self, v):
        self.v = v

    async def __call__(self, request):
        return {"v": self.v, "pid": os.getpid()}


def test_a_draining_replica_closes_an_idle_keep_alive_connection_within_seconds(url):
    """The keep-alive timeout is Ray's 90 s; a drain would wait for an idle connection that long
    (up to graceful_shutdown_timeout_s), so a draining replica closes it 5 s in."""
    serve.run(Idle.bind(1), name="idle", route_prefix="/i")
    with httpx.Client(base_url=url, timeout=30) as c:
        old = c.get("/i").json()["pid"]  # this connection now sits idle on the old replica
        serve.run(Idle.bind(2), name="idle", route_prefix="/i")
        wait_for(lambda: not alive({old}), timeout=20, what="the old replica gone though a connection idles on it")
        assert c.get("/i").json()["v"] == 2  # the client reconnects to the new one
