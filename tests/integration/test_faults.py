"""Failures and lifecycle: crashes, health checks, constructor errors, reconfigure, updates,
max_ongoing_requests and backpressure."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import threading
import time

import httpx
import pytest

from flotilla import serve
from flotilla.exceptions import RayActorError
from flotilla.serve.exceptions import BackPressureError, RayServeException
from tests.conftest import env_vars, running_cluster, wait_for

pytestmark = pytest.mark.slow


@serve.deployment(health_check_period_s=0.2, health_check_timeout_s=1)
class Fragile:
    def __init__(self):
        self.healthy = True
        self.checks = 0
        self.fail_checks = 0

    def __call__(self):
        return os.getpid()

    def crash(self):
        os._exit(1)

    def exit(self, code):
        import sys

        sys.exit(code)

    async def interrupt(self):
        raise KeyboardInterrupt

    async def hang_then_crash(self):
        asyncio.get_running_loop().call_later(0.3, os._exit, 1)
        await asyncio.sleep(60)

    async def slow(self, s):
        await asyncio.sleep(s)
        return os.getpid()

    def set_healthy(self, v):
        self.healthy = v

    def fail_next_checks(self, n):
        self.fail_checks = n
        return self.checks

    def checks_done(self):
        return self.checks

    def check_health(self):
        self.checks += 1
        if self.fail_checks > 0:
            self.fail_checks -= 1
            raise RuntimeError("a passing failure")
        if not self.healthy:
            raise RuntimeError("unhealthy on purpose")


def _running(app):
    st = serve.status().applications.get(app)
    return st is not None and st.status == "RUNNING"


def wait_for_replacement(h, pid: int) -> None:
    """Until a replica other than `pid` answers `h`."""

    def new_pid():
        try:
            p = h.remote().result(timeout_s=5)
        except RayActorError:
            return None
        return p if p != pid else None

    wait_for(new_pid, what="a replacement replica")


def test_crashed_replica_is_replaced(url):
    h = serve.run(Fragile.bind(), name="crash", route_prefix=None)
    pid = h.remote().result()
    with pytest.raises(RayActorError):
        h.crash.remote().result(timeout_s=10)

    wait_for_replacement(h, pid)
    wait_for(lambda: _running("crash"), what="app RUNNING again")


@pytest.mark.parametrize("how", ["exit", "interrupt"])
def test_sys_exit_in_user_code_ends_the_replica_not_the_caller(url, how):
    """As a Ray actor's worker: sys.exit() (or an interrupt) in a method ends the replica, the
    caller gets ActorDiedError (not a SystemExit that would end the driver), the replica is
    replaced, and the driver's handles keep working."""
    h = serve.run(Fragile.bind(), name=f"exit-{how}", route_prefix=None)
    pid = h.remote().result(timeout_s=10)
    call = h.exit.remote(3) if how == "exit" else h.interrupt.remote()
    with pytest.raises(RayActorError) as info:
        call.result(timeout_s=10)
    assert isinstance(info.value, Exception) and not isinstance(info.value, (SystemExit, KeyboardInterrupt))

    wait_for_replacement(h, pid)


@serve.deployment(graceful_shutdown_timeout_s=0.5)
class Holder:
    def __init__(self):
        self.started = False

    async def hold(self):
        self.started = True
        await asyncio.sleep(30)

    def holding(self):
        return self.started


def test_a_request_cut_off_by_graceful_shutdown_timeout_is_an_actor_died_error(url):
    """As Ray's: a replica stopped at graceful_shutdown_timeout_s with a request still running
    fails it with ActorDiedError (a RayActorError, what retry code catches)."""
    h = serve.run(Holder.bind(), name="cutoff", route_prefix=None)
    call = h.hold.remote()
    wait_for(lambda: h.holding.remote().result(timeout_s=10), what="the call running on the replica")
    serve.delete("cutoff", _blocking=False)
    with pytest.raises(RayActorError, match=r"graceful_shutdown_timeout_s=0\.5"):
        call.result(timeout_s=20)


def test_in_flight_request_fails_fast_when_replica_dies(url):
    h = serve.run(Fragile.bind(), name="inflight", route_prefix=None)
    t0 = time.monotonic()
    with pytest.raises(RayActorError, match="died"):
        h.hang_then_crash.remote().result(timeout_s=20)
    assert time.monotonic() - t0 < 5


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Adder:
    def __call__(self, val):
        if val == 0:
            os._exit(1)
        return val + 1


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Multiplier:
    def __call__(self, val):
        return val * 2


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Chain:
    def __init__(self, adder, multiplier):
        self.adder, self.multiplier = adder, multiplier

    async def __call__(self, x):
        return await self.multiplier.remote(self.adder.remote(x))


def test_a_chained_call_whose_upstream_replica_dies_names_both_deployments(url):
    """It was the upstream's ActorDiedError, naming neither deployment, as if the call's own
    replica had died (Ray: a RayServeException naming both)."""
    h = serve.run(Chain.bind(Adder.bind(), Multiplier.bind()), name="chain", route_prefix=None)
    assert h.remote(5).result(timeout_s=30) == 12
    with pytest.raises(RayServeException, match=r"(?s)deployment 'Multiplier'.*upstream.*deployment 'Adder'") as e:
        h.remote(0).result(timeout_s=20)
    assert "died while handling" in str(e.value)
    wait_for(lambda: h.remote(2).result(timeout_s=20) == 6, timeout=30, what="the replaced Adder serving")


def test_failed_health_check_replaces_replica(url):
    h = serve.run(Fragile.bind(), name="health", route_prefix=None)
    pid = h.remote().result()
    h.set_healthy.remote(False).result()

    # The failing replica drains (as Ray Serve stops an unhealthy one by default): no call fails.
    wait_for(lambda: h.remote().result(timeout_s=10) != pid, timeout=20, what="replacement after health check")
    wait_for(lambda: _running("health"), what="RUNNING again")


def test_two_failed_health_checks_in_a_row_are_tolerated(url):
    # As Ray Serve: a replica is unhealthy after 3 failed checks in a row; a success resets the count.
    h = serve.run(Fragile.bind(), name="health-flaky", route_prefix=None)
    pid = h.remote().result()
    for _ in range(2):
        start = h.fail_next_checks.remote(2).result()
        wait_for(lambda s=start: h.checks_done.remote().result() >= s + 3, what="two failed checks, then a good one")
    assert h.remote().result() == pid
    assert serve.status().applications["health-flaky"].deployments["Fragile"].status == "HEALTHY"


def test_a_new_version_retrying_its_constructor_is_updating_not_unhealthy(url, tmp_path):
    """As Ray's status says it: while a version that has not served retries a failing
    constructor, its deployment is UPDATING (CONFIG_UPDATE_STARTED) with the error and the
    retries left, and its application DEPLOYING; it was UNHEALTHY."""
    flag = tmp_path / "fail"
    flag.touch()

    @serve.deployment(num_replicas=4, ray_actor_options={"num_cpus": 0})
    class Flaky:
        def __init__(self):
            time.sleep(0.2)
            if flag.exists():
                raise ZeroDivisionError("ctor exploded")

        def __call__(self):
            return 1

    serve._run(Flaky.bind(), name="retrying", route_prefix=None, _blocking=False)

    def retrying():
        app = serve.status().applications.get("retrying")
        d = app.deployments.get("Flaky") if app is not None else None
        return d is not None and "Retrying" in d.message and (app, d)

    app, d = wait_for(retrying, timeout=30, interval=0.02, what="a retry message")
    assert (d.status, d.status_trigger, app.status) == ("UPDATING", "CONFIG_UPDATE_STARTED", "DEPLOYING")
    assert re.search(r"A replica failed to start with exception\. Retrying \d+ more time\(s\)\. Error:\n", d.message)
    assert "ctor exploded" in d.message
    flag.unlink()
    wait_for(lambda: serve.status().applications["retrying"].status == "RUNNING", timeout=60, what="RUNNING")
    assert serve.status().applications["retrying"].deployments["Flaky"].message == ""


def test_max_constructor_retry_count_bounds_the_attempts(url, tmp_path):
    tries = tmp_path / "tries"

    @serve.deployment(max_constructor_retry_count=2)
    class Broken:
        def __init__(self):
            with open(tries, "a") as f:
                f.write("x")
            raise ZeroDivisionError("ctor exploded")

    with pytest.raises(RuntimeError, match="failed to start 2 times in a row"):
        serve.run(Broken.bind(), name="retries", route_prefix=None)
    assert tries.read_text() == "xx"


def test_a_replica_must_pass_a_first_health_check_to_start(url):
    # As Ray Serve: a replica is not ready until its check_health() passed once after the
    # constructor; a deployment whose check always fails does not deploy.
    @serve.deployment(health_check_timeout_s=2)
    class AlwaysUnhealthy:
        def check_health(self):
            raise RuntimeError("intended to fail")

        def __call__(self):
            return 1

    with pytest.raises(RuntimeError, match="intended to fail"):
        serve.run(AlwaysUnhealthy.bind(), name="never-healthy", route_prefix=None)
    st = serve.status().applications["never-healthy"]
    assert st.status == "DEPLOY_FAILED"
    assert "health check" in st.deployments["AlwaysUnhealthy"].message


def test_a_deployment_whose_replacements_fail_their_check_stays_unhealthy(url, tmp_path):
    flag = tmp_path / "fail"

    @serve.deployment(health_check_period_s=0.2, health_check_timeout_s=1)
    class WillBeUnhealthy:
        def check_health(self):
            if flag.exists():
                raise RuntimeError("intended to fail")

        def __call__(self):
            return 1

    serve.run(WillBeUnhealthy.bind(), name="turns-unhealthy", route_prefix=None)

    def status():
        return serve.status().applications["turns-unhealthy"].deployments["WillBeUnhealthy"].status

    assert status() == "HEALTHY"
    flag.touch()
    wait_for(lambda: status() == "UNHEALTHY", what="UNHEALTHY")
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # its replacements fail their first check: never HEALTHY again
        assert status() == "UNHEALTHY"
        time.sleep(0.1)
    flag.unlink()
    wait_for(lambda: status() == "HEALTHY", timeout=30, what="HEALTHY once checks pass again")


def test_failed_health_check_drains_calls_in_flight(url):
    h = serve.run(Fragile.options(graceful_shutdown_timeout_s=30).bind(), name="health-drain", route_prefix=None)
    pid = h.remote().result()
    slow = h.slow.remote(3)
    h.set_healthy.remote(False).result()
    wait_for(lambda: h.remote().result(timeout_s=10) != pid, timeout=20, what="replacement after health check")
    assert slow.result(timeout_s=20) == pid  # answered by the replica that failed its check
    wait_for(lambda: _running("health-drain"), what="RUNNING again")


def test_constructor_failure_is_deploy_failed_with_traceback(url):
    @serve.deployment
    class Broken:
        def __init__(self):
            raise ZeroDivisionError("ctor exploded")

    with pytest.raises(RuntimeError, match="ctor exploded"):
        serve.run(Broken.bind(), name="broken", route_prefix=None)
    app = serve.status().applications["broken"]
    assert app.status == "DEPLOY_FAILED"
    assert "ZeroDivisionError" in app.deployments["Broken"].message
    assert app.deployments["Broken"].status == "DEPLOY_FAILED"


@serve.deployment(user_config={"greeting": "hello"})
class Configurable:
    def __init__(self):
        self.calls = 0

    def reconfigure(self, config):
        self.calls += 1
        self.greeting = config["greeting"]

    def __call__(self):
        return self.greeting, self.calls, os.getpid()


def test_reconfigure_runs_at_start_and_on_new_user_config_without_restart(url):
    h = serve.run(Configurable.bind(), name="cfg", route_prefix=None)
    greeting, calls, pid = h.remote().result()
    assert (greeting, calls) == ("hello", 1)
    h = serve.run(Configurable.options(user_config={"greeting": "hi"}).bind(), name="cfg", route_prefix=None)
    wait_for(lambda: h.remote().result()[0] == "hi", what="new user_config")
    greeting, calls, pid2 = h.remote().result()
    assert (greeting, calls, pid2) == ("hi", 2, pid)


def test_code_update_replaces_replicas_without_failing_requests(url):
    @serve.deployment(num_replicas=2, graceful_shutdown_wait_loop_s=0.05)
    class V:
        def __init__(self, version):
            self.version = version

        async def __call__(self, *args):
            await asyncio.sleep(0.01)
            return self.version

    h = serve.run(V.bind(1), name="upd", route_prefix="/upd")
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: set[int] = set()

    def load():
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.get("/upd")
                    if r.status_code != 200:
                        errors.append(AssertionError(r.status_code))
                    else:
                        seen.add(r.json())
                except Exception as e:
                    errors.append(e)
                try:
                    seen.add(h.remote().result(timeout_s=30))
                except Exception as e:
                    errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: 1 in seen, what="v1 responses")
    serve.run(V.bind(2), name="upd", route_prefix="/upd")
    wait_for(lambda: h.remote().result() == 2, what="v2")
    time.sleep(0.3)  # keep load going across the end of the rollout
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert seen == {1, 2}
    wait_for(lambda: serve.status().applications["upd"].deployments["V"].replica_states == {"RUNNING": 2}, what="2 running")


def test_max_ongoing_requests_is_never_exceeded(url):
    @serve.deployment(max_ongoing_requests=2)
    class Counter:
        def __init__(self):
            self.now = 0
            self.peak = 0

        async def __call__(self, *args):
            self.now += 1
            self.peak = max(self.peak, self.now)
            await asyncio.sleep(0.05)
            self.now -= 1

        def peak_seen(self):
            return self.peak

    h = serve.run(Counter.bind(), name="limit", route_prefix="/limit")
    # Two independent routers (driver handle and HTTP proxy) send at once.
    with httpx.Client(base_url=url, timeout=30) as c, concurrent.futures.ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(c.get, "/limit") for _ in range(10)]
        resps = [h.remote() for _ in range(10)]
        for r in resps:
            r.result(timeout_s=30)
        assert all(f.result().status_code == 200 for f in futs)
    assert h.peak_seen.remote().result() == 2


def test_sync_methods_do_not_block_the_event_loop(url):
    @serve.deployment(max_ongoing_requests=4)
    class Blocking:
        def __call__(self):
            time.sleep(0.3)
            return 1

        async def ping(self):
            return "pong"

    h = serve.run(Blocking.bind(), name="block", route_prefix=None)
    slow = [h.remote() for _ in range(2)]
    t0 = time.monotonic()
    assert h.ping.remote().result() == "pong"
    assert time.monotonic() - t0 < 0.25
    assert [r.result() for r in slow] == [1, 1]


def test_backpressure_503_and_BackPressureError(url):
    @serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
    class Busy:
        async def __call__(self, *args):
            await asyncio.sleep(0.5)
            return "done"

    h = serve.run(Busy.bind(), name="bp", route_prefix="/bp")
    assert h.remote().result() == "done"  # the router holds a live connection: `first` goes straight in
    first = h.remote()
    second = h.remote()  # queued
    with pytest.raises(BackPressureError):
        h.remote().result(timeout_s=5)
    assert first.result() == "done" and second.result() == "done"
    with httpx.Client(base_url=url, timeout=30) as c, concurrent.futures.ThreadPoolExecutor(6) as pool:
        codes = sorted(f.result().status_code for f in [pool.submit(c.get, "/bp") for _ in range(6)])
    assert 503 in codes and 200 in codes


def test_force_stop_unhealthy_replicas_kills_at_once() -> None:
    # Ray Serve's RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS=1: no drain, the call in flight fails.
    with env_vars(FLOTILLA_FORCE_STOP_UNHEALTHY_REPLICAS="1"), running_cluster(num_cpus=2):
        h = serve.run(Fragile.options(graceful_shutdown_timeout_s=30).bind(), name="health-force", route_prefix=None)
        pid = h.remote().result()
        slow = h.slow.remote(10)
        h.set_healthy.remote(False).result()
        t0 = time.monotonic()
        with pytest.raises(RayActorError):
            slow.result(timeout_s=20)
        assert time.monotonic() - t0 < 5
        wait_for(lambda: h.remote().result(timeout_s=10) != pid, timeout=20, what="replacement after health check")


@serve.deployment(health_check_period_s=100, ray_actor_options={"num_cpus": 0})
class CountedChecks:
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def check_health(self) -> None:
        with open(os.path.join(self.folder, "checks"), "a") as f:
            f.write("x")
        if os.path.exists(os.path.join(self.folder, "hang")):
            time.sleep(30)

    def __call__(self) -> int:
        return os.getpid()


def test_new_health_check_period_and_timeout_apply_to_running_replicas(url, tmp_path):
    """As Ray's: a redeploy that changes only health_check_period_s / _timeout_s updates the
    replicas in place and their checks follow the new values at once (the loop slept out the
    old period)."""
    checks = tmp_path / "checks"
    h = serve.run(CountedChecks.bind(str(tmp_path)), name="hc", route_prefix=None)
    pid = h.remote().result()
    first = len(checks.read_text()) if checks.exists() else 0
    serve.run(CountedChecks.options(health_check_period_s=0.1).bind(str(tmp_path)), name="hc", route_prefix=None)
    assert h.remote().result() == pid  # the same replica
    wait_for(lambda: len(checks.read_text()) >= first + 10, timeout=10, what="ten checks at the new period")
    serve.run(CountedChecks.options(health_check_period_s=0.1, health_check_timeout_s=0.5).bind(str(tmp_path)),
              name="hc", route_prefix=None)
    assert h.remote().result() == pid
    (tmp_path / "hang").touch()  # checks hang now: three time out at 0.5 s and the replica is replaced
    wait_for(lambda: serve.status().applications["hc"].deployments["CountedChecks"].status == "UNHEALTHY",
             timeout=15, interval=0.01, what="checks timing out at 0.5 s")
    (tmp_path / "hang").unlink()


@serve.deployment(graceful_shutdown_timeout_s=1, graceful_shutdown_wait_loop_s=0.1, ray_actor_options={"num_cpus": 0})
class BlocksForever:
    def __call__(self, started: str | None = None) -> int:
        if started is not None:
            open(started, "w").close()
            time.sleep(120)  # a sync call that no cancel can stop
        return os.getpid()


def test_a_replica_blocked_in_a_sync_call_exits_at_its_graceful_shutdown_timeout(url, tmp_path):
    """As Ray kills the actor: the replica process is gone about graceful_shutdown_timeout_s
    after the stop, though a thread still runs the call (it waited for the thread, then was
    killed over 10 s later)."""
    from flotilla._private.procfs import start_ticks

    h = serve.run(BlocksForever.bind(), name="blocked", route_prefix=None)
    pid = h.remote().result()
    ticks = start_ticks(pid)
    started = tmp_path / "started"
    stuck = h.remote(str(started))
    wait_for(started.exists, what="the call running in the replica's thread")
    began = time.monotonic()
    serve.delete("blocked", _blocking=False)
    wait_for(lambda: start_ticks(pid) != ticks, timeout=20, interval=0.05, what="the replica process gone")
    took = time.monotonic() - began
    assert took < 4.0, f"the replica process took {took:.1f}s to go (graceful_shutdown_timeout_s=1)"
    with pytest.raises(RayActorError):
        stuck.result(timeout_s=10)
