"""Canary rollouts (issue #13): `serve.start_canary` moves a split route's traffic from an old
application to a new one in steps, promoted while the new one stays within bounds, rolled back
when it does not; under load, with every request accounted for."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from flotilla import serve
from tests.conftest import running_cluster, wait_for
from tests.integration.test_bounds import metric
from tests.load import Load, running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with running_cluster(num_cpus=8) as url:
        yield url


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class Version:
    def __init__(self, name: str, fail: bool = False, delay_s: float = 0.0) -> None:
        self.name, self.fail, self.delay_s = name, fail, delay_s

    async def __call__(self, request: object) -> str:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError(f"{self.name} is broken")
        return self.name


def deploy(name: str, **kwargs: object) -> None:
    serve.run(Version.bind(name, **kwargs), name=name, route_prefix=f"/{name}")


def canary(name: str):  # type: ignore[no-untyped-def]
    return serve.status().traffic[name].canary


def test_a_healthy_new_version_is_promoted_step_by_step(url: str) -> None:
    deploy("v1")
    deploy("v2")
    # Both versions are the same code: this test is about stepping, so latency noise on a busy
    # machine (one slow request is the p95 of a 10-request step) must not roll it back.
    serve.start_canary("promote", "v1", "v2", steps=(0.2, 0.5, 1.0), hold_s=1.0, min_requests=10,
                       p95_slack_ms=10_000.0)
    c = canary("promote")
    assert (c.phase, c.step, c.share, c.old, c.new) == ("RUNNING", 1, 0.2, "v1", "v2")
    http = Load.http(url, "/promote", threads=4, max_s=60)
    seen: list[float] = []

    def promoted() -> bool:
        c = canary("promote")
        if not seen or seen[-1] != c.share:
            seen.append(c.share)
        assert c.phase != "ROLLED_BACK", f"rolled back: {c.reason} ({http.report()})"
        return c.phase == "PROMOTED"

    with running(http):
        wait_for(promoted, timeout=40, what=lambda: f"the canary promoted ({http.report()}; shares seen {seen}; {canary('promote')})")
        http.wait_answers(lambda a: a == "v2", n=50)
    assert http.failed == 0 and http.stuck == 0, http.report()
    assert seen[0] == 0.2 and seen[-1] == 1.0 and seen == sorted(seen), seen  # never back
    status = serve.status().traffic["promote"]
    assert status.traffic == {"v1": 0.0, "v2": 1.0}
    assert "promoted" in status.canary.reason and status.canary.new_figures["requests"] >= 10
    assert {"v1", "v2"} <= set(http.values)
    assert metric("flotilla_canary_decisions_total", split="promote", decision="step") == 2
    assert metric("flotilla_canary_decisions_total", split="promote", decision="promote") == 1


def test_a_new_version_that_fails_is_rolled_back_and_the_old_share_loses_nothing(url: str) -> None:
    deploy("good")
    deploy("bad", fail=True)
    serve.start_canary("rollback", "good", "bad", steps=(0.2, 0.5, 1.0), hold_s=30.0, min_requests=10)
    http = Load.http(url, "/rollback", threads=4, max_s=60)
    with running(http):
        wait_for(lambda: canary("rollback").phase == "ROLLED_BACK", timeout=30,
                 what=lambda: f"the canary rolled back ({http.report()})")
        http.wait_ok(100)  # (requests already sent to "bad" have come back)
        failed_after_rollback = http.failed
        http.wait_ok(200)
    c = canary("rollback")
    assert c.share == 0.0 and "error rate" in c.reason and "rolled back at 20%" in c.reason, c.reason
    assert c.new_figures["errors"] >= 10 and c.old_figures["errors"] == 0
    assert serve.status().traffic["rollback"].traffic == {"good": 1.0, "bad": 0.0}
    # Every failure was the broken version's (a 500 from "bad"); the old version's share lost nothing.
    assert set(http.failures) == {"HTTP 500"} and http.failed == failed_after_rollback, http.report()
    wait_for(lambda: metric("ray_serve_num_http_requests_total", application="bad", status_code="500")
             == http.failed, what="the bad version's 500s counted under it")
    assert metric("ray_serve_num_http_error_requests_total", application="good") == 0
    assert set(http.values) == {"good"}
    assert metric("flotilla_canary_decisions_total", split="rollback", decision="rollback") == 1


def test_a_slower_new_version_is_rolled_back_on_p95(url: str) -> None:
    deploy("fast")
    deploy("slow", delay_s=0.2)
    serve.start_canary("latency", "fast", "slow", steps=(0.5, 1.0), hold_s=30.0, min_requests=10,
                       max_p95_ratio=2.0)
    http = Load.http(url, "/latency", threads=4, max_s=60)
    with running(http):
        wait_for(lambda: canary("latency").phase == "ROLLED_BACK", timeout=30,
                 what=lambda: f"the canary rolled back ({http.report()})")
    assert http.failed == 0, http.report()
    assert "p95 latency" in canary("latency").reason


def test_bad_canary_arguments_say_what_is_wrong(url: str) -> None:
    deploy("a")
    with pytest.raises(ValueError, match=r"bad entry: 0\.1"):
        serve.start_canary("x", "a", "b", steps=(0.5, 0.1, 1.0))
    with pytest.raises(ValueError, match="same application"):
        serve.start_canary("x", "a", "a")
    with pytest.raises(Exception, match="unknown application"):
        serve.start_canary("x", "a", "nope")
    assert "x" not in serve.status().traffic


def test_set_traffic_takes_the_weights_back(url: str) -> None:
    deploy("p")
    deploy("q")
    serve.start_canary("manual", "p", "q", hold_s=3600)
    assert canary("manual").phase == "RUNNING"
    serve.set_traffic("manual", {"p": 0.5, "q": 0.5})
    assert serve.status().traffic["manual"].canary is None
    assert serve.status().traffic["manual"].traffic == {"p": 0.5, "q": 0.5}
