"""`serve.gang` as in Ray 2.60: what a replica of a gang-scheduled deployment knows of its gang."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GangContext:
    """A replica's gang: its id, the replica's rank in it, its size and members (by rank).

    flotilla accepts `gang_scheduling_config` but places replicas one at a time, so
    `serve.get_replica_context().gang_context` is None on both backends.
    """

    gang_id: str
    rank: int
    world_size: int
    member_replica_ids: list[str] = field(default_factory=list)
    pg_name: str = ""
