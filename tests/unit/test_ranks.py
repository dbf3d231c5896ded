"""Replica ranks: assignment, release and compaction (flotilla._private.ranks), and ReplicaRank."""

from __future__ import annotations

import pickle

import cloudpickle
import pytest

from flotilla._private.ranks import DeploymentRanks, RankBook
from flotilla.serve.schema import ReplicaRank


def book(ranks: dict[str, int]) -> RankBook:
    b = RankBook()
    for k, r in ranks.items():
        b.recover(k, r)
    return b


@pytest.mark.parametrize(
    ("held", "new_rank"),
    [
        ({}, 0),
        ({"a": 0}, 1),
        ({"a": 0, "b": 1, "c": 2}, 3),
        ({"a": 0, "c": 2}, 1),  # the smallest free rank first
        ({"b": 1, "c": 2}, 0),
        ({"a": 0, "d": 5}, 1),
    ],
)
def test_a_new_key_takes_the_smallest_free_rank(held: dict[str, int], new_rank: int) -> None:
    b = book(held)
    assert b.assign("new") == new_rank
    assert b.assign("new") == new_rank  # asked again: the same


@pytest.mark.parametrize(
    ("held", "after", "moved"),
    [
        ({}, {}, []),
        ({"a": 0, "b": 1}, {"a": 0, "b": 1}, []),
        ({"a": 0, "c": 2}, {"a": 0, "c": 1}, ["c"]),  # after b (rank 1) went
        ({"b": 1, "c": 2, "d": 3}, {"b": 1, "c": 2, "d": 0}, ["d"]),  # only the one above N moves
        ({"x": 7, "y": 9}, {"x": 0, "y": 1}, ["x", "y"]),  # lowest rank takes the lowest hole
        ({"a": 0, "b": 0}, {"a": 0, "b": 1}, ["b"]),  # a shared rank (never made; still mended)
    ],
)
def test_compact_moves_as_few_keys_as_possible(held: dict[str, int], after: dict[str, int], moved: list[str]) -> None:
    b = book(held)
    assert b.compact() == moved
    assert b.ranks == after
    assert sorted(b.ranks.values()) == list(range(len(held)))


def test_scale_down_then_up_keeps_ranks_unique_and_contiguous() -> None:
    d = DeploymentRanks()
    ranks = {f"r{i}": d.assign(f"r{i}") for i in range(4)}
    assert [int(r) for r in ranks.values()] == [0, 1, 2, 3]
    d.release("r1")
    d.release("r2")
    assert d.compact() == ["r3"]
    assert int(d.get("r3")) == 1 and d.get("r3").local_rank == 1
    assert int(d.assign("r4")) == 2  # a new replica after the shrink
    assert sorted(int(d.get(r)) for r in ("r0", "r3", "r4")) == [0, 1, 2]


def test_node_and_local_ranks() -> None:
    d = DeploymentRanks()
    a0 = d.assign("a0", "node-a")
    b0 = d.assign("b0", "node-b")
    a1 = d.assign("a1", "node-a")
    assert (int(a0), a0.node_rank, a0.local_rank) == (0, 0, 0)
    assert (int(b0), b0.node_rank, b0.local_rank) == (1, 1, 0)
    assert (int(a1), a1.node_rank, a1.local_rank) == (2, 0, 1)
    d.release("a0")
    d.release("a1")  # node-a holds no replica: its node rank is free
    c0 = d.assign("c0", "node-c")  # takes the free global and node rank 0
    assert (int(c0), c0.node_rank, c0.local_rank) == (0, 0, 0)
    assert d.compact() == []
    d.release("c0")
    assert d.compact() == ["b0"]
    b0 = d.get("b0")
    assert (int(b0), b0.node_rank, b0.local_rank) == (0, 0, 0)


def test_release_of_an_unknown_replica_is_harmless() -> None:
    d = DeploymentRanks()
    d.release("never")
    assert not d.holds("never") and d.compact() == []


def test_replica_rank_is_an_int_with_its_parts() -> None:
    r = ReplicaRank(rank=2, node_rank=1, local_rank=0)
    assert r == 2 and r.rank == 2 and r in [0, 1, 2, 3] and isinstance(r.rank, int)
    assert (r.node_rank, r.local_rank) == (1, 0)
    assert r.model_dump() == {"rank": 2, "node_rank": 1, "local_rank": 0}
    assert repr(r) == "ReplicaRank(rank=2, node_rank=1, local_rank=0)" and f"{r}" == "2"
    for dumps in (pickle.dumps, cloudpickle.dumps):
        back = pickle.loads(dumps(r))
        assert type(back) is ReplicaRank and back.model_dump() == r.model_dump()
    assert ReplicaRank() == 0 and ReplicaRank().node_rank == 0


def test_rank_zero_on_another_node_reaches_the_replica_context() -> None:
    from flotilla._private import context
    from flotilla._private.replica import set_replica_context

    saved = context.replica_context
    try:
        set_replica_context("app", "dep", "r1", ReplicaRank(0, node_rank=1, local_rank=0), 3)
        ctx = context.replica_context
        assert ctx is not None and ctx.rank.parts == (0, 1, 0) and ctx.world_size == 3
    finally:
        context.replica_context = saved
