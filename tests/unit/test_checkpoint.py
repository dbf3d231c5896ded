"""The head's checkpoint: a round trip through the files re-creates apps, deployments (code as
opaque bytes), autoscaling state, and the replicas whose processes still run, with their
allocations (GPU ids included); dead ones are left out; the files are plain data only."""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
from pathlib import Path
from typing import Any

import pytest

from flotilla import serve
from flotilla._private import checkpoint
from flotilla._private.autoscaling import PolicyState
from flotilla._private.controller import Controller, Replica
from flotilla._private.lifecycle import RState, transition
from flotilla._private.resources import ResourcePool
from flotilla._private.supervisor import Process, ZygoteSupervisor, start_ticks
from flotilla.serve import api

NOT_A_PICKLE = b"\x80\x05user code the head must never unpickle"


@serve.deployment(ray_actor_options={"num_gpus": 1}, num_replicas=2)
class Model:
    pass


@serve.deployment(autoscaling_config={"min_replicas": 1, "max_replicas": 4})
class Scaled:
    pass


def app_spec(name: str, app: Any, version_tag: str = "") -> dict[str, Any]:
    spec = api.app_spec(app, name, f"/{name}")
    for d in spec["deployments"]:
        d["def_bytes"] = NOT_A_PICKLE
        d["version"] += version_tag
    return spec


def place(c: Controller, r: Replica, proc: Process, state: RState) -> None:
    r.alloc = c.pool.try_allocate(r.spec["demand"])
    transition(r, RState.STARTING, "test")
    r.proc = proc
    if state is not RState.STARTING:
        transition(r, RState.RUNNING, "test")
    if state is RState.DRAINING:
        transition(r, RState.DRAINING, "test")


def test_round_trip_re_adopts_live_replicas_only(tmp_path: Path) -> None:
    live = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        asyncio.run(_round_trip(tmp_path, live, dead.pid))
    finally:
        for p in live:
            p.kill()
            p.wait()


async def _round_trip(tmp: Path, live: list[subprocess.Popen[bytes]], dead_pid: int) -> None:
    totals = {"CPU": 8.0, "GPU": 2.0, "memory": 1e9}
    c = Controller(str(tmp), str(tmp / "head.sock"), ResourcePool(totals), ZygoteSupervisor())
    old = app_spec("m", Model.bind())
    c.deploy_app(old)
    dep = c.apps["m"].deployments["Model"]
    old_spec = dep.spec
    c.deploy_app(app_spec("m", Model.bind(), "-v2"))  # a rollout in progress: two versions
    assert dep.spec is not old_spec
    c.deploy_app(app_spec("s", Scaled.bind()))
    scaled = c.apps["s"].deployments["Scaled"]
    assert scaled.autoscale is not None
    scaled.autoscale.samples = [(10.0, 3.0), (10.25, 4.0)]
    scaled.autoscale.policy = PolicyState(1, 10.0)  # wants up since t=10
    scaled.target = 3
    dep.failures = 1
    c.set_traffic({"name": "split", "route_prefix": "/split", "traffic": {"m": 0.25, "s": 0.75},
                   "sticky_header": "x-user", "sticky_cookie": None})
    c.set_shadow({"route": "split", "target": "s", "fraction": 0.1, "max_queue": 7})

    def proc(pid: int) -> Process:
        return Process(pid, "replica", start_ticks(pid) or 12345)

    a = c._new_replica(dep)  # the new version, serving, holds GPU 0
    place(c, a, proc(live[0].pid), RState.RUNNING)
    a.models = ("m1",)
    b = c._new_replica(dep)  # the old version, draining
    b.spec = old_spec
    place(c, b, proc(live[1].pid), RState.DRAINING)
    gone = c._new_replica(dep)  # its process died while the head was away
    place(c, gone, Process(dead_pid, "replica", 1), RState.RUNNING)
    s1 = c._new_replica(scaled)
    place(c, s1, proc(live[2].pid), RState.STARTING)
    pending = c._new_replica(scaled)  # no process: not checkpointed, reconcile remakes it
    assert pending.state is RState.PENDING

    ckpt = checkpoint.Checkpoint(str(tmp))
    proxy = {"options": {"port": 8123}, "url": "http://127.0.0.1:8123", "pid": 42, "ticks": 7}
    state = checkpoint.capture(c, ckpt, proxy, 9100)
    assert ckpt.save(state) and not ckpt.save(checkpoint.capture(c, ckpt, proxy, 9100))  # unchanged: not rewritten
    assert not list(tmp.glob("**/*.tmp"))
    assert len(list((tmp / "specs").glob("*.spec"))) == 3  # m v1, m v2, s: each stored once

    loaded = checkpoint.Checkpoint(str(tmp)).load()
    assert loaded is not None
    saved, specs = loaded
    assert saved["proxy"] == proxy and saved["metrics_port"] == 9100
    c2 = Controller(str(tmp), str(tmp / "head.sock"), ResourcePool(totals), ZygoteSupervisor())
    assert checkpoint.restore(c2, saved, specs, c2.supervisor) == 3

    assert set(c2.apps) == {"m", "s"}
    assert c2.splits == c.splits and c2.routes() == c.routes()  # the split route comes back
    assert c2.shadows == c.shadows and c2.shadow_table() == c.shadow_table()  # and its shadow
    assert c2.shadow_table()["/split"]["target_prefix"] == c.apps["s"].route_prefix
    assert c2.apps["m"].route_prefix == "/m" and c2.apps["m"].ingress == "Model"
    dep2 = c2.apps["m"].deployments["Model"]
    assert dep2.version == dep.version and dep2.target == 2 and dep2.failures == 1
    assert dep2.spec["def_bytes"] == NOT_A_PICKLE  # opaque bytes, never unpickled
    scaled2 = c2.apps["s"].deployments["Scaled"]
    assert scaled2.target == 3 and scaled2.autoscale is not None
    assert scaled2.autoscale.policy == PolicyState(1, 10.0) and scaled2.autoscale.samples == []

    assert set(c2.replicas) == {a.id, b.id, s1.id}  # the dead one is left out
    a2, b2, s2 = c2.replicas[a.id], c2.replicas[b.id], c2.replicas[s1.id]
    assert (a2.state, b2.state, s2.state) == (RState.RUNNING, RState.DRAINING, RState.STARTING)
    assert a2.version == dep.version and b2.version == old_spec["version"]
    assert a2.sock == a.sock and a2.models == ("m1",) and a2.proc is not None and a2.proc.pid == live[0].pid
    assert a2.awaiting_reattach and a2.peer is None
    assert a2.alloc is not None and a.alloc is not None and a2.alloc.gpu_shares == a.alloc.gpu_shares
    assert b2.alloc is not None and b.alloc is not None and b2.alloc.gpu_shares == b.alloc.gpu_shares
    assert sorted(a2.alloc.gpu_ids + b2.alloc.gpu_ids) == [0, 1]
    # The pool holds exactly the re-adopted allocations again: no GPU left, the dead one's freed.
    assert c2.pool.available()["GPU"] == 0.0
    assert c2.pool.available()["CPU"] == pytest.approx(8.0 - 3 * 1.0)
    for r in list(c2.replicas.values()):
        assert r.proc is not None
        c2.supervisor.kill(r.proc)
        assert await c2.supervisor.wait(r.proc, 10)  # exits seen by pidfd: not our children
    assert c2.replicas == {}  # each exit went through the controller: replicas gone
    assert c2.pool.available()["GPU"] == 2.0


def test_a_checkpoint_holds_plain_data_only(tmp_path: Path) -> None:
    path = tmp_path / checkpoint.FILE
    path.write_bytes(pickle.dumps({"format": checkpoint.FORMAT, "apps": [os.system]}))
    with pytest.raises(pickle.UnpicklingError, match="plain data"):
        checkpoint.Checkpoint(str(tmp_path)).load()
    assert checkpoint.Checkpoint(str(tmp_path / "none")).load() is None
