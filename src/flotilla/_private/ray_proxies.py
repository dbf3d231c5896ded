"""One HTTP proxy per Ray node (`proxy_location="EveryNode"`, the default on the Ray backend).

Imported only by a head on the Ray backend.

```
head's machine                                  every other alive Ray node
 head ─ ProxyManager ─ zygote ─fork─▶ proxy      ProxyActor (num_cpus=0, max_restarts=0,
         │              (socket held by the        NodeAffinity(node, soft=False))
         │               keeper; SO_REUSEPORT)     run(): the proxy main loop on its own
         └─ ProxyFleet: Ray's alive nodes,         thread; binds host:port itself
            polled every NODE_POLL_S                (SO_REUSEPORT)
            start / restart / drop actors ◀─────── authenticated TCP to the head:
                                                    routes subscription, node_proxy_ready,
                                                    metrics push; routers to replicas
```

- The head's node keeps its zygote-forked proxy: its socket, held by the head (and the keeper,
  where there is one), outlives proxy restarts (connections wait in the backlog), and the local backend's paths stay as
  they are. Other nodes get a `ProxyActor` each.
- `ProxyFleet` reads Ray's alive nodes in a thread every `NODE_POLL_S`: a node that appears
  gets a proxy; a node that is gone takes its proxy with it; a proxy that exits (or loses its
  head link) on a live node is started again after a backoff (0.2 s doubling to 10 s).
- A proxy actor subscribes to the routes, binds the HTTP host and port with SO_REUSEPORT (so
  proxies of nodes that share an address, as `ray.cluster_utils.Cluster` makes them, share
  the port: the kernel spreads new connections among them), serves, and only then calls
  `node_proxy_ready`: HEALTHY. `serve.status().proxies` is keyed by Ray node id.
- A proxy not ready `START_TIMEOUT_S` after its creation is killed, and so started again.
- Stop: `stop()` on every actor (uvicorn stops accepting and finishes what is in flight),
  bounded by `STOP_TIMEOUT_S`, then `ray.kill`. Actors are the head's (not detached): they
  die with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from flotilla._private.keeper import Backoff
from flotilla._private.ray_supervisor import NAMESPACE, _first_line
from flotilla._private.transport import RpcPeer
from flotilla.serve.schema import ProxyStatus

logger = logging.getLogger("flotilla.ray.proxies")

#: How often the head reads Ray's alive nodes (in a thread, off its loop).
NODE_POLL_S = 1.0
#: How long stopping proxies may take to finish their requests before they are killed.
STOP_TIMEOUT_S = 3.0
RESTART_FIRST_S = 0.2
RESTART_CAP_S = 10.0
#: A proxy actor not ready this long after its creation is killed (and so started again).
START_TIMEOUT_S = 60.0


def alive_nodes() -> dict[str, str]:
    """Ray's alive nodes: node id -> address. Blocking (a GCS read)."""
    return {n["NodeID"]: n.get("NodeManagerAddress", "") for n in ray.nodes() if n.get("Alive")}


class Seat:
    """What the proxy loop in a `ProxyActor` shares with the actor's other methods (a plain
    object: an `async def` on the actor class would make Ray run it as an async actor)."""

    def __init__(self) -> None:
        self.args: dict[str, Any] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Any = None
        self.proxy: Any = None
        self.stopping = False
        self._lock = threading.Lock()

    async def serving(self, link: Any, server: Any, url: str) -> None:
        """The proxy loop accepts: tell the head (or stop at once if `stop` came first)."""
        with self._lock:
            self.loop, self.server = asyncio.get_running_loop(), server
            if self.stopping:
                server.should_exit = True
                return
        node = ray.get_runtime_context().get_node_id()
        await link.call("node_proxy_ready", self.args["node_id"], self.args["generation"], node, os.getpid(), url)

    def stop(self) -> None:
        with self._lock:
            self.stopping = True
            if self.loop is not None and self.server is not None:
                self.loop.call_soon_threadsafe(setattr, self.server, "should_exit", True)


class ProxyActor:
    """The HTTP proxy of one Ray node. `run` serves until `stop` (or the actor is killed);
    `info` and `stop` answer meanwhile (a threaded actor)."""

    def __init__(self) -> None:
        self.seat = Seat()

    def run(self, args: dict[str, Any]) -> int:
        from flotilla._private import auth, proxy

        auth.set_cluster_secret(args.pop("secret"))
        self.seat.args = args
        proxy.run_in_actor(args, self.seat)
        return 0

    def stop(self) -> None:
        """Stop accepting, finish the requests in flight, return from `run`."""
        self.seat.stop()

    def info(self) -> dict[str, Any]:
        seat = self.seat
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "requests": getattr(seat.proxy, "requests", 0),
                "serving": bool(seat.server is not None and seat.server.started)}


_remote_cls: Any = None


def _actor_class() -> Any:
    global _remote_cls
    if _remote_cls is None:
        _remote_cls = ray.remote(ProxyActor)
    return _remote_cls


def _kill(actor: Any) -> None:
    if actor is None:
        return
    try:
        ray.kill(actor, no_restart=True)
    except Exception as e:  # already gone
        logger.debug("ray.kill(proxy): %r", e)


class NodeProxy:
    """The proxy of one node, across its restarts (`generation` counts its actors)."""

    def __init__(self, node_id: str, ip: str) -> None:
        self.node_id = node_id
        self.ip = ip
        self.status = ProxyStatus.STARTING
        self.generation = 0
        self.actor: Any = None
        self.watch: asyncio.Task[None] | None = None
        self.peer: RpcPeer | None = None
        self.pid = 0
        self.url = ""
        self.message = ""
        self.backoff = Backoff(first=RESTART_FIRST_S, cap=RESTART_CAP_S)
        self.relaunch: asyncio.TimerHandle | None = None
        self.restarts = 0
        self.launched = 0.0  # time.monotonic() of the current actor's creation


class ProxyFleet:
    """The proxies of the nodes other than the head's: started, restarted and dropped as
    Ray's nodes come and go. `options`: the HTTP options, with the port actually bound."""

    def __init__(self, head_node: str, head_addr: str, secret: bytes, tag: str, options: dict[str, Any]) -> None:
        self.head_node = head_node
        self.head_addr = head_addr
        self.secret = secret
        self.tag = tag
        self.options = options
        self.proxies: dict[str, NodeProxy] = {}
        self.stopping = False
        self._poll: asyncio.Task[None] | None = None
        self._poll_error = ""

    def start(self) -> None:
        self._poll = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping:
            try:
                nodes = await loop.run_in_executor(None, alive_nodes)
            except Exception as e:
                if repr(e) != self._poll_error:
                    logger.warning("could not read Ray's nodes: %r", e)
                self._poll_error = repr(e)
            else:
                self._poll_error = ""
                self.sync(nodes)
            await asyncio.sleep(NODE_POLL_S)

    def sync(self, nodes: dict[str, str]) -> None:
        """Match the proxies to Ray's alive nodes (`alive_nodes()`)."""
        if self.stopping:
            return
        for node_id, ip in nodes.items():
            if node_id != self.head_node and node_id not in self.proxies:
                p = self.proxies[node_id] = NodeProxy(node_id, ip)
                logger.info("starting the HTTP proxy of node %s (%s)", node_id, ip)
                self._launch(p)
        now = time.monotonic()
        for p in self.proxies.values():
            if p.status is ProxyStatus.STARTING and p.actor is not None and now - p.launched > START_TIMEOUT_S:
                p.message = f"not ready {START_TIMEOUT_S:g}s after its start"
                logger.warning("the HTTP proxy of node %s is %s; replacing it", p.node_id, p.message)
                p.status = ProxyStatus.UNHEALTHY
                _kill(p.actor)  # its exit starts another
        for node_id in [n for n in self.proxies if n not in nodes]:
            p = self.proxies.pop(node_id)
            logger.info("node %s is gone: its HTTP proxy is dropped", node_id)
            if p.relaunch is not None:
                p.relaunch.cancel()
            _kill(p.actor)

    def _launch(self, p: NodeProxy) -> None:
        p.relaunch = None
        if self.stopping or self.proxies.get(p.node_id) is not p:
            return
        p.generation += 1
        p.status = ProxyStatus.STARTING
        p.peer = None
        args = dict(self.options, head_sock=self.head_addr, secret=self.secret, node_id=p.node_id,
                    generation=p.generation)
        try:
            p.actor = _actor_class().options(
                name=f"{self.tag}:proxy:{p.node_id}:{p.generation}", namespace=NAMESPACE, num_cpus=0,
                max_restarts=0, max_concurrency=4,
                scheduling_strategy=NodeAffinitySchedulingStrategy(p.node_id, soft=False),
            ).remote()
            ref = p.actor.run.remote(args)
        except Exception as e:
            self._exited(p, p.generation, f"could not create its Ray actor: {type(e).__name__}: {_first_line(e)}")
            return
        p.backoff.started()
        p.launched = time.monotonic()
        p.watch = asyncio.get_running_loop().create_task(self._watch(p, p.generation, p.actor, ref))

    async def _watch(self, p: NodeProxy, generation: int, actor: Any, ref: Any) -> None:
        """Wait for `run()` to end: returned (stopped) or failed (the actor or its node died)."""
        reason = "it stopped"
        try:
            await asyncio.wrap_future(ref.future())
        except asyncio.CancelledError:
            raise
        except ray.exceptions.RayActorError as e:
            reason = f"its Ray actor died: {_first_line(e)}"
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None) or e
            reason = f"it failed: {type(cause).__name__}: {_first_line(cause)}"
        except Exception as e:
            reason = f"it failed: {type(e).__name__}: {_first_line(e)}"
        _kill(actor)
        self._exited(p, generation, reason)

    def _exited(self, p: NodeProxy, generation: int, reason: str) -> None:
        if self.stopping or self.proxies.get(p.node_id) is not p or p.generation != generation:
            return  # stopped, dropped with its node, or an earlier actor
        p.actor = None
        p.peer = None
        p.status = ProxyStatus.UNHEALTHY
        p.restarts += 1
        delay = p.backoff.failed()
        if reason != p.message:
            logger.warning("the HTTP proxy of node %s is gone: %s; restarting it in %.2fs", p.node_id, reason, delay)
        p.message = reason
        p.relaunch = asyncio.get_running_loop().call_later(delay, self._launch, p)

    def ready(self, peer: RpcPeer, node_id: str, generation: int, actual_node: str, pid: int, url: str) -> None:
        """`node_proxy_ready` from a proxy actor that accepts connections."""
        p = self.proxies.get(node_id)
        if self.stopping or p is None or p.generation != generation:
            raise RuntimeError(f"not the current HTTP proxy of node {node_id}")
        if actual_node != node_id:  # pinned with soft=False: Ray would not do that
            logger.error("the HTTP proxy of node %s runs on node %s", node_id, actual_node)
        p.status, p.peer, p.pid, p.url, p.message = ProxyStatus.HEALTHY, peer, pid, url, ""
        logger.info("HTTP proxy of node %s ready at %s (pid %d%s)", node_id, url, pid,
                    f", restart {p.restarts}" if p.restarts else "")
        peer.on_close(lambda: self._peer_closed(p, peer))

    def _peer_closed(self, p: NodeProxy, peer: RpcPeer) -> None:
        if p.peer is not peer or self.stopping:
            return
        p.peer = None
        p.status = ProxyStatus.UNHEALTHY
        _kill(p.actor)  # a proxy without its head link: replaced when its run() ends

    def statuses(self) -> dict[str, ProxyStatus]:
        return {n: p.status for n, p in self.proxies.items()}

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop every proxy: drain (bounded by `timeout`), then `ray.kill`."""
        self.stopping = True
        if self._poll is not None:
            self._poll.cancel()
        proxies = list(self.proxies.values())
        self.proxies.clear()
        watches = []
        for p in proxies:
            if p.relaunch is not None:
                p.relaunch.cancel()
            if p.actor is not None:
                try:
                    p.actor.stop.remote()
                except Exception as e:
                    logger.debug("stop(proxy of %s): %r", p.node_id, e)
            if p.watch is not None and not p.watch.done():
                watches.append(p.watch)
        if watches:
            await asyncio.wait(watches, timeout=timeout)
        for p in proxies:
            if p.watch is not None and not p.watch.done():
                _kill(p.actor)
        if watches:
            _, left = await asyncio.wait(watches, timeout=5.0)
            for t in left:
                t.cancel()
