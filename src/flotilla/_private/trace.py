"""Per-request latency breakdown: stage histograms and a bounded ring of recent traces.

Each process records what it sees of a request, as plain tuples in its own `RING` (the last
`FLOTILLA_TRACE_CAPACITY` events, default 10,000; 0 turns traces off), keyed by request id:

- a router: `(rid, "call", app, deployment, router_queue_ms, total_ms, wall_end)` for every
  request it sends (the proxy's to the ingress, a replica's downstream handle calls);
- a replica: `(rid, "replica", app, deployment, replica_id, replica_queue_ms, batch_wait_ms,
  user_code_ms, downstream_ms, total_ms, wall_end)`;
- the proxy: `(rid, "http", route, app, status, e2e_ms, wall_end)`.

The head asks every process for one id's events on demand (`trace` control op, over the
authenticated control connections) and `assemble` nests them. Recording costs a few clock
reads and a list store per request; nothing is sent until asked. Stages also go to the
process's metric store as `flotilla_request_stage_ms{deployment, application, stage}`.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from flotilla._private import metrics

METRIC = "flotilla_request_stage_ms"
#: Named stages, in order; `other` is what the named ones leave of the end-to-end time.
STAGES = ("router_queue", "replica_queue", "batch_wait", "user_code", "downstream", "other")
CAPACITY = 10_000

#: Key of a serving request's `meta` (the replica's own copy, never sent on) under which the
#: handle calls made while serving it add up their seconds.
DOWNSTREAM_KEY = "_downstream_s"
#: Key of a request's `meta` carrying the seconds it waited in the sending router (set only
#: when it waited), so the replica knows the whole queueing delay and latency.
ROUTER_QUEUE_KEY = "_router_queue_s"
#: Waits shorter than this are not sent along (the request did not queue).
QUEUED_S = 5e-5


def capacity() -> int:
    """Events kept per process (`FLOTILLA_TRACE_CAPACITY`; 0: no traces, histograms stay)."""
    try:
        return max(0, int(os.environ.get("FLOTILLA_TRACE_CAPACITY", CAPACITY)))
    except ValueError:
        return CAPACITY


class Ring:
    """About the last `cap` events of this process, kept as batches: a batch is its events'
    request ids and a function making event i, so the folds keep the columns they computed
    and no tuple is made per event until a trace asks. The oldest batches go whole once the
    rest hold `cap` events; looking an id up scans the ids, which only `trace` requests do."""

    __slots__ = ("batches", "cap", "n")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.n = 0
        self.batches: deque[tuple[Sequence[Any], Callable[[int], tuple[Any, ...]]]] = deque()

    def extend(self, events: list[tuple[Any, ...]]) -> None:
        """Keep `events` (each a tuple whose first item is its request id) as one batch."""
        self.columns([e[0] for e in events], events.__getitem__)

    def columns(self, ids: Sequence[Any], event: Callable[[int], tuple[Any, ...]]) -> None:
        """Keep a batch: `ids[i]` is event i's request id, `event(i)` makes it."""
        if not self.cap or not ids:
            return
        batches = self.batches
        batches.append((ids, event))
        self.n += len(ids)
        while self.n - len(batches[0][0]) >= self.cap:
            self.n -= len(batches.popleft()[0])

    def find(self, request_id: str) -> list[list[Any]]:
        """This id's events, oldest first, as lists (plain data for the control reply)."""
        out: list[list[Any]] = []
        for ids, event in self.batches:
            if request_id in ids:
                out.extend(list(event(i)) for i, r in enumerate(ids) if r == request_id)
        return out


RING = Ring(capacity())
ON = metrics.enabled()
STORE = metrics.STORE
STORE.declare("histogram", METRIC, "Time requests spent per stage (router_queue, replica_queue, batch_wait, "
              "user_code, downstream), ms.", ("deployment", "application", "stage"), metrics.LATENCY_MS_BUCKETS)


BUCKETS = tuple(sorted(metrics.LATENCY_MS_BUCKETS))
# Every process with routers counts what they send (declared here: drivers too).
STORE.declare("counter", "ray_serve_num_router_requests", "Requests a router sent to a deployment (the proxy's "
              "and handles').", ("deployment", "route", "application", "handle"))
STORE.declare("counter", "ray_serve_handle_request_counter", "Calls made through handles (the proxy's included).",
              ("handle", "deployment", "route", "application"))
STORE.declare("gauge", "ray_serve_num_ongoing_requests_at_replicas", "Requests a process's router for a deployment "
              "has sent to its replicas and not had answered yet.", ("deployment", "application", "handle"))
STORE.declare("gauge", "ray_serve_request_router_queue_len", "Requests waiting in a process's router for a "
              "replica of the deployment.", ("deployment", "application", "handle"))
STORE.declare("histogram", "ray_serve_request_router_fulfillment_time_ms", "Time a request waited in a router "
              "until a replica was chosen for it, ms.", ("deployment", "application", "handle"), metrics.LATENCY_MS_BUCKETS)


def count_routed(deployment: str, route: str, application: str, handle: str, n: int) -> None:
    """`n` requests a router of `handle` ("proxy", "driver" or a replica's id) sent."""
    STORE.inc("ray_serve_num_router_requests", (deployment, route, application, handle), n)
    STORE.inc("ray_serve_handle_request_counter", (handle, deployment, route, application), n)


def series(dep: Any, stage: str) -> list[Any]:
    """The live histogram series of one deployment's stage (kept by the hot paths)."""
    return STORE.series(METRIC, (dep.name, dep.app_name, stage))


#: A router's finished calls wait this long (from the first of a batch) for `calls_done`.
FOLD_S = 0.1
#: ... or until this many wait (a router whose loop stopped never runs its timer).
FOLD_MAX = 4096


#: Items a router keeps per finished call until `calls_done` (a flat list: no object per
#: call outlives it): request id (None: none), asked-for time, end time, seconds queued, the
#: route of the request it serves ("" for a call not made while serving one).
CALL_FIELDS = 5


#: Who this process's handles are, in metrics' `handle` label: "driver", "proxy" or the
#: replica's id (set by the proxy and replicas when they start).
CALLER = "driver"


def calls_done(hist: list[Any], dep: Any, done: list[Any]) -> None:
    """A router's finished calls (`done`: CALL_FIELDS items each) into its router_queue
    histogram and the ring, a column at a time. Downstream time is added to the parent
    request at once, by the router: it is read when that one ends."""
    ids, t0, t1, queued, routes = metrics.columns(done, CALL_FIELDS)
    q = [x * 1000.0 for x in queued]
    app, name = dep.app_name, dep.name
    ordered = sorted(q)
    metrics.observe_sorted(hist, BUCKETS, ordered)
    metrics.observe_sorted(STORE.series("ray_serve_request_router_fulfillment_time_ms", (name, app, CALLER)),
                           BUCKETS, ordered)
    to_wall = time.time() - time.perf_counter()
    for route in set(routes):  # the route of the request each call served, as Ray's (one, mostly)
        count_routed(name, route, app, CALLER, routes.count(route))
    RING.columns(ids, lambda i: (ids[i], "call", app, name, q[i], (t1[i] - t0[i]) * 1000.0, to_wall + t1[i]))


class LatencyRing:
    """A replica's last `cap` requests: (end time, latency ms, queue delay ms), for the
    autoscaler's latency targets. Latency runs from arrival at the router to the reply;
    queue delay is the router's wait plus the replica's."""

    __slots__ = ("cap", "i", "items")

    def __init__(self, cap: int = 1024) -> None:
        self.cap = cap
        self.items: list[tuple[float, float, float] | None] = [None] * cap
        self.i = 0

    def add(self, t: float, latency_ms: float, queue_ms: float) -> None:
        i = self.i
        self.items[i] = (t, latency_ms, queue_ms)
        self.i = i + 1 if i + 1 < self.cap else 0

    def p95(self, window_s: float, now: float | None = None) -> tuple[float | None, float | None, int]:
        """(p95 latency, p95 queue delay, samples) of the requests that ended in the last
        `window_s` seconds; Nones without any."""
        since = (time.perf_counter() if now is None else now) - window_s
        got = [e for e in self.items if e is not None and e[0] > since]
        if not got:
            return None, None, 0
        return percentile([e[1] for e in got], 95), percentile([e[2] for e in got], 95), len(got)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of a non-empty list."""
    v = sorted(values)
    return v[max(0, min(len(v) - 1, math.ceil(len(v) * q / 100) - 1))]


def stage_ms(stages: dict[str, float], e2e_ms: float) -> dict[str, float]:
    """`stages` with `other` = what they leave of `e2e_ms`, so they sum to it exactly.

    Named stages that exceed `e2e_ms` (a replica's closing clock read delayed by the OS
    scheduler after its reply left) are trimmed, user_code first, then downstream.
    """
    out = {k: v for k, v in stages.items() if k != "other"}
    over = sum(out.values()) - e2e_ms
    for k in ("user_code", "downstream", "replica_queue", "batch_wait", "router_queue"):
        if over <= 0:
            break
        cut = min(over, out.get(k, 0.0))
        out[k] = out.get(k, 0.0) - cut
        over -= cut
    out["other"] = max(0.0, e2e_ms - sum(out.values()))
    return out


def assemble(request_id: str, sources: dict[str, list[list[Any]]]) -> dict[str, Any] | None:
    """Nest one request's events from every process (`sources`: process name -> events).

    The root is the proxy's `http` event (else the earliest call seen). Each call becomes a
    node with its stages: router_queue (in the caller), replica_queue, batch_wait, user_code,
    downstream (handle calls awaited while serving it, capped at the handler's time), and
    `other` = the call's time minus those (transport, (de)serialization, the event loop); a
    node's downstream calls are the calls its replica's process made for this id while it was
    serving it, each a node of its own. None when no process knows the id.
    """
    replicas: list[tuple[str, list[Any]]] = []
    calls: list[tuple[str, list[Any]]] = []
    http: list[Any] | None = None
    for src, events in sources.items():
        for e in events:
            if e[1] == "replica":
                replicas.append((src, e))
            elif e[1] == "call":
                calls.append((src, e))
            elif e[1] == "http" and http is None:
                http = e
    if not replicas and not calls and http is None:
        return None
    used: set[int] = set()

    def node(src: str, call: list[Any]) -> dict[str, Any]:
        _, _, app, dep, q, total, wall = call
        stages = {"router_queue": q, "replica_queue": 0.0, "batch_wait": 0.0, "user_code": 0.0, "downstream": 0.0}
        out: dict[str, Any] = {"application": app, "deployment": dep, "replica": None, "e2e_ms": total}
        best = None
        for i, (_src, r) in enumerate(replicas):  # the matching replica event ending nearest
            if i in used or r[2] != app or r[3] != dep:
                continue
            if best is None or abs(r[10] - wall) < abs(replicas[best][1][10] - wall):
                best = i
        children: list[dict[str, Any]] = []
        if best is not None:
            used.add(best)
            rsrc, r = replicas[best]
            out["replica"] = r[4]
            stages.update(replica_queue=r[5], batch_wait=r[6], user_code=r[7], downstream=r[8])
            start, end = r[10] - r[9] / 1000.0, r[10]
            for csrc, c in calls:
                if csrc == rsrc and start - 0.001 <= c[6] <= end + 0.001 and id(c) not in taken:
                    taken.add(id(c))
                    children.append(node(csrc, c))
        out["stages"] = stage_ms(stages, total)
        out["downstream_calls"] = children
        return out

    taken: set[int] = set()
    # The root: the proxy's call, else (a handle call from a driver, or the proxy's ring no
    # longer has it) whichever call or replica event started first.
    starts = [(c[6] - c[5] / 1000.0, s, c) for s, c in calls if http is None or s == "proxy"]
    if http is not None and not starts and len(http) > 8 and http[7]:
        # The proxy records its call in the http event: (..., deployment, router queue ms).
        starts.append((http[6] - http[5] / 1000.0, "proxy",
                       [request_id, "call", http[3], http[7], http[8], http[5], http[6]]))
    if http is None:
        starts += [(r[10] - r[9] / 1000.0, "", [request_id, "call", r[2], r[3], 0.0, r[9], r[10]])
                   for _, r in replicas]
    result: dict[str, Any] = {"request_id": request_id}
    if not starts:  # only the proxy's http event (e.g. a 404)
        assert http is not None
        return dict(result, route=http[2], application=http[3], status=http[4], e2e_ms=http[5],
                    stages=stage_ms({}, http[5]), deployment=None, replica=None, downstream_calls=[])
    _, src0, call0 = min(starts, key=lambda x: x[0])
    taken.add(id(call0))
    top = node(src0, call0)
    if http is not None:
        result.update(route=http[2], application=http[3], status=http[4], e2e_ms=http[5])
        top["stages"] = stage_ms(top["stages"], http[5])
    else:
        result.update(route=None, application=top["application"], status=None, e2e_ms=top["e2e_ms"])
    result["stages"] = top["stages"]
    result["deployment"] = top["deployment"]
    result["replica"] = top["replica"]
    result["downstream_calls"] = top["downstream_calls"]
    return result


def format_trace(t: dict[str, Any]) -> str:
    """What `flotilla trace` prints: stages per call, nested calls indented."""
    lines = [f"request {t['request_id']}  {t.get('route') or ''}  status {t.get('status')}  "
             f"end-to-end {t['e2e_ms']:.2f} ms"]

    def block(n: dict[str, Any], indent: str) -> None:
        lines.append(f"{indent}{n['application']}/{n['deployment']}"
                     + (f"  (replica {n['replica']})" if n.get("replica") else ""))
        for s in STAGES:
            v = n["stages"].get(s, 0.0)
            lines.append(f"{indent}  {s:<14}{v:10.2f} ms")
        for c in n.get("downstream_calls", ()):
            lines.append(f"{indent}  call {c['application']}/{c['deployment']}: {c['e2e_ms']:.2f} ms")
            block(c, indent + "    ")

    block(t, "  ")
    return "\n".join(lines) + "\n"
