"""Custom request routers (`serve.request_router`, Ray Serve's alpha API): honoured by every
router of a deployment's calls (the driver's handles, the proxy's HTTP, other deployments'
handles), fed `request_router_kwargs` and the replicas' `record_routing_stats()`."""

from __future__ import annotations

import json
import os
import zlib

import httpx
import pytest

from flotilla import serve
from flotilla.serve.config import RequestRouterConfig
from flotilla.serve.context import _get_internal_replica_context, _get_serve_request_context
from flotilla.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)
from tests.conftest import metric_total, wait_for

pytestmark = pytest.mark.slow


class LowestIdRouter(RequestRouter):
    """Always the replica whose id sorts first; kwargs can name a file to log completions to."""

    def initialize_state(self, **kwargs):
        self.log = kwargs.get("log")

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        return [[min(candidate_replicas, key=lambda r: r.replica_id.unique_id)]]

    def on_request_completed(self, replica_id, internal_request_id):
        if self.log:
            with open(self.log, "a") as f:
                f.write(json.dumps([replica_id.unique_id, internal_request_id, os.getpid()]) + "\n")


class StatsRouter(FIFOMixin, MultiplexMixin, LocalityMixin, RequestRouter):
    """The available replica whose routing stats say `pick` (any, until stats arrive)."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        local = self.select_available_replicas(self.rank_replicas_via_locality(candidate_replicas)[0])
        return [sorted(local, key=lambda r: -r.routing_stats.get("pick", 0))[:1]]


class MetaRouter(RequestRouter):
    """Writes what it is told of each request to the file in its kwargs."""

    def initialize_state(self, **kwargs):
        self.log = kwargs["log"]

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        m = pending_request.metadata
        with open(self.log, "a") as f:
            f.write(json.dumps({"request_id": m.request_id, "route": m.route, "method": m.call_method,
                                "http": m.is_http_request, "args": len(pending_request.args),
                                "internal": m.internal_request_id}) + "\n")
        return [candidate_replicas]


class BrokenRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas, pending_request=None):
        raise ValueError("no replica suits this request")


class FlatRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas, pending_request=None):
        return candidate_replicas  # a rank, not a list of ranks


@serve.deployment(num_replicas=3, ray_actor_options={"num_cpus": 0})
class Who:
    def __init__(self, chosen: str = ""):
        self.id = _get_internal_replica_context().replica_id.unique_id
        self.chosen = chosen  # a file: the replica whose id is in it says `pick`

    def __call__(self, *args):
        return self.id

    def record_routing_stats(self):
        try:
            with open(self.chosen) as f:
                return {"pick": int(f.read().strip() == self.id)}
        except OSError:
            return {}


@serve.deployment
class Caller:
    def __init__(self, who):
        self.who = who

    async def __call__(self, *args):
        return [await self.who.remote() for _ in range(8)]


def test_a_custom_router_decides_for_handles_http_and_downstream_calls(url, tmp_path):
    log = str(tmp_path / "completed.jsonl")
    cfg = RequestRouterConfig(request_router_class=LowestIdRouter, request_router_kwargs={"log": log})
    h = serve.run(Caller.bind(Who.options(request_router_config=cfg).bind()), name="rr", route_prefix="/rr")
    who = serve.get_deployment_handle("Who", app_name="rr")
    # Once the router is connected to all three replicas, every call goes to the lowest id.
    lowest = wait_for(lambda: (got := {who.remote().result() for _ in range(12)}) and len(got) == 1 and got.pop(),
                      what="the driver's calls all going to one replica")
    assert set(h.remote().result()) == {lowest}  # from another deployment's replica
    assert set(h.remote().result()) == {lowest}
    with httpx.Client(base_url=url, timeout=30) as c:  # through the proxy's router, to Caller's
        assert set(c.get("/rr").json()) == {lowest}
    direct = serve.run(Who.options(request_router_config=cfg).bind(), name="rr2", route_prefix="/rr2")
    first = wait_for(lambda: (got := {direct.remote().result() for _ in range(12)}) and len(got) == 1 and got.pop(),
                     what="the driver's calls to rr2 all going to one replica")
    with httpx.Client(base_url=url, timeout=30) as c:
        got = {c.get("/rr2").text for _ in range(12)}  # the proxy's own router of Who
    assert got == {first}

    def completed_here() -> list[list]:
        if not os.path.exists(log):
            return []
        with open(log) as f:
            return [e for e in map(json.loads, f) if e[2] == os.getpid()]

    # on_request_completed heard of each call made from this process (the driver's router).
    wait_for(lambda: len(completed_here()) >= 12, what="on_request_completed calls from the driver's router")
    mine = completed_here()
    assert {m[0] for m in mine[:12]} == {lowest}
    assert len({m[1] for m in mine}) == len(mine)  # one internal request id per request


def test_routing_stats_reach_the_router(url, tmp_path):
    chosen = tmp_path / "chosen"
    cfg = RequestRouterConfig(request_router_class=StatsRouter, request_routing_stats_period_s=0.2,
                              request_routing_stats_timeout_s=2)
    h = serve.run(Who.options(request_router_config=cfg).bind(str(chosen)), name="stats", route_prefix=None)
    ids = set(h.broadcast("__call__").results())
    assert len(ids) == 3
    before = h.remote().result()
    target = sorted(ids - {before})[0]  # a replica the router does not pick now
    chosen.write_text(target)
    wait_for(lambda: all(h.remote().result() == target for _ in range(5)), timeout=30,
             what="calls following the replica whose routing stats say pick")
    wait_for(lambda: metric_total("ray_serve_routing_stats_delay_ms_count", deployment="Who", application="stats") > 0,
             what="the routing stats' delay (Ray's metric)")


def test_a_router_that_raises_fails_the_call_with_its_error(url):
    h = serve.run(Who.options(num_replicas=1, request_router_config={"request_router_class": BrokenRouter}).bind(),
                  name="broken", route_prefix=None)
    with pytest.raises(ValueError, match="no replica suits"):
        h.remote().result(timeout_s=30)
    h = serve.run(Who.options(num_replicas=1, request_router_config={"request_router_class": FlatRouter}).bind(),
                  name="flat", route_prefix=None)
    with pytest.raises(TypeError, match=r"FlatRouter\.choose_replicas\(\) must return ranks"):
        h.remote().result(timeout_s=30)


def test_a_bad_router_class_is_refused_at_declaration():
    with pytest.raises(ValueError, match="request_router"):
        Who.options(request_router_config={"request_router_class": "no_such_module_xyz:Router"})
    with pytest.raises(ValueError, match="RequestRouter"):
        Who.options(request_router_config={"request_router_class": dict})


def test_the_router_is_told_each_requests_id_route_and_kind_from_the_first_request(url, tmp_path):
    log = tmp_path / "meta.jsonl"
    cfg = {"request_router_class": MetaRouter, "request_router_kwargs": {"log": str(log)}}
    serve.run(Who.options(num_replicas=1, request_router_config=cfg).bind(), name="meta", route_prefix="/meta")
    with httpx.Client(base_url=url, timeout=30) as c:  # the proxy's first request to it
        assert c.get("/meta", headers={"x-request-id": "req-abc-1"}).status_code == 200
    h = serve.get_app_handle("meta")
    h.remote(7).result()
    seen = [json.loads(line) for line in log.read_text().splitlines()]
    by_id = {e["request_id"]: e for e in seen}
    assert by_id["req-abc-1"]["route"] == "/meta" and by_id["req-abc-1"]["http"] is True
    handle_calls = [e for e in seen if not e["http"]]
    assert handle_calls and handle_calls[-1]["method"] == "__call__" and handle_calls[-1]["args"] == 1
    assert handle_calls[-1]["request_id"]  # the call's own id


class SessionRouter(RequestRouter):
    """The replica a stable hash of the request's session id names (Ray 2.60's session
    affinity); marks its tries in the routing context and logs what the request's future got."""

    def initialize_state(self, **kwargs):
        self.log = kwargs["log"]

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        ctx = pending_request.routing_context
        ctx.should_backoff = True
        ctx.tried_same_node = True
        ranked = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        session = pending_request.metadata.session_id
        if not session:
            return [ranked]
        return [[ranked[zlib.crc32(session.encode()) % len(ranked)]]]

    def on_request_routed(self, pending_request, replica_id, result):
        fut = pending_request.future
        with open(self.log, "a") as f:
            f.write(json.dumps([fut.done() and fut.result().replica_id == replica_id,
                                pending_request.routing_context.tried_same_node]) + "\n")


@serve.deployment(num_replicas=3, ray_actor_options={"num_cpus": 0})
class SessionWho:
    def __call__(self, *args):
        return [_get_internal_replica_context().replica_id.unique_id, _get_serve_request_context().session_id]


def test_a_session_id_reaches_the_router_and_the_replica_from_handles_and_http(url, tmp_path):
    """`handle.options(session_id=...)` raised TypeError, the `x-session-id` header was dropped,
    and `PendingRequest` had no `routing_context` (Ray's routers set `should_backoff` on it)."""
    log = tmp_path / "routed.jsonl"
    cfg = {"request_router_class": SessionRouter, "request_router_kwargs": {"log": str(log)}}
    h = serve.run(SessionWho.options(request_router_config=cfg).bind(), name="sess", route_prefix="/sess")
    ids = {x[0] for x in h.broadcast("__call__").results()}
    assert len(ids) == 3
    expected = {s: sorted(ids)[zlib.crc32(s.encode()) % 3] for s in ("alpha", "beta", "gamma")}
    for s, rid in expected.items():
        wait_for(lambda s=s, rid=rid: h.options(session_id=s).remote().result() == [rid, s],
                 what=f"the driver's calls of session {s} reaching replica {rid}")
        assert all(h.options(session_id=s).remote().result() == [rid, s] for _ in range(5))
    with httpx.Client(base_url=url, timeout=30) as c:  # through the proxy's own router
        for s, rid in expected.items():
            got = [c.get("/sess", headers={"X-Session-Id": s}).json() for _ in range(5)]
            assert got == [[rid, s]] * 5, got
        assert c.get("/sess").json()[1] == ""  # no header: no session
    seen = [json.loads(line) for line in log.read_text().splitlines()]
    assert seen and all(e == [True, True] for e in seen), seen


def test_rays_ready_made_routers_by_their_ray_paths(url):
    """`ray.serve.experimental`'s round robin and consistent hash routers (there was no
    `flotilla.serve.experimental`): named by Ray's import paths, as a ported config has them."""
    rr = serve.run(SessionWho.options(request_router_config={
        "request_router_class": "ray.serve.experimental.round_robin_router:RoundRobinRouter"}).bind(),
        name="rrobin", route_prefix=None)
    ids = sorted({x[0] for x in rr.broadcast("__call__").results()})
    assert len(ids) == 3

    def turns() -> bool:
        got = [rr.remote().result()[0] for _ in range(6)]
        start = ids.index(got[0])
        return got == [ids[(start + i) % 3] for i in range(6)]

    wait_for(turns, what="sequential calls taking the replicas in turn")
    ch = serve.run(SessionWho.options(request_router_config={
        "request_router_class": "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter",
        "request_router_kwargs": {"num_virtual_nodes": 50}}).bind(), name="chash", route_prefix="/chash")
    owner = {}
    for s in ("alpha", "beta", "gamma", "delta", "epsilon"):
        owner[s] = ch.options(session_id=s).remote().result()[0]
        assert all(ch.options(session_id=s).remote().result() == [owner[s], s] for _ in range(4))
    assert len(set(owner.values())) >= 2
    with httpx.Client(base_url=url, timeout=30) as c:  # the proxy's router builds the same ring
        for s, rid in owner.items():
            assert [c.get("/chash", headers={"x-session-id": s}).json()[0] for _ in range(4)] == [rid] * 4
