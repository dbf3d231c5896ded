"""The head's checkpoint: what a restarted head needs to carry on where the dead one stopped.

Written by the head (coalesced: at most once per turn of its event loop, and only when the
bytes differ) on every change of the desired state or of the replica set, atomically (a
temporary file, then `os.replace`), to `<session>/checkpoint.pkl`:

- apps: name, route prefix, ingress, status, deploy time, deleting;
- deployments: their spec by reference (see below), target, status, failure counts and
  messages, autoscaling state (target, the policy's pending wish and since when, the last
  decision; not the load samples, which a restarted head takes anew);
- replicas: id, app, deployment, spec by reference, state, pid and start time, socket path,
  resource allocation (units and GPU ids with shares), the config last applied, models held;
- the proxy: pid and start time, URL, options; the metrics port;
- traffic splits: name, route prefix, weights, sticky header or cookie.
- shadowed routes: route, target application, fraction, queue size.

A deployment spec holds the user's code and bound arguments as opaque cloudpickle bytes (the
head never unpickles user code); each distinct spec is stored once, in
`<session>/specs/<hash>.spec`, written before the checkpoint that refers to it, and removed
once nothing refers to it. Everything is plain data (dicts, lists, str, bytes, numbers), and
it is read back with an unpickler that refuses any class or function.

`restore` rebuilds the controller's apps, deployments and replicas: each replica's process
is re-adopted through the supervisor (pidfd and start-time check: a number reused by another
process is never taken for it) with its allocation re-taken; replicas whose process is gone
are left out (reconcile replaces them). Re-adopted replicas wait for their reconnection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import os
import pickle
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flotilla._private.lifecycle import RState
from flotilla.serve.schema import ApplicationStatus, DeploymentStatus, DeploymentStatusTrigger

if TYPE_CHECKING:
    from flotilla._private.controller import Controller, Replica
    from flotilla._private.supervisor import Process, Supervisor

logger = logging.getLogger("flotilla.checkpoint")

FILE = "checkpoint.pkl"
SPECS = "specs"
FORMAT = 1


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"a checkpoint holds plain data only, not {module}.{name}")


def loads_plain(data: bytes) -> Any:
    """Unpickle plain data (containers, str, bytes, numbers); refuse any class or function."""
    return _PlainUnpickler(io.BytesIO(data)).load()


def write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class Checkpoint:
    """The checkpoint files of one session folder."""

    def __init__(self, session_dir: str) -> None:
        self.path = os.path.join(session_dir, FILE)
        self.spec_dir = os.path.join(session_dir, SPECS)
        self._keys: dict[int, tuple[dict[str, Any], str]] = {}  # id(spec) -> (spec, key)
        self._written: set[str] = set()
        self._last = b""
        self.writes = 0

    def spec_key(self, spec: dict[str, Any]) -> str:
        """The key of `spec`, its file written on first sight (specs are never mutated)."""
        hit = self._keys.get(id(spec))
        if hit is not None and hit[0] is spec:
            return hit[1]
        data = pickle.dumps(spec, protocol=5)
        key = hashlib.sha256(data).hexdigest()[:32]
        if key not in self._written:
            os.makedirs(self.spec_dir, mode=0o700, exist_ok=True)
            write_atomic(os.path.join(self.spec_dir, f"{key}.spec"), data)
            self._written.add(key)
        self._keys[id(spec)] = (spec, key)
        return key

    def save(self, state: dict[str, Any]) -> bool:
        """Write `state` (from `capture`) if it changed; True if written."""
        data = pickle.dumps({"format": FORMAT, **state}, protocol=5)
        if data == self._last:
            return False
        write_atomic(self.path, data)
        self._last = data
        self.writes += 1
        self._prune(state)
        return True

    def _prune(self, state: dict[str, Any]) -> None:
        used = {d["spec"] for d in state["deployments"]} | {r["spec"] for r in state["replicas"]}
        for key in self._written - used:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.spec_dir, f"{key}.spec"))
        self._written &= used
        self._keys = {i: v for i, v in self._keys.items() if v[1] in used}

    def load(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]] | None:
        """(state, specs by key), or None when there is no checkpoint. Raises on a bad one."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        state = loads_plain(data)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"unknown checkpoint format {state.get('format') if isinstance(state, dict) else type(state)}")
        specs: dict[str, dict[str, Any]] = {}
        for key in {d["spec"] for d in state["deployments"]} | {r["spec"] for r in state["replicas"]}:
            with open(os.path.join(self.spec_dir, f"{key}.spec"), "rb") as f:
                specs[key] = loads_plain(f.read())
        self._written = set(specs)
        self._last = data
        return state, specs

    def set_aside(self) -> str:
        """Move an unreadable checkpoint out of the way (kept for post-mortem)."""
        bad = f"{self.path}.bad"
        with contextlib.suppress(OSError):
            os.replace(self.path, bad)
        return bad


# ---- controller <-> plain data -------------------------------------------------------------


def _autoscale(st: Any) -> dict[str, Any] | None:
    if st is None:
        return None
    policy = st.policy
    return {  # not the load samples: they change every tick; a restarted head samples anew
        "policy": None if policy is None else (policy.direction, policy.since),
        "last_decision": st.last_decision,
        "last_decision_time_s": st.last_decision_time_s,
        "zero_since": st.zero_since,
    }


def capture(c: Controller, ckpt: Checkpoint, proxy: dict[str, Any] | None, metrics_port: int) -> dict[str, Any]:
    """The controller's state as plain data (specs by key, their files written by `ckpt`)."""
    apps = []
    deps = []
    replicas = []
    for app in c.apps.values():
        apps.append({
            "name": app.name, "route_prefix": app.route_prefix, "ingress": app.ingress,
            "status": app.status.value, "message": app.message,
            "last_deployed_time_s": app.last_deployed_time_s, "deleting": app.deleting,
            "was_running": app.was_running, "external_scaler_enabled": app.external_scaler_enabled,
            "autoscaling_policy": app.autoscaling_policy, "declarative": app.declarative,
        })
        for d in app.deployments.values():
            deps.append({
                "app": d.app, "name": d.name, "spec": ckpt.spec_key(d.spec), "target": d.target,
                "status": d.status.value, "trigger": d.trigger.value, "message": d.message,
                "failures": d.failures, "failed_msg": d.failed_msg, "unhealthy_msg": d.unhealthy_msg,
                "deleting": d.deleting, "scaling": d.scaling, "autoscale": _autoscale(d.autoscale),
                "external_target": d.external_target,
            })
            for r in d.replicas.values():
                if r.proc is None or r.state in (RState.PENDING, RState.GONE):
                    continue  # no process to re-adopt: reconcile makes it again
                alloc = r.alloc
                replicas.append({
                    "id": r.id, "app": d.app, "deployment": d.name, "spec": ckpt.spec_key(r.spec),
                    "state": r.state.name, "pid": r.proc.pid, "ticks": r.proc.ticks, "sock": r.sock,
                    "demand": dict(alloc.demand) if alloc else {},
                    "gpu_shares": dict(alloc.gpu_shares) if alloc else {},
                    "config_sent": r.config_sent, "models": list(r.models), "node": r.node,
                })
    return {"apps": apps, "deployments": deps, "replicas": replicas, "proxy": proxy,
            "metrics_port": metrics_port, "splits": [sp.plain() for sp in c.splits.values()],
            "shadows": [sh.plain() for sh in c.shadows.values()],
            "target_capacity": [c.target_capacity, c.capacity_direction]}


def restore(c: Controller, state: dict[str, Any], specs: dict[str, dict[str, Any]], supervisor: Supervisor) -> int:
    """Rebuild `c` from a checkpoint; returns how many replica processes were re-adopted."""
    from flotilla._private.autoscaler_loop import make_state
    from flotilla._private.autoscaling import PolicyState
    from flotilla._private.controller import App, Deployment, Replica, Shadow, Split
    from flotilla.serve.schema import ReplicaRank

    c.target_capacity, c.capacity_direction = state.get("target_capacity") or (None, None)
    for sh in state.get("shadows", []):
        c.shadows[sh["route"]] = Shadow(sh["route"], sh["target"], float(sh["fraction"]), int(sh["max_queue"]))
    for sp in state.get("splits", []):
        c.splits[sp["name"]] = Split(sp["name"], sp["route_prefix"], dict(sp["traffic"]),
                                     sp["sticky_header"], sp["sticky_cookie"])
    for a in state["apps"]:
        app = App(a["name"], a["route_prefix"], a["ingress"], {})
        app.status = ApplicationStatus(a["status"])
        app.message = a["message"]
        app.last_deployed_time_s = a["last_deployed_time_s"]
        app.deleting = a["deleting"]
        app.was_running = a["was_running"]
        app.external_scaler_enabled = bool(a.get("external_scaler_enabled", False))
        app.autoscaling_policy = a.get("autoscaling_policy")
        app.declarative = bool(a.get("declarative", False))
        c.apps[app.name] = app
    for d in state["deployments"]:
        app = c.apps[d["app"]]
        dep = Deployment(d["app"], d["name"], specs[d["spec"]], d["target"])
        dep.status = DeploymentStatus(d["status"])
        dep.trigger = DeploymentStatusTrigger(d["trigger"])
        dep.message = d["message"]
        dep.failures = d["failures"]
        dep.failed_msg = d["failed_msg"]
        dep.unhealthy_msg = d["unhealthy_msg"]
        dep.external_target = d.get("external_target")
        dep.deleting = d["deleting"]
        dep.scaling = d["scaling"]
        dep.autoscale = make_state(dep.config)
        if dep.autoscale is not None:
            dep.autoscale.set_capacity(*c.capacity_of(app))
        saved = d["autoscale"]
        if dep.autoscale is not None and saved is not None:
            st = dep.autoscale
            if saved["policy"] is not None:
                st.policy = PolicyState(*saved["policy"])
            st.last_decision = saved["last_decision"]
            st.last_decision_time_s = saved["last_decision_time_s"]
            st.zero_since = saved["zero_since"]
        app.deployments[dep.name] = dep
    adopted = 0
    now = time.monotonic()
    for x in state["replicas"]:
        owner = c.find(("deployment", x["app"], x["deployment"]))
        r = Replica(x["id"], owner, specs[x["spec"]]) if owner is not None else None
        proc = supervisor.adopt(x["pid"], "replica", x["ticks"], _exit_callback(c, r))
        if proc is None:
            logger.info("replica %s (pid %s) of %s/%s is gone; it will be replaced", x["id"], x["pid"], x["app"], x["deployment"])
            continue
        if r is None or owner is None:
            supervisor.kill(proc)  # of a deployment the checkpoint does not have
            continue
        r.state = RState[x["state"]]
        r.proc = proc
        r.sock = x["sock"]
        r.alloc = c.pool.take(x["demand"], x["gpu_shares"])
        r.placed_at = now
        r.config_sent = x["config_sent"]
        r.models = tuple(x["models"])
        r.node = x.get("node", "")
        held = (r.config_sent or {}).get("rank")
        if held is not None:  # its rank, as it was last told it
            r.rank = ReplicaRank(*held)
            r.world_size = r.config_sent["world_size"]  # type: ignore[index]
            owner.ranks.recover(r.id, r.node, r.rank)
        r.adopted = asyncio.Event()
        owner.replicas[r.id] = r
        c.replicas[r.id] = r
        adopted += 1
    return adopted


def _exit_callback(c: Controller, r: Replica | None) -> Callable[[Process], None] | None:
    if r is None:
        return None
    return lambda p: c._on_exit(r, p)
