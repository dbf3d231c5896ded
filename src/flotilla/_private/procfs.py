"""Memory readings from /proc and the cgroup filesystem (Linux; no psutil).

- `group_rss(pgids)`: resident memory of whole process groups (a replica and the processes
  its user code started), in one pass over /proc.
- `start_ticks(pid)`: when a process started (tells a live process from a reused PID).
- `exited_child()`, `reap_group(pid)`: reap children whose process group may outlive them.
- `group_cpu(pgids)`: CPU seconds (user + system) used so far by whole process groups.
- `machine_memory()`: (used, total) bytes for the machine, or for the cgroup the cluster runs
  in when that cgroup has a memory limit (as Ray's memory monitor reads it).
- `process_memory(pid)`, `memory_of(pids)`: one process's RSS, PSS, USS (private) and shared
  bytes from /proc/<pid>/smaps_rollup (or smaps): RSS counts pages shared copy-on-write with
  other processes in full in each of them; USS and PSS do not.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable, Iterator
from typing import NamedTuple

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None



def exited_child() -> int | None:
    """The pid of a child that has exited and is not reaped yet (left unreaped), or None."""
    try:
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    return info.si_pid if info is not None and info.si_pid else None


def reap_group(pid: int) -> int | None:
    """Kill what is left of an exited child's process group (its subprocesses), then reap it;
    returns its exit code. Unreaped until then, its pid (the group id) cannot be reused."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status)

class Memory(NamedTuple):
    """One process's memory in bytes: `rss` resident; `pss` proportional (each shared page
    divided by the number of processes mapping it); `uss` private (Private_Clean +
    Private_Dirty: freed when it exits); `shared` resident pages other processes map too."""

    rss: int
    pss: int
    uss: int
    shared: int


_SMAPS_KEYS = {b"Rss": 0, b"Pss": 1, b"Private_Clean": 2, b"Private_Dirty": 2,
               b"Shared_Clean": 3, b"Shared_Dirty": 3}


def _sum_smaps(data: bytes) -> Memory:
    sums = [0, 0, 0, 0]
    for line in data.splitlines():
        key, sep, rest = line.partition(b":")
        i = _SMAPS_KEYS.get(key) if sep else None
        if i is not None:
            parts = rest.split()
            if parts:
                sums[i] += int(parts[0]) * 1024  # kB
    return Memory(*sums)


def process_memory(pid: int) -> Memory | None:
    """`pid`'s memory from /proc/<pid>/smaps_rollup (summed from /proc/<pid>/smaps on kernels
    before 4.14); None when the process is gone or its maps are unreadable."""
    for name in ("smaps_rollup", "smaps"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                data = f.read()
        except FileNotFoundError:
            if name == "smaps" or not os.path.isdir(f"/proc/{pid}"):
                return None
            continue  # no smaps_rollup on this kernel
        except OSError:
            return None
        try:
            return _sum_smaps(data)
        except ValueError:
            return None
    return None


def memory_of(pids: Iterable[int]) -> dict[int, Memory]:
    """`process_memory` of each pid in `pids` that could be read."""
    out = {}
    for pid in set(pids):
        m = process_memory(pid)
        if m is not None:
            out[pid] = m
    return out


def group_rss(pgids: Iterable[int]) -> dict[int, int]:
    """RSS in bytes of every process group in `pgids` (summed over its live processes)."""
    return {k: int(v) for k, v in _group_sum(pgids, (21,), _PAGE).items()}


def group_cpu(pgids: Iterable[int]) -> dict[int, float]:
    """CPU seconds (utime + stime, all threads) used so far by every process group in `pgids`,
    summed over its live processes."""
    return _group_sum(pgids, (11, 12), 1.0 / _TICKS)


def proc_stats() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, fields of /proc/<pid>/stat after the command: state, ppid, pgrp, ...) of every
    live process, in one pass over /proc."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                yield int(name), f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue


def _group_sum(pgids: Iterable[int], idx: tuple[int, ...], scale: float) -> dict[int, float]:
    want = set(pgids)
    out = dict.fromkeys(want, 0.0)
    if not want:
        return out
    for _, fields in proc_stats():
        # utime, stime, rss are stat's fields 14, 15 and 24 (indexes 11, 12, 21 here).
        try:
            pgrp = int(fields[2])
            if pgrp in want:
                out[pgrp] += sum(int(fields[i]) for i in idx) * scale
        except (IndexError, ValueError):
            continue
    return out


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cgroup_dirs(controller: str, base: str) -> list[str]:
    """Where this process's cgroup may be mounted: its own path, then the mount's root (the
    path in /proc/self/cgroup is not visible inside a cgroup namespace)."""
    dirs = []
    for line in (_read("/proc/self/cgroup") or "").splitlines():
        _, ctrls, path = line.split(":", 2)
        if ctrls == controller or controller in ctrls.split(","):
            dirs.append(os.path.join(base, path.lstrip("/")))
    return [*dirs, base]


def _stat_value(text: str, key: str) -> int:
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            return int(v)
    return 0


def _cgroup_memory(physical: int) -> tuple[int, int] | None:
    """(used, limit) of the cgroup this process runs in, when it has a memory limit below the
    machine's; page cache the kernel reclaims first (inactive files) does not count as used."""
    for d in _cgroup_dirs("", "/sys/fs/cgroup"):  # v2
        limit, current = _read(os.path.join(d, "memory.max")), _read(os.path.join(d, "memory.current"))
        if limit is not None and current is not None:
            if limit == "max" or int(limit) >= physical:
                return None
            inactive = _stat_value(_read(os.path.join(d, "memory.stat")) or "", "inactive_file")
            return max(0, int(current) - inactive), int(limit)
    for d in _cgroup_dirs("memory", "/sys/fs/cgroup/memory"):  # v1
        limit, current = _read(os.path.join(d, "memory.limit_in_bytes")), _read(os.path.join(d, "memory.usage_in_bytes"))
        if limit is not None and current is not None:
            if int(limit) >= physical:
                return None
            inactive = _stat_value(_read(os.path.join(d, "memory.stat")) or "", "total_inactive_file")
            return max(0, int(current) - inactive), int(limit)
    return None


def machine_memory() -> tuple[int, int]:
    """(used, total) bytes: the cgroup's when it has a memory limit, else MemTotal - MemAvailable."""
    info: dict[str, int] = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            info[key] = int(parts[0]) * 1024
    total = info.get("MemTotal", 0)
    try:
        cg = _cgroup_memory(total)
    except (OSError, ValueError):
        cg = None
    if cg is not None:
        return cg
    available = info.get("MemAvailable", info.get("MemFree", 0))
    return max(0, total - available), total
