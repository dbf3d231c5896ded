"""Event-loop monitoring, as Ray 2.60 reports it for proxies and replicas: every interval the
loop's scheduling lag (how late a sleep of the interval woke up), its pending tasks, and a
count of looks. A loop blocked by sync code shows as lag.

`RAY_SERVE_EVENT_LOOP_MONITORING_INTERVAL_S` (default 5 s), as in Ray.
"""

from __future__ import annotations

import asyncio
import os
import time

from flotilla._private.metrics import STORE

LABELS = ("component", "loop_type", "deployment", "application")
#: Lag buckets, ms: a healthy loop wakes within a millisecond; a blocked one seconds late.
LAG_MS_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 10000.0)

STORE.declare("counter", "ray_serve_event_loop_monitoring_iterations", "Looks at the event loop's lag.", LABELS)
STORE.declare("histogram", "ray_serve_event_loop_scheduling_latency_ms", "How late the event loop woke from a "
              "sleep of the monitoring interval, ms.", LABELS, LAG_MS_BUCKETS)
STORE.declare("gauge", "ray_serve_event_loop_tasks", "Pending asyncio tasks on the event loop.", LABELS)


def interval_s() -> float:
    try:
        value = float(os.environ.get("RAY_SERVE_EVENT_LOOP_MONITORING_INTERVAL_S", "5"))
    except ValueError:
        return 5.0
    return value if value > 0 else 5.0


def start(loop: asyncio.AbstractEventLoop, component: str, deployment: str = "", application: str = "",
          loop_type: str = "main") -> asyncio.Task[None]:
    """Watch `loop` (the running one) until it stops; labels as Ray's."""
    return loop.create_task(_watch(loop, (component, loop_type, deployment, application), interval_s()))


async def _watch(loop: asyncio.AbstractEventLoop, labels: tuple[str, ...], every: float) -> None:
    while loop.is_running():
        STORE.inc("ray_serve_event_loop_monitoring_iterations", labels)
        STORE.set("ray_serve_event_loop_tasks", labels, float(len(asyncio.all_tasks(loop))))
        began = time.monotonic()
        await asyncio.sleep(every)
        STORE.observe("ray_serve_event_loop_scheduling_latency_ms", labels,
                      max(0.0, (time.monotonic() - began - every) * 1000.0))
