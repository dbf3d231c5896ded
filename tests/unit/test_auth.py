"""The authenticated TCP transport (`auth.py`, `transport.connect_tcp`/`serve_tcp`): real
sockets on 127.0.0.1 in both event loops, no mocks, no sleeps.

What is proved: a client and a server that share the secret get a working `RpcPeer` or
data-plane `FrameProtocol`; everything else (wrong secret, a pickle sent straight away,
garbage, short, oversize or silent handshakes, replayed or reflected transcripts) is closed,
counted in `auth.failures`, and no byte of it reaches a `FrameProtocol`, let alone `pickle`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flotilla._private import auth
from flotilla._private.auth import AuthError
from flotilla._private.protocol import Call, Drain, Ok
from flotilla._private.transport import FrameProtocol, RpcPeer, connect_tcp, frame, serve_tcp
from tests.unit.aio import Net, until

pytestmark = pytest.mark.timeout(10)

HOST = "127.0.0.1"
HEAD = struct.Struct("<QI")
HELLO, PROOF, ANSWER = auth.HELLO.size, auth.PROOF.size, auth.ANSWER.size


# ---- helpers -------------------------------------------------------------------------------


def _plant(path: str) -> str:
    """What the hostile pickle runs when it is loaded: it creates the marker file."""
    Path(path).write_text("the payload ran")
    return path


class Planter:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> Any:
        return (_plant, (self.path,))


def hostile_frame(marker: Path) -> bytes:
    """A well-formed data-plane frame whose payload creates `marker` when unpickled."""
    payload = pickle.dumps(Planter(marker), protocol=5)
    return HEAD.pack(len(payload), 1) + payload


def delta(before: Counter[Any]) -> dict[Any, int]:
    """The failures counted since `before` (a copy of `auth.failures`)."""
    return {k: v - before[k] for k, v in auth.failures.items() if v != before[k]}


class Served:
    """A `serve_tcp` server whose connections are recorded (created only after the handshake)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make
        self.made: list[Any] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    def factory(self) -> Any:
        conn = self.make()
        self.made.append(conn)
        return conn

    async def start(self, secret: bytes, timeout: float = auth.HANDSHAKE_TIMEOUT) -> Served:
        self.server = await serve_tcp(HOST, 0, self.factory, secret, timeout=timeout)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


def frame_server() -> FrameProtocol:
    """A data-plane end that answers every message with `Ok(message)`, and sends a `Drain`
    as soon as it is connected (as a draining replica does)."""
    proto = FrameProtocol(lambda t, m: None)
    proto.on_message = lambda tag, msg: proto.send(tag, Ok(msg))
    proto.on_connect = lambda: proto.send(0, Drain())
    return proto


async def until_closed(reader: asyncio.StreamReader, limit: float = 3.0) -> bytes:
    """Everything the server sends until it closes the connection (EOF or reset)."""
    got = bytearray()

    async def drain() -> None:
        try:
            while chunk := await reader.read(65536):
                got.extend(chunk)
        except ConnectionResetError:
            pass

    await asyncio.wait_for(drain(), limit)
    return bytes(got)


async def raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(HOST, port)


def nodelay(t: asyncio.BaseTransport) -> int:
    sock = t.get_extra_info("socket")
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


# ---- secrets ---------------------------------------------------------------------------------


def test_new_secret_is_32_fresh_random_bytes() -> None:
    a, b = auth.new_secret(), auth.new_secret()
    assert isinstance(a, bytes) and len(a) == 32 and a != b


@pytest.mark.parametrize(
    "bad", [b"", b"15 bytes, short", "a str of 32 characters, not bytes", None], ids=["empty", "short", "str", "none"]
)
def test_a_weak_or_wrong_type_secret_is_refused(net: Net, bad: Any) -> None:
    async def main() -> None:
        with pytest.raises((TypeError, ValueError)):
            await serve_tcp(HOST, 0, RpcPeer, bad)
        with pytest.raises((TypeError, ValueError)):
            await connect_tcp(HOST, 1, RpcPeer(), bad)

    net.run(main())


def test_the_metric_name_is_documented() -> None:
    assert auth.METRIC == "flotilla_auth_failures_total"
    doc = (Path(__file__).parents[2] / "docs" / "ARCHITECTURE.md").read_text()
    assert auth.METRIC in doc


# ---- the good path -----------------------------------------------------------------------------


def test_rpc_peer_over_authenticated_tcp(net: Net) -> None:
    secret = auth.new_secret()

    async def handler(peer: RpcPeer, op: str, args: tuple[Any, ...]) -> Any:
        return sum(args) if op == "add" else await peer.call("whoami")

    async def main() -> None:
        s = await Served(lambda: RpcPeer(handler, name="server")).start(secret)
        before = auth.failures.copy()
        try:
            client = await connect_tcp(HOST, s.port, RpcPeer(lambda p, op, a: "client", name="client"), secret)
            assert await asyncio.wait_for(client.call("add", 20, 22), 2) == 42
            # calls go both ways: the server calls back into the client
            assert await asyncio.wait_for(client.call("ask"), 2) == "client"
            assert len(s.made) == 1
            server_peer = s.made[0]
            assert server_peer.proto.transport is not None
            assert nodelay(client.proto.transport) == 1  # type: ignore[arg-type]
            assert nodelay(server_peer.proto.transport) == 1
            client.close()
            await until(lambda: server_peer.closed, what="the server side to close")
        finally:
            s.close()
        assert delta(before) == {}

    net.run(main())


def test_data_plane_frames_flow_over_authenticated_tcp(net: Net) -> None:
    secret = auth.new_secret()

    async def main() -> None:
        s = await Served(frame_server).start(secret)
        got: list[tuple[int, Any]] = []
        client = FrameProtocol(lambda tag, msg: got.append((tag, msg)))
        reads: list[int] = []
        get_buffer = client.get_buffer

        def spy(hint: int) -> memoryview:
            reads.append(hint)
            return get_buffer(hint)

        client.get_buffer = spy  # type: ignore[method-assign]
        try:
            assert await connect_tcp(HOST, s.port, client, secret) is client
            # the Drain the server sent the moment it was authenticated arrives first
            await until(lambda: got, what="the server's first frame")
            assert got[0] == (0, Drain())
            reads.clear()  # the Drain may have come with the handshake's last bytes
            calls = [Call("m", (i, b"x" * (i * 997)), {}, None) for i in range(1, 101)]
            calls.append(Call("big", (b"y" * (3 << 20),), {}, {"request_id": "r"}))
            for i, c in enumerate(calls, 1):
                client.send(i, c)
            await until(lambda: len(got) == len(calls) + 1, timeout=5, what="every answer")
            assert got[1:] == [(i, Ok(c)) for i, c in enumerate(calls, 1)]
            assert reads, "after the handshake the loop reads into the protocol's own memory"
            client.close()
            await until(lambda: s.made[0].closed, what="the server side to close")
        finally:
            s.close()

    net.run(main())


def test_frames_sent_with_the_servers_proof_are_delivered(net: Net) -> None:
    """A server may write its proof and its first frames in one write; the client hands the
    frames to its FrameProtocol only after it checked the proof."""
    secret = auth.new_secret()

    async def main() -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            ns = os.urandom(32)
            w.write(auth.HELLO.pack(auth.MAGIC, ns))
            _, nc, _ = auth.PROOF.unpack(await r.readexactly(PROOF))
            w.write(auth._proof(secret, auth.SERVER, ns, nc) + frame(0, Drain()) + frame(7, Ok("x")))
            await r.read()
            w.close()

        server = await asyncio.start_server(handle, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        got: list[tuple[int, Any]] = []
        client = FrameProtocol(lambda tag, msg: got.append((tag, msg)))
        try:
            await connect_tcp(HOST, port, client, secret)
            await until(lambda: len(got) == 2, what="both frames")
            assert got == [(0, Drain()), (7, Ok("x"))]
            client.close()
        finally:
            server.close()

    net.run(main())


# ---- refusals ----------------------------------------------------------------------------------


def test_a_wrong_secret_is_refused_by_both_sides_and_counted(net: Net) -> None:
    async def main() -> None:
        s = await Served(frame_server).start(auth.new_secret())
        fed: list[Any] = []
        client = FrameProtocol(lambda tag, msg: fed.append(msg))
        before = auth.failures.copy()
        try:
            with pytest.raises(AuthError):
                await connect_tcp(HOST, s.port, client, auth.new_secret())
            assert isinstance(AuthError("x"), ConnectionError)  # callers treat it as a refused connection
            await until(lambda: delta(before).get(("server", "bad_proof")), what="the server's count")
            assert delta(before) == {("server", "bad_proof"): 1, ("client", "eof"): 1}
            assert s.made == []  # the server never built a connection for it
            assert client.transport is None and fed == []  # nor was the client's protocol fed
        finally:
            s.close()

    net.run(main())


@pytest.mark.parametrize("when", ["at-once", "after-hello", "with-a-bad-proof", "as-the-proof"])
def test_an_unauthenticated_pickle_never_runs(net: Net, tmp_path: Path, when: str) -> None:
    """A client without the secret sends a frame whose pickle would create a marker file: it
    is refused, and the file never appears. The same frame from an authenticated client does
    create it, so the payload is live: only the handshake stopped it."""
    secret = auth.new_secret()
    marker = tmp_path / "pwned"

    async def main() -> None:
        bad: list[int] = []

        def make() -> FrameProtocol:
            return FrameProtocol(lambda t, m: None, on_bad_frame=lambda tag, err: bad.append(tag))

        s = await Served(make).start(secret)
        before = auth.failures.copy()
        try:
            r, w = await raw(s.port)
            evil = hostile_frame(marker)
            if when == "at-once":
                w.write(evil)
            elif when == "after-hello":
                await r.readexactly(HELLO)
                w.write(evil)
            elif when == "with-a-bad-proof":  # and the pickle once the server answers
                await r.readexactly(HELLO)
                w.write(auth.PROOF.pack(auth.MAGIC, os.urandom(32), os.urandom(32)))
                try:
                    answer = await asyncio.wait_for(r.read(ANSWER), 3)
                except ConnectionResetError:
                    answer = b""
                if answer:
                    w.write(evil)
            else:  # the pickle in place of the proof, cut to the proof's size
                await r.readexactly(HELLO)
                w.write(evil[:PROOF])
            rest = await until_closed(r)
            w.close()
            assert len(rest) <= HELLO  # the hello at most: never the server's proof
            assert s.made == [] and bad == []
            assert sum(delta(before).values()) == 1
            assert not marker.exists()

            # control: the very same bytes from an authenticated client are unpickled
            control = tmp_path / "control"
            client = await connect_tcp(HOST, s.port, FrameProtocol(lambda t, m: None), secret)
            client.send_raw(hostile_frame(control))
            await until(lambda: bad, what="the control frame to be decoded")
            assert control.exists()  # the payload is live...
            assert not marker.exists()  # ...and the refused one never ran
            client.close()
        finally:
            s.close()

    net.run(main())


def test_a_silent_client_is_closed_after_the_handshake_timeout(net: Net) -> None:
    async def main() -> None:
        s = await Served(frame_server).start(auth.new_secret(), timeout=0.2)
        before = auth.failures.copy()
        try:
            t0 = time.monotonic()
            r, w = await raw(s.port)
            hello = await r.readexactly(HELLO)
            assert hello.startswith(auth.MAGIC)
            assert await until_closed(r) == b""
            elapsed = time.monotonic() - t0
            w.close()
            assert 0.19 <= elapsed < 2.0  # uvloop timers have 1 ms resolution: they may fire a hair early
            assert delta(before) == {("server", "timeout"): 1}
            assert s.made == []
        finally:
            s.close()

    net.run(main())


def test_a_client_gives_up_on_a_silent_server(net: Net) -> None:
    async def main() -> None:
        held: list[asyncio.StreamWriter] = []

        async def say_nothing(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            held.append(w)

        server = await asyncio.start_server(say_nothing, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        before = auth.failures.copy()
        client = FrameProtocol(lambda t, m: None)
        try:
            t0 = time.monotonic()
            with pytest.raises(AuthError, match="timeout"):
                await connect_tcp(HOST, port, client, auth.new_secret(), timeout=0.2)
            assert 0.19 <= time.monotonic() - t0 < 2.0  # uvloop rounds timers to 1 ms
            assert delta(before) == {("client", "timeout"): 1}
            assert client.transport is None
        finally:
            for w in held:
                w.close()
            server.close()

    net.run(main())


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("garbage", bytes(range(PROOF)), "bad_magic"),
        ("http", b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: scanner\r\nAccept: */*\r\n\r\n.", "bad_magic"),
        ("random-proof", auth.MAGIC + b"\x01" * (PROOF - 4), "bad_proof"),
        ("short-then-eof", auth.MAGIC + b"\x00" * 10, "eof"),
        ("one-byte-over", auth.MAGIC + b"\x00" * (PROOF - 3), "oversize"),
        ("oversize", b"\x00" * 65536, "oversize"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_bad_handshake_is_closed_and_counted(net: Net, name: str, data: bytes, reason: str) -> None:
    async def main() -> None:
        s = await Served(frame_server).start(auth.new_secret())
        before = auth.failures.copy()
        try:
            r, w = await raw(s.port)
            await r.readexactly(HELLO)
            w.write(data)
            if reason == "eof":
                w.write_eof()
            assert await until_closed(r) == b""
            w.close()
            await until(lambda: delta(before), what="the count")
            assert delta(before) == {("server", reason): 1}
            assert s.made == []
        finally:
            s.close()

    net.run(main())


def test_a_valid_proof_with_bytes_piggybacked_is_refused(net: Net, tmp_path: Path) -> None:
    """Before the server's proof, a client may send its proof and nothing else: even with the
    secret, bytes piggybacked on the proof are refused, so the pre-auth read is capped."""
    secret = auth.new_secret()
    marker = tmp_path / "pwned"

    async def main() -> None:
        s = await Served(frame_server).start(secret)
        before = auth.failures.copy()
        try:
            r, w = await raw(s.port)
            _, ns = auth.HELLO.unpack(await r.readexactly(HELLO))
            nc = os.urandom(32)
            w.write(auth.PROOF.pack(auth.MAGIC, nc, auth._proof(secret, auth.CLIENT, ns, nc)) + hostile_frame(marker))
            assert await until_closed(r) == b""
            w.close()
            assert delta(before) == {("server", "oversize"): 1}
            assert s.made == [] and not marker.exists()
        finally:
            s.close()

    net.run(main())


class Relay:
    """A TCP relay that records both directions of each connection it carries."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.up: list[bytearray] = []  # client -> server, per connection
        self.down: list[bytearray] = []  # server -> client
        self.server: asyncio.Server | None = None
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, HOST, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(HOST, self.port)
        up, down = bytearray(), bytearray()
        self.up.append(up)
        self.down.append(down)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, log: bytearray) -> None:
            try:
                while data := await r.read(65536):
                    log.extend(data)
                    w.write(data)
            except ConnectionError:
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(cr, sw, up), pipe(sr, cw, down))

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


def test_replayed_transcripts_from_another_connection_fail(net: Net) -> None:
    """Record one good handshake through a relay; replaying the server's half to a client,
    or the client's half to the server, on a new connection fails (fresh nonces)."""
    secret = auth.new_secret()

    async def main() -> None:
        s = await Served(lambda: RpcPeer(lambda p, op, a: "pong", name="server")).start(secret)
        relay = Relay(s.port)
        rport = await relay.start()
        try:
            peer = await connect_tcp(HOST, rport, RpcPeer(name="client"), secret)
            assert await asyncio.wait_for(peer.call("ping"), 2) == "pong"
            peer.close()
            server_half = bytes(relay.down[0][: HELLO + ANSWER])
            client_half = bytes(relay.up[0][:PROOF])

            # 1. a fake server replays the recorded hello and proof to a new client
            async def replay(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                w.write(server_half[:HELLO])
                await r.readexactly(PROOF)
                w.write(server_half[HELLO:])
                await r.read()
                w.close()

            fake = await asyncio.start_server(replay, HOST, 0)
            before = auth.failures.copy()
            client = FrameProtocol(lambda t, m: None)
            with pytest.raises(AuthError, match="bad_proof"):
                await connect_tcp(HOST, fake.sockets[0].getsockname()[1], client, secret)
            assert delta(before) == {("client", "bad_proof"): 1}
            assert client.transport is None
            fake.close()

            # 2. a client replays the recorded proof to the real server
            before = auth.failures.copy()
            r, w = await raw(s.port)
            await r.readexactly(HELLO)
            w.write(client_half)
            assert await until_closed(r) == b""
            w.close()
            assert delta(before) == {("server", "bad_proof"): 1}
            assert len(s.made) == 1  # only the relayed, authenticated connection
        finally:
            relay.close()
            s.close()

    net.run(main())


def test_a_reflected_client_proof_is_not_a_server_proof(net: Net) -> None:
    """A fake server that sends the client's own proof back is refused: the proofs carry
    their direction, so one cannot stand for the other."""
    secret = auth.new_secret()

    async def main() -> None:
        async def reflect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(auth.HELLO.pack(auth.MAGIC, os.urandom(32)))
            _, _, mac = auth.PROOF.unpack(await r.readexactly(PROOF))
            w.write(mac)
            await r.read()
            w.close()

        fake = await asyncio.start_server(reflect, HOST, 0)
        before = auth.failures.copy()
        try:
            with pytest.raises(AuthError):
                await connect_tcp(HOST, fake.sockets[0].getsockname()[1], RpcPeer(), secret)
            assert delta(before) == {("client", "bad_proof"): 1}
        finally:
            fake.close()

    net.run(main())


@pytest.mark.parametrize(
    ("name", "hello", "reason"),
    [
        ("wrong-magic", b"HTTP" + b"\x00" * 32, "bad_magic"),
        ("too-long", auth.MAGIC + b"\x00" * 33, "oversize"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_client_refuses_a_bad_hello(net: Net, name: str, hello: bytes, reason: str) -> None:
    async def main() -> None:
        async def bad(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(hello)
            await r.read()
            w.close()

        fake = await asyncio.start_server(bad, HOST, 0)
        before = auth.failures.copy()
        try:
            with pytest.raises(AuthError, match=reason):
                await connect_tcp(HOST, fake.sockets[0].getsockname()[1], RpcPeer(), auth.new_secret())
            assert delta(before) == {("client", reason): 1}
        finally:
            fake.close()

    net.run(main())


def test_failures_are_logged_once_per_address_without_the_secret(
    net: Net, caplog: pytest.LogCaptureFixture
) -> None:
    secret = auth.new_secret()
    auth._logged.clear()

    async def main() -> None:
        s = await Served(frame_server).start(secret)
        try:
            for _ in range(3):
                with pytest.raises(AuthError):
                    await connect_tcp(HOST, s.port, RpcPeer(), auth.new_secret())
            await until(lambda: len([r for r in caplog.records if "refused" in r.getMessage()]) >= 2)
        finally:
            s.close()

    with caplog.at_level(logging.WARNING, logger=auth.__name__):
        net.run(main())
    lines = [r.getMessage() for r in caplog.records if r.name == auth.__name__]
    assert len(lines) == 2, lines  # one from the server's side, one from the client's
    assert any(HOST in line and "bad_proof" in line for line in lines)
    for line in lines:
        assert secret.hex() not in line and repr(secret) not in line


def test_a_factory_that_fails_sends_no_proof(net: Net, caplog: pytest.LogCaptureFixture) -> None:
    """The server proves itself only once the connection's protocol exists; a factory that
    raises closes the connection without the proof (the client sees a refusal)."""
    secret = auth.new_secret()

    def broken() -> FrameProtocol:
        raise RuntimeError("no room for another connection")

    async def main() -> None:
        s = await Served(broken).start(secret)
        before = auth.failures.copy()
        try:
            with pytest.raises(AuthError, match="eof"):
                await connect_tcp(HOST, s.port, RpcPeer(), secret)
            assert delta(before) == {("client", "eof"): 1}  # not an authentication failure
        finally:
            s.close()

    with caplog.at_level(logging.ERROR, logger=auth.__name__):
        net.run(main())
    assert any("could not set up" in r.getMessage() for r in caplog.records)
