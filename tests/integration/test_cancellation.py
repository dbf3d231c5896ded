"""`DeploymentResponse.cancel()` and `DeploymentResponseGenerator.cancel()` as Ray Serve does
them: the replica's call is cancelled (or, still queued, never sent), and waiting for the
response then raises `RequestCancelledError`, from sync code, from `await`, and from the next
item of a stream. Cancelling one call leaves the others alone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from flotilla import serve
from flotilla.exceptions import TaskCancelledError
from flotilla.serve.exceptions import RequestCancelledError
from tests.conftest import wait_for

pytestmark = pytest.mark.slow


@serve.deployment(max_ongoing_requests=10)
class Target:
    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.release = asyncio.Event()

    async def wait(self, key: str, timeout: float = 30) -> str:
        self.started.append(key)
        try:
            await asyncio.wait_for(self.release.wait(), timeout)
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            self.cancelled.append(key)
            raise
        return key

    async def stream(self, key: str) -> Any:
        self.started.append(key)
        yield "hi"
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(key)
            raise
        yield "never"

    async def raise_cancelled(self) -> None:
        t = asyncio.ensure_future(asyncio.sleep(10))
        t.cancel()
        await t  # CancelledError from code it awaited: the request itself was not cancelled

    def open(self) -> None:
        self.release.set()

    def close(self) -> None:
        self.release.clear()

    def seen(self) -> dict[str, list[str]]:
        return {"started": self.started, "cancelled": self.cancelled}


@serve.deployment
class Caller:
    def __init__(self, target: Any) -> None:
        self.target = target

    async def cancel_running(self) -> str:
        r = self.target.wait.remote("async-running")
        while "async-running" not in (await self.target.seen.remote())["started"]:
            await asyncio.sleep(0.01)
        r.cancel()
        try:
            await r
        except RequestCancelledError:
            return "RequestCancelledError"
        return "not cancelled"

    async def cancel_stream(self) -> str:
        g = self.target.options(stream=True).stream.remote("async-stream")
        assert await g.__anext__() == "hi"
        g.cancel()
        try:
            await g.__anext__()
        except RequestCancelledError:
            return "RequestCancelledError"
        return "not cancelled"

    async def outer_cancelled(self) -> str:
        # Cancelling the task that awaits a response is asyncio cancellation, not the request's.
        t = asyncio.ensure_future(self._await(self.target.wait.remote("async-outer")))
        while "async-outer" not in (await self.target.seen.remote())["started"]:
            await asyncio.sleep(0.01)
        t.cancel()
        try:
            await t
        except asyncio.CancelledError:
            return "CancelledError"
        return "not cancelled"

    @staticmethod
    async def _await(r: Any) -> Any:
        return await r

    async def spawn_and_wait(self, key: str) -> None:
        self.target.wait.remote(key)  # not awaited: cancelled with this request all the same
        await asyncio.sleep(60)

    async def spawn_and_swallow(self, key: str) -> str:
        self.target.wait.remote(key)
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:  # caught, as Ray's own tests do: the request is cancelled all the same
            return "swallowed"
        return "slept"

    async def spawn_and_return(self, key: str) -> str:
        self.target.wait.remote(key, 1.0)  # outlives this request, which is not cancelled
        return key


@serve.deployment
class EarlyCaller:
    def __init__(self, target: Any) -> None:
        self.target = target
        self.early = target.wait.remote("out-of-band", 3.0)  # made outside any request

    async def __call__(self) -> None:
        await self.target.wait.remote("in-request")

    async def early_result(self) -> str:
        return await self.early


@pytest.fixture
def target(url: str) -> serve.DeploymentHandle:
    return serve.run(Target.bind(), name="cancel", route_prefix=None)


def _seen(h: serve.DeploymentHandle) -> dict[str, list[str]]:
    return h.seen.remote().result(timeout_s=10)


def test_cancel_a_running_call_from_sync_code(target: serve.DeploymentHandle) -> None:
    r = target.wait.remote("sync")
    wait_for(lambda: "sync" in _seen(target)["started"], what="the call running")
    r.cancel()
    wait_for(lambda: "sync" in _seen(target)["cancelled"], what="the replica's call cancelled")
    with pytest.raises(RequestCancelledError):
        r.result(timeout_s=10)
    with pytest.raises(TaskCancelledError):  # Ray's older name still catches it
        r.result(timeout_s=10)
    assert r.cancelled()


def test_a_call_cancelled_while_queued_never_reaches_the_replica(url: str) -> None:
    h = serve.run(Target.options(max_ongoing_requests=1).bind(), name="cancel", route_prefix=None)
    h.close.remote().result(timeout_s=10)  # the router has a live connection: `first` goes straight in
    first = h.wait.remote("first", 1.0)
    second = h.wait.remote("second")  # max_ongoing_requests=1: waits in the router
    second.cancel()
    with pytest.raises(RequestCancelledError):
        second.result(timeout_s=10)
    assert first.result(timeout_s=10) == "first"
    for i in range(5):
        assert h.wait.remote(f"after-{i}", 0).result(timeout_s=10) == f"after-{i}"
    assert "second" not in _seen(h)["started"]


def test_cancelling_one_call_leaves_the_others(url: str) -> None:
    h = serve.run(Target.options(max_ongoing_requests=5).bind(), name="cancel", route_prefix=None)
    r1, r2 = h.wait.remote("r1"), h.wait.remote("r2")
    wait_for(lambda: {"r1", "r2"} <= set(_seen(h)["started"]), what="both calls running")
    r1.cancel()
    with pytest.raises(RequestCancelledError):
        r1.result(timeout_s=10)
    h.open.remote().result(timeout_s=10)
    assert r2.result(timeout_s=10) == "r2"
    assert _seen(h)["cancelled"] == ["r1"]


def test_cancel_a_running_call_from_a_driver_event_loop(target: serve.DeploymentHandle) -> None:
    async def main() -> None:
        r = target.wait.remote("loop")
        while "loop" not in (await target.seen.remote())["started"]:
            await asyncio.sleep(0.01)
        r.cancel()
        with pytest.raises(RequestCancelledError):
            await r

    asyncio.run(main())
    wait_for(lambda: "loop" in _seen(target)["cancelled"], what="the replica's call cancelled")


def test_cancel_in_a_deployment_raises_request_cancelled_on_await(url: str) -> None:
    h = serve.run(Caller.bind(Target.options(max_ongoing_requests=5).bind()), name="cancel", route_prefix=None)
    assert h.cancel_running.remote().result(timeout_s=20) == "RequestCancelledError"
    assert h.outer_cancelled.remote().result(timeout_s=20) == "CancelledError"
    assert h.cancel_stream.remote().result(timeout_s=20) == "RequestCancelledError"
    t = serve.get_deployment_handle("Target", "cancel")
    wait_for(lambda: {"async-running", "async-outer", "async-stream"} <= set(_seen(t)["cancelled"]),
             what="the replica's calls cancelled")


def test_cancel_a_stream_from_sync_code(target: serve.DeploymentHandle) -> None:
    g = target.options(stream=True).stream.remote("sync-stream")
    assert next(g) == "hi"
    g.cancel()
    with pytest.raises(RequestCancelledError):
        next(g)
    wait_for(lambda: "sync-stream" in _seen(target)["cancelled"], what="the replica's stream cancelled")


def test_cancel_a_stream_while_an_item_is_awaited(target: serve.DeploymentHandle) -> None:
    async def main() -> None:
        g = target.options(stream=True).stream.remote("waiting-stream")
        assert await g.__anext__() == "hi"
        pending = asyncio.ensure_future(g.__anext__())  # waits on the replica's release
        while "waiting-stream" not in (await target.seen.remote())["started"]:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)
        g.cancel()
        with pytest.raises(RequestCancelledError):
            await pending
        with pytest.raises(RequestCancelledError):
            await g.__anext__()

    asyncio.run(main())
    wait_for(lambda: "waiting-stream" in _seen(target)["cancelled"], what="the replica's stream cancelled")


def test_a_stream_cancelled_before_its_first_item(target: serve.DeploymentHandle) -> None:
    g = target.options(stream=True).stream.remote("never-started")
    g.cancel()
    with pytest.raises(RequestCancelledError):
        next(g)
    assert "never-started" not in _seen(target)["started"]


@pytest.mark.parametrize("method", ["spawn_and_wait", "spawn_and_swallow"])
def test_cancellation_cascades_to_calls_the_request_spawned(url: str, method: str) -> None:
    # Ray Serve: cancelling a request cancels the handle calls made while serving it, awaited or
    # not, also when its method catches the CancelledError (`spawn_and_swallow`: they were
    # cancelled only when the error left the method).
    h = serve.run(Caller.bind(Target.options(max_ongoing_requests=5).bind()), name="cancel", route_prefix=None)
    t = serve.get_deployment_handle("Target", "cancel")
    r = getattr(h, method).remote(method)
    wait_for(lambda: method in _seen(t)["started"], what="the spawned call running")
    r.cancel()
    wait_for(lambda: method in _seen(t)["cancelled"], what="the spawned call cancelled")
    assert h.spawn_and_return.remote("survivor").result(timeout_s=10) == "survivor"
    wait_for(lambda: "survivor" in _seen(t)["started"], what="the second spawned call running")
    t.open.remote().result(timeout_s=10)
    assert "survivor" not in _seen(t)["cancelled"]


def test_a_call_made_outside_any_request_is_not_cancelled_with_one(url: str) -> None:
    h = serve.run(EarlyCaller.bind(Target.options(max_ongoing_requests=5).bind()), name="cancel", route_prefix=None)
    t = serve.get_deployment_handle("Target", "cancel")
    r = h.remote()
    wait_for(lambda: "in-request" in _seen(t)["started"], what="the request's call running")
    r.cancel()
    wait_for(lambda: "in-request" in _seen(t)["cancelled"], what="the request's call cancelled")
    assert h.early_result.remote().result(timeout_s=10) == "out-of-band"
    assert "out-of-band" not in _seen(t)["cancelled"]


@serve.deployment(max_ongoing_requests=10)
class Batcher:
    def __init__(self, target: Any) -> None:
        self.target = target

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1.0)
    async def both(self, keys: list[str]) -> list[str]:
        await self.target.wait.remote("+".join(keys), 1.0)  # the batch's own downstream call
        return keys

    async def __call__(self, key: str) -> str:
        return await self.both(key)


def test_cancelling_the_request_that_started_a_batch_leaves_the_batch(url: str) -> None:
    h = serve.run(Batcher.bind(Target.options(max_ongoing_requests=5).bind()), name="cancel", route_prefix=None)
    t = serve.get_deployment_handle("Target", "cancel")
    first, second = h.remote("a"), h.remote("b")
    wait_for(lambda: "a+b" in _seen(t)["started"] or "b+a" in _seen(t)["started"], what="the batch's call running")
    first.cancel()
    assert second.result(timeout_s=10) == "b"
    assert not _seen(t)["cancelled"]


def test_a_method_that_raises_cancelled_error_uncancelled_gets_an_answer(target: serve.DeploymentHandle) -> None:
    # Not a hang: the caller learns the request was cut off by a CancelledError inside it.
    with pytest.raises(TaskCancelledError, match="CancelledError"):
        target.raise_cancelled.remote().result(timeout_s=10)
    assert target.wait.remote("after", 0).result(timeout_s=10) == "after"


def test_an_http_request_that_raises_cancelled_error_uncancelled_gets_500(url: str) -> None:
    import httpx

    @serve.deployment
    class Http:
        async def __call__(self, request: Any) -> str:
            t = asyncio.ensure_future(asyncio.sleep(10))
            t.cancel()
            await t
            return "unreachable"

    serve.run(Http.bind(), name="cancel-http", route_prefix="/cancel-http")
    r = httpx.get(f"{url}/cancel-http", timeout=10)
    assert r.status_code == 500


def test_a_stream_is_iterated_not_awaited_nor_result(target: serve.DeploymentHandle) -> None:
    g = target.options(stream=True).stream.remote("iterated")
    with pytest.raises(TypeError, match="iterate"):
        g.result()

    async def main() -> None:
        with pytest.raises(TypeError):  # not awaitable (and so never mistaken for a result to await)
            await g

    asyncio.run(main())
    assert next(g) == "hi"
    g.cancel()
