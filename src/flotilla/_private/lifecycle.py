"""The replica state machine: one enum of internal states and the one table of legal moves.

```
            place                ready                reconfigure
 PENDING ─────────▶ STARTING ──────────▶ RUNNING ◀──────────────▶ UPDATING
    │                  │                    │                        │
    │ cancel           │ stop / failed      │ stop                   │ stop
    │                  ▼                    ▼                        │
    │              DRAINING ◀───────────────┴────────────────────────┘
    │                  │ process exited (or killed)
    ▼                  ▼
   GONE ◀──────────────┘   (STARTING, RUNNING, UPDATING also go straight to GONE on a crash)
```

Routers see RUNNING and UPDATING replicas (a reconfiguring replica keeps serving). Every
transition goes through `transition`, which refuses an illegal one and logs one line.
"""

from __future__ import annotations

import enum
import logging
from typing import Protocol

from flotilla.serve.schema import ReplicaState

logger = logging.getLogger("flotilla.controller")


class RState(enum.Enum):
    """Where a replica is in its life, as the controller tracks it."""

    PENDING = "PENDING_RESOURCES"  # wants resources (or a node slot); no process yet
    STARTING = "STARTING"  # resources held, process forked, constructor running
    RUNNING = "RUNNING"  # serving
    UPDATING = "UPDATING"  # serving, and running reconfigure()
    DRAINING = "DRAINING"  # out of the published set; finishing in-flight work, then exits
    GONE = "GONE"  # process exited, resources released

    @property
    def routable(self) -> bool:
        """Published to routers (counts as running capacity)."""
        return self in (RState.RUNNING, RState.UPDATING)

    @property
    def placed(self) -> bool:
        """Holds resources on the node."""
        return self in (RState.STARTING, RState.RUNNING, RState.UPDATING, RState.DRAINING)

    @property
    def public(self) -> ReplicaState:
        """The Ray Serve name shown by `serve.status()`."""
        return _PUBLIC[self]


_PUBLIC = {
    RState.PENDING: ReplicaState.STARTING,
    RState.STARTING: ReplicaState.STARTING,
    RState.RUNNING: ReplicaState.RUNNING,
    RState.UPDATING: ReplicaState.UPDATING,
    RState.DRAINING: ReplicaState.STOPPING,
    RState.GONE: ReplicaState.STOPPING,
}

ALLOWED: dict[RState, frozenset[RState]] = {
    RState.PENDING: frozenset({RState.STARTING, RState.GONE}),
    RState.STARTING: frozenset({RState.RUNNING, RState.DRAINING, RState.GONE}),
    RState.RUNNING: frozenset({RState.UPDATING, RState.DRAINING, RState.GONE}),
    RState.UPDATING: frozenset({RState.RUNNING, RState.DRAINING, RState.GONE}),
    RState.DRAINING: frozenset({RState.GONE}),
    RState.GONE: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A move the state machine does not allow (a controller bug, never a user error)."""


class Stateful(Protocol):
    id: str
    state: RState

    @property
    def pid(self) -> int | None: ...

    @property
    def label(self) -> str: ...


def can_move(old: RState, new: RState) -> bool:
    return new in ALLOWED[old]


def transition(r: Stateful, new: RState, why: str) -> None:
    """Move `r` to `new`, logging one line; raises IllegalTransition if the move is not allowed."""
    old = r.state
    if not can_move(old, new):
        raise IllegalTransition(f"replica {r.id} ({r.label}): {old.name} -> {new.name} is not allowed ({why})")
    r.state = new
    logger.info("replica %s (%s, pid %s): %s -> %s: %s", r.id, r.label, r.pid, old.name, new.name, why)
