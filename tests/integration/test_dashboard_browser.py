"""The dashboard in a real headless Chromium: an application RUNNING, a chart with requests/s,
a replica's log, and a replica killed under load shown as restarted."""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

import flotilla
from flotilla import serve
from tests import browser
from tests.conftest import RAY_BACKEND, running_cluster, wait_for

pytestmark = pytest.mark.skipif(bool(browser.missing()), reason=f"no browser: {browser.missing()}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with running_cluster(num_cpus=4) as url:
        yield url


@pytest.fixture(scope="module")
def page(cluster: str) -> Iterator[Any]:
    with browser.chrome() as driver:
        driver.set_page_load_timeout(20)
        yield driver


@serve.deployment(num_replicas=2)
class Greeter:
    def __call__(self, request: Any) -> str:
        print("greeter: said hello", flush=True)
        return "hello"


def js(page: Any, script: str) -> Any:
    return page.execute_script(script)


def text(page: Any, selector: str) -> str | None:
    return js(page, f"const e = document.querySelector({selector!r}); return e ? e.textContent.trim() : null;")


class Load:
    """Requests to `url` from two threads until stopped; counts failures."""

    def __init__(self, url: str) -> None:
        self.url, self.stop, self.sent = url, threading.Event(), 0
        self.threads = [threading.Thread(target=self._run) for _ in range(2)]

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=10) as r:
                    r.read()
                self.sent += 1
            except OSError:
                pass

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def test_the_page_shows_the_app_its_traffic_and_a_replica_log(cluster: str, page: Any) -> None:
    serve.run(Greeter.bind(), name="greeter", route_prefix="/greet")
    page.get(str(flotilla.dashboard_url()) + "/")
    wait_for(lambda: text(page, '[data-app="greeter"] .app-status') == "RUNNING", timeout=20,
             what="the application shown RUNNING")
    assert text(page, '#conn-status') == "live"
    with Load(f"{cluster}/greet"):
        chart = '[data-deployment="greeter/Greeter"] svg.chart[data-series="rps"]'
        top = wait_for(lambda: float(js(page, f"return document.querySelector({chart!r})?.dataset.max || 0")) or None,
                       timeout=20, interval=0.2, what="a requests/s chart above zero")
    assert top > 0
    rows = js(page, "return [...document.querySelectorAll('[data-deployment=\"greeter/Greeter\"] tr.replica')]"
                    ".map(r => [r.dataset.replica, r.dataset.state])")
    assert len(rows) == 2 and all(state == "RUNNING" for _, state in rows)
    rid = rows[0][0]
    page.find_element("css selector", f'button.log-btn[data-replica="{rid}"]').click()
    wait_for(lambda: rid in (text(page, "#log-title") or ""), timeout=10, what="the log panel for the replica")
    wait_for(lambda: "greeter: said hello" in (text(page, "#log-view") or ""), timeout=10,
             what="the replica's log line in the page")
    assert js(page, "return document.getElementById('log-follow').checked")
    before = (text(page, "#log-view") or "").count("said hello")
    with Load(f"{cluster}/greet"):
        wait_for(lambda: (text(page, "#log-view") or "").count("said hello") > before, timeout=10,
                 what="new log lines followed")
    page.find_element("css selector", "#log-close").click()


def test_a_replica_killed_under_load_shows_as_restarted(cluster: str, page: Any) -> None:
    serve.run(Greeter.bind(), name="greeter", route_prefix="/greet")
    page.get(str(flotilla.dashboard_url()) + "/")
    dep = '[data-deployment="greeter/Greeter"]'
    rows = wait_for(lambda: js(page, f"return [...document.querySelectorAll('{dep} tr.replica:not(.dead)')]"
                                     ".map(r => r.dataset.replica)") or None, timeout=20, what="replica rows")
    victim = rows[0]
    with urllib.request.urlopen(f"{flotilla.dashboard_url()}/api/flotilla/dashboard/", timeout=10) as r:
        snap = json.load(r)
    pid = next(r["pid"] for r in snap["applications"]["greeter"]["deployments"]["Greeter"]["replicas"] if r["id"] == victim)
    restarts = int(text(page, f"{dep} .dep-restarts") or 0)
    with Load(f"{cluster}/greet") as load:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: int(text(page, f"{dep} .dep-restarts") or 0) == restarts + 1, timeout=30, interval=0.2,
                 what="the restart counted on the page")
        wait_for(lambda: js(page, f"return document.querySelector('{dep} tr.replica.dead[data-replica=\"{victim}\"]') !== null"),
                 timeout=10, what="the killed replica listed as dead")
        wait_for(lambda: len(js(page, f"return [...document.querySelectorAll('{dep} tr.replica[data-state=\"RUNNING\"]')]")) == 2,
                 timeout=30, interval=0.2, what="two replicas running again")
    assert load.sent > 0
    dead = text(page, f'{dep} tr.replica.dead[data-replica="{victim}"]') or ""
    assert ("actor died" if RAY_BACKEND else "killed by signal 9 (SIGKILL)") in dead, dead
