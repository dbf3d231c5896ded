"""The HTTP proxy process: uvicorn + a raw ASGI app that routes by longest route prefix.

It reads the whole request body, forwards (scope, body) to a replica of the app's ingress
deployment through a `Router`, and writes back the replica's response, streaming it when
the replica streams. Route table and replica sets are pushed by the controller.

It runs as a process forked by the zygote on the head's machine (`main`: the listening
socket is the head's, fetched over a Unix socket), or inside a Ray actor on another node
(`run_in_actor`, Ray backend: it binds the port itself with SO_REUSEPORT; `ray_proxies.py`).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
import logging
import math
import os
import random
import time
from operator import sub as _SUB
from typing import Any

from flotilla._private import (
    asgiroutes,
    frontdoor,
    heap,
    http_util,
    httpguard,
    logrotate,
    loopwatch,
    metrics,
    shadow,
    trace,
)
from flotilla._private.client import Runtime
from flotilla._private.lean_http import LeanCycle
from flotilla._private.metrics import STORE, observe_into, observe_sorted
from flotilla._private.protocol import HttpFull
from flotilla._private.router import Channel
from flotilla._private.transport import RemoteCallError, RpcPeer
from flotilla.exceptions import RayActorError
from flotilla.serve.exceptions import BackPressureError, DeploymentUnavailableError
from flotilla.serve.schema import DeploymentID

logger = logging.getLogger("flotilla.proxy")

DISCONNECT_CHECK_S = 0.2
MAX_REQUEST_BODY_BYTES = 1 << 30  # http_options["max_request_body_bytes"] default: 1 GiB
#: `/-/healthz` while no application has a route (Ray's answer).
_NO_ROUTES = http_util.plain(503, "Route table is not populated yet.")
#: Items one HTTP request keeps on `Proxy._done` until `Proxy.fold`: t0, t1, route prefix,
#: deployment (None: no route), method, path, status, request id, seconds queued in the router.
RECORD_FIELDS = 9
#: HTTP requests' figures reach the metrics, access log and traces this long after the first
#: of a batch (`Proxy.fold`); a metrics push or a trace lookup folds at once.
FOLD_S = 0.1


def count_error(route: str, status: int, method: str, app: str, deployment: str) -> None:
    """Count an HTTP request answered with an error status, overall and by deployment."""
    code = str(status)
    STORE.inc("ray_serve_num_http_error_requests", (route, code, method, app))
    STORE.inc("ray_serve_num_deployment_http_error_requests", (deployment, code, method, route, app))


def ws_error(status: int) -> bool:
    """A websocket's outcome is an error: a close code other than 1000 (normal) and 1001
    (going away), as Ray counts it, or an HTTP status >= 400 (refused before it opened)."""
    return status not in (1000, 1001) if status >= 1000 else status >= 400


class SplitRoute:
    """A split route (`serve.set_traffic`): each request goes to one application by weight.

    The variant is drawn at random by weight, or, with a sticky header or cookie present, from
    a stable hash of its value (salted with the split's name), so one value always lands on the
    same application while the weights stay the same. The path below the split's prefix is
    passed on as if it had been requested under the chosen application's own prefix."""

    __slots__ = ("cookie", "cum", "header", "name", "prefix", "salt", "targets", "total")

    def __init__(self, prefix: str, spec: dict[str, Any]) -> None:
        self.name: str = spec["split"]
        self.prefix = prefix
        self.salt = self.name.encode() + b"\0"
        header = spec.get("sticky_header")
        self.header: bytes | None = header.lower().encode("latin-1") if header else None
        cookie = spec.get("sticky_cookie")
        self.cookie: bytes | None = cookie.encode("latin-1") if cookie else None
        self.targets: list[tuple[str | None, DeploymentID]] = []
        self.cum: list[float] = []
        total = 0.0
        for app, ingress, app_prefix, weight in spec["variants"]:
            if weight <= 0:
                continue
            total += weight
            self.targets.append((app_prefix, DeploymentID(ingress, app)))
            self.cum.append(total)
        self.total = total

    def sticky_value(self, scope: dict[str, Any]) -> bytes | None:
        if self.header is not None:
            for k, v in scope["headers"]:
                if k == self.header:
                    return bytes(v)
            return None
        if self.cookie is not None:
            for k, v in scope["headers"]:
                if k == b"cookie":
                    for part in v.split(b";"):
                        name, _, value = part.strip().partition(b"=")
                        if name == self.cookie:
                            return value
        return None

    def point(self, key: bytes | None) -> float:
        """Where a request falls in [0, 1): a stable hash of its sticky value, or random."""
        if key is None:
            return random.random()
        digest = hashlib.blake2b(self.salt + key, digest_size=8).digest()
        return int.from_bytes(digest, "big") / 18446744073709551616.0  # 2**64

    def pick(self, scope: dict[str, Any], path: str, root: str) -> tuple[dict[str, Any], str, DeploymentID] | None:
        """(the scope to forward, the prefix it is under, the chosen ingress), or None when no
        application of the split exists now."""
        if not self.targets:
            return None
        u = self.point(self.sticky_value(scope) if (self.header or self.cookie) else None) * self.total
        i = min(bisect.bisect_right(self.cum, u), len(self.targets) - 1)
        app_prefix, dep = self.targets[i]
        if app_prefix is None or app_prefix == self.prefix:  # handles-only app: served here
            return scope, self.prefix, dep
        below = "" if self.prefix == "/" else self.prefix  # what the path starts with
        rest = path[len(below):]
        if not below and rest == "/":
            rest = ""  # "/" under a split at "/" is the app's prefix itself
        to = "" if app_prefix == "/" else app_prefix
        fscope = dict(scope)
        fscope["path"] = root + ((to + rest) or "/")
        raw = scope.get("raw_path")
        if raw is not None:
            old = (root + below).encode()
            if raw.startswith(old) and rest:
                fscope["raw_path"] = (root + to).encode() + raw[len(old):]
            else:
                fscope["raw_path"] = fscope["path"].encode()
        return fscope, app_prefix, dep


class _Watcher:
    """On uvicorn's request cycle: a request still running after DISCONNECT_CHECK_S gets a
    task that waits for its client's disconnect and then cancels it (`LeanCycle.watch` does
    this without a timer or a task)."""

    __slots__ = ("_task", "_timer", "disconnected")

    def __init__(self, receive: Any, task: asyncio.Task[Any] | None) -> None:
        loop = asyncio.get_running_loop()
        self.disconnected = False
        self._task: asyncio.Task[None] | None = None
        self._timer = loop.call_later(DISCONNECT_CHECK_S, self._arm, loop, receive, task)

    def _arm(self, loop: asyncio.AbstractEventLoop, receive: Any, task: asyncio.Task[Any] | None) -> None:
        async def wait_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnected = True
            if task is not None:
                task.cancel()

        self._task = loop.create_task(wait_disconnect())

    def unwatch(self) -> None:
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()


class Proxy:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args
        self.routes: list[tuple[str, DeploymentID | SplitRoute]] = []
        self.routes_json = b"{}"
        #: route prefix -> how its requests are named (apps with route templates only)
        self.names: dict[str, asgiroutes.Names] = {}
        self.rt: Runtime | None = None
        self.request_timeout_s: float | None = args.get("request_timeout_s")
        self.backpressure_status: int = args.get("backpressure_status_code", 503)
        self.max_body: int | None = args.get("max_request_body_bytes", MAX_REQUEST_BODY_BYTES)
        self.metrics = metrics.enabled()
        self.ongoing = 0
        self.requests = 0  # HTTP requests received
        self.node_label: str = args.get("node_id") or "head"
        self.access = metrics.AccessLog(f"proxy {self.node_label}")
        #: (prefix, method, app, status) -> metric labels and latency series, made once each
        self._series: dict[tuple[str, str, str, int], tuple[tuple[str, ...], list[Any]]] = {}
        #: HTTP requests recorded (`_record`) and not yet in the metrics (`fold`), flat
        self._done: list[Any] = []
        #: (application, deployment) -> its router_queue and fulfillment histogram series
        self._queues: dict[tuple[str, str], tuple[list[Any], list[Any]]] = {}
        self.ids = metrics.RequestIds()
        self.root_path: str = args.get("root_path") or ""
        self.shadows: dict[str, shadow.ShadowRoute] = {}  # shadowed routes by prefix (serve.set_shadow)
        self._shadows: shadow.Shadows | None = None
        metrics.declare_builtins(STORE)
        shadow.declare(STORE)
        self.access.configure(args.get("logging_config"), {"component_name": "proxy"})

    def set_routes(self, table: dict[str, Any]) -> None:
        """A new route table, swapped in whole (a split's new weights apply to the next request)."""
        items = sorted(table.items(), key=lambda kv: len(kv[0]), reverse=True)
        self.routes = [
            (prefix, SplitRoute(prefix, v) if isinstance(v, dict) else DeploymentID(v[1], v[0]))
            for prefix, v in items
        ]
        old = self.names
        self.names = {
            prefix: old[prefix] if prefix in old and old[prefix].source == v[2] else asgiroutes.Names(prefix, v[2])
            for prefix, v in items if not isinstance(v, dict) and len(v) > 2
        }
        self.routes_json = json.dumps(
            {p: (v["split"] if isinstance(v, dict) else v[0]) for p, v in table.items()}).encode()

    def set_shadows(self, table: dict[str, Any]) -> None:
        """The shadowed routes (`serve.set_shadow`): prefix -> target and fraction."""
        if self._shadows is None:
            self._shadows = shadow.Shadows(self.rt)
        self.shadows = self._shadows.set(table)

    def _not_found(self, path: str) -> str:
        """The 404 text: the routes that exist, so a wrong path says where to go instead
        (built only on this path)."""
        ray = f"Path '{path}' not found. Ping http://.../-/routes for available routes."  # Ray's words, then ours
        if not self.routes:
            return f"{ray} No application has a route yet."
        routes = sorted(self.routes, key=lambda r: r[0])
        listed = ", ".join(
            f"{prefix} (traffic split '{t.name}')" if isinstance(t, SplitRoute) else f"{prefix} (application '{t.app_name}')"
            for prefix, t in routes[:20])
        more = f" and {len(routes) - 20} more" if len(routes) > 20 else ""
        return f"{ray} Routes: {listed}{more}."

    def match(self, path: str) -> tuple[str, DeploymentID | SplitRoute] | None:
        """The route table's entry (prefix, target) of `path`, the longest prefix first."""
        for route in self.routes:
            prefix = route[0]
            if prefix == "/" or path == prefix or (path.startswith(prefix) and path[len(prefix)] == "/"):
                return route
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await self._websocket(scope, receive, send)
            return
        self.requests += 1
        path, root = http_util.mount_scope(self.root_path, scope) if self.root_path else (scope["path"], "")
        if path.startswith("/-/"):
            if path == "/-/healthz":  # healthy once there is somewhere to send requests, as Ray's
                await http_util.reply(send, *(http_util.plain(200, "success") if self.routes else _NO_ROUTES))
                return
            if path == "/-/routes":
                body = self.routes_json
                await http_util.reply(send, 200, [http_util.JSON[0], (b"content-length", str(len(body)).encode())], body)
                return
        request_id = None
        model_id = None
        session_id = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                request_id = v
            elif k == b"serve_multiplexed_model_id" or k == b"serve-multiplexed-model-id":  # either, as Ray
                model_id = v.decode("latin-1")  # as Starlette decodes headers
            elif k in http_util.SESSION_HEADERS:
                session_id = v.decode("latin-1")
        if request_id is None:
            request_id = self.ids.next()
        m: Any = self.match(path)
        route = None
        fscope = scope
        mirror = None
        if self.shadows and m is not None:  # only while some route is shadowed
            sh = self.shadows.get(m[0])
            if sh is not None:
                mirror = (sh, scope, path)
        if m is not None and m[1].__class__ is SplitRoute:  # only split routes pay for this
            route = m[0]
            picked = m[1].pick(scope, path, root)
            if picked is None:
                await self._no_variant(scope, send, m[1], request_id)
                return
            fscope, fprefix, dep = picked
            m = (fprefix, dep)
        meta: dict[str, Any] | None = None
        if m is not None:
            if self.names and route is None:  # only apps with route templates pay for this
                names = self.names.get(m[0])
                if names is not None:
                    route = names.name(scope["method"], path)
            meta = {"request_id": request_id.decode("latin-1"), "route": route or m[0]}
            if model_id:
                meta["multiplexed_model_id"] = model_id
            if session_id:
                meta["session_id"] = session_id
        if not self.metrics:
            await self._forward(fscope, receive, send, m, request_id, meta, root, mirror)
            return
        t0 = time.perf_counter()
        self.ongoing += 1
        status = 500
        try:
            status = await self._forward(fscope, receive, send, m, request_id, meta, root, mirror)
        finally:
            self.ongoing -= 1
            self._record(scope, m, route, status, t0, request_id, meta, send)

    def _record(self, scope: dict[str, Any], m: Any, route: str | None, status: int, t0: float,
                request_id: bytes, meta: dict[str, Any] | None, send: Any = None) -> None:
        """Keep one HTTP request's figures for `fold`, RECORD_FIELDS items on a flat list (no
        object outlives the request, so its record never wakes the garbage collector): the
        request path does no more. The request ends when its response's last write began
        (the lean path notes when), else now."""
        cycle = getattr(send, "__self__", None)
        t1 = cycle.sent_at if cycle.__class__ is LeanCycle else 0.0  # type: ignore[union-attr]
        if m is None:
            prefix, dep, rid, q = "", None, request_id.decode("latin-1"), 0.0
        else:  # a routed request has its meta
            prefix, dep = route or m[0], m[1]
            rid, q = meta["request_id"], meta.get(trace.ROUTER_QUEUE_KEY, 0.0)  # type: ignore[index,union-attr]
        done = self._done
        done += (t0, t1 or time.perf_counter(), prefix, dep, scope["method"], scope["path"], status, rid, q)
        if len(done) == RECORD_FIELDS:
            asyncio.get_running_loop().call_later(FOLD_S, self.fold)

    def fold(self) -> None:
        """The metrics, access log lines and trace events of the HTTP requests kept since the
        last fold, off the request path, each series looked up once per batch."""
        done, self._done = self._done, []
        if not done:
            return
        to_wall = time.time() - time.perf_counter()
        cols = metrics.columns(done, RECORD_FIELDS)
        if not self._fold_columns(cols, to_wall):
            self._fold_rows(cols, to_wall)
        self.access.flush()

    def _fold_rows(self, columns: list[list[Any]], to_wall: float) -> None:
        """`fold` a request at a time: any mix of routes, methods and statuses."""
        series, access = self._series, self.access
        events: list[tuple[Any, ...]] = []
        add = events.append
        buckets = metrics.LATENCY_MS_BUCKETS
        counts: dict[tuple[str, ...], int] = {}
        routed: dict[tuple[str, str, str], int] = {}  # (route, application, deployment) -> requests
        for t0, t1, prefix, dep, method, path, status, rid, q_s in zip(*columns, strict=True):
            ms = (t1 - t0) * 1000.0
            app, name = ("", "") if dep is None else (dep.app_name, dep.name)
            key, hist = series.get((prefix, method, app, status)) or self._series_for(prefix, method, app, status)
            counts[key] = counts.get(key, 0) + 1
            observe_into(hist, buckets, ms)
            if status >= 400:
                count_error(prefix, status, method, app, name)
            now = to_wall + t1
            q = q_s * 1000.0
            if dep is not None:
                for h in self._queue_series(app, name):
                    observe_into(h, buckets, q)
                routed[(prefix, app, name)] = routed.get((prefix, app, name), 0) + 1
            access.keep(now, rid, f"{method} {path}", status, ms)
            add((rid, "http", prefix, app, status, ms, now, name, q))
        trace.RING.extend(events)
        for key, n in counts.items():
            STORE.inc("ray_serve_num_http_requests", key, n)
        for (prefix, app, name), n in routed.items():
            trace.count_routed(name, prefix, app, "proxy", n)

    def _fold_columns(self, columns: list[list[Any]], to_wall: float) -> bool:
        """`fold` of the common batch (one route, method, application and status, below 400)
        a column at a time, each step one C loop over the batch; False, having done nothing,
        for any other batch."""
        t0, t1, prefixes, deps, methods, paths, statuses, rids, qs = columns
        n = len(t0)
        p, dep, meth, st = prefixes[0], deps[0], methods[0], statuses[0]
        if (dep is None or st >= 400 or deps.count(dep) != n or prefixes.count(p) != n
                or methods.count(meth) != n or statuses.count(st) != n):
            return False
        a, name = dep.app_name, dep.name
        key, hist = self._series.get((p, meth, a, st)) or self._series_for(p, meth, a, st)
        ms = [x * 1000.0 for x in map(_SUB, t1, t0)]
        observe_sorted(hist, metrics.LATENCY_MS_BUCKETS, sorted(ms))
        STORE.inc("ray_serve_num_http_requests", key, n)
        trace.count_routed(name, p, a, "proxy", n)
        unqueued = qs.count(0.0) == n  # the usual case: no request waited for a replica
        q = [0.0] * n if unqueued else [x * 1000.0 for x in qs]
        ordered = q if unqueued else sorted(q)
        for h in self._queue_series(a, name):
            observe_sorted(h, trace.BUCKETS, ordered)
        now = [to_wall + x for x in t1]
        path = paths[0]
        lines = f"{meth} {path}" if paths.count(path) == n else [f"{meth} {x}" for x in paths]
        self.access.keep_columns(now, rids, lines, statuses, ms)
        trace.RING.columns(rids, lambda i: (rids[i], "http", p, a, st, ms[i], now[i], name, q[i]))
        return True

    def _queue_series(self, app: str, name: str) -> tuple[list[Any], list[Any]]:
        """The histograms of the time its requests to deployment `name` of `app` waited for a
        replica: the router_queue stage's and Ray's fulfillment time (made once)."""
        h = self._queues.get((app, name))
        if h is None:
            h = self._queues[(app, name)] = (
                trace.series(DeploymentID(name, app), "router_queue"),
                STORE.series("ray_serve_request_router_fulfillment_time_ms", (name, app, "proxy")))
        return h

    def _series_for(self, prefix: str, method: str, app: str, status: int) -> tuple[tuple[str, ...], list[Any]]:
        """The metric labels and latency series of (route, method, application, status)."""
        key: tuple[str, ...] = (prefix, method, app, str(status))
        per_key = (key, STORE.series("ray_serve_http_request_latency_ms", key))
        if len(self._series) < 1000:  # methods come from clients: keep the cache bounded
            self._series[(prefix, method, app, status)] = per_key
        return per_key

    async def _websocket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Route a WebSocket like an HTTP request and carry it to one replica (`ws.relay`)."""
        from flotilla._private import ws

        self.requests += 1
        t0 = time.perf_counter()
        path, root = http_util.mount_scope(self.root_path, scope) if self.root_path else (scope["path"], "")
        request_id = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                request_id = v
        rid = (request_id or self.ids.next()).decode("latin-1")
        m: Any = self.match(path)
        route = m[0] if m is not None else ""
        names = self.names.get(route) if m is not None else None
        if names is not None:
            route = names.name("WS", path)
        app = dep_name = ""
        self.ongoing += 1
        status = 500
        try:
            if m is None:
                status = await ws.deny(send, scope, 404, self._not_found(scope["path"]))
                return
            fscope = scope
            if m[1].__class__ is SplitRoute:
                picked = m[1].pick(scope, path, root)
                if picked is None:
                    status = await ws.deny(send, scope, 503, f"Traffic split '{m[1].name}' has no application.")
                    return
                fscope, fprefix, dep = picked
                m = (fprefix, dep)
            app, dep_name = m[1].app_name, m[1].name
            meta = {"request_id": rid, "route": route}
            assert self.rt is not None
            try:
                link = await self.rt.router(m[1]).websocket(ws.forward_scope(fscope, m[0], root), meta)
            except (BackPressureError, DeploymentUnavailableError) as e:
                status = await ws.deny(send, scope, 503, str(e))
                return
            except Exception as e:
                status = await ws.deny(send, scope, 500, str(e) or "Internal Server Error")
                return
            status = await ws.relay(send, receive, link)
        finally:
            self.ongoing -= 1
            if self.metrics:
                ms = (time.perf_counter() - t0) * 1000.0
                key = (route, "WS", app, str(status))  # Ray's method label for a websocket
                STORE.inc("ray_serve_num_http_requests", key)
                STORE.observe("ray_serve_http_request_latency_ms", key, ms)
                if ws_error(status):
                    count_error(route, status, "WS", app, dep_name)
                self.access.add(rid, f"WS {scope['path']}", status, ms)

    async def _no_variant(self, scope: dict[str, Any], send: Any, split: SplitRoute, request_id: bytes) -> None:
        text = (f"Traffic split '{split.name}' at {split.prefix} has no application to send to: "
                "none of its applications with a weight above 0 exists now.")
        status = await http_util.reply(send, *http_util.plain(503, text), (b"x-request-id", request_id))
        if self.metrics:
            STORE.inc("ray_serve_num_http_requests", (split.prefix, scope["method"], "", str(status)))
            count_error(split.prefix, status, scope["method"], "", "")

    async def _forward(
        self, scope: dict[str, Any], receive: Any, send: Any, m: tuple[str, DeploymentID] | None,
        request_id: bytes, meta: dict[str, Any] | None, root: str = "",
        mirror: tuple[shadow.ShadowRoute, dict[str, Any], str] | None = None,
    ) -> int:
        """Send the request to a replica and its response to the client; returns the status.

        `meta`: the request's (None without a route); the router writes its queue time there.
        `mirror`: (the shadowed route, the original scope and path) when the route is shadowed."""
        rid_header = (b"x-request-id", request_id)
        if m is None:
            return await http_util.reply(send, *http_util.plain(404, self._not_found(scope["path"])), rid_header)
        prefix, dep = m
        body = await http_util.read_body(receive, scope, self.max_body)
        if body is None:
            return 499
        if body is http_util.TOO_LARGE:
            return await http_util.reply(send, *http_util.too_large(self.max_body), rid_header)
        if mirror is not None:  # queues a copy (or not); never waits
            mirror[0].offer(mirror[1], mirror[2], root, body, request_id)
        fwd = http_util.forward_scope(scope, prefix, root)
        assert self.rt is not None and meta is not None
        router = self.rt.router(dep)
        # If the client goes away, the request is cancelled in the replica (and its downstream
        # calls with it): at once on the lean path (the connection cancels the task), else
        # by a watcher that a request still running after DISCONNECT_CHECK_S gets.
        watch: LeanCycle | _Watcher = getattr(send, "__self__", None)  # type: ignore[assignment]
        if watch.__class__ is LeanCycle:
            task = watch.watch()  # type: ignore[union-attr]
        else:
            task = asyncio.current_task()
            watch = _Watcher(receive, task)
        deadline = None
        try:
            if self.request_timeout_s is None:
                res = await router.http(fwd, body, meta, False)
            else:  # end to end, as Ray's: a stream past it is cut off (`_stream`)
                deadline = asyncio.get_running_loop().time() + self.request_timeout_s
                async with asyncio.timeout_at(deadline):
                    res = await router.http(fwd, body, meta, False)
        except asyncio.CancelledError:
            if watch.disconnected and task is not None:
                task.uncancel()
                return 499
            raise
        except BackPressureError as e:
            # the deployment's own backpressure_config (which the error carries), else http_options'
            code, after = (e.status_code, e.retry_after_s) if router.backpressure else (self.backpressure_status, None)
            status, headers, text = http_util.plain(code, str(e))
            if after is not None or code == 429:
                seconds = math.ceil(after) if after is not None else router.retry_after_s()
                headers = [*headers, (b"retry-after", str(seconds).encode())]
            return await http_util.reply(send, status, headers, text, rid_header)
        except DeploymentUnavailableError as e:
            return await http_util.reply(send, *http_util.plain(503, str(e)), rid_header)
        except RayActorError as e:
            return await http_util.reply(send, *http_util.plain(500, str(e)), rid_header)
        except TimeoutError:
            late = f"Request {request_id.decode('latin-1')} timed out after {self.request_timeout_s}s."
            return await http_util.reply(send, *http_util.plain(408, late), rid_header)
        except Exception as e:
            logger.warning("request %s failed: %s", request_id.decode("latin-1"), e)
            return await http_util.reply(send, *http_util.plain(500, str(e) or "Internal Server Error"), rid_header)
        finally:
            watch.unwatch()
        if res.__class__ is HttpFull:
            return await http_util.send_whole(send, res.status, res.headers, res.body, rid_header)
        assert isinstance(res, Channel) and res.start is not None
        await self._stream(send, receive, res, rid_header, deadline)
        return res.start.status

    async def _stream(self, send: Any, receive: Any, ch: Channel, rid_header: tuple[bytes, bytes],
                      deadline: float | None = None) -> None:
        """Relay a streaming response; a client that goes away stops the generator, and so
        does `deadline` (loop time: request_timeout_s), the client then seeing the stream cut
        off (no last chunk)."""
        assert ch.start is not None
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if task is not None:
                task.cancel()

        watcher = loop.create_task(watch())
        done = False
        try:
            await send({"type": "http.response.start", "status": ch.start.status, "headers": [*ch.start.headers, rid_header]})
            if deadline is None:
                done = await http_util.relay_stream(send, ch)
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        done = await http_util.relay_stream(send, ch)
                except TimeoutError:
                    logger.warning("request %s: its stream ran past request_timeout_s=%gs; cut off",
                                   rid_header[1].decode("latin-1"), self.request_timeout_s)
        except asyncio.CancelledError:
            if task is not None and task.cancelling() and watcher.done():
                task.uncancel()  # the client went away: nothing more to send
            else:
                raise
        finally:
            watcher.cancel()
            if not done:
                ch.cancel()

    def set_gauges(self) -> None:
        self.fold()  # a push carries every request recorded so far
        if self.rt is not None:
            self.rt.router_gauges()
        STORE.set("ray_serve_num_ongoing_http_requests", (self.node_label,), float(self.ongoing))
        metrics.record_auth_failures(STORE, "proxy")


async def _amain(args: dict[str, Any], seat: Any = None) -> None:
    """Serve until told to stop. `seat`: a `ray_proxies.Seat` (in a Ray actor: this proxy
    binds its own socket and registers as its node's), or None (the head's machine)."""
    import uvicorn

    from flotilla._private import listener
    from flotilla._private.client import HeadLink

    if args.get("secret"):  # the Ray backend: replicas serve on authenticated TCP
        from flotilla._private import auth

        auth.set_cluster_secret(bytes.fromhex(args.pop("secret")))
    proxy = Proxy(args)
    if seat is not None:
        seat.proxy = proxy
    loop = asyncio.get_running_loop()
    url: str = args["url"]
    state: dict[str, Any] = {"ready": False, "server": None}

    def on_call(peer: RpcPeer, op: str, a: tuple[Any, ...]) -> Any:
        if op == "update":
            Runtime.current().on_update(*a)
            return None
        if op == "trace":
            proxy.fold()
            if proxy.rt is not None:
                proxy.rt.fold_calls()
            return trace.RING.find(str(a[0]))
        raise ValueError(op)

    async def hello(peer: RpcPeer) -> None:
        """A restarted head: tell it who we are (before ready, the proxy_ready call is retried)."""
        if not state["ready"]:
            return
        try:
            await peer.call("proxy_reattach", os.getpid(), url)
        except (RemoteCallError, RuntimeError) as e:
            logger.error("the restarted head does not know this proxy (%s); exiting", e)
            if state["server"] is not None:
                state["server"].should_exit = True

    link = HeadLink(args["head_sock"], on_call, name="head", hello=hello if seat is None else None)
    await link.connect()
    rt = Runtime.attach(loop, link)
    trace.CALLER = "proxy"  # the `handle` label of what this process's routers send
    pusher = metrics.Pusher(STORE, link, proxy.set_gauges)
    pusher.start()
    watch = loopwatch.start(loop, "proxy") if metrics.enabled() else None  # noqa: F841 (kept alive)
    proxy.rt = rt
    await rt.subscribe(("routes",), proxy.set_routes)
    await rt.subscribe(("shadows",), proxy.set_shadows)
    grpc_server = None
    if args.get("grpc_options"):  # serve.start(grpc_options=...): a grpc.aio server on this loop
        from flotilla._private import grpc_proxy

        grpc_server = await grpc_proxy.start(proxy, args)
    if seat is None:  # the listening socket belongs to the head (and the keeper): it outlives this process
        sock = await loop.run_in_executor(None, listener.receive, args["fd_sock"])
    else:  # bound only now that the routes are known, so no connection waits on a proxy that cannot route
        sock = listener.bind_tcp(args.get("host", "127.0.0.1"), int(args["port"]), reuse_port=True)
    app = frontdoor.wrap(proxy, args, "proxy")  # API keys, then the user's middlewares
    # Connection, header size and time limits; plain requests on the lean path, bodies up to
    # the limit received whole into one buffer, which the proxy alone forwards without a copy.
    bounded, _ = httpguard.protocol_class(args, "proxy", lean=True, large_bodies=proxy.max_body,
                                          body_views=app is proxy)
    tls = await frontdoor.proxy_tls(args, link if seat is None else None)
    config = uvicorn.Config(
        app,
        **tls,
        loop="none",
        http=bounded,
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=args.get("keep_alive_timeout_s", 90),  # a float works (a timer)
        server_header=False,
        proxy_headers=False,
        date_header=False,
    )
    server = state["server"] = uvicorn.Server(config)
    serve_task = loop.create_task(server.serve(sockets=[sock]))
    while not server.started and not serve_task.done():
        await asyncio.sleep(0.005)
    if seat is None:
        await link.call("proxy_ready", url, os.getpid(), wait_s=math.inf)
    else:
        await seat.serving(link, server, url)
    state["ready"] = True
    await serve_task
    if grpc_server is not None:
        await grpc_server.stop(5.0)
    pusher.stop()
    link.close()


def main(args: dict[str, Any]) -> None:
    heap.keep_freed()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s proxy %(name)s: %(message)s")
    if args.get("logging_config") is not None:  # serve.start(logging_config=...)
        from flotilla._private import logfmt

        logfmt.configure(args["logging_config"], "proxy", args.get("node_id") or "head", "proxy",
                         {"component_name": "proxy"}, request_id=False)
    logrotate.rotate_own_log()
    import uvloop

    uvloop.run(_amain(args))


def run_in_actor(args: dict[str, Any], seat: Any) -> None:
    """The proxy main loop in a Ray actor's thread (its worker's log is Ray's: not rotated)."""
    heap.keep_freed()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s proxy %(name)s: %(message)s")
    if args.get("logging_config") is not None:
        from flotilla._private import logfmt

        logfmt.configure(args["logging_config"], "proxy", args.get("node_id") or "head", "proxy",
                         {"component_name": "proxy"}, request_id=False)
    import uvloop

    uvloop.run(_amain(args, seat))
