"""`ProxyFleet`'s bookkeeping with stand-in actors (no Ray cluster): a proxy per node but the
head's, restarted when it exits, dropped with its node, stopped on `stop`."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

import pytest

pytest.importorskip("ray", reason='the Ray backend tests need Ray: pip install "flotilla[ray]"')

from flotilla._private import ray_proxies
from flotilla.serve.schema import ProxyStatus

pytestmark = [pytest.mark.ray, pytest.mark.timeout(30)]

H, A, B, C = (f"{i:056x}" for i in (1, 2, 3, 4))  # node ids: 28 bytes, in hex


class FakeMethod:
    def __init__(self, fn: Any) -> None:
        self.remote = fn


class FakeActor:
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.done: concurrent.futures.Future[int] = concurrent.futures.Future()
        self.args: dict[str, Any] = {}
        self.stopped = False
        self.run = FakeMethod(self._run)
        self.stop = FakeMethod(self._stop)

    def _run(self, args: dict[str, Any]) -> Any:
        self.args = args
        ref = type("Ref", (), {})()
        ref.future = lambda: self.done
        return ref

    def _stop(self) -> None:
        self.stopped = True
        self.done.set_result(0)

    def die(self) -> None:
        if not self.done.done():
            self.done.set_exception(RuntimeError("killed"))


class FakeClass:
    def __init__(self) -> None:
        self.created: list[FakeActor] = []

    def options(self, **kw: Any) -> Any:
        cls = self

        class Maker:
            def remote(self) -> FakeActor:
                a = FakeActor(kw)
                cls.created.append(a)
                return a

        return Maker()


class FakePeer:
    def __init__(self) -> None:
        self.closers: list[Any] = []

    def on_close(self, cb: Any) -> None:
        self.closers.append(cb)

    def close(self) -> None:
        for cb in self.closers:
            cb()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeClass:
    cls = FakeClass()
    monkeypatch.setattr(ray_proxies, "_actor_class", lambda: cls)
    monkeypatch.setattr(ray_proxies, "_kill", lambda actor: actor is not None and actor.die())
    monkeypatch.setattr(ray_proxies, "RESTART_FIRST_S", 0.01)
    return cls


def test_fleet_follows_the_nodes(fake: FakeClass) -> None:
    async def main() -> None:
        fleet = ray_proxies.ProxyFleet(H, "tcp://h:1", b"s" * 32, "sess", {"port": 8000, "host": "127.0.0.1"})
        fleet.sync({H: "10.0.0.1", A: "10.0.0.2", B: "10.0.0.3"})
        assert set(fleet.statuses()) == {A, B}
        assert all(s is ProxyStatus.STARTING for s in fleet.statuses().values())
        a1, b1 = fake.created
        assert a1.options["num_cpus"] == 0 and a1.options["max_restarts"] == 0
        assert a1.options["scheduling_strategy"].node_id == A and a1.options["scheduling_strategy"].soft is False
        assert a1.args["node_id"] == A and a1.args["port"] == 8000 and a1.args["secret"] == b"s" * 32
        peer = FakePeer()
        fleet.ready(peer, A, 1, A, 123, "http://127.0.0.1:8000")
        assert fleet.statuses()[A] is ProxyStatus.HEALTHY
        with pytest.raises(RuntimeError):
            fleet.ready(FakePeer(), A, 7, A, 1, "u")  # not its generation
        a1.die()  # the actor died: UNHEALTHY, then a new one after the backoff
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(fake.created) == 3:
                break
        a2 = fake.created[2]
        assert a2.args["node_id"] == A and a2.args["generation"] == 2
        assert fleet.statuses()[A] is ProxyStatus.STARTING
        fleet.ready(FakePeer(), A, 2, A, 124, "u")
        peer.close()  # the dead actor's link closing changes nothing now
        assert fleet.statuses()[A] is ProxyStatus.HEALTHY
        fleet.sync({H: "10.0.0.1", A: "10.0.0.2"})  # B left
        assert set(fleet.statuses()) == {A}
        assert b1.done.done()  # killed
        await fleet.stop(timeout=1.0)
        assert a2.stopped and fleet.statuses() == {}
        fleet.sync({H: "", C: ""})  # nothing starts once stopped
        assert len(fake.created) == 3

    asyncio.run(main())


def test_a_proxy_that_loses_its_head_link_is_replaced(fake: FakeClass) -> None:
    async def main() -> None:
        fleet = ray_proxies.ProxyFleet(H, "tcp://h:1", b"s" * 32, "sess", {"port": 8000})
        fleet.sync({H: "", A: ""})
        peer = FakePeer()
        fleet.ready(peer, A, 1, A, 1, "u")
        peer.close()
        assert fleet.statuses()[A] is ProxyStatus.UNHEALTHY
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(fake.created) == 2:
                break
        assert fake.created[0].done.done() and len(fake.created) == 2
        await fleet.stop(timeout=1.0)

    asyncio.run(main())
