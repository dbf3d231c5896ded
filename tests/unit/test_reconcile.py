"""The pure reconcile function and the replica state machine, table by table.

`simulate` plays the controller: it applies a plan's actions to a model of the replicas, then
lets the world move one step (started replicas come up, draining ones exit, freed resources
come back), so multi-step rollouts can be checked for their invariants at every step.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import pytest

from flotilla._private.lifecycle import ALLOWED, IllegalTransition, RState, can_move, transition
from flotilla._private.reconcile import (
    Desired,
    Observed,
    PlaceReplica,
    Plan,
    StartReplica,
    StopReplica,
    failed_start_limit,
    reconcile,
    start_backoff_s,
)
from flotilla._private.resources import ResourcePool, visible_devices
from flotilla.serve.schema import DeploymentStatus, ReplicaState

P, S, R, U, D = RState.PENDING, RState.STARTING, RState.RUNNING, RState.UPDATING, RState.DRAINING


def rep(id: str, state: RState, version: str = "v1", in_flight: int = 0, placed_at: float = 0.0, node: str = "") -> Observed:
    return Observed(id, version, state, in_flight, placed_at, node)


def stops(plan: Plan) -> list[str]:
    return [a.id for a in plan.actions if isinstance(a, StopReplica)]


def graceful(plan: Plan) -> dict[str, bool]:
    return {a.id: a.graceful for a in plan.actions if isinstance(a, StopReplica)}


def placed(plan: Plan) -> list[str]:
    return [a.id for a in plan.actions if isinstance(a, PlaceReplica)]


def started(plan: Plan) -> list[bool]:
    return [a.place for a in plan.actions if isinstance(a, StartReplica)]


# ---------------------------------------------------------------------------------------
# Steady state and scaling
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("replicas", "target", "fits", "want_stops", "want_started", "want_placed", "status"),
    [
        # Nothing to do.
        ([rep("a", R), rep("b", R)], 2, 0, [], [], [], DeploymentStatus.HEALTHY),
        # Scale up with room for both new replicas.
        ([rep("a", R)], 3, 5, [], [True, True], [], DeploymentStatus.UPDATING),
        # Scale up with room for one: the other waits, pending.
        ([rep("a", R)], 3, 1, [], [True, False], [], DeploymentStatus.UPDATING),
        # A pending replica is placed before a new one is made.
        ([rep("a", R), rep("p", P)], 3, 1, [], [False], ["p"], DeploymentStatus.UPDATING),
        # Scale down: pending first, then starting, then the running one with the fewest in flight.
        ([rep("a", R, in_flight=3), rep("b", R, in_flight=1), rep("s", S), rep("p", P)], 1, 0,
         ["p", "s", "b"], [], [], DeploymentStatus.HEALTHY),
        ([rep("a", R, in_flight=0), rep("b", R, in_flight=4), rep("c", R, in_flight=2)], 1, 0,
         ["a", "c"], [], [], DeploymentStatus.HEALTHY),
        # On a tie in flight, the newest goes first.
        ([rep("old", R, placed_at=1.0), rep("new", R, placed_at=9.0)], 1, 0, ["new"], [], [], DeploymentStatus.HEALTHY),
        # An UPDATING replica counts as running: nothing to start.
        ([rep("a", U), rep("b", R)], 2, 5, [], [], [], DeploymentStatus.UPDATING),
        # Scale to zero.
        ([rep("a", R), rep("b", R)], 0, 0, ["a", "b"], [], [], DeploymentStatus.HEALTHY),
        # Draining replicas are on their way out: neither counted nor stopped again.
        ([rep("a", R), rep("d", D)], 2, 5, [], [True], [], DeploymentStatus.UPDATING),
    ],
)
def test_scaling_table(replicas, target, fits, want_stops, want_started, want_placed, status) -> None:
    plan = reconcile(Desired("v1", target), replicas, fits)
    assert stops(plan) == want_stops
    assert started(plan) == want_started
    assert placed(plan) == want_placed
    assert plan.status is status


def on(node: str, *specs: tuple[str, RState, int, float]) -> list[Observed]:
    """Replicas on `node`: (id, state, in flight, placed at)."""
    return [rep(i, st, in_flight=f, placed_at=t, node=node) for i, st, f, t in specs]


@pytest.mark.parametrize(
    ("replicas", "target", "want_stops"),
    [
        # The node with fewer replicas is emptied first, even of its oldest, busiest replica.
        (on("A", ("a1", R, 0, 2.0), ("a2", R, 0, 3.0), ("a3", R, 0, 4.0)) + on("B", ("b1", R, 9, 1.0)), 3, ["b1"]),
        (on("A", ("a1", R, 0, 2.0), ("a2", R, 0, 3.0), ("a3", R, 0, 4.0)) + on("B", ("b1", R, 9, 1.0)), 1,
         ["b1", "a3", "a2"]),
        # One at a time: a node that became the emptiest is emptied next.
        (on("A", ("a1", R, 0, 3.0), ("a2", R, 0, 4.0)) + on("B", ("b1", R, 0, 1.0), ("b2", R, 0, 2.0))
         + on("C", ("c1", R, 0, 0.5)), 2, ["c1", "a2", "a1"]),
        # Equal counts: the one-node rules decide (starting before serving, then fewest in flight).
        (on("A", ("a1", R, 0, 1.0), ("a2", R, 0, 2.0)) + on("B", ("b1", R, 3, 3.0), ("b2", S, 0, 4.0)), 3, ["b2"]),
        (on("A", ("a1", R, 5, 1.0), ("a2", R, 0, 2.0)) + on("B", ("b1", R, 3, 3.0), ("b2", R, 4, 4.0)), 3, ["a2"]),
        # A starting replica on a fuller node stays; the serving one alone on its node goes.
        (on("A", ("a1", R, 0, 1.0), ("a2", R, 0, 2.0), ("a3", S, 0, 3.0)) + on("B", ("b1", R, 0, 4.0)), 3, ["b1"]),
        # Not placed, or not yet registered (node unknown): first, as on one node.
        (on("A", ("a1", R, 0, 1.0)) + on("B", ("b1", R, 0, 2.0)) + [rep("s", S, placed_at=3.0), rep("p", P)], 2,
         ["p", "s"]),
        # Draining replicas are leaving: they do not count for their node.
        (on("A", ("a1", R, 0, 1.0), ("a2", R, 0, 2.0), ("ad", D, 0, 0.5), ("ae", D, 0, 0.6))
         + on("B", ("b1", R, 0, 3.0), ("b2", R, 0, 4.0), ("b3", R, 0, 5.0)), 4, ["a2"]),
    ],
)
def test_scale_down_empties_the_emptiest_node_first(replicas, target, want_stops) -> None:
    assert stops(reconcile(Desired("v1", target), replicas, 0)) == want_stops


def test_rollout_stops_old_replicas_on_the_emptiest_node_first() -> None:
    replicas = on("A", ("a1", R, 0, 1.0), ("a2", R, 0, 2.0)) + on("B", ("b1", R, 0, 0.5)) + [rep("n", R, "v2", node="A")]
    plan = reconcile(Desired("v2", 3), replicas, 9)
    assert stops(plan) == ["b1"] and started(plan) == [True, True]


def test_scale_down_drains_serving_replicas_and_kills_the_others() -> None:
    plan = reconcile(Desired("v1", 0), [rep("r", R), rep("u", U), rep("s", S), rep("p", P)], 0)
    assert graceful(plan) == {"r": True, "u": True, "s": False, "p": False}


def test_status_names() -> None:
    serving = [rep("a", R)]
    assert reconcile(Desired("v1", 1, unhealthy=True), serving, 0).status is DeploymentStatus.HEALTHY
    assert reconcile(Desired("v1", 2, unhealthy=True), serving, 0).status is DeploymentStatus.UNHEALTHY
    assert reconcile(Desired("v1", 2, scaling=1), serving, 1).status is DeploymentStatus.UPSCALING
    # Scaling down is over (HEALTHY) once no replica is stopping, as in Ray Serve.
    assert reconcile(Desired("v1", 0, scaling=-1), [rep("a", D)], 0).status is DeploymentStatus.DOWNSCALING
    assert reconcile(Desired("v1", 1, scaling=-1), [rep("a", R), rep("b", R)], 0).status is DeploymentStatus.DOWNSCALING
    assert reconcile(Desired("v1", 1, scaling=-1), [rep("a", R)], 0).status is DeploymentStatus.HEALTHY
    assert reconcile(Desired("v1", 0, scaling=-1), [], 0).status is DeploymentStatus.HEALTHY
    # Outside a scaling step a draining replica (of a rollout) does not hold HEALTHY back.
    assert reconcile(Desired("v1", 1), [rep("a", R), rep("b", D, "v0")], 0).status is DeploymentStatus.HEALTHY
    assert reconcile(Desired("v1", 1, scaling=-1), [rep("a", R), rep("b", U)], 0).status is DeploymentStatus.DOWNSCALING
    assert reconcile(Desired("v1", 1), [rep("a", U)], 0).status is DeploymentStatus.UPDATING


def test_delete_stops_everything() -> None:
    plan = reconcile(Desired("v1", 2, deleting=True), [rep("a", R), rep("b", S, "v0"), rep("d", D)], 9)
    assert stops(plan) == ["a", "b"] and graceful(plan) == {"a": True, "b": False}


def test_waiting_for_resources_is_reported() -> None:
    plan = reconcile(Desired("v1", 4), [rep("a", R)], 1)
    assert plan.waiting_for_resources == 2 and plan.waiting_for_node == 0


# ---------------------------------------------------------------------------------------
# Rollouts, simulated step by step
# ---------------------------------------------------------------------------------------


@dataclass
class World:
    """Replicas of one deployment on a node with room for `slots` replicas."""

    slots: int
    replicas: dict[str, Observed]
    ids: itertools.count

    def free(self) -> int:
        return self.slots - sum(1 for r in self.replicas.values() if r.state.placed)

    def serving(self, version: str | None = None) -> int:
        return sum(1 for r in self.replicas.values() if r.state.routable and version in (None, r.version))

    def apply(self, want: Desired, plan: Plan) -> None:
        for a in plan.actions:
            if isinstance(a, StartReplica):
                rid = f"n{next(self.ids)}"
                self.replicas[rid] = rep(rid, S if a.place else P, want.version)
            elif isinstance(a, PlaceReplica):
                self.replicas[a.id] = replace(self.replicas[a.id], state=S)
            else:
                r = self.replicas[a.id]
                if r.state is P:
                    del self.replicas[a.id]
                else:
                    self.replicas[a.id] = replace(r, state=D)
        assert self.free() >= 0, "placed more than fits"

    def step(self) -> None:
        """The world moves: starting replicas come up, draining ones exit."""
        for rid, r in list(self.replicas.items()):
            if r.state is S:
                self.replicas[rid] = replace(r, state=R)
            elif r.state is D:
                del self.replicas[rid]


def roll(world: World, want: Desired, max_steps: int = 50) -> list[int]:
    """Reconcile until settled; returns the serving count after each plan is applied."""
    serving = []
    for _ in range(max_steps):
        plan = reconcile(want, list(world.replicas.values()), world.free())
        world.apply(want, plan)
        serving.append(world.serving())
        if plan.status is DeploymentStatus.HEALTHY:
            return serving
        world.step()
    raise AssertionError(f"no convergence: {world.replicas}")


def old_world(n: int, slots: int) -> World:
    return World(slots, {f"o{i}": rep(f"o{i}", R, "v1", in_flight=i) for i in range(n)}, itertools.count())


@pytest.mark.parametrize(("target", "slots"), [(1, 2), (2, 4), (3, 4), (4, 8), (4, 5), (5, 7)])
def test_rollout_with_room_never_drops_below_target(target: int, slots: int) -> None:
    world = old_world(target, slots)
    serving = roll(world, Desired("v2", target))
    assert min(serving) >= target, serving
    assert world.serving("v2") == target and world.serving("v1") == 0


@pytest.mark.parametrize("target", [1, 2, 3, 4])
def test_rollout_without_room_replaces_one_at_a_time(target: int) -> None:
    world = old_world(target, target)
    want = Desired("v2", target)
    # First plan: the new replicas wait, and exactly one old replica (the least busy) drains.
    plan = reconcile(want, list(world.replicas.values()), world.free())
    assert stops(plan) == ["o0"] and started(plan) == [False] * target
    assert plan.waiting_for_resources == target
    serving = roll(world, want)
    assert min(serving) >= target - 1, serving
    assert world.serving("v2") == target and world.serving("v1") == 0


def test_rollout_stops_old_replicas_fewest_in_flight_first() -> None:
    replicas = [rep("busy", R, "v1", 9), rep("idle", R, "v1", 0), rep("mid", R, "v1", 3), rep("n", R, "v2")]
    plan = reconcile(Desired("v2", 3), replicas, 9)
    # One new replica serves: one old one may go, the idle one; two new ones are started.
    assert stops(plan) == ["idle"] and started(plan) == [True, True]


def test_rollout_kills_old_replicas_that_do_not_serve() -> None:
    replicas = [rep("op", P, "v1"), rep("os", S, "v1"), rep("o", R, "v1")]
    plan = reconcile(Desired("v2", 1), replicas, 1)
    assert stops(plan) == ["op", "os"] and graceful(plan) == {"op": False, "os": False}
    assert started(plan) == [True]
    assert plan.rolling


def test_no_room_is_made_for_a_version_that_can_never_fit() -> None:
    replicas = [rep("o1", R, "v1"), rep("o2", R, "v1")]
    plan = reconcile(Desired("v2", 2, fits_ever=False), replicas, 0)
    assert stops(plan) == [] and plan.waiting_for_resources == 2


def test_rollout_waits_while_a_swap_is_in_progress() -> None:
    # No room, one old replica already draining: nothing more is stopped until it is gone.
    replicas = [rep("o1", R, "v1"), rep("d", D, "v1"), rep("n", P, "v2")]
    assert stops(reconcile(Desired("v2", 2), replicas, 0)) == []
    # A new replica starting: wait for it before the next swap.
    replicas = [rep("o1", R, "v1"), rep("s", S, "v2"), rep("n", P, "v2")]
    assert stops(reconcile(Desired("v2", 2), replicas, 0)) == []


# ---------------------------------------------------------------------------------------
# Failed rollouts
# ---------------------------------------------------------------------------------------


def test_failed_version_leaves_old_replicas_untouched() -> None:
    replicas = [rep("o1", R, "v1"), rep("o2", U, "v1"), rep("o3", S, "v1"), rep("np", P, "v2")]
    plan = reconcile(Desired("v2", 3, failed=True), replicas, 9)
    assert stops(plan) == ["np"]  # the failed version's pending replica; old ones untouched
    assert started(plan) == [] and placed(plan) == []
    assert plan.status is DeploymentStatus.DEPLOY_FAILED


def test_failed_new_deployment_makes_no_replicas() -> None:
    plan = reconcile(Desired("v1", 2, failed=True), [], 9)
    assert plan.actions == () and plan.status is DeploymentStatus.DEPLOY_FAILED


def test_a_good_version_after_a_failed_one_rolls_out() -> None:
    world = old_world(2, 6)
    world.replicas["f"] = rep("f", S, "v2")  # a v2 replica still starting when v2 failed
    serving = roll(world, Desired("v3", 2))
    assert min(serving) >= 2
    assert world.serving("v3") == 2 and {r.version for r in world.replicas.values() if r.state is not D} == {"v3"}


# ---------------------------------------------------------------------------------------
# Reconfigure and max_replicas_per_node
# ---------------------------------------------------------------------------------------


def test_updating_replicas_stay_and_count_as_capacity_in_a_rollout() -> None:
    replicas = [rep("o1", U, "v1"), rep("o2", U, "v1"), rep("n1", R, "v2")]
    plan = reconcile(Desired("v2", 2), replicas, 0)
    # 3 serving (2 UPDATING old + 1 new), target 2: exactly one old one may go.
    assert len(stops(plan)) == 1 and all(graceful(plan).values())


@pytest.mark.parametrize(
    ("replicas", "cap", "fits", "want_started", "for_node"),
    [
        ([], 2, 9, [True, True, False, False], 2),
        ([rep("a", R)], 1, 9, [False, False], 2),
        # Draining replicas still occupy the node.
        ([rep("a", R), rep("d", D)], 2, 9, [False, False], 2),
        # Resources are the tighter bound: reported as such.
        ([], 3, 1, [True, False, False, False], 0),
    ],
)
def test_max_replicas_per_node(replicas, cap, fits, want_started, for_node) -> None:
    plan = reconcile(Desired("v1", 4 - len([r for r in replicas if r.state is not D]), max_replicas_per_node=cap), replicas, fits)
    assert started(plan) == want_started
    assert plan.waiting_for_node == for_node
    assert plan.waiting_for_resources == want_started.count(False) - for_node


def test_rollout_at_the_node_cap_replaces_one_at_a_time() -> None:
    world = old_world(2, 10)
    want = Desired("v2", 2, max_replicas_per_node=2)
    plan = reconcile(want, list(world.replicas.values()), world.free())
    assert stops(plan) == ["o0"] and plan.waiting_for_node == 2
    serving = roll(world, want)
    assert min(serving) >= 1 and world.serving("v2") == 2


# ---------------------------------------------------------------------------------------
# The state machine
# ---------------------------------------------------------------------------------------


@dataclass
class Thing:
    id: str = "x"
    state: RState = RState.PENDING
    pid: int | None = None
    label: str = "app/dep"


def test_every_legal_path_and_no_other() -> None:
    legal = {
        (P, S), (P, RState.GONE), (S, R), (S, D), (S, RState.GONE), (R, U), (R, D), (R, RState.GONE),
        (U, R), (U, D), (U, RState.GONE), (D, RState.GONE),
    }
    for old, new in itertools.product(RState, RState):
        assert can_move(old, new) == ((old, new) in legal), (old, new)
    assert set(ALLOWED) == set(RState)


def test_transition_moves_logs_and_refuses(caplog: pytest.LogCaptureFixture) -> None:
    t = Thing(pid=42)
    caplog.set_level("INFO", logger="flotilla.controller")
    transition(t, S, "placed")
    assert t.state is S and "pid 42" in caplog.text and "PENDING -> STARTING" in caplog.text
    with pytest.raises(IllegalTransition):
        transition(t, U, "reconfigure before ready")
    assert t.state is S


def test_public_names() -> None:
    assert {s: s.public for s in RState} == {
        P: ReplicaState.STARTING, S: ReplicaState.STARTING, R: ReplicaState.RUNNING,
        U: ReplicaState.UPDATING, D: ReplicaState.STOPPING, RState.GONE: ReplicaState.STOPPING,
    }
    assert [s for s in RState if s.routable] == [R, U]


# ---------------------------------------------------------------------------------------
# Resources: how many fit, and which GPUs a replica sees
# ---------------------------------------------------------------------------------------


def test_count_fits() -> None:
    pool = ResourcePool({"CPU": 4, "GPU": 2})
    assert pool.count_fits({"CPU": 1}, 10) == 4
    assert pool.count_fits({"CPU": 1}, 3) == 3
    assert pool.count_fits({"CPU": 0.5, "GPU": 0.5}, 10) == 4
    assert pool.count_fits({"CPU": 1, "GPU": 1}, 10) == 2
    assert pool.count_fits({}, 7) == 7
    pool.try_allocate({"CPU": 3})
    assert pool.count_fits({"CPU": 1}, 10) == 1


@pytest.mark.parametrize(
    ("ids", "parent", "want"),
    [
        ([0], None, "0"),
        ([0, 1], None, "0,1"),
        ([0], "2,3", "2"),
        ([1], "2,3", "3"),
        ([0, 1], "2, 3", "2,3"),
        ([1], "GPU-aaaa,GPU-bbbb", "GPU-bbbb"),
        ([0], "", ""),
        ([2], "2,3", ""),
    ],
)
def test_visible_devices_map_through_the_parents_list(ids: list[int], parent: str | None, want: str) -> None:
    assert visible_devices(ids, parent) == want


@pytest.mark.parametrize(("failures", "wait"), [(0, 0.0), (2, 0.0), (3, 1.0), (4, 2.0), (6, 8.0), (9, 8.0), (50, 8.0)])
def test_start_backoff_after_failed_starts(failures: int, wait: float) -> None:
    assert start_backoff_s(failures, 3) == wait


@pytest.mark.parametrize(("retries", "target", "limit"), [
    (20, 1, 3), (20, 2, 6), (20, 0, 3), (20, 10, 20), (4, 5, 4), (1, 1, 1),
])
def test_failed_start_limit_is_rays(retries: int, target: int, limit: int) -> None:
    assert failed_start_limit(retries, target) == limit
