"""No flotilla process outlives shutdown, the driver, or the CLI; the CLI serves an app."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import httpx
import pytest

import flotilla
from flotilla import serve
from flotilla._private.client import Runtime
from tests.conftest import RAY_BACKEND, alive, descendants, free_port, wait_for

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_shutdown_leaves_no_process():
    if flotilla.is_initialized():
        flotilla.shutdown()
    flotilla.init(num_cpus=2)
    serve.start(http_options={"port": free_port()})

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.5})
    def f():
        return os.getpid()

    h = serve.run(f.bind(), route_prefix="/")
    head = Runtime.current().process.pid
    tree = descendants(head) | {head}
    assert {h.remote().result() for _ in range(20)} <= tree
    assert len(tree) >= 5  # head, zygote, proxy, 2 replicas
    flotilla.shutdown()
    assert not flotilla.is_initialized()
    wait_for(lambda: not alive(tree), timeout=15, what="all processes gone")
    flotilla.shutdown()  # twice is fine


DRIVER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {root!r})
    from flotilla import serve
    from flotilla._private.client import Runtime

    @serve.deployment
    def f():
        return os.getpid()

    serve.start(http_options={{"port": {port}}})
    serve.run(f.bind())
    print(Runtime.current().process.pid, flush=True)
    time.sleep(120)
    """
)


def test_killed_driver_takes_everything_down(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(root=ROOT, port=free_port()))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    head = int(proc.stdout.readline())
    tree = descendants(proc.pid)
    assert head in tree and len(tree) >= 4
    proc.kill()
    proc.wait()
    wait_for(lambda: not alive(tree), timeout=15, what="all processes gone after SIGKILL of the driver")


def test_driver_exit_without_shutdown_cleans_up(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(root=ROOT, port=free_port()).replace("time.sleep(120)", "tree = 1"))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    head = int(proc.stdout.readline())
    tree = descendants(head) | {head}
    assert proc.wait(30) == 0
    wait_for(lambda: not alive(tree), timeout=15, what="all processes gone after the driver exited")


def test_cli_run_serves_and_stops_on_ctrl_c():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flotilla.cli", "run", "examples.composition:app", "--port", str(port), "--num-cpus", "2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # As in a terminal: a test run started in the background (`cmd &`) ignores SIGINT, and
        # a process started with SIGINT ignored keeps ignoring it (as `nohup` relies on).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line, line
        r = httpx.post(f"http://127.0.0.1:{port}/", json={"text": "Flotilla serves models"}, timeout=10)
        assert r.status_code == 200 and r.json()["tokens"] == ["flotilla", "serves", "models"]
        tree = descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        wait_for(lambda: not alive(tree), timeout=15, what="CLI processes gone")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_reports_a_bad_import_path():
    r = subprocess.run([sys.executable, "-m", "flotilla.cli", "run", "nope.module:app"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "could not import" in r.stderr


def test_serve_shutdown_then_run_again():
    if flotilla.is_initialized():
        flotilla.shutdown()
    flotilla.init(num_cpus=2)
    try:

        @serve.deployment(ray_actor_options={"num_cpus": 0.5})
        def hello(request):
            return "hi"

        port = free_port()
        serve.start(http_options={"port": port})
        serve.run(hello.bind())
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text == "hi"
        head = Runtime.current().head_pid
        serve.shutdown()
        assert serve.status().applications == {}
        if not RAY_BACKEND:  # (on Ray, Ray's own processes are the head's children too)
            assert len(alive(descendants(head))) == 1  # only the zygote: proxy and replicas are gone
        port = free_port()
        serve.start(http_options={"port": port})
        serve.run(hello.bind())
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text == "hi"
    finally:
        flotilla.shutdown()
