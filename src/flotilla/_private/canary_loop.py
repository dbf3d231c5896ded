"""The controller's canary loop: figures from what the proxies push, decisions from `canary.py`.

Every `PERIOD_S` it reads each running canary's two applications' HTTP figures from the
metrics the proxies pushed to the head (`ray_serve_num_http_requests`, 5xx among them, the
`ray_serve_http_request_latency_ms` histogram, summed over routes, methods and proxies), as
differences from the totals when the canary began (old version) and when its step began (new
version); asks `canary.decide`; and when the share changes, rewrites the split's weights (the
proxy swaps its route table at once), logs the decision and counts it in
`flotilla_canary_decisions_total{split, decision}`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flotilla._private.canary import (
    CanaryConfig,
    CanaryPhase,
    CanaryState,
    Figures,
    decide,
    p95,
    start,
)
from flotilla._private.metrics import LATENCY_MS_BUCKETS
from flotilla.serve.schema import CanaryStatus

if TYPE_CHECKING:
    from flotilla._private.controller import Controller, Split

logger = logging.getLogger("flotilla.canary")

PERIOD_S = 0.5
DECISIONS = "flotilla_canary_decisions_total"


@dataclass
class Totals:
    """One application's cumulative HTTP figures at the proxies."""

    requests: int = 0
    errors: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_MS_BUCKETS) + 1))

    def since(self, base: Totals) -> Figures:
        counts = [max(0, a - b) for a, b in zip(self.buckets, base.buckets, strict=True)]
        return Figures(max(0, self.requests - base.requests), max(0, self.errors - base.errors),
                       p95(LATENCY_MS_BUCKETS, counts))


def app_totals(snapshots: list[dict[str, Any]], apps: tuple[str, ...]) -> dict[str, Totals]:
    """Cumulative figures of `apps` over every pushed snapshot (proxies, present and departed)."""
    out = {a: Totals() for a in apps}
    for snap in snapshots:
        meta, values = snap["meta"], snap["values"]
        req = meta.get("ray_serve_num_http_requests")
        if req is not None:
            ai, si = req[2].index("application"), req[2].index("status_code")
            for key, v in values.get("ray_serve_num_http_requests", {}).items():
                t = out.get(key[ai])
                if t is not None:
                    t.requests += int(v)
                    if key[si].isdigit() and int(key[si]) >= 500:
                        t.errors += int(v)
        lat = meta.get("ray_serve_http_request_latency_ms")
        if lat is not None and tuple(lat[3]) == tuple(LATENCY_MS_BUCKETS):
            ai = lat[2].index("application")
            for key, v in values.get("ray_serve_http_request_latency_ms", {}).items():
                t = out.get(key[ai])
                if t is not None:
                    t.buckets = [a + b for a, b in zip(t.buckets, v[0], strict=True)]
    return out


@dataclass
class CanaryRun:
    """A canary attached to a split: `old` hands its traffic to `new` step by step."""

    config: CanaryConfig
    old: str
    new: str
    state: CanaryState
    base_old: Totals
    base_new: Totals
    figures: tuple[Figures, Figures] = (Figures(), Figures())
    decided_at: float = 0.0  # wall clock of the last decision

    def status(self) -> CanaryStatus:
        old, new = self.figures
        return CanaryStatus(
            phase=self.state.phase.value, old=self.old, new=self.new, share=self.state.share(self.config),
            step=self.state.step + 1, steps=list(self.config.steps), reason=self.state.reason,
            last_decision_time_s=self.decided_at, old_figures=_plain(old), new_figures=_plain(new),
        )


def _plain(f: Figures) -> dict[str, Any]:
    return {"requests": f.requests, "errors": f.errors, "error_rate": round(f.error_rate, 6), "p95_ms": f.p95_ms}


def weights(run: CanaryRun, share: float) -> dict[str, float]:
    return {run.old: round(1.0 - share, 9), run.new: share}


class CanaryLoop:
    def __init__(self, controller: Controller) -> None:
        self.c = controller
        #: Where pushed metrics come from (the head sets it: its `Aggregate.snapshots`).
        self.source: Callable[[], list[dict[str, Any]]] = lambda: []

    def begin(self, split: Split, config: CanaryConfig, old: str, new: str) -> CanaryRun:
        now = time.monotonic()
        totals = app_totals(self.source(), (old, new))
        run = CanaryRun(config, old, new, start(config, now), totals[old], totals[new], decided_at=time.time())
        logger.info("canary %r: %s -> %s, steps %s, each held %gs", split.name, old, new,
                    [f"{s:.0%}" for s in config.steps], config.hold_s)
        self._count(split.name, "start")
        return run

    def tick(self, now: float) -> None:
        for split in list(self.c.splits.values()):
            run = split.canary
            if run is None or run.state.phase is not CanaryPhase.RUNNING:
                continue
            totals = app_totals(self.source(), (run.old, run.new))
            run.figures = (totals[run.old].since(run.base_old), totals[run.new].since(run.base_new))
            d = decide(run.config, run.state, run.figures[0], run.figures[1], now)
            step_before = run.state.step
            run.state = d.state
            if not d.changed:
                continue
            run.decided_at = time.time()
            if d.state.phase is CanaryPhase.RUNNING and d.state.step != step_before:
                run.base_new = totals[run.new]  # the next step is judged on its own requests
            kind = {CanaryPhase.ROLLED_BACK: "rollback", CanaryPhase.PROMOTED: "promote"}.get(d.state.phase, "step")
            (logger.warning if kind == "rollback" else logger.info)("canary %r: %s", split.name, d.state.reason)
            self._count(split.name, kind)
            split.traffic = weights(run, d.share)
            self.c.publish(("split", split.name))
            self.c.publish(("routes",))

    def _count(self, split: str, decision: str) -> None:
        m = self.c.metrics
        m.declare("counter", DECISIONS, "Canary decisions (start, step, promote, rollback), by traffic split.",
                  ("split", "decision"))
        m.inc(DECISIONS, (split, decision))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(PERIOD_S)
            if not any(s.canary is not None for s in self.c.splits.values()):
                continue
            try:
                self.tick(time.monotonic())
            except Exception:
                logger.exception("canary tick failed")
