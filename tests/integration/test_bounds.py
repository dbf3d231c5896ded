"""Bounds: start-up time, replica memory, keyword arguments, log rotation, and the HTTP proxy's
connection, header-size and header-time limits.

One cluster for the module, started with small limits (environment variables read by the head,
`http_options` for the proxy), so each bound trips in seconds.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import resource
import select
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import flotilla
from flotilla import serve
from flotilla._private.client import Runtime
from tests.conftest import env_vars, local_only, running_cluster, wait_for

pytestmark = pytest.mark.slow

MiB = 1 << 20
ROTATE_BYTES = 4096
MAX_CONNECTIONS = 2000
HEADER_TIMEOUT_S = 1.0
MAX_HEADER_BYTES = 16 * 1024
ENV = {
    "FLOTILLA_SLOW_STARTUP_WARNING_S": "1",
    "FLOTILLA_REPLICA_STARTUP_TIMEOUT_S": "3",
    "FLOTILLA_MEMORY_MONITOR_REFRESH_MS": "100",
    "FLOTILLA_ROTATION_MAX_BYTES": str(ROTATE_BYTES),
    "FLOTILLA_ROTATION_BACKUP_COUNT": "2",
}
HTTP = {
    "max_connections": MAX_CONNECTIONS,
    "request_header_timeout_s": HEADER_TIMEOUT_S,
    "max_request_header_bytes": MAX_HEADER_BYTES,
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with env_vars(**ENV), running_cluster(HTTP, num_cpus=8) as url:
        yield url


def logs_dir() -> str:
    return os.path.join(Runtime.current().session_dir, "logs")


def read_logs(pattern: str) -> str:
    """The text of every file matching `pattern` in the session's logs (rotated ones too)."""
    out = []
    for path in sorted(glob.glob(os.path.join(logs_dir(), pattern))):
        with open(path, errors="replace") as f:
            out.append(f.read())
    return "".join(out)


def scrape() -> dict[str, list[Any]]:
    text = httpx.get(flotilla.metrics_url(), timeout=30).text
    out: dict[str, list[Any]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def metric(name: str, **labels: str) -> float:
    return sum(s.value for s in scrape().get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def metric_reaches(name: str, at_least: float, **labels: str) -> float:
    """Metrics are pushed to the head once a second: poll until `name` reaches `at_least`."""
    return wait_for(lambda: (v := metric(name, **labels)) >= at_least and v, timeout=10, what=name)


def deployment_message(app: str, dep: str) -> str:
    a = serve.status().applications.get(app)
    d = a.deployments.get(dep) if a is not None else None
    return d.message if d is not None else ""


# ---- keyword arguments ------------------------------------------------------------------------


@serve.deployment
def ok(request: Any = None) -> str:
    return "ok"


def test_unknown_keyword_arguments_raise_type_error_naming_them(url: str) -> None:
    with pytest.raises(TypeError, match=r"'route_prefx'.*did you mean 'route_prefix'"):
        serve.run(ok.bind(), name="typo", route_prefx="/typo")
    assert "typo" not in serve.status().applications
    with pytest.raises(TypeError, match=r"serve\.run\(\).*'port'.*http_options"):
        serve.run(ok.bind(), name="typo", port=8001)
    with pytest.raises(TypeError, match=r"serve\.start\(\).*'http_option'"):
        serve.start(http_option={"port": 1})
    with pytest.raises(TypeError, match=r"init\(\).*'num_cpu'.*did you mean 'num_cpus'"):
        flotilla.init(num_cpu=2, ignore_reinit_error=True)


def test_documented_ray_arguments_are_accepted_with_a_warning(url: str) -> None:
    with pytest.warns(UserWarning, match="configure_logging"):  # ignored on both backends
        flotilla.init(configure_logging=False, ignore_reinit_error=True)
    with pytest.warns(UserWarning, match="dedicated_cpu"):
        serve.start(dedicated_cpu=True, http_options={"port": httpx.URL(url).port, **HTTP})
    with pytest.warns(UserWarning, match="tracing_config"):  # Ray 2.60's, as models or dicts
        serve.start(tracing_config=serve.TracingConfig(enabled=True), http_options={"port": httpx.URL(url).port, **HTTP})
    with pytest.warns(UserWarning, match="controller_options"):
        serve.start(controller_options={"runtime_env": {"env_vars": {"A": "1"}}},
                    http_options={"port": httpx.URL(url).port, **HTTP})
    assert serve.get_trace_context() is None


# ---- start-up bounds ------------------------------------------------------------------------


@serve.deployment
class Hang:
    def __init__(self) -> None:
        time.sleep(3600)

    def __call__(self) -> str:
        return "never"


def test_hanging_constructor_is_reported_then_fails_after_the_limit(url: str) -> None:
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            msg = deployment_message("hang", "Hang")
            if "to initialize" in msg:
                seen.append(msg)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"did not finish its constructor within 3s"):
            serve.run(Hang.bind(), name="hang", route_prefix="/hang")
    finally:
        stop.set()
        watcher.join(5)
    took = time.monotonic() - t0
    assert took < 3 * 3 + 10, took  # three starts of 3 s each, not forever
    assert seen, "the status never said a replica was slow to initialize"
    assert re.search(r"has 1 replicas? that (has|have) taken more than 1s to initialize", seen[0]), seen[0]
    assert re.search(r"initializing for \d+\.\ds", seen[-1]), seen[-1]
    app = serve.status().applications["hang"]
    assert app.status == "DEPLOY_FAILED"
    assert "FLOTILLA_REPLICA_STARTUP_TIMEOUT_S" in app.message
    # Logged once per replica, not on every tick.
    lines = [ln for ln in read_logs("head.log*").splitlines() if "slow to initialize" in ln and "hang/Hang" in ln]
    assert 1 <= len(lines) <= 3, lines
    assert len({re.search(r"replica (\w+)", ln).group(1) for ln in lines}) == len(lines), lines  # type: ignore[union-attr]
    serve.delete("hang")


# ---- memory ---------------------------------------------------------------------------------


@serve.deployment(ray_actor_options={"memory": 100 * MiB})
class Leaky:
    """Starts leaking 0.3 s after it is constructed: 16 MiB every 50 ms, up to 1 GiB."""

    def __init__(self) -> None:
        self.hoard: list[bytes] = []

        def grow() -> None:
            time.sleep(0.3)
            for _ in range(64):
                self.hoard.append(b"\x01" * (16 * MiB))
                time.sleep(0.05)

        threading.Thread(target=grow, daemon=True).start()

    def pid(self) -> int:
        return os.getpid()


@local_only("on Ray `memory` is a reservation Ray schedules by; Ray's memory monitor acts on use")
def test_replica_over_its_memory_is_restarted_with_a_clear_message(url: str) -> None:
    h = serve.run(Leaky.bind(), name="leaky", route_prefix=None)
    first = h.pid.remote().result()
    msg = wait_for(lambda: (m := deployment_message("leaky", "Leaky")) and "memory" in m and m, timeout=20,
                   what="a status message about memory")
    assert re.search(r"RSS [\d.]+ MiB.*over its memory limit of 100(\.0)? MiB", msg), msg
    assert "restart" in msg, msg

    def other_pid() -> int | None:
        try:
            pid = h.pid.remote().result(timeout_s=5)
        except Exception:
            return None
        return pid if pid != first else None

    wait_for(other_pid, timeout=20, what="a new replica serving")
    metric_reaches("flotilla_replica_memory_kills_total", 1, application="leaky", reason="memory_limit")
    log = read_logs("head.log*")
    assert re.search(r"replica \w+ of leaky/Leaky .*RSS [\d.]+ MiB.*memory limit of 100", log), log[-3000:]
    serve.delete("leaky")


# ---- HTTP proxy: headers, slowloris, idle floods -----------------------------------------------


def _addr(url: str) -> tuple[str, int]:
    u = httpx.URL(url)
    assert u.port is not None
    return u.host, u.port


def _get(url: str) -> float:
    """One request on a new connection; returns its latency in seconds."""
    t0 = time.perf_counter()
    r = httpx.get(url + "/ok", headers={"connection": "close"}, timeout=10)
    assert r.status_code == 200 and r.text == "ok", (r.status_code, r.text[:200])
    return time.perf_counter() - t0


def _raw(url: str, request: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(_addr(url), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk


def test_header_over_the_limit_gets_431(url: str) -> None:
    serve.run(ok.bind(), name="ok", route_prefix="/ok")
    small = b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: " + b"a" * (MAX_HEADER_BYTES // 2) + b"\r\n\r\n"
    assert _raw(url, small).startswith(b"HTTP/1.1 200"), "a header under the limit is served"
    big = b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (MAX_HEADER_BYTES + 1) + b"\r\n\r\n"
    assert _raw(url, big).startswith(b"HTTP/1.1 431"), "one header over the limit"
    many = b"GET /ok HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"b" * 100) for i in range(300)) + b"\r\n"
    assert _raw(url, many).startswith(b"HTTP/1.1 431"), "many headers over the limit together"
    # A 50 MB header is never read whole: the proxy answers 431 (or resets) and closes early.
    with socket.create_connection(_addr(url), timeout=10) as s:
        s.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Huge: ")
        sent = 0
        try:
            while sent < 50 * MiB:
                s.sendall(b"c" * MiB)
                sent += MiB
        except OSError:
            pass
        assert sent < 8 * MiB, f"the proxy kept reading a {sent} byte header"
        try:
            head = s.recv(100)
        except OSError:
            head = b""
        assert head == b"" or head.startswith(b"HTTP/1.1 431"), head
    metric_reaches("flotilla_http_header_too_large_total", 3, server="proxy")
    assert _get(url) < 5


def test_slowloris_connections_are_closed_and_do_not_starve_clients(url: str) -> None:
    serve.run(ok.bind(), name="ok", route_prefix="/ok")
    socks = []
    for _ in range(50):
        s = socket.create_connection(_addr(url), timeout=5)
        s.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    opened = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            for s in socks:
                with contextlib.suppress(OSError):
                    s.send(b"X-Slow: 1\r\n")
            time.sleep(0.2)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    latencies = []
    try:
        while time.monotonic() - opened < HEADER_TIMEOUT_S + 1.5:
            latencies.append(_get(url))
    finally:
        stop.set()
        t.join(5)
    # Every slow client was answered 408 and closed after the header timeout.
    for s in socks:
        ready, _, _ = select.select([s], [], [], 5)
        assert ready, "a slowloris connection is still open"
        try:
            data = s.recv(200)
        except OSError:
            data = b""
        assert data == b"" or data.startswith(b"HTTP/1.1 408"), data
        s.close()
    assert max(latencies) < 2.0, latencies
    assert statistics.median(latencies) < 0.5, latencies
    metric_reaches("flotilla_http_connections_timed_out_total", 50, server="proxy", phase="headers")


def _listener_pid(port: int) -> int:
    """The pid of the process holding the listening TCP socket on `port` (via /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        return int(pid)
    raise AssertionError(f"no process listens on port {port}")


def test_idle_connection_flood_does_not_exhaust_descriptors_or_starve_clients(url: str) -> None:
    serve.run(ok.bind(), name="ok", route_prefix="/ok")
    want = 10_000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = (hard if hard != resource.RLIM_INFINITY else 1 << 20) - 500
    n = min(want, room)
    if n < 2 * MAX_CONNECTIONS:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for an idle flood over max_connections={MAX_CONNECTIONS}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, n + 500), hard))
    proxy = _listener_pid(_addr(url)[1])
    before = metric("flotilla_http_connections_evicted_total", server="proxy")
    fds: list[int] = []
    socks: list[socket.socket] = []
    latencies: list[float] = []
    try:
        while len(socks) < n:
            for _ in range(500):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(_addr(url))
                socks.append(s)
            fds.append(len(os.listdir(f"/proc/{proxy}/fd")))
            latencies.append(_get(url))
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            fds.append(len(os.listdir(f"/proc/{proxy}/fd")))
            latencies.append(_get(url))
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert max(fds) <= MAX_CONNECTIONS + 100, f"proxy descriptors peaked at {max(fds)}"
    assert statistics.median(latencies) < 0.5, latencies
    assert max(latencies) < 5.0, latencies
    metric_reaches("flotilla_http_connections_evicted_total", before + 1, server="proxy")


# ---- logs -----------------------------------------------------------------------------------


@serve.deployment
class Chatty:
    def __call__(self, request: Any) -> str:
        print("x" * 2000, flush=True)
        return "ok"


def test_logs_rotate_by_size(url: str) -> None:
    serve.run(Chatty.bind(), name="chatty", route_prefix="/chatty")
    with httpx.Client(base_url=url, timeout=10) as c:
        t_end = time.monotonic() + 3.0
        n = 0
        while time.monotonic() < t_end or n < 200:
            assert c.get("/chatty").status_code == 200
            n += 1
            time.sleep(0.01)

    def rotated(pattern: str) -> list[str]:
        return sorted(glob.glob(os.path.join(logs_dir(), pattern)))

    replica = wait_for(lambda: (f := rotated("replica_chatty_Chatty_*.log.2")) and f, timeout=5, what="two rotated replica logs")
    base = replica[0][: -len(".2")]
    assert not os.path.exists(base + ".3"), "more backups than FLOTILLA_ROTATION_BACKUP_COUNT"
    sizes = [os.path.getsize(p) for p in (base, base + ".1", base + ".2")]
    assert sum(sizes) < n * 2001, (sizes, n)  # the oldest lines were dropped
    wait_for(lambda: rotated("proxy.log.1"), timeout=5, what="a rotated proxy log")
    for i in range(4):  # the head logs a few lines for each
        serve.run(ok.bind(), name=f"ok{i}", route_prefix=None)
        serve.delete(f"ok{i}")
    wait_for(lambda: rotated("head.log.1"), timeout=5, what="a rotated head log")
    assert os.path.getsize(os.path.join(logs_dir(), "proxy.log")) < ROTATE_BYTES + 200_000
