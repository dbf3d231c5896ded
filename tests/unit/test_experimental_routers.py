"""The ready-made routers of `flotilla.serve.experimental` (Ray 2.60's experimental ones):
their choices, table-tested on replica lists without a cluster."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from flotilla.serve.config import RequestRouterConfig
from flotilla.serve.experimental.consistent_hash_router import ConsistentHashRouter
from flotilla.serve.experimental.round_robin_router import RoundRobinRouter
from flotilla.serve.request_router import PendingRequest, RequestMetadata, RunningReplica
from flotilla.serve.schema import DeploymentID, ReplicaID

DEP = DeploymentID("d", "app")


def replicas(*ids: str, models: dict[str, set[str]] | None = None) -> list[RunningReplica]:
    return [RunningReplica(ReplicaID(i, DEP), multiplexed_model_ids=(models or {}).get(i)) for i in ids]


def request(session: str = "", model: str = "", n: int = 0) -> PendingRequest:
    return PendingRequest([], {}, RequestMetadata(request_id=f"r{n}", internal_request_id=f"internal-{n}",
                                                  multiplexed_model_id=model, session_id=session))


def choose(router, reps: list[RunningReplica], req: PendingRequest) -> list[list[str]]:
    async def go():
        return await router.choose_replicas(reps, req)
    return [[r.replica_id.unique_id for r in rank] for rank in asyncio.run(go())]


def test_round_robin_starts_each_request_at_the_next_replica_and_offers_the_rest_in_turn() -> None:
    rr = RoundRobinRouter(DEP)
    reps = replicas("c", "a", "b")
    firsts = []
    for n in range(6):
        ranks = choose(rr, reps, request(n=n))
        assert sorted(r[0] for r in ranks) == ["a", "b", "c"] and all(len(r) == 1 for r in ranks)
        firsts.append(ranks[0][0])
    order = ["a", "b", "c"]
    start = order.index(firsts[0])
    assert firsts == [order[(start + i) % 3] for i in range(6)]


def test_round_robin_sends_a_model_round_the_replicas_that_hold_it_first() -> None:
    rr = RoundRobinRouter(DEP)
    reps = replicas("a", "b", "c", models={"a": {"m1"}, "c": {"m1", "m2"}})
    got = [choose(rr, reps, request(model="m1", n=n)) for n in range(4)]
    assert [g[0][0] for g in got] == ["a", "c", "a", "c"]
    assert all([r[0] for r in g[2:]] == ["b"] for g in got)  # then the replica without it
    assert choose(rr, reps, request(model="m9"))[0][0] in ("a", "b", "c")  # no one holds it: plain turn


def test_round_robin_with_no_replicas_offers_nothing() -> None:
    assert choose(RoundRobinRouter(DEP), [], request()) == []


def test_consistent_hash_keeps_a_session_on_one_replica_with_distinct_fallbacks() -> None:
    ch = ConsistentHashRouter(DEP)
    ch.initialize_state()
    reps = replicas("a", "b", "c", "d")
    for s in ("alpha", "beta", "gamma", "delta"):
        ranks = choose(ch, reps, request(session=s))
        assert len(ranks) == 3 and len({r[0] for r in ranks}) == 3  # owner + 2 fallbacks
        assert all(choose(ch, reps, request(session=s, n=n)) == ranks for n in range(5))
        again = ConsistentHashRouter(DEP)  # another process's router builds the same ring
        again.initialize_state()
        assert choose(again, list(reversed(reps)), request(session=s)) == ranks


def test_consistent_hash_moves_only_the_removed_replicas_sessions() -> None:
    ch = ConsistentHashRouter(DEP)
    ch.initialize_state(num_fallback_replicas=0)
    reps = replicas("a", "b", "c", "d")
    sessions = [f"s{i}" for i in range(400)]
    before = {s: choose(ch, reps, request(session=s))[0][0] for s in sessions}
    after = {s: choose(ch, reps[:3], request(session=s))[0][0] for s in sessions}
    moved = [s for s in sessions if before[s] != after[s]]
    assert moved and all(before[s] == "d" for s in moved)
    assert set(Counter(before.values())) == {"a", "b", "c", "d"}  # spread over every replica


def test_consistent_hash_without_a_session_spreads_by_request_id() -> None:
    ch = ConsistentHashRouter(DEP)
    ch.initialize_state()
    owners = Counter(choose(ch, replicas("a", "b", "c"), request(n=n))[0][0] for n in range(300))
    assert set(owners) == {"a", "b", "c"} and min(owners.values()) > 50


@pytest.mark.parametrize("kwargs", [{"num_virtual_nodes": 0}, {"num_virtual_nodes": "8"},
                                    {"num_fallback_replicas": -1}, {"num_fallback_replicas": True}])
def test_consistent_hash_refuses_bad_kwargs(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="must be a"):
        ConsistentHashRouter(DEP).initialize_state(**kwargs)


def test_rays_experimental_paths_name_flotillas_routers() -> None:
    cfg = RequestRouterConfig(request_router_class="ray.serve.experimental.consistent_hash_router.ConsistentHashRouter")
    assert cfg.request_router_class == "flotilla.serve.experimental.consistent_hash_router.ConsistentHashRouter"
    assert cfg.is_custom and cfg.serialized_class
    with pytest.raises(ImportError, match="no CapacityQueueRouter"):
        import flotilla.serve.experimental.capacity_queue_router  # noqa: F401
