"""Process helpers on /proc: trees, CPU time, PSS, roles, and killing by PID.

Everything here reads /proc directly (Linux only) and needs nothing outside the stdlib,
so the orchestrator can run under any Python.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_CHILD_SUBREAPER = 36
# PIDs of the children we started with Popen: their exit status is Popen's to collect.
POPEN_PIDS: set[int] = set()


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    start: int  # start time in clock ticks since boot: (pid, start) names a process uniquely
    state: str


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces or parentheses: split after the last ')'.
    return data[data.rindex(")") + 2 :].split()


def read_proc(pid: int) -> Proc | None:
    f = _stat_fields(pid)
    if f is None:
        return None
    return Proc(pid=pid, ppid=int(f[1]), start=int(f[19]), state=f[0])


def all_procs() -> dict[int, Proc]:
    out: dict[int, Proc] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            p = read_proc(int(name))
            if p is not None:
                out[p.pid] = p
    return out


def tree(root: int, include_root: bool = True) -> list[Proc]:
    """`root` and all its descendants (children, recursively), zombies excluded."""
    procs = all_procs()
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    out: list[Proc] = []
    todo = [root] if include_root else list(children.get(root, []))
    while todo:
        pid = todo.pop()
        p = procs.get(pid)
        if p is None:
            continue
        if p.state != "Z":
            out.append(p)
        todo.extend(children.get(pid, []))
    return out


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of `pid`, in clock ticks."""
    f = _stat_fields(pid)
    if f is None:
        return None
    return int(f[11]) + int(f[12])


def pss_kib(pid: int) -> int | None:
    """Proportional set size of `pid` from /proc/PID/smaps_rollup, in KiB."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def smaps_rollup(pid: int) -> dict[str, int] | None:
    """The KiB fields of /proc/PID/smaps_rollup (Rss, Pss, Private_Clean, ...)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        return None
    return out or None


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def listening_pid(port: int, pids: list[int]) -> int | None:
    """Which of `pids` owns the TCP socket listening on `port` (IPv4 or IPv6)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(cols[9])
        except OSError:
            continue
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return pid
    return None


_RAY_ROLES = [
    ("ray::ServeController", "controller"),
    ("ray::ProxyActor", "proxy"),
    ("ray::ServeReplica", "replica"),
    ("ray::ReplicaActor", "replica"),  # flotilla's replicas on its Ray backend
    ("ray::IDLE", "idle_worker"),
    ("gcs_server", "gcs_server"),
    ("raylet", "raylet"),
    ("ray::DashboardAgent", "dashboard_agent"),
    ("ray::RuntimeEnvAgent", "runtime_env_agent"),
    ("dashboard/agent.py", "dashboard_agent"),
    ("dashboard/dashboard.py", "dashboard"),
    ("runtime_env/agent", "runtime_env_agent"),
    ("log_monitor", "log_monitor"),
    ("monitor.py", "monitor"),
    ("ray.util.client.server", "ray_client_server"),
    ("bin/ray start", "ray_start"),
    ("ray::", "ray_worker"),
    ("flotilla._private.head", "head"),
]


def role_of(
    pid: int, root: int, procs: dict[int, Proc], http_pid: int | None, root_label: str
) -> str:
    """A short name for what `pid` does in a served system (driver, proxy, replica, ...)."""
    if pid == root:
        return root_label
    args = cmdline(pid)
    line = " ".join(args)
    if line.startswith("flotilla::"):  # flotilla's process titles: keeper, head, zygote, proxy, replica
        return line[len("flotilla::"):].split(":", 1)[0].strip()
    if pid == http_pid:
        return "proxy"
    for needle, role in _RAY_ROLES:
        if needle in line:
            return role
    if "flotilla._private.zygote" in line:
        parent = procs.get(pid)
        parent_line = " ".join(cmdline(parent.ppid)) if parent else ""
        # Forked children keep the zygote's command line: tell them apart by their parent.
        return "replica" if "flotilla._private.zygote" in parent_line else "zygote"
    return os.path.basename(args[0]) if args else "?"


def roles(
    root: int, http_port: int | None, root_label: str = "driver", extra_roots: Sequence[int] = ()
) -> dict[int, str]:
    """Every process of `root`'s tree, and of each of `extra_roots`' (a shared Ray
    instance), by role."""
    procs = all_procs()
    members = list(dict.fromkeys(p.pid for r in [root, *extra_roots] for p in tree(r)))
    http_pid = listening_pid(http_port, members) if http_port else None
    return {pid: role_of(pid, root, procs, http_pid, root_label) for pid in members}


def become_subreaper() -> None:
    """Orphaned descendants (e.g. daemons whose parent died) re-parent to us, not to init,
    so everything a benchmarked system starts stays findable in our process tree."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap_zombies() -> None:
    """Collect exited orphans re-parented to us (not the children that Popen waits for)."""
    me = os.getpid()
    for p in all_procs().values():
        if p.ppid == me and p.state == "Z" and p.pid not in POPEN_PIDS:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(p.pid, os.WNOHANG)


def kill_procs(procs: list[Proc], sig: int = signal.SIGKILL) -> list[Proc]:
    """Signal each process that is still the same one (pid and start time match)."""
    hit: list[Proc] = []
    for p in procs:
        now = read_proc(p.pid)
        if now is None or now.start != p.start or now.state == "Z":
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p.pid, sig)
            hit.append(p)
    return hit


def wait_gone(procs: list[Proc], timeout: float) -> list[Proc]:
    """Wait until none of `procs` is alive; returns those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            now = read_proc(p.pid)
            if now is not None and now.start == p.start and now.state != "Z":
                alive.append(p)
        if not alive or time.monotonic() >= deadline:
            return alive
        reap_zombies()
        time.sleep(0.1)
