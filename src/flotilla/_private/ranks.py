"""Replica ranks: each replica of a deployment holds a rank 0..N-1, unique among the replicas
that hold one (a replica keeps its rank until it is gone, draining included).

A replica takes its rank when it registers, before its constructor runs: the smallest rank no
replica holds. A rank is released when its replica is gone. Once the deployment is healthy with
no replica starting, `compact` makes the ranks contiguous again, moving as few replicas as
possible (those above the count take the holes); the controller gives each moved replica its
new rank through reconfigure. Nodes are ranked the same way (a node holds its rank while some
replica of the deployment runs there), and replicas on each node get a local rank.

Pure bookkeeping, no I/O: the controller owns one `DeploymentRanks` per deployment.
"""

from __future__ import annotations

from flotilla.serve.schema import ReplicaRank


class RankBook:
    """Ranks of keys: a new key takes the smallest rank no key holds."""

    def __init__(self) -> None:
        self.ranks: dict[str, int] = {}

    def assign(self, key: str) -> int:
        """`key`'s rank (a new one, the smallest free, if it has none)."""
        got = self.ranks.get(key)
        if got is not None:
            return got
        held = set(self.ranks.values())
        rank = next(i for i in range(len(held) + 1) if i not in held)
        self.ranks[key] = rank
        return rank

    def recover(self, key: str, rank: int) -> None:
        """`key` holds `rank` already (a replica re-adopted after a head restart)."""
        self.ranks[key] = rank

    def release(self, key: str) -> None:
        self.ranks.pop(key, None)

    def compact(self) -> list[str]:
        """Make the ranks 0..N-1 for N keys; returns the keys whose rank changed. Keys already
        below N (and not sharing a rank) keep theirs; the others take the free ranks, lowest
        rank first."""
        n = len(self.ranks)
        kept: set[int] = set()
        movers: list[tuple[int, str]] = []
        for key, rank in sorted(self.ranks.items(), key=lambda kv: (kv[1], kv[0])):
            if rank < n and rank not in kept:
                kept.add(rank)
            else:
                movers.append((rank, key))
        free = iter(i for i in range(n) if i not in kept)
        for _, key in movers:
            self.ranks[key] = next(free)
        return [key for _, key in movers]


class DeploymentRanks:
    """The global, node and per-node local ranks of one deployment's replicas."""

    def __init__(self) -> None:
        self.replicas = RankBook()
        self.nodes = RankBook()
        self.local: dict[str, RankBook] = {}
        self.node_of: dict[str, str] = {}

    def assign(self, replica: str, node: str = "") -> ReplicaRank:
        """`replica`'s rank on `node` (assigned if it has none)."""
        if replica not in self.node_of:
            self.node_of[replica] = node
        return self.get(replica)

    def get(self, replica: str) -> ReplicaRank:
        node = self.node_of[replica]
        return ReplicaRank(rank=self.replicas.assign(replica), node_rank=self.nodes.assign(node),
                           local_rank=self.local.setdefault(node, RankBook()).assign(replica))

    def recover(self, replica: str, node: str, rank: ReplicaRank) -> None:
        """`replica` holds `rank` already: a restarted head rebuilding its book."""
        self.node_of[replica] = node
        self.replicas.recover(replica, int(rank))
        self.nodes.recover(node, rank.node_rank)
        self.local.setdefault(node, RankBook()).recover(replica, rank.local_rank)

    def holds(self, replica: str) -> bool:
        return replica in self.node_of

    def release(self, replica: str) -> None:
        node = self.node_of.pop(replica, None)
        if node is None:
            return
        self.replicas.release(replica)
        book = self.local.get(node)
        if book is not None:
            book.release(replica)
            if not book.ranks:
                del self.local[node]
                self.nodes.release(node)

    def compact(self) -> list[str]:
        """Contiguous global, node and local ranks again; returns the replicas whose rank (any
        of the three) changed, in no particular order."""
        before = {r: self.get(r) for r in self.node_of}
        self.replicas.compact()
        self.nodes.compact()
        for book in self.local.values():
            book.compact()
        return [r for r, old in before.items() if self.get(r).parts != old.parts]
