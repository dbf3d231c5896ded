"""Replica ranks as Ray Serve documents them: `serve.get_replica_context().rank` (a ReplicaRank:
rank, node_rank, local_rank) and `world_size`, known in the constructor, 0..N-1 across the
deployment's replicas, contiguous again after a scale-down (the moved replicas are told
through `reconfigure(config, rank=...)` when it takes a `rank`)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from flotilla import serve
from tests.conftest import running_cluster, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with running_cluster(num_cpus=8) as url:
        yield url


@serve.deployment(num_replicas=4)
class ModelShard:
    def __init__(self) -> None:
        ctx = serve.get_replica_context()
        self.rank_at_init = ctx.rank.rank
        self.world_at_init = ctx.world_size

    def __call__(self) -> dict[str, Any]:
        ctx = serve.get_replica_context()
        return {"rank": ctx.rank.rank, "world_size": ctx.world_size, "replica": ctx.replica_tag,
                "node_rank": ctx.rank.node_rank, "local_rank": ctx.rank.local_rank,
                "rank_at_init": self.rank_at_init, "world_at_init": self.world_at_init,
                "code_version": ctx.code_version, "gang_context": ctx.gang_context}


def _by_replica(h: Any, n: int) -> dict[str, dict[str, Any]]:
    """Each replica's answer, calling until `n` replicas answered (deadline-bounded)."""
    seen: dict[str, dict[str, Any]] = {}

    def all_seen() -> bool:
        for out in [h.remote() for _ in range(4 * n)]:
            res = out.result(timeout_s=10)
            seen[res["replica"]] = res
        return len(seen) >= n

    wait_for(all_seen, timeout=20, what=f"answers from {n} replicas")
    return seen


def test_the_documented_example_sees_ranks_0_to_3_and_world_size_4(cluster: str) -> None:
    h = serve.run(ModelShard.bind(), name="ranks", route_prefix=None)
    seen = _by_replica(h, 4)
    assert sorted(r["rank"] for r in seen.values()) == [0, 1, 2, 3]
    for r in seen.values():
        assert r["world_size"] == 4 and r["node_rank"] == 0 and r["local_rank"] == r["rank"]
        assert (r["rank_at_init"], r["world_at_init"]) == (r["rank"], 4)  # known in the constructor
        assert r["gang_context"] is None  # Ray 2.60's field; no gang scheduling here
    versions = {r["code_version"] for r in seen.values()}
    assert len(versions) == 1 and isinstance(versions.pop(), str)  # one code version for all replicas
    serve.delete("ranks")


@serve.deployment(num_replicas=4, user_config={"v": 1})
class Subscriber:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, int]] = []

    def reconfigure(self, config: dict[str, Any], rank) -> None:
        self.calls.append((config["v"], rank.rank))

    def __call__(self) -> dict[str, Any]:
        ctx = serve.get_replica_context()
        return {"rank": ctx.rank.rank, "world_size": ctx.world_size, "replica": ctx.replica_tag, "calls": self.calls}


def test_after_a_scale_down_the_ranks_are_contiguous_and_moved_replicas_are_told(cluster: str) -> None:
    h = serve.run(Subscriber.bind(), name="sub", route_prefix=None)
    first = _by_replica(h, 4)
    for r in first.values():
        assert r["calls"] == [(1, r["rank"])]  # reconfigure at start gets the rank too
    h = serve.run(Subscriber.options(num_replicas=2).bind(), name="sub", route_prefix=None)

    def two_contiguous() -> dict[str, dict[str, Any]] | None:
        got = {}
        for out in [h.remote() for _ in range(16)]:
            res = out.result(timeout_s=10)
            got[res["replica"]] = res
        ranks = sorted(r["rank"] for r in got.values())
        return got if len(got) == 2 and ranks == [0, 1] else None

    after = wait_for(two_contiguous, timeout=20, what="ranks 0 and 1 on the two replicas left")
    for tag, r in after.items():
        assert r["world_size"] == 2
        before = first[tag]["rank"]
        if before != r["rank"]:  # moved: its reconfigure was called with the new rank
            assert r["calls"] == [(1, before), (1, r["rank"])], r
        else:
            assert r["calls"] == [(1, before)], r
    serve.delete("sub")


def test_a_replaced_replica_takes_the_free_rank(cluster: str) -> None:
    import os
    import signal

    @serve.deployment(num_replicas=2)
    class WithPid:
        def __call__(self) -> dict[str, Any]:
            ctx = serve.get_replica_context()
            return {"rank": int(ctx.rank), "replica": ctx.replica_tag, "pid": os.getpid()}

    h = serve.run(WithPid.bind(), name="pids", route_prefix=None)
    seen = _by_replica(h, 2)
    victim = next(r for r in seen.values() if r["rank"] == 0)
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced() -> bool:
        got = {}
        for out in [h.remote() for _ in range(8)]:
            try:
                res = out.result(timeout_s=10)
            except Exception:
                return False
            got[res["replica"]] = res
        return victim["replica"] not in got and sorted(r["rank"] for r in got.values()) == [0, 1]

    wait_for(replaced, timeout=30, what="a replacement holding rank 0")
    serve.delete("pids")


@serve.deployment(num_replicas=2)
class SlowToHear:
    def __init__(self, v: int) -> None:
        self.v = v
        self.told = 0
        self.first_rank = serve.get_replica_context().rank.rank

    def reconfigure(self, config: dict[str, Any], rank) -> None:
        import time

        if self.told:  # told of a new rank (the first call is at start)
            time.sleep(1.0)
        self.told += 1

    async def __call__(self, hold_s: float = 0.0) -> dict[str, Any]:
        import asyncio

        await asyncio.sleep(hold_s)
        ctx = serve.get_replica_context()
        return {"rank": ctx.rank.rank, "replica": ctx.replica_tag, "v": self.v, "told": self.told,
                "first_rank": self.first_rank}


def test_new_ranks_after_a_rollout_leave_the_app_running(cluster: str) -> None:
    """The new version's replicas start while the old ones still hold ranks 0 and 1 (at least
    the first does); moving them to 0 and 1 afterwards is news for them, not a config change:
    the app stays RUNNING."""
    old = serve.run(SlowToHear.bind(1), name="roll", route_prefix=None)
    held = [old.remote(hold_s=2.0) for _ in range(4)]  # the old replicas drain for 2 s
    h = serve.run(SlowToHear.bind(2), name="roll", route_prefix=None)
    statuses: list[str] = []
    got: dict[str, dict[str, Any]] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            statuses.append(serve.status().applications["roll"].status)
            done.wait(0.01)

    def compacted() -> bool:
        got.clear()
        for out in [h.remote() for _ in range(8)]:
            res = out.result(timeout_s=10)
            got[res["replica"]] = res
        # A replica that moved was told once more (its reconfigure returned); one that started
        # at 0 or 1 (an old replica was already gone when it registered, as a loaded machine
        # can make it) was not.
        return ({r["v"] for r in got.values()} == {2} and sorted(r["rank"] for r in got.values()) == [0, 1]
                and all(r["told"] == 1 + (r["first_rank"] != r["rank"]) for r in got.values()))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        wait_for(compacted, timeout=20,
                 what=lambda: f"the new version's replicas told of ranks 0 and 1; last answers: {got}")
    finally:
        done.set()
        watcher.join(5)
    assert set(statuses) == {"RUNNING"}, collections.Counter(statuses)
    assert any(r["first_rank"] >= 2 for r in got.values()), got  # at least one moved
    assert {r.result(timeout_s=10)["v"] for r in held} == {1}
    serve.delete("roll")
