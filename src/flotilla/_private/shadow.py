"""Shadow (mirror) traffic in the proxy (`serve.set_shadow`).

A request on a shadowed route is drawn for mirroring at random (probability `fraction`). The
primary request is forwarded exactly as any other; a copy (method, headers, path rewritten
from the route's prefix to the target application's, the body when it is at most
`MAX_BODY` bytes) is put, without waiting, into a bounded queue of this proxy. A few worker
tasks send queued copies to the target application through the ordinary router, read the
answer and discard it, and record the outcome and latency. A full queue drops the copy; a
copy whose body is too large to keep is skipped. Both are counted, nothing is ever awaited
on the primary's path.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from flotilla._private import http_util
from flotilla._private.metrics import LATENCY_MS_BUCKETS, STORE
from flotilla._private.protocol import HttpFull
from flotilla.serve.schema import DeploymentID

logger = logging.getLogger("flotilla.proxy")

#: The largest body a mirrored copy carries; a larger request is not mirrored ("skipped").
MAX_BODY = 1 << 20
#: Copies in flight to the target at once, per shadowed route and proxy.
WORKERS = 4
#: A copy not answered within this long counts as an error (the worker moves on).
TIMEOUT_S = 30.0

REQUESTS = "flotilla_shadow_requests_total"
LATENCY = "flotilla_shadow_latency_ms"


def declare(store: Any) -> None:
    store.declare("counter", REQUESTS, "Mirrored (shadow) copies of HTTP requests by outcome: "
                  "ok, error (5xx or exception), dropped (queue full), skipped (body not kept).",
                  ("route", "application", "outcome"))
    store.declare("histogram", LATENCY, "Latency of mirrored (shadow) requests at the target, ms.",
                  ("route", "application"), LATENCY_MS_BUCKETS)


class ShadowRoute:
    """One shadowed route in one proxy: its settings, its queue and its workers."""

    def __init__(self, prefix: str, spec: dict[str, Any], rt: Any) -> None:
        self.prefix = prefix
        self.rt = rt
        self.update(spec)
        self.queue: asyncio.Queue[tuple[dict[str, Any], bytes, str]] = asyncio.Queue(self.max_queue)
        self.workers: list[asyncio.Task[None]] = []

    def update(self, spec: dict[str, Any]) -> None:
        self.name: str = spec["route"]
        self.fraction: float = float(spec["fraction"])
        self.max_queue: int = int(spec["max_queue"])
        self.target_prefix: str | None = spec["target_prefix"]
        self.dep = DeploymentID(spec["ingress"], spec["target"])
        self.labels = (self.prefix, spec["target"])

    def close(self) -> None:
        for t in self.workers:
            t.cancel()
        self.workers = []

    def offer(self, scope: dict[str, Any], path: str, root: str, body: bytes, request_id: bytes) -> None:
        """Maybe queue a copy of this request (never blocks)."""
        if random.random() >= self.fraction:
            return
        if len(body) > MAX_BODY:
            STORE.inc(REQUESTS, (*self.labels, "skipped"))
            return
        if self.queue.full():
            STORE.inc(REQUESTS, (*self.labels, "dropped"))
            return
        self.queue.put_nowait((self._rewrite(scope, path, root), body, request_id.decode("latin-1") + "-shadow"))
        if len(self.workers) < WORKERS:  # started on demand, then kept
            self.workers.append(asyncio.get_running_loop().create_task(self._work()))

    def _rewrite(self, scope: dict[str, Any], path: str, root: str) -> dict[str, Any]:
        """The forwarded scope of the copy: the path below the route's prefix, under the
        target's prefix (a target without a route keeps the path as it is)."""
        to_prefix = self.target_prefix
        if to_prefix is None or to_prefix == self.prefix:
            return http_util.forward_scope(scope, self.prefix, root)
        below = "" if self.prefix == "/" else self.prefix
        rest = path[len(below):]
        if not below and rest == "/":
            rest = ""
        to = "" if to_prefix == "/" else to_prefix
        s = dict(scope)
        s["path"] = root + ((to + rest) or "/")
        s["raw_path"] = s["path"].encode()
        return http_util.forward_scope(s, to_prefix, root)

    async def _work(self) -> None:
        while True:
            fwd, body, rid = await self.queue.get()
            t0 = time.perf_counter()
            outcome = "error"
            try:
                res = await asyncio.wait_for(self._send(fwd, body, rid), TIMEOUT_S)
                outcome = "ok" if res < 500 else "error"
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the target's failures never reach the client
                logger.debug("shadow copy %s to %s failed: %s", rid, self.dep, e)
            STORE.inc(REQUESTS, (*self.labels, outcome))
            STORE.observe(LATENCY, self.labels, (time.perf_counter() - t0) * 1000.0)

    async def _send(self, fwd: dict[str, Any], body: bytes, rid: str) -> int:
        from flotilla._private.protocol import Chunk, End

        router = self.rt.router(self.dep)
        res = await router.http(fwd, body, {"request_id": rid, "route": self.prefix})
        if res.__class__ is HttpFull:
            return int(res.status)
        status = int(res.start.status)  # a streaming answer: read it to its end, discard it
        while True:
            msg = await res.get()
            if msg.__class__ is End:
                return status
            if msg.__class__ is not Chunk:
                return 500


class Shadows:
    """The proxy's shadowed routes by route prefix (`set` swaps in the controller's table)."""

    def __init__(self, rt: Any) -> None:
        self.rt = rt
        self.by_prefix: dict[str, ShadowRoute] = {}

    def set(self, table: dict[str, Any]) -> dict[str, ShadowRoute]:
        old = self.by_prefix
        new: dict[str, ShadowRoute] = {}
        for prefix, spec in table.items():
            sr = old.get(prefix)
            if sr is not None and sr.max_queue == int(spec["max_queue"]):
                sr.update(spec)
            else:
                sr = ShadowRoute(prefix, spec, self.rt)
            new[prefix] = sr
        for prefix, sr in old.items():
            if new.get(prefix) is not sr:
                sr.close()
        self.by_prefix = new
        return new
