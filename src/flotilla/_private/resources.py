"""Resource accounting for replicas on one node: CPUs, GPUs (with ids), memory, custom.

Pure bookkeeping, no I/O. Amounts are kept in integer micro-units so fractional
requests (0.5 GPU, 0.25 CPU) add and subtract exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_UNIT = 10_000


def _u(x: float) -> int:
    return round(x * _UNIT)


def _f(x: int) -> float:
    return x / _UNIT


@dataclass
class Allocation:
    """What one replica holds: its resource demand and, for GPUs, which ids (with shares)."""

    demand: dict[str, int]
    gpu_shares: dict[int, int] = field(default_factory=dict)

    @property
    def gpu_ids(self) -> list[int]:
        return sorted(self.gpu_shares)


def fmt(resources: dict[str, float]) -> str:
    parts = []
    for k in sorted(resources):
        v = resources[k]
        if k in ("memory", "object_store_memory"):  # bytes (Ray reports both)
            parts.append(f"{k}: {v / 2**30:.1f} GiB")
        else:
            parts.append(f"{k}: {int(v) if v == int(v) else round(v, 4)}")
    return "{" + ", ".join(parts) + "}"


class ResourcePool:
    """The node's resources and what replicas hold of them."""

    def __init__(self, total: dict[str, float]) -> None:
        self.total = {k: _u(v) for k, v in total.items() if v > 0}
        self.free = dict(self.total)
        n_gpus = int(total.get("GPU", 0))
        self.gpu_free = {i: _UNIT for i in range(n_gpus)}

    def totals(self) -> dict[str, float]:
        return {k: _f(v) for k, v in self.total.items()}

    def available(self) -> dict[str, float]:
        return {k: _f(v) for k, v in self.free.items()}

    def gpus(self) -> dict[int, float]:
        """The free share of each GPU, by id."""
        return {i: _f(v) for i, v in self.gpu_free.items()}

    def fits_ever(self, demand: dict[str, float]) -> bool:
        """Could this demand fit on an empty node?"""
        return self._check(demand, self.total, {i: _UNIT for i in self.gpu_free}) is None

    def count_fits(self, demand: dict[str, float], limit: int) -> int:
        """How many replicas of `demand` (up to `limit`) the free resources hold now."""
        free, gpus = dict(self.free), dict(self.gpu_free)
        need = {k: _u(v) for k, v in demand.items()}
        n = 0
        while n < limit and self._check(demand, free, gpus) is None:
            shares = self._pick_gpus(need.get("GPU", 0), gpus)
            assert shares is not None
            for k, v in need.items():
                free[k] -= v
            for i, s in shares.items():
                gpus[i] -= s
            n += 1
            if not need:
                return limit
        return n

    def try_allocate(self, demand: dict[str, float]) -> Allocation | None:
        if self._check(demand, self.free, self.gpu_free) is not None:
            return None
        need = {k: _u(v) for k, v in demand.items()}
        shares = self._pick_gpus(need.get("GPU", 0), self.gpu_free)
        assert shares is not None
        for k, v in need.items():
            self.free[k] -= v
        for i, s in shares.items():
            self.gpu_free[i] -= s
        return Allocation(need, shares)

    def take(self, demand: dict[str, int], gpu_shares: dict[int, int]) -> Allocation:
        """Hold exactly this allocation (units, GPU id -> share) again: a restarted head
        re-takes what its re-adopted replicas hold, GPU ids included."""
        for k, v in demand.items():
            self.free[k] = self.free.get(k, 0) - v
        for i, sh in gpu_shares.items():
            self.gpu_free[i] = self.gpu_free.get(i, 0) - sh
        return Allocation(dict(demand), dict(gpu_shares))

    def release(self, alloc: Allocation) -> None:
        for k, v in alloc.demand.items():
            self.free[k] = min(self.total.get(k, 0), self.free.get(k, 0) + v)
        for i, s in alloc.gpu_shares.items():
            self.gpu_free[i] = min(_UNIT, self.gpu_free[i] + s)
        alloc.demand = {}
        alloc.gpu_shares = {}

    def unscheduled(self, demand: dict[str, float], waited: float) -> bool:
        """A replica placed `waited` s ago has not started because the scheduler has no room
        for it yet. Never here: this pool places only what fits (Ray's view says otherwise)."""
        return False

    def shortfall(self, demand: dict[str, float]) -> str:
        """Why `demand` does not fit now, in words; '' when it fits."""
        return self._check(demand, self.free, self.gpu_free) or ""

    def _check(self, demand: dict[str, float], free: dict[str, int], gpus: dict[int, int]) -> str | None:
        short = []
        for k, v in demand.items():
            have = free.get(k, 0)
            if _u(v) > have:
                short.append(f"{k} (needs {v:g}, {_f(have):g} available)")
        if not short and demand.get("GPU") and self._pick_gpus(_u(demand["GPU"]), gpus) is None:
            short.append(f"GPU (needs {demand['GPU']:g} on one device; free shares per GPU: "
                         f"{[_f(s) for s in gpus.values()]})")
        if not short:
            return None
        return "not enough " + ", ".join(short)

    @staticmethod
    def _pick_gpus(need: int, gpus: dict[int, int]) -> dict[int, int] | None:
        if need <= 0:
            return {}
        if need >= _UNIT:
            whole = [i for i, s in sorted(gpus.items()) if s == _UNIT]
            count = need // _UNIT
            return {i: _UNIT for i in whole[:count]} if len(whole) >= count else None
        # Fractional: best fit, so shares pack onto as few devices as possible.
        fits = [(s, i) for i, s in gpus.items() if s >= need]
        if not fits:
            return None
        _, i = min(fits)
        return {i: need}


def visible_devices(gpu_ids: list[int], parent: str | None) -> str:
    """`CUDA_VISIBLE_DEVICES` for a replica holding GPU indices `gpu_ids` of this node.

    The node's GPU i is the i-th device the head may see: with `CUDA_VISIBLE_DEVICES=2,3`
    inherited from the driver, index 0 is device 2. Unset: every device, so i is i. Empty: no
    device is visible, and none is given.
    """
    if parent is None:
        return ",".join(str(i) for i in gpu_ids)
    devices = [d.strip() for d in parent.split(",") if d.strip()]
    return ",".join(devices[i] for i in gpu_ids if i < len(devices))
