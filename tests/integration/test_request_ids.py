"""Request ids of handle calls, as Ray Serve gives them: every call carries one
(`DeploymentResponse.request_id`), the serving request's for a call made while serving one,
else a fresh one, and the replica sees it in `serve.get_request_context().request_id`."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from flotilla import serve
from flotilla.serve.exceptions import RequestCancelledError

pytestmark = pytest.mark.slow


@serve.deployment
class Echo:
    def rid(self) -> str:
        return serve.get_request_context().request_id

    def rids(self, n: int) -> Any:
        for _ in range(n):
            yield serve.get_request_context().request_id

    async def slow(self) -> None:
        import asyncio

        await asyncio.sleep(30)


@serve.deployment
class Front:
    def __init__(self, echo: Any) -> None:
        self.echo = echo

    async def __call__(self, request: Any) -> dict[str, str]:
        r = self.echo.rid.remote()
        return {"mine": serve.get_request_context().request_id, "response": r.request_id, "seen": await r}


def test_a_driver_call_has_a_fresh_id_the_replica_sees(url: str) -> None:
    h = serve.run(Echo.bind(), name="ids", route_prefix=None)
    a, b = h.rid.remote(), h.rid.remote()
    assert isinstance(a.request_id, str) and a.request_id and a.request_id != b.request_id
    uuid.UUID(a.request_id)  # in a UUID's form, as Ray Serve's
    assert a.result(timeout_s=10) == a.request_id and b.result(timeout_s=10) == b.request_id
    gen = h.options(stream=True).rids.remote(2)
    assert gen.request_id and list(gen) == [gen.request_id] * 2


def test_an_http_request_without_an_id_gets_one_in_a_uuids_form(url: str) -> None:
    """As Ray Serve's proxy makes them (uuid4 strings), unique per request."""
    serve.run(Front.bind(Echo.bind()), name="ids", route_prefix="/ids")
    got = [httpx.get(f"{url}/ids", timeout=10) for _ in range(3)]
    ids = [r.headers["x-request-id"] for r in got]
    assert len(set(ids)) == 3 and all(str(uuid.UUID(i)) == i for i in ids)
    assert [r.json()["mine"] for r in got] == ids


def test_a_call_made_while_serving_a_request_carries_its_id(url: str) -> None:
    serve.run(Front.bind(Echo.bind()), name="ids", route_prefix="/ids")
    got = httpx.get(f"{url}/ids", headers={"x-request-id": "outer-id-1"}, timeout=10).json()
    assert got == {"mine": "outer-id-1", "response": "outer-id-1", "seen": "outer-id-1"}


def test_a_cancelled_call_names_its_id(url: str) -> None:
    h = serve.run(Echo.bind(), name="ids", route_prefix=None)
    r = h.slow.remote()
    r.cancel()
    with pytest.raises(RequestCancelledError) as e:
        r.result(timeout_s=10)
    assert r.request_id in str(e.value)


def test_run_many_deploys_every_target_and_checks_all_first(url: str) -> None:
    handles = serve.run_many([
        serve.RunTarget(Echo.bind(), name="many-a", route_prefix=None),
        serve.RunTarget(Front.bind(Echo.bind()), name="many-b", route_prefix="/many-b"),
    ])
    assert [h.deployment_name for h in handles] == ["Echo", "Front"]
    assert {"many-a", "many-b"} <= set(serve.status().applications)
    assert all(serve.status().applications[n].status == "RUNNING" for n in ("many-a", "many-b"))
    assert handles[0].rid.remote().result(timeout_s=10)
    assert httpx.get(f"{url}/many-b", timeout=10).json()["seen"]
    with pytest.raises(ValueError, match="must be unique"):
        serve.run_many([serve.RunTarget(Echo.bind(), name="many-c", route_prefix=None),
                        serve.RunTarget(Echo.bind(), name="many-c", route_prefix=None)])
    assert "many-c" not in serve.status().applications  # checked before any was deployed
    with pytest.raises(ValueError, match="No applications"):
        serve.run_many([])


def test_shutdown_async(url: str) -> None:
    import asyncio

    serve.run(Echo.bind(), name="ids", route_prefix=None)
    asyncio.run(serve.shutdown_async())
    assert serve.status().applications == {}
