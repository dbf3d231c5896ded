"""The Ray backend: replicas are Ray actors, behind the same supervisor seam as the fork server.

Imported only by a head started with `backend="ray"` (the local backend never imports Ray).

```
driver ─▶ keeper ─▶ head (this machine; the Ray driver) ──ray.init──▶ Ray cluster
                     │ controller, proxy manager            ReplicaActor (one per replica,
                     │ zygote ─fork─▶ proxy (this machine)    on whichever node Ray picks)
                     │ control: head.sock (local processes)    run(): the replica's main loop
                     │          tcp://ip:port (actors)          on its own uvloop thread,
                     │                                          data plane on tcp://node-ip:port
                     └ ProxyFleet (ray_proxies.py) ─────────▶ ProxyActor on each other node
 routers (driver, proxies) ──── authenticated TCP frames ──▶  replicas
```

- `RaySupervisor.start("replica", ...)` creates a `ReplicaActor` with the deployment's
  `ray_actor_options` passed through (num_cpus, num_gpus, memory, resources,
  accelerator_type, object_store_memory, runtime_env), `max_restarts=0`, a name in the
  `flotilla` namespace; then calls its `run(args)`. The actor listens with
  `transport.serve_tcp` on its node's address (port 0) and registers with the head over
  authenticated TCP, saying where it serves; routers then connect with `connect_tcp`.
- Ray places the actor (and sets `CUDA_VISIBLE_DEVICES`); the controller places nothing
  (`RayResources` says everything fits) and only reports, from Ray's pending demand, replicas
  Ray cannot schedule yet.
- Exit: the awaited `run()` ObjectRef resolves (the replica drained and returned; the actor is
  then killed to free its resources) or fails (`ActorDiedError`: the worker or its node died,
  `RuntimeEnvSetupError`: a bad runtime_env, ...). Stop: the controller drains the replica
  over its control connection as on the local backend, then `ray.kill`.
- Other workers (the head machine's HTTP proxy) are still forked by a local zygote; the
  other nodes' proxies are actors of `ray_proxies.ProxyFleet` (`proxy_location="EveryNode"`).
- The per-cluster secret travels to actors as an argument of `run` (through Ray), to local
  processes over their pipe or the head's Unix socket; never on a command line, in a file or
  in the environment.
"""

from __future__ import annotations

import asyncio
import logging
import os
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


class ReplicaActor:
    """A replica as a Ray actor. `__init__` runs no user code; `run` runs the replica until it
    exits (in a thread of this threaded actor: `where` answers meanwhile)."""

    def __init__(self) -> None:
        self.started = time.time()

    def run(self, args: dict[str, Any]) -> int:
        from flotilla._private import auth, replica

        auth.set_cluster_secret(args.pop("secret"))
        args["tcp_host"] = ray.util.get_node_ip_address()
        replica.setup_process(args, in_actor=True)
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
        return "Ray's worker logs on the replica's node (/tmp/ray/session_latest/logs/worker-*)"

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
        run_args = dict(args, head_sock=self.head_addr, secret=self.secret,
                        has_working_dir=bool((rao.get("runtime_env") or {}).get("working_dir")))
        run_args.pop("ray_actor_options", None)
        proc.actor = _actor_class().options(
            name=name, namespace=NAMESPACE, max_restarts=0, max_concurrency=4, **opts
        ).remote()
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
        if proc.actor is None:
            return
        try:
            ray.kill(proc.actor, no_restart=True)
        except Exception as e:  # already gone
            logger.debug("ray.kill(%s): %r", proc.name, e)

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
                where = "" if total else ", and no node of the cluster has any"
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
        want = {k: round(v, 4) for k, v in demand.items() if v}
        return any({k: round(v, 4) for k, v in b.items() if v} == want for b in pending)


def _pending_demand() -> list[dict[str, float]] | None:
    """The shapes of tasks and actors Ray cannot schedule yet (what `ray status` lists as
    pending demand), or None when this Ray does not say."""
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        return [dict(b.bundle) for d in status.resource_demands.ray_task_actor_demand for b in d.bundles_by_count]
    except Exception:
        return None
