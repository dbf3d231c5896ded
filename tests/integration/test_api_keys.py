"""API keys on the proxy and direct ingress, and the metrics endpoint's token."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import flotilla
from flotilla import serve
from flotilla._private.client import Runtime
from tests.conftest import local_only, running_cluster, wait_for
from tests.integration.test_bounds import metric

pytestmark = pytest.mark.slow

KEYS = ["key-one-0123456789", "key-two-9876543210"]
ROOT = "/srv"


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with running_cluster({"api_keys": KEYS, "root_path": ROOT}, num_cpus=4) as url:
        yield url


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Counted:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: Any) -> str:
        self.calls += 1
        return "hello"

    def count(self) -> int:
        return self.calls


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def failures(reason: str, component: str = "proxy") -> float:
    return metric("flotilla_auth_failures_total", component=component, side="http", reason=reason)


def test_requests_need_a_key(url: str) -> None:
    h = serve.run(Counted.bind(), name="counted", route_prefix="/c")
    missing0, invalid0 = failures("missing"), failures("invalid")
    with httpx.Client(base_url=url + ROOT, timeout=10) as c:
        for headers in ({}, bearer("wrong-key"), {"Authorization": KEYS[0]}, {"Authorization": "Basic " + KEYS[0]}):
            r = c.get("/c", headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            r = c.post("/c", headers=headers, content=b"x" * 10_000)
            assert r.status_code == 401
        assert h.count.remote().result() == 0  # nothing refused reached the replica
        for key in KEYS:
            r = c.get("/c", headers=bearer(key))
            assert r.status_code == 200 and r.text == "hello"
        assert c.get("/-/healthz").text == "success"  # open, under root_path and outside it
        assert httpx.get(url + "/-/healthz", timeout=10).text == "success"
        assert c.get("/-/routes").status_code == 401
    assert h.count.remote().result() == 2
    wait_for(lambda: failures("missing") >= missing0 + 2 and failures("invalid") >= invalid0 + 6,
             what="auth failures in /metrics")


def test_keys_never_logged(url: str) -> None:
    """Neither the keys nor their digests appear in any log of the session."""
    from flotilla._private.frontdoor import digest

    session = Runtime.current().session_dir
    texts = []
    for path in glob.glob(os.path.join(session, "**", "*.log*"), recursive=True):
        with open(path, errors="replace") as f:
            texts.append(f.read())
    assert texts
    for key in KEYS:
        assert not any(key in t or digest(key) in t for t in texts)


def test_websocket_refused_without_a_key(url: str) -> None:
    import socket

    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /c HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 401") and b"www-authenticate: Bearer" in head.lower().replace(b"bearer", b"Bearer"), head


@local_only("direct ingress shares this machine's listening socket")
def test_env_keys_and_direct_ingress(monkeypatch: pytest.MonkeyPatch) -> None:
    """FLOTILLA_API_KEYS (read by the driver at serve.start), enforced by direct ingress."""
    monkeypatch.setenv("FLOTILLA_API_KEYS", "env-key-a, env-key-b")
    with running_cluster({"direct_ingress": True}, num_cpus=2) as url:
        serve.run(Counted.bind(), name="counted", route_prefix="/c")
        wait_for(lambda: httpx.get(url + "/-/healthz", timeout=5).status_code == 200, what="direct ingress")
        assert httpx.get(url + "/c", timeout=10).status_code == 401
        assert httpx.get(url + "/c", headers=bearer("env-key-x"), timeout=10).status_code == 401
        assert httpx.get(url + "/c", headers=bearer("env-key-b"), timeout=10).text == "hello"
        wait_for(lambda: failures("invalid", "replica") >= 1, what="direct ingress auth failures")


def test_metrics_token_beyond_loopback(tmp_path: Any) -> None:
    """FLOTILLA_METRICS_HOST=0.0.0.0: scrapes need the generated token (in the session folder,
    mode 0600); it is never printed. A cluster of its own, in a subprocess (the head takes the
    environment of the driver)."""
    if flotilla.is_initialized():
        flotilla.shutdown()
    script = textwrap.dedent("""
        import os, stat, sys, httpx, flotilla
        flotilla.init(num_cpus=1)
        from flotilla._private.client import Runtime
        rt = Runtime.current()
        url = flotilla.metrics_url()
        path = os.path.join(rt.session_dir, "metrics_token")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        token = open(path).read().strip()
        r = httpx.get(url, timeout=10)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        assert httpx.get(url, headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401
        r = httpx.get(url, headers={"Authorization": "Bearer " + token}, timeout=10)
        assert r.status_code == 200 and "flotilla" in r.text
        logs = ""
        for root, _, files in os.walk(os.path.join(rt.session_dir, "logs")):
            for f in files:
                logs += open(os.path.join(root, f), errors="replace").read()
        assert token not in logs and "metrics_token" in logs, logs[-2000:]
        flotilla.shutdown()
        print("OK")
    """)
    env = {**os.environ, "FLOTILLA_METRICS_HOST": "0.0.0.0"}
    env.pop("FLOTILLA_METRICS_TOKEN", None)
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=90)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr
