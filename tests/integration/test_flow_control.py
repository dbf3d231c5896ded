"""Flow control and the replica's own resources: a slow streaming client slows the generator
instead of filling the proxy's memory; health checks do not queue behind user work; the
thread pool follows max_ongoing_requests when it changes in place."""

from __future__ import annotations

import os
import socket
import time

import psutil
import pytest
from starlette.responses import StreamingResponse

from flotilla import serve
from tests.conftest import descendants, wait_for

pytestmark = pytest.mark.slow

CHUNK = 256 * 1024
CHUNKS = 800  # 200 MiB in all, far more than any buffer on the way


@serve.deployment
class Producer:
    def __init__(self) -> None:
        self.sent = 0

    def progress(self) -> int:
        return self.sent

    async def __call__(self, request):
        async def gen():
            block = b"x" * CHUNK
            for _ in range(CHUNKS):
                self.sent += 1
                yield block

        return StreamingResponse(gen(), media_type="application/octet-stream")


def _proxy_rss_mib(port: int) -> float:
    """RSS of the proxy (the keeper and the head hold the listening socket too)."""
    for pid in descendants(os.getpid()):
        try:
            p = psutil.Process(pid)
            if p.cmdline()[:1] == ["flotilla::proxy"] and any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in p.net_connections(kind="tcp")):
                return p.memory_info().rss / 2**20
        except psutil.Error:
            continue
    raise AssertionError("no proxy listens on the HTTP port")


def test_slow_streaming_client_slows_the_generator(url: str) -> None:
    h = serve.run(Producer.bind(), name="slow", route_prefix="/slow")
    host, port = url.removeprefix("http://").split(":")
    rss_before = _proxy_rss_mib(int(port))
    with socket.create_connection((host, int(port))) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        s.recv(4096)  # the response has started; now read nothing for a while
        stalled = wait_for(lambda: _stalled(h), timeout=20, what="the generator to stall")
        assert stalled < CHUNKS // 4, f"the replica produced {stalled} of {CHUNKS} chunks for a client that reads nothing"
        assert _proxy_rss_mib(int(port)) - rss_before < 64, "the proxy buffered the stream"
        # Reading resumes the generator.
        s.settimeout(10)
        got = 0
        deadline = time.monotonic() + 30
        while got < 40 * CHUNK and time.monotonic() < deadline:
            got += len(s.recv(1 << 20))
        assert h.progress.remote().result(timeout_s=5) > stalled


def _stalled(h) -> int | None:
    """The generator's progress if it made none over half a second, else None."""
    a = h.progress.remote().result(timeout_s=5)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        if h.progress.remote().result(timeout_s=5) != a:
            return None
    return a if a > 0 else None


@serve.deployment(max_ongoing_requests=2, health_check_period_s=0.1, health_check_timeout_s=0.5)
class Busy:
    def block(self) -> int:
        time.sleep(3)  # holds one of the pool's two threads
        return os.getpid()

    def check_health(self) -> None:
        return None

    async def pid(self) -> int:
        return os.getpid()


def test_health_checks_do_not_wait_for_a_saturated_thread_pool(url: str) -> None:
    h = serve.run(Busy.bind(), name="busy", route_prefix=None)
    pid = h.pid.remote().result(timeout_s=5)
    calls = [h.block.remote() for _ in range(2)]
    # While both threads are busy for 3 s, 30 health checks with a 0.5 s timeout come due.
    window_end = time.monotonic() + 2.0
    while time.monotonic() < window_end:
        st = serve.status().applications["busy"].deployments["Busy"]
        assert st.status == "HEALTHY", st
        assert st.replica_states == {"RUNNING": 1}, st
    assert {c.result(timeout_s=15) for c in calls} == {pid}, "the replica was replaced"
