"""WebSockets through the proxy (FastAPI ingress, plain ASGI) and through direct ingress."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import threading
import time

import httpx
import pytest
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import flotilla
from flotilla import serve
from tests.conftest import local_only, running_cluster, wait_for

pytestmark = pytest.mark.slow

api = FastAPI()


@serve.deployment(max_ongoing_requests=100, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class Chat:
    def __init__(self) -> None:
        self.disconnects = 0
        self.sent = 0
        self.received = 0
        self.release = asyncio.Event()

    @api.websocket("/echo")
    async def echo(self, ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text(f"root={ws.scope['root_path']} path={ws.url.path}")
        try:
            while True:
                await ws.send_text(await ws.receive_text())
        except WebSocketDisconnect:
            self.disconnects += 1

    @api.websocket("/stream")
    async def stream(self, ws: WebSocket) -> None:
        await ws.accept()
        while True:
            n = int(await ws.receive_text())
            for i in range(n):
                await ws.send_text(str(i))
            await ws.send_text("done")

    @api.websocket("/close")
    async def close(self, ws: WebSocket) -> None:
        await ws.accept()
        await ws.receive_text()
        await ws.close(code=4001, reason="bye")

    @api.websocket("/flood")
    async def flood(self, ws: WebSocket) -> None:
        await ws.accept()
        data = os.urandom(100_000)  # incompressible (permessage-deflate)
        while True:
            await ws.send_bytes(data)
            self.sent += 1

    @api.websocket("/sink")
    async def sink(self, ws: WebSocket) -> None:
        await ws.accept()
        await self.release.wait()
        while True:
            await ws.receive_bytes()
            self.received += 1

    @api.get("/hello")
    def hello(self) -> str:
        return "hi"

    def counts(self) -> dict[str, int]:
        return {"disconnects": self.disconnects, "sent": self.sent, "received": self.received}

    async def open_sink(self) -> None:
        self.release.set()

    def pid(self) -> int:
        return os.getpid()


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class RawEcho:
    async def __call__(self, scope, receive, send):
        assert scope["type"] == "websocket"
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": f"root={scope['root_path']}"})
        while True:
            m = await receive()
            if m["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": "raw:" + m["text"]})


def ws_url(url: str, path: str) -> str:
    return url.replace("http://", "ws://") + path


def test_echo_through_fastapi_ingress(url):
    serve.run(Chat.bind(), name="chat", route_prefix="/chat")
    with connect(ws_url(url, "/chat/echo"), open_timeout=10) as ws:
        assert ws.recv(timeout=10) == "root=/chat path=/chat/echo"
        for i in range(20):
            ws.send(f"m{i}")
            assert ws.recv(timeout=10) == f"m{i}"
    # Plain HTTP on the same app still works, and an unknown route refuses the handshake.
    assert httpx.get(f"{url}/chat/hello", timeout=10).json() == "hi"
    with pytest.raises(Exception, match="404"):
        connect(ws_url(url, "/nowhere"), open_timeout=10)


def test_streaming_websocket(url):
    serve.run(Chat.bind(), name="chat", route_prefix="/chat")
    with connect(ws_url(url, "/chat/stream"), open_timeout=10) as ws:
        for n in (1, 500, 3):
            ws.send(str(n))
            got = [ws.recv(timeout=10) for _ in range(n + 1)]
            assert got == [*map(str, range(n)), "done"]


def test_plain_asgi_echo(url):
    serve.run(RawEcho.bind(), name="raw", route_prefix="/raw")
    with connect(ws_url(url, "/raw/sock"), open_timeout=10) as ws:
        assert ws.recv(timeout=10) == "root=/raw"
        ws.send("a")
        assert ws.recv(timeout=10) == "raw:a"


def test_many_concurrent_sockets(url):
    serve.run(Chat.bind(), name="chat", route_prefix="/chat")
    n = 50
    opened = threading.Barrier(n, timeout=60)

    def one(i: int) -> bool:
        with connect(ws_url(url, "/chat/echo"), open_timeout=30) as ws:
            ws.recv(timeout=30)
            opened.wait()  # all 50 are open at once
            for j in range(10):
                ws.send(f"{i}-{j}")
                assert ws.recv(timeout=30) == f"{i}-{j}"
        return True

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        assert all(pool.map(one, range(n)))


def test_client_close_reaches_handler(url):
    h = serve.run(Chat.bind(), name="chat", route_prefix="/chat")
    before = h.counts.remote().result()["disconnects"]
    with connect(ws_url(url, "/chat/echo"), open_timeout=10) as ws:
        ws.recv(timeout=10)
        ws.send("x")
        assert ws.recv(timeout=10) == "x"
    wait_for(lambda: h.counts.remote().result()["disconnects"] == before + 1, timeout=10, what="disconnect seen")


def test_server_close_code(url):
    serve.run(Chat.bind(), name="chat", route_prefix="/chat")
    with connect(ws_url(url, "/chat/close"), open_timeout=10) as ws:
        ws.send("bye?")
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=10)
    assert e.value.rcvd is not None and e.value.rcvd.code == 4001 and e.value.rcvd.reason == "bye"

    def counted() -> bool:  # the proxy counts the socket when it ends, pushed within ~1 s
        lines = httpx.get(flotilla.metrics_url(), timeout=10).text.splitlines()
        # Ray's labels: method "WS"; every close code but 1000 and 1001 is an error
        return (any(line.startswith("ray_serve_num_http_requests") and 'method="WS"' in line
                    and 'status_code="4001"' in line and 'application="chat"' in line for line in lines)
                and any(line.startswith("ray_serve_num_http_error_requests") and 'method="WS"' in line
                        and 'error_code="4001"' in line and 'application="chat"' in line for line in lines))

    wait_for(counted, timeout=15, what="the websocket counted, as an error, with its close code")


def _stable(read, settle_s: float = 0.5, timeout: float = 30.0) -> int:
    """Poll `read()` until it stops changing for `settle_s` (deadline-bounded)."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        cur = read()
        if cur != last:
            last, since = cur, time.monotonic()
        elif time.monotonic() - since >= settle_s and cur > 0:
            return last
    raise AssertionError(f"never settled: {last}")


def test_flow_control_replica_to_slow_client(url):
    h = serve.run(Chat.bind(), name="chat", route_prefix="/chat")
    with connect(ws_url(url, "/chat/flood"), open_timeout=10, max_queue=4) as ws:
        # The client reads nothing: the app's sends must stop (window + socket buffers),
        # not pile up in the proxy. 100 kB messages: 2000 would be 200 MB.
        sent = _stable(lambda: h.counts.remote().result()["sent"])
        assert sent < 2000, sent
        for _ in range(sent + 50):  # reading lets it go on
            assert len(ws.recv(timeout=10)) == 100_000
        assert h.counts.remote().result()["sent"] > sent


def test_flow_control_client_to_slow_replica(url):
    h = serve.run(Chat.bind(), name="chat", route_prefix="/chat")
    sent = [0]
    stop = threading.Event()
    with connect(ws_url(url, "/chat/sink"), open_timeout=10) as ws:

        def pump() -> None:
            data = os.urandom(100_000)
            while not stop.is_set():
                try:
                    ws.send(data)
                except Exception:
                    return
                sent[0] += 1

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        stalled = _stable(lambda: sent[0])  # the app reads nothing: the client's send blocks
        assert stalled < 2000, stalled
        h.open_sink.remote().result()
        wait_for(lambda: sent[0] > stalled + 50, timeout=20, what="client unblocked")
        stop.set()
        wait_for(lambda: h.counts.remote().result()["received"] > stalled, timeout=20, what="app consumed")
    t.join(10)


def test_socket_holds_a_slot(url):
    serve.run(Chat.options(max_ongoing_requests=1, num_replicas=1).bind(), name="chat", route_prefix="/chat")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        with connect(ws_url(url, "/chat/echo"), open_timeout=10) as ws:
            ws.recv(timeout=10)
            get = pool.submit(httpx.get, f"{url}/chat/hello", timeout=30)

            def second() -> str:
                with connect(ws_url(url, "/chat/echo"), open_timeout=30) as ws2:
                    return ws2.recv(timeout=30)

            other = pool.submit(second)
            done, _ = concurrent.futures.wait([get, other], timeout=1.5)
            assert not done, "a request ran beside an open socket with max_ongoing_requests=1"
            ws.send("still here")
            assert ws.recv(timeout=10) == "still here"
        assert get.result(timeout=30).json() == "hi"
        assert other.result(timeout=30).startswith("root=/chat")


def test_replica_killed_under_open_socket(url):
    h = serve.run(Chat.options(num_replicas=1).bind(), name="chat", route_prefix="/chat")
    pid = h.pid.remote().result()
    with connect(ws_url(url, "/chat/echo"), open_timeout=10) as ws:
        ws.recv(timeout=10)
        ws.send("a")
        assert ws.recv(timeout=10) == "a"
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=10)
        assert time.monotonic() - t0 < 5
    assert e.value.rcvd is not None and e.value.rcvd.code == 1011


def test_draining_replica_lets_socket_finish(url):
    opts = {"num_replicas": 1, "graceful_shutdown_timeout_s": 3}
    h = serve.run(Chat.options(**opts).bind(), name="chat", route_prefix="/chat")
    old = h.pid.remote().result()
    with connect(ws_url(url, "/chat/echo"), open_timeout=10) as ws:
        ws.recv(timeout=10)
        # A rollout (new replica options): the old replica drains with this socket open.
        h = serve.run(Chat.options(**opts, ray_actor_options={"num_cpus": 0.4}).bind(), name="chat", route_prefix="/chat")
        assert h.pid.remote().result() != old
        ws.send("after rollout")
        assert ws.recv(timeout=10) == "after rollout"
        deadline = time.monotonic() + 20
        with pytest.raises(ConnectionClosed) as e:  # cut when the graceful timeout ends
            while time.monotonic() < deadline:
                ws.send("ping")
                assert ws.recv(timeout=15) == "ping"
    assert e.value.rcvd is not None and e.value.rcvd.code == 1001
    with connect(ws_url(url, "/chat/echo"), open_timeout=10) as ws:
        assert ws.recv(timeout=10).startswith("root=/chat")


@local_only("direct ingress shares this machine's listening socket")
def test_direct_ingress_echo():
    with running_cluster({"direct_ingress": True}, num_cpus=4) as base:
        h = serve.run(Chat.bind(), name="chat", route_prefix="/chat")
        with connect(ws_url(base, "/chat/echo"), open_timeout=10) as ws:
            assert ws.recv(timeout=10) == "root=/chat path=/chat/echo"
            for i in range(50):
                ws.send(f"d{i}")
                assert ws.recv(timeout=10) == f"d{i}"
        wait_for(lambda: h.counts.remote().result()["disconnects"] == 1, timeout=10, what="disconnect seen")
        with connect(ws_url(base, "/chat/stream"), open_timeout=10) as ws:
            ws.send("200")
            assert [ws.recv(timeout=10) for _ in range(201)] == [*map(str, range(200)), "done"]
