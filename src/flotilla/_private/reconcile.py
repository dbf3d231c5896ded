"""Reconcile, as a pure function: what one deployment wants, what runs, what fits -> actions.

No I/O and no clock: the controller observes, calls `reconcile`, and turns the actions into
effects (allocate and fork, drain, kill). The rules:

- Scale: the current version gets `target` replicas. Extras are stopped one at a time from the
  node with the fewest replicas of the deployment left (so whole nodes empty and a cluster
  autoscaler can release them; a replica whose node is unknown counts as alone on one), and
  on that node: replicas not yet placed first, then starting ones, then among the serving
  ones those with the fewest requests in flight (the newest on a tie). On one node (the local
  backend) that is the last three rules alone.
- Place: pending replicas get resources in order, as many as fit now, and never more placed
  replicas (of every version, draining ones included) than `max_replicas_per_node` (this
  machine is one node).
- Roll out: new-version replicas start before old ones stop, and old serving replicas are
  stopped only while the serving count stays at or above the target (surge bounded by free
  resources). When a new replica cannot be placed and nothing is starting or draining, one
  old replica is stopped to make room (replace one at a time), unless the new replica could
  never fit on the node.
- Failed version (its constructor or first health check failed `failed_start_limit` times in
  a row, none of its replicas serving and none ever ready): no new replica of it is made,
  and the old version's replicas keep serving, untouched. Status DEPLOY_FAILED until the next
  deploy. A version that has served keeps being retried instead (`start_backoff_s`), UNHEALTHY.
- A reconfiguring (UPDATING) replica serves and counts as running capacity.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from flotilla._private.lifecycle import RState
from flotilla.serve.schema import DeploymentStatus

#: Failed starts in a row allowed per target replica (Ray Serve's MAX_PER_REPLICA_RETRY_COUNT).
MAX_CONSTRUCTOR_FAILURES = 3
#: Longest wait between two starts of a version that has run before and keeps failing to start.
MAX_START_BACKOFF_S = 8.0


def failed_start_limit(max_constructor_retry_count: int, target: int) -> int:
    """Failed starts in a row (constructor or first health check) that fail a version none of
    whose replicas ever served: `max_constructor_retry_count`, or 3 per target replica if that
    is fewer, as Ray Serve counts."""
    return max(1, min(max_constructor_retry_count, max(1, target) * MAX_CONSTRUCTOR_FAILURES))


def start_backoff_s(failures: int, limit: int) -> float:
    """Seconds to wait before starting another replica after `failures` failed starts in a row
    of a version that has served (one that never has fails at `limit` instead): none before
    `limit`, then 1, 2, 4, 8 s (MAX_START_BACKOFF_S): a version that cannot start does not
    fork replicas in a tight loop, and one that recovers is back within seconds."""
    if failures < limit:
        return 0.0
    return min(2.0 ** (failures - limit), MAX_START_BACKOFF_S)


@dataclass(frozen=True)
class Observed:
    """One replica as the controller sees it."""

    id: str
    version: str
    state: RState
    in_flight: int = 0  # requests running or queued in it, at the last stats sample
    placed_at: float = 0.0  # monotonic time it got resources (0 while pending)
    node: str = ""  # the node it runs on, once known ("" on the local backend)


@dataclass(frozen=True)
class Desired:
    """What the deployment should be."""

    version: str
    target: int
    failed: bool = False  # the current version failed to start (see module doc)
    deleting: bool = False
    max_replicas_per_node: int | None = None
    fits_ever: bool = True  # one replica fits on the empty node (else making room is futile)
    unhealthy: bool = False  # a replica died or failed a check since the last healthy state
    scaling: int = 0  # +1 / -1 while a scaling step (the autoscaler's or a new num_replicas) is carried out


@dataclass(frozen=True)
class StartReplica:
    """Make a new replica of the current version; `place`: give it resources and fork it now."""

    place: bool


@dataclass(frozen=True)
class PlaceReplica:
    """Give a pending replica its resources and fork it."""

    id: str


@dataclass(frozen=True)
class StopReplica:
    """Take a replica out of routing and stop it: drained if it serves, else killed."""

    id: str
    graceful: bool
    reason: str


Action = StartReplica | PlaceReplica | StopReplica


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    status: DeploymentStatus
    waiting_for_resources: int = 0  # current-version replicas left pending: resources short
    waiting_for_node: int = 0  # left pending: max_replicas_per_node reached
    rolling: bool = False  # old-version replicas are still live


def _stop_order(r: Observed) -> tuple[int, int, float]:
    """Sort key on one node: the replica to stop first sorts first."""
    rank = {RState.PENDING: 0, RState.STARTING: 1}.get(r.state, 2)
    return (rank, r.in_flight if rank == 2 else 0, -r.placed_at)


def _stop_sequence(candidates: Sequence[Observed], live: Sequence[Observed]) -> list[Observed]:
    """`candidates` in the order to stop them: each time, one on the node where the fewest of
    `live` remain, by `_stop_order` among those."""
    left = Counter(r.node for r in live if r.node)
    rest = list(candidates)
    out: list[Observed] = []
    while rest:
        r = min(rest, key=lambda r: (left[r.node] if r.node else 0, *_stop_order(r)))
        rest.remove(r)
        out.append(r)
        if r.node:
            left[r.node] -= 1
    return out


def reconcile(want: Desired, observed: Sequence[Observed], fits: int) -> Plan:
    """The actions that move one deployment towards `want`.

    `observed`: its replicas (any state but GONE); `fits`: how many more replicas of its
    resource demand the free resources hold right now.
    """
    live = [r for r in observed if r.state not in (RState.DRAINING, RState.GONE)]
    if want.deleting:
        stops = tuple(StopReplica(r.id, r.state.routable, "deployment deleted") for r in live)
        return Plan(stops, DeploymentStatus.UPDATING)
    actions: list[Action] = []
    stopped: set[str] = set()

    def stop(r: Observed, reason: str) -> None:
        actions.append(StopReplica(r.id, r.state.routable, reason))
        stopped.add(r.id)

    cur = [r for r in live if r.version == want.version]
    old = [r for r in live if r.version != want.version]

    # Scale the current version to its target (a failed version gets no new replica).
    new = 0
    if want.failed:
        for r in cur:
            if r.state is RState.PENDING:
                stop(r, "its version failed to start")
    else:
        for r in _stop_sequence(cur, live)[: max(0, len(cur) - want.target)]:
            stop(r, f"scaling down to {want.target}")
        new = max(0, want.target - len(cur))
    cur = [r for r in cur if r.id not in stopped]

    # Place pending replicas where resources and the per-node cap allow.
    pending = [r for r in cur if r.state is RState.PENDING]
    waiting = len(pending) + new
    node_room = waiting
    if want.max_replicas_per_node is not None:
        placed = sum(1 for r in observed if r.state.placed)
        node_room = max(0, want.max_replicas_per_node - placed)
    room = min(fits, node_room, waiting)
    actions.extend(PlaceReplica(r.id) for r in pending[:room])
    actions.extend(StartReplica(place=i < room - len(pending)) for i in range(new))
    unplaced = waiting - room
    for_node = unplaced if unplaced and node_room <= fits else 0

    # Old versions: pending ones never start; the rest go once the new ones can carry the load.
    if old and not want.failed:
        for r in old:
            if not r.state.routable:
                stop(r, "replaced by a new version")
        staying = [r for r in live if r.id not in stopped]
        serving_old = _stop_sequence([r for r in old if r.state.routable], staying)
        serving_new = sum(1 for r in cur if r.state.routable)
        surplus = serving_new + len(serving_old) - want.target
        for r in serving_old[: max(0, surplus)]:
            stop(r, "replaced by a new version")
        serving_old = serving_old[max(0, surplus):]
        # Something on its way in or out changes what fits: wait for it before the next swap.
        busy = any(
            r.state is RState.DRAINING
            or (r.state is RState.STARTING and r.version == want.version)
            or (r.id in stopped and r.state.placed)
            for r in observed
        )
        if serving_old and unplaced and room == 0 and not busy and want.fits_ever:
            stop(serving_old[0], "making room for a new-version replica (resources are short)")
    elif old:
        for r in old:
            if r.state is RState.PENDING:
                stop(r, "replaced by a new version")
    rolling = any(r.id not in stopped for r in old)

    # Status, with Ray's names.
    settled = (
        not rolling
        and len(cur) == want.target
        and all(r.state is RState.RUNNING for r in cur)
        and new == 0
    )
    # Scaling down ends (as in Ray Serve) once no replica is stopping any more.
    stopping = want.scaling < 0 and (bool(stopped) or any(r.state is RState.DRAINING for r in observed))
    if want.failed:
        status = DeploymentStatus.DEPLOY_FAILED
    elif settled and not stopping:
        status = DeploymentStatus.HEALTHY
    elif want.unhealthy:
        status = DeploymentStatus.UNHEALTHY
    elif want.scaling and not rolling:
        status = DeploymentStatus.UPSCALING if want.scaling > 0 else DeploymentStatus.DOWNSCALING
    else:
        status = DeploymentStatus.UPDATING
    return Plan(tuple(actions), status, unplaced - for_node, for_node, rolling)
