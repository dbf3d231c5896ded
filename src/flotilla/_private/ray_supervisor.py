"""The Ray backend: replicas are Ray actors, behind the same supervisor seam as the fork server.

Imported only by a head on the Ray backend (a head process, or the detached controller actor
of `ray_controller.py`); the local backend never imports Ray.

```
driver ─▶ keeper ─▶ head process (private local Ray)  ──ray.init──▶ Ray
driver ─ray.init(address)─▶ ControllerActor (a cluster: detached, named; ray_controller.py)
          either one runs the head:                  ReplicaActor (one per replica,
                     │ controller, proxy manager            on whichever node Ray picks)
                     │ zygote ─fork─▶ proxy (its node)       run(): the replica's main loop
                     │ control: head.sock (local processes)   on its own uvloop thread,
                     │          tcp://ip:port (actors, drivers) data plane on tcp://node-ip:port
                     └ ProxyFleet (ray_proxies.py) ─────────▶ ProxyActor on each other node
 routers (driver, proxies) ──── authenticated TCP frames ──▶  replicas
```

- `RaySupervisor.start("replica", ...)` creates a `ReplicaActor` with the deployment's
  `ray_actor_options` passed through (num_cpus, num_gpus, memory, resources,
  accelerator_type, object_store_memory, runtime_env), `max_restarts=0`, a name in the
  `flotilla` namespace; then calls its `run(args)`. The actor listens with
  `transport.serve_tcp` on its node's address (port 0) and registers with the head over
  authenticated TCP, saying where it serves and on which Ray node (scale-down empties the
  nodes with the fewest replicas first); routers then connect with `connect_tcp`.
- Ray places the actor (and sets `CUDA_VISIBLE_DEVICES`); the controller places nothing
  (`RayResources` says everything fits) and only reports, from Ray's pending demand (which an
  autoscaler acts on too), replicas Ray cannot schedule yet.
- `placement`: as Ray Serve, `placement_group_bundles` give each replica its own placement
  group (the actor in bundle 0, its children captured), removed with the actor;
  `max_replicas_per_node` is a share of an implicit resource every node has 1 of.
- Exit: the awaited `run()` ObjectRef resolves (the replica drained and returned; the actor is
  then killed to free its resources) or fails (`ActorDiedError`: the worker or its node died,
  `RuntimeEnvSetupError`: a bad runtime_env, ...). Stop: the controller drains the replica
  over its control connection as on the local backend, then `ray.kill`.
- Other workers (the head's node's HTTP proxy) are still forked by a local zygote; the
  other nodes' proxies are actors of `ray_proxies.ProxyFleet` (`proxy_location="EveryNode"`).
- The per-cluster secret travels to actors as an argument of `run` (through Ray), to local
  processes over their pipe or the head's Unix socket; never on a command line, in a file or
  in the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

try:
    import ray
except ImportError as e:  # pragma: no cover - the head checks first, with this message
    raise ImportError('the Ray backend needs Ray: pip install "flotilla[ray]"') from e

from flotilla._private.backend import RAY_INIT_OPTIONS
from flotilla._private.resources import Allocation, ResourcePool, _u
from flotilla._private.supervisor import Process, Supervisor, ZygoteSupervisor

logger = logging.getLogger("flotilla.ray")

NAMESPACE = "flotilla"
#: How often the head reads Ray's resources and pending demand (a thread, off its loop).
RESOURCE_REFRESH_S = 1.0
#: A replica not started after this long, whose demand Ray has pending, is reported as such.
UNSCHEDULED_AFTER_S = 1.0
#: `ray_actor_options` fields handed to Ray as they are (None and empty ones left out).
ACTOR_OPTIONS = ("num_cpus", "num_gpus", "memory", "object_store_memory", "resources",
                 "accelerator_type", "runtime_env")
#: Where a replica runs (deployment options the controller passes in `start`'s args).
PLACEMENT_ARGS = ("placement_group_bundles", "placement_group_strategy", "max_replicas_per_node",
                  "placement_group_bundle_label_selector")
#: Ray's implicit resources: every node has 1 of each such name, unlisted (max_replicas_per_node).
IMPLICIT_PREFIX = "node:__internal_implicit_resource_"
#: Ray keeps resource amounts to 4 decimals.
RESOURCE_UNIT = 10_000


def connect(opts: dict[str, Any]) -> None:
    """`ray.init` in the head: join the cluster at `opts["address"]`, or (no address and no
    RAY_ADDRESS) start a private local Ray instance with the given resources."""
    address = opts.get("address")
    kwargs: dict[str, Any] = {k: opts[k] for k in RAY_INIT_OPTIONS if opts.get(k) is not None}
    kwargs.setdefault("namespace", NAMESPACE)
    kwargs["log_to_driver"] = False  # the head's stdout is its pipe to the keeper
    if address in (None, "local") and not (address is None and os.environ.get("RAY_ADDRESS")):
        kwargs.setdefault("include_dashboard", False)
        for k in ("num_cpus", "num_gpus", "resources"):
            if opts.get(k) is not None:
                kwargs[k] = opts[k]
        ray.init(address="local", **kwargs)
    else:
        ray.init(address=address, **kwargs)


def actor_options(rao: dict[str, Any]) -> dict[str, Any]:
    """The deployment's `ray_actor_options` as Ray takes them (unset fields left out)."""
    out: dict[str, Any] = {}
    for k in ACTOR_OPTIONS:
        v = rao.get(k)
        if v is None or (k in ("resources", "runtime_env") and not v):
            continue
        out[k] = int(v) if k in ("memory", "object_store_memory") else v
    return out


def per_node_resource(tag: str, app: str, deployment: str) -> str:
    """The implicit resource that bounds a deployment's replicas per node (one name per session)."""
    return f"{IMPLICIT_PREFIX}flotilla:{tag}:{app}:{deployment}"


def per_node_share(limit: int) -> float:
    """What one replica takes of its per-node resource: `limit` shares fit in 1, `limit + 1` do
    not (rounded down to Ray's 4 decimals, never up)."""
    return math.floor(RESOURCE_UNIT / limit) / RESOURCE_UNIT


def placement(name: str, tag: str, args: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Where a replica runs, as Ray Serve does it: extra actor options, and the replica's own
    placement group (or None).

    - `placement_group_bundles`: a placement group per replica (named as its actor, strategy
      `placement_group_strategy` or PACK); the actor runs in bundle 0 and the tasks and actors
      it starts are placed in the group (`placement_group_capture_child_tasks`); with
      `placement_group_bundle_label_selector`, each bundle on a node whose labels match.
    - `max_replicas_per_node`: each replica takes `1 / limit` of an implicit resource that every
      node has 1 of, so Ray (and its autoscaler) put at most `limit` of them on a node.
    """
    bundles = args.get("placement_group_bundles")
    if bundles:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        selector = args.get("placement_group_bundle_label_selector")
        pg = ray.util.placement_group(bundles, strategy=args.get("placement_group_strategy") or "PACK", name=name,
                                      **({"bundle_label_selector": selector} if selector else {}))
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}, pg
    limit = args.get("max_replicas_per_node")
    if limit:
        key = per_node_resource(tag, args["app"], args["deployment"])
        return {"resources": {key: per_node_share(int(limit))}}, None
    return {}, None


class ReplicaActor:
    """A replica as a Ray actor. `__init__` runs no user code; `run` runs the replica until it
    exits (in a thread of this threaded actor: `where` answers meanwhile)."""

    def __init__(self) -> None:
        self.started = time.time()

    def run(self, args: dict[str, Any]) -> int:
        from flotilla._private import auth, replica

        auth.set_cluster_secret(args.pop("secret"))
        args["tcp_host"] = ray.util.get_node_ip_address()
        args["node_id"] = ray.get_runtime_context().get_node_id()
        own_log = _log_to(args.pop("log_path", ""))
        replica.setup_process(args, in_actor=True, own_log=own_log)
        replica.run_loop(args)
        return 0

    def where(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "gpu_ids": ray.get_gpu_ids()}


_remote_cls: Any = None


def _actor_class() -> Any:
    global _remote_cls
    if _remote_cls is None:
        _remote_cls = ray.remote(ReplicaActor)
    return _remote_cls


class ActorProcess(Process):
    """A replica actor, as the controller sees worker processes: `pid` is 0 until it
    registers; signals are not used (`RaySupervisor.kill` is `ray.kill`)."""

    def __init__(self, kind: str, name: str, on_exit: Callable[[Process], None] | None) -> None:
        super().__init__(0, kind, None, on_exit)
        self.name = name
        self.actor: Any = None
        self.ref: Any = None
        self.pg: Any = None  # its placement group (placement_group_bundles), removed with it

    def __repr__(self) -> str:
        state = "running" if not self.exited.is_set() else f"exited ({self.exit_reason or self.exit_code})"
        return f"ActorProcess({self.name}, pid {self.pid or '?'}, {state})"

    def same_process(self) -> bool:
        return not self.exited.is_set()

    def send(self, sig: int) -> bool:
        return False


class RaySupervisor(Supervisor):
    """Replicas as Ray actors; anything else (the proxy) forked by a local zygote."""

    local = False

    def __init__(self, secret: bytes, session_dir: str) -> None:
        self.secret = secret
        self.tag = os.path.basename(session_dir.rstrip("/"))
        self.zygote = ZygoteSupervisor()
        self.head_addr = ""  # the head's authenticated TCP control address, set by the head
        self.actors: dict[str, ActorProcess] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def logs_hint(self, path: str) -> str:
        name = os.path.basename(path) if path.endswith(".log") else ""
        return (f"{path} (on a node without that folder: logs/flotilla/{name} in Ray's session "
                "folder there; Ray's worker-* logs for a worker that never started)")

    async def use_zygote(self, proc: Any = None) -> None:
        await self.zygote.use_zygote(proc)

    async def start(self, kind: str, log_path: str, args: dict[str, Any],
                    on_exit: Callable[[Process], None] | None = None) -> Process:
        if kind != "replica":
            return await self.zygote.start(kind, log_path, args, on_exit)
        rao = (args.get("ray_actor_options") or {})
        name = f"{self.tag}:{args['app']}:{args['deployment']}:{args['replica_id']}"
        proc = ActorProcess(kind, name, on_exit)
        opts = actor_options(rao)
        extra, proc.pg = placement(name, self.tag, args)
        if extra.get("resources"):
            extra["resources"] = {**opts.get("resources", {}), **extra["resources"]}
        opts.update(extra)
        run_args = dict(args, head_sock=self.head_addr, secret=self.secret, log_path=log_path,
                        has_working_dir=bool((rao.get("runtime_env") or {}).get("working_dir")))
        for k in ("ray_actor_options", *PLACEMENT_ARGS):
            run_args.pop(k, None)
        try:
            proc.actor = _actor_class().options(
                name=name, namespace=NAMESPACE, max_restarts=0, max_concurrency=4, **opts
            ).remote()
        except BaseException:
            remove_placement_group(proc)
            raise
        proc.ref = proc.actor.run.remote(run_args)
        self.actors[name] = proc
        t = asyncio.get_running_loop().create_task(self._watch(proc))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return proc

    async def _watch(self, proc: ActorProcess) -> None:
        """Wait for `run()` to end: returned (drained) or failed (the actor died)."""
        code: int | None = None
        reason = ""
        try:
            code = await asyncio.wrap_future(proc.ref.future())
        except asyncio.CancelledError:
            raise
        except ray.exceptions.RuntimeEnvSetupError as e:
            reason = f"Ray could not set up its runtime_env: {_first_line(e)}"
        except ray.exceptions.RayActorError as e:
            reason = f"its Ray actor died: {_first_line(e)}"
        except Exception as e:
            reason = f"its Ray actor failed: {type(e).__name__}: {_first_line(e)}"
        self._kill_actor(proc)  # returned normally: free its worker and resources
        self.actors.pop(proc.name, None)
        proc.exit_reason = reason
        proc.mark_exited(code)

    @staticmethod
    def _kill_actor(proc: ActorProcess) -> None:
        if proc.actor is not None:
            try:
                ray.kill(proc.actor, no_restart=True)
            except Exception as e:  # already gone
                logger.debug("ray.kill(%s): %r", proc.name, e)
        remove_placement_group(proc)

    def adopt(self, pid: int, kind: str, ticks: int | None,
              on_exit: Callable[[Process], None] | None = None) -> Process | None:
        if kind == "replica":
            return None  # a restarted head does not re-adopt actors yet: they are replaced
        return self.zygote.adopt(pid, kind, ticks, on_exit)

    def _adopted(self, proc: Process) -> None:  # pragma: no cover - adopt() is overridden
        pass

    def alive(self, proc: Process) -> bool:
        return proc.same_process()

    def kill(self, proc: Process) -> None:
        if isinstance(proc, ActorProcess):
            if not proc.exited.is_set():
                self._kill_actor(proc)
        else:
            self.zygote.kill(proc)

    async def stop(self, proc: Process, timeout: float) -> None:
        if isinstance(proc, ActorProcess):
            self.kill(proc)
            await self.wait(proc, timeout)
        else:
            await self.zygote.stop(proc, timeout)

    async def close(self) -> None:
        procs = list(self.actors.values())
        for p in procs:
            self.kill(p)
        if procs:
            await asyncio.gather(*(self.wait(p, 5.0) for p in procs))
        for t in list(self._tasks):
            t.cancel()
        await self.zygote.close()


def remove_placement_group(proc: ActorProcess) -> None:
    """Remove the replica's placement group (what it and its children still run in it ends)."""
    pg, proc.pg = proc.pg, None
    if pg is None:
        return
    try:
        ray.util.remove_placement_group(pg)
    except Exception as e:  # already removed
        logger.debug("remove_placement_group(%s): %r", proc.name, e)


def _log_to(path: str) -> bool:
    """Point this worker's stdout and stderr at the replica's log file, as the local backend
    does: `path` where its folder exists on this node (the head's machine, a shared disk), else
    the same name under `logs/flotilla/` in Ray's session folder here. False (Ray's worker
    logs kept) when neither can be opened."""
    if not path:
        return False
    if not os.path.isdir(os.path.dirname(path)):
        try:
            node = ray._private.worker.global_worker.node
            folder = os.path.join(node.get_logs_dir_path(), "flotilla")
            os.makedirs(folder, exist_ok=True)
        except Exception:
            return False
        path = os.path.join(folder, os.path.basename(path))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return False
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class RayResources(ResourcePool):
    """The controller's view of resources on Ray: Ray's totals and free amounts, read in a
    thread every RESOURCE_REFRESH_S. It places nothing: every replica "fits" and becomes an
    actor at once, and Ray decides where and when it runs. `unscheduled` tells, from Ray's
    pending demand, which starting replicas Ray has no room for yet."""

    def __init__(self) -> None:
        super().__init__({})
        self._totals: dict[str, float] = {}
        self._free: dict[str, float] = {}
        self._pending: list[dict[str, float]] | None = None  # None: Ray's pending demand unknown
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        totals = {k: float(v) for k, v in ray.cluster_resources().items() if not k.startswith("node:")}
        free = {k: float(v) for k, v in ray.available_resources().items() if not k.startswith("node:")}
        pending = _pending_demand()
        with self._lock:
            self._totals, self._free, self._pending = totals, free, pending

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(RESOURCE_REFRESH_S)
            try:
                await loop.run_in_executor(None, self.refresh)
            except Exception as e:
                logger.warning("could not read Ray's resources: %r", e)

    def totals(self) -> dict[str, float]:
        return dict(self._totals)

    def available(self) -> dict[str, float]:
        return dict(self._free)

    def fits_ever(self, demand: dict[str, float]) -> bool:
        return True  # Ray decides (an autoscaler may add the node it needs)

    def count_fits(self, demand: dict[str, float], limit: int) -> int:
        return limit

    def try_allocate(self, demand: dict[str, float]) -> Allocation | None:
        return Allocation({k: _u(v) for k, v in demand.items()})

    def take(self, demand: dict[str, int], gpu_shares: dict[int, int]) -> Allocation:
        return Allocation(dict(demand))

    def release(self, alloc: Allocation) -> None:
        alloc.demand = {}
        alloc.gpu_shares = {}

    def shortfall(self, demand: dict[str, float]) -> str:
        short = []
        for k, v in demand.items():
            have = self._free.get(k, 0.0)
            if v > have + 1e-9:
                total = self._totals.get(k, 0.0)
                where = "" if total else ", and no node of the cluster has any: it can never fit until one that has it joins"
                short.append(f"{k} (needs {v:g}, {have:g} available{where})")
        return "not enough " + ", ".join(short) if short else ""

    def unscheduled(self, demand: dict[str, float], waited: float) -> bool:
        if waited < UNSCHEDULED_AFTER_S:
            return False
        if any(self._totals.get(k, 0.0) + 1e-9 < v for k, v in demand.items()):
            return True  # no node has (enough of) it now: infeasible until a node is added
        pending = self._pending
        if pending is None:  # no pending demand from Ray: judge by what is free
            return bool(self.shortfall(demand))
        want = _shape(demand)
        return any(_shape(b) == want for b in pending)


def _shape(demand: dict[str, float]) -> dict[str, float]:
    """A demand as compared with Ray's pending ones: without Ray's per-node and implicit
    resources (max_replicas_per_node), the object store and accelerator types; fractions of
    GPUs adding up past one rounded up as `DeploymentConfig.demand` does."""
    out = {k: round(v, 4) for k, v in demand.items()
           if v and not k.startswith(("node:", "accelerator_type:")) and k != "object_store_memory"}
    gpus = out.get("GPU", 0.0)
    if gpus > 1 and gpus != int(gpus):
        out["GPU"] = float(math.ceil(gpus))
    return out


def _pending_demand() -> list[dict[str, float]] | None:
    """The shapes of tasks, actors and placement groups (their bundles added up) that Ray cannot
    schedule yet (what `ray status` lists as pending demand), or None when this Ray does not
    say."""
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        demands = status.resource_demands
        out = [dict(b.bundle) for d in demands.ray_task_actor_demand for b in d.bundles_by_count]
        for pg in demands.placement_group_demand:
            total: dict[str, float] = {}
            for b in pg.bundles_by_count:
                for k, v in b.bundle.items():
                    total[k] = total.get(k, 0.0) + v * b.count
            out.append(total)
        return out
    except Exception:
        return None
