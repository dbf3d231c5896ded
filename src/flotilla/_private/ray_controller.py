"""The controller as a detached, named Ray actor: the control plane outlives drivers.

Used when a driver joins an existing Ray cluster (`flotilla.init(backend="ray", address=...)`
or RAY_ADDRESS). A private local Ray instance (no address) keeps the keeper and head
processes: nothing could outlive that Ray anyway.

```
driver A ─ray.init(address)─┐          ControllerActor "flotilla-controller" (detached,
driver B ─ray.init(address)─┤           num_cpus=0, one per Ray namespace)
  get_if_exists=True ───────┴─info()──▶  thread: Head.run() on its own uvloop
  HeadLink ── authenticated TCP ───────▶ controller, RaySupervisor, ProxyManager,
                                         zygote ─fork─▶ the node's HTTP proxy; metrics
                                         ReplicaActor / ProxyActor: owned by this actor
```

- `attach` (driver): `ray.init` unless this process is already a Ray driver, then gets or
  creates the actor (race-safe: `get_if_exists=True`; pinned, softly, to the driver's node)
  and calls `info()`: the head's authenticated TCP address, the per-cluster secret (through
  Ray only), the metrics port. The driver connects its `HeadLink` to that address.
- `__init__` starts the head on a thread of the actor's process (no keeper: no stdin watch,
  no signal handlers; its own session folder on that node, logs in `logs/head.log` there).
  Replica and proxy actors are owned by this actor: they die with it.
- A driver that exits, or calls `flotilla.shutdown()`, leaves it running; `serve.shutdown()`
  stops every application and proxy, ends the head, and kills the actor (`stop`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import ray

from flotilla._private.backend import RAY_INIT_OPTIONS
from flotilla._private.dashboard import DEFAULT as DASHBOARD

logger = logging.getLogger("flotilla.ray.controller")

CONTROLLER_NAME = "flotilla-controller"
#: The Ray namespace of the controller actor when `flotilla.init` is given none.
DEFAULT_NAMESPACE = "flotilla"
#: How long `info()` waits for the head to serve (a new actor: Ray starts a worker first).
START_TIMEOUT_S = 120.0
#: A head that ended is followed by the end of its actor's process after this long, should
#: nobody `ray.kill` it (a driver that died during `serve.shutdown`).
EXIT_GRACE_S = 30.0

#: Whether this process called `ray.init` (then `flotilla.shutdown()` calls `ray.shutdown`).
_owns_ray = False


class ControllerActor:
    """The head (controller, proxy manager, metrics) on a thread of a detached actor."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from flotilla._private.keeper import ENV

        os.environ.pop(ENV, None)  # no keeper: the zygote's children die with it instead
        self.ready = threading.Event()
        self.done = threading.Event()
        self.info_: dict[str, Any] | None = None
        self.error = ""
        self.thread = threading.Thread(target=self._main, args=(cfg,), name="flotilla-head", daemon=True)
        self.thread.start()

    def _main(self, cfg: dict[str, Any]) -> None:
        from flotilla._private import head, session

        session_dir = session.create()
        handler = logging.FileHandler(os.path.join(session_dir, "logs", "head.log"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            h = head.Head(dict(cfg, session_dir=session_dir, resources={}, backend="ray", in_actor=True))
            h.on_ready = self._on_ready
            try:
                import uvloop

                uvloop.run(h.run())
            except ImportError:  # pragma: no cover
                import asyncio

                asyncio.run(h.run())
        except BaseException as e:
            logger.exception("the flotilla head stopped")
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.error = self.error or "the flotilla controller stopped (serve.shutdown)"
            logger.info("head exiting; session folder %s removed", session_dir)
            session.finish(session_dir)
            self.done.set()
            self.ready.set()
            timer = threading.Timer(EXIT_GRACE_S, os._exit, (0,))
            timer.daemon = True
            timer.start()

    def _on_ready(self, info: dict[str, Any]) -> None:
        self.info_ = info
        self.ready.set()

    def info(self, timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
        """Where the head listens, and the secret (answered through Ray only)."""
        if not self.ready.wait(timeout):
            raise TimeoutError(f"the flotilla head did not start within {timeout:g}s")
        if self.info_ is None or self.done.is_set():
            raise RuntimeError(self.error or "the flotilla head did not start")
        return self.info_

    def ping(self) -> int:
        return os.getpid()

    def wait_done(self, timeout: float) -> bool:
        return self.done.wait(timeout)


_remote_cls: Any = None


def _actor_class() -> Any:
    global _remote_cls
    if _remote_cls is None:
        _remote_cls = ray.remote(ControllerActor)
    return _remote_cls


def namespace(opts: dict[str, Any]) -> str:
    """The Ray namespace of the controller actor: `flotilla.init(namespace=...)`, else "flotilla"."""
    return str(opts.get("namespace") or DEFAULT_NAMESPACE)


def describe(ns: str) -> str:
    return f"the Ray actor {CONTROLLER_NAME!r} in Ray namespace {ns!r}"


def _connect(opts: dict[str, Any]) -> None:
    """`ray.init(address)` in the driver, unless it is a Ray driver already."""
    global _owns_ray
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {k: opts[k] for k in RAY_INIT_OPTIONS if opts.get(k) is not None}
    kwargs.setdefault("namespace", namespace(opts))
    kwargs.setdefault("log_to_driver", False)  # the controller's and replicas' logs stay in their files
    ray.init(address=opts.get("address"), **kwargs)
    _owns_ray = True


def attach(opts: dict[str, Any], metrics_port: int) -> tuple[Any, dict[str, Any]]:
    """Join Ray, get or create the controller actor, and return it with its `info()`."""
    try:
        _connect(opts)
    except Exception as e:
        raise RuntimeError(f"the Ray backend could not join Ray at address={opts.get('address')!r}: "
                           f"{type(e).__name__}: {_first_line(e)}") from e
    ns = namespace(opts)
    options: dict[str, Any] = dict(name=CONTROLLER_NAME, namespace=ns, lifetime="detached", get_if_exists=True,
                                   num_cpus=0, max_restarts=0, max_concurrency=8)
    try:
        node = ray.get_runtime_context().get_node_id()
    except Exception:  # a Ray client ("ray://"): no node of its own
        node = None
    if node:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
    cls = _actor_class()
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        actor = cls.options(**options).remote({"metrics_port": metrics_port, "dashboard": dict(DASHBOARD)})
        try:
            return actor, ray.get(actor.info.remote(), timeout=START_TIMEOUT_S + 10)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            # One that is stopping (serve.shutdown from another driver): its name frees soon.
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not start or reach {describe(ns)}: {_first_line(e)}") from None
            time.sleep(0.5)


def alive(actor: Any, timeout: float = 10.0) -> str:
    """"" while the actor answers (or might: a timeout), else why it is gone."""
    try:
        ray.get(actor.ping.remote(), timeout=timeout)
    except ray.exceptions.RayActorError as e:
        return _first_line(e)
    except ray.exceptions.GetTimeoutError:
        return ""
    return ""


def stop(actor: Any, timeout: float = 60.0) -> None:
    """After the head was told to shut down: wait for it to end, then kill the actor."""
    try:
        ray.get(actor.wait_done.remote(timeout), timeout=timeout + 10)
    except Exception as e:  # already dead, or too slow: killed either way
        logger.debug("waiting for the controller to end: %r", e)
    try:
        ray.kill(actor, no_restart=True)
    except Exception as e:
        logger.debug("ray.kill(controller): %r", e)


def release() -> None:
    """`flotilla.shutdown()`: leave Ray if `attach` joined it (the controller stays)."""
    global _owns_ray
    if _owns_ray:
        _owns_ray = False
        ray.shutdown()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
