"""Turn run records into bench/RESULTS.md and a printed summary."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import wakeup


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    better: str  # "higher" | "lower"
    scenario: str
    summary: bool = True  # False: only in the raw tables
    #: A flotilla-only variant's row: the other systems show (and are compared on) this key.
    vs: str | None = None


def _metrics() -> list[Metric]:
    m: list[Metric] = []
    for c in (1, 8, 32):
        m += [
            Metric(f"http_rps_c{c}", f"HTTP req/s, {c} conn", "higher", "http"),
            Metric(f"http_p50_ms_c{c}", f"HTTP p50 ms, {c} conn", "lower", "http"),
            Metric(f"http_p99_ms_c{c}", f"HTTP p99 ms, {c} conn", "lower", "http"),
            Metric(f"http_errors_c{c}", f"HTTP errors, {c} conn", "lower", "http"),
            Metric(
                f"http_cpu_ms_c{c}", f"CPU ms/request (all processes), {c} conn", "lower", "http"
            ),
        ]
    for c in (8, 32):
        m += [
            Metric(f"http_rps_nometrics_c{c}", f"HTTP req/s, {c} conn, FLOTILLA_METRICS=0", "higher", "http"),
            Metric(f"http_cpu_ms_nometrics_c{c}", f"CPU ms/request, {c} conn, FLOTILLA_METRICS=0", "lower", "http"),
            Metric(f"metrics_cost_rps_c{c}", f"req/s lost to metrics, access logs, traces, {c} conn", "lower", "http"),
            Metric(f"metrics_cost_cpu_c{c}", f"CPU/request added by metrics, access logs, traces, {c} conn",
                   "lower", "http"),
        ]
    for c in (8, 32):
        m += [
            Metric(f"http_rps_2proxies_c{c}", f"HTTP req/s, {c} conn, flotilla num_proxies=2", "higher", "http",
                   vs=f"http_rps_c{c}"),
            Metric(f"http_cpu_ms_2proxies_c{c}", f"CPU ms/request, {c} conn, flotilla num_proxies=2", "lower", "http",
                   vs=f"http_cpu_ms_c{c}"),
        ]
    m += [
        Metric("handle_seq_cps", "handle calls/s, sequential", "higher", "handle"),
        Metric("handle_aseq_cps", "handle calls/s, sequential, awaited on an asyncio loop", "higher", "handle"),
        Metric("handle_64_cps", "handle calls/s, 64 in flight", "higher", "handle"),
    ]
    for label in ("plain", "batched"):
        m += [
            Metric(f"batch_{label}_rps", f"{label} req/s, 32 conn", "higher", "batch"),
            Metric(f"batch_{label}_p50_ms", f"{label} p50 ms, 32 conn", "lower", "batch"),
            Metric(f"batch_{label}_p99_ms", f"{label} p99 ms, 32 conn", "lower", "batch"),
            Metric(f"batch_{label}_errors", f"{label} errors, 32 conn", "lower", "batch"),
            Metric(f"batch_{label}_cpu_ms", f"{label} CPU ms/request", "lower", "batch"),
        ]
    m += [
        Metric("batch_gain", "batched / plain req/s", "higher", "batch"),
    ]
    for c in (8, 32):
        for label, what in (("plain", "plain route"), ("split", "0.5/0.5 split route"),
                            ("shadow", "route with 10% shadow")):
            m += [
                Metric(f"traffic_{label}_rps_c{c}", f"{what} req/s, {c} conn", "higher", "traffic"),
                Metric(f"traffic_{label}_p50_ms_c{c}", f"{what} p50 ms, {c} conn", "lower", "traffic", False),
                Metric(f"traffic_{label}_errors_c{c}", f"{what} errors, {c} conn", "lower", "traffic", False),
            ]
        m += [
            Metric(f"traffic_split_ratio_c{c}", f"split / plain req/s, {c} conn", "higher", "traffic"),
            Metric(f"traffic_shadow_ratio_c{c}", f"10% shadow / plain req/s, {c} conn", "higher", "traffic"),
        ]
    for key, what in (
        ("handle", "handle, array as argument"),
        ("handle_rt", "handle, array there and back"),
        ("handle_bytes", "handle, bytes as argument"),
        ("handle_bytes_rt", "handle, bytes there and back"),
        ("http", "HTTP POST, length answered"),
        ("http_echo", "HTTP POST, body echoed"),
    ):
        for mb in (1, 10, 100):
            m += [
                Metric(f"payload_{key}_gbps_{mb}mb", f"{what}, {mb} MB: GB/s", "higher", "payload"),
                Metric(f"payload_{key}_ms_{mb}mb", f"{what}, {mb} MB: ms per call", "lower", "payload"),
            ]
    m += [
        Metric(
            "cold_start_s", "cold start: script start to first HTTP 200, s", "lower", "coldstart"
        ),
        Metric("deploy4_s", "serve.run of a 4-replica app (warm cluster), s", "lower", "coldstart"),
        Metric("pss_base_mib", "PSS MiB, cluster + proxy, no app", "lower", "memory"),
        Metric("pss_1rep_mib", "PSS MiB, 1 replica (all processes)", "lower", "memory"),
        Metric("pss_4rep_mib", "PSS MiB, 4 replicas (all processes)", "lower", "memory"),
        Metric("pss_per_replica_mib", "PSS MiB per extra replica ((4 - 1) / 3)", "lower", "memory"),
        Metric(
            "autoscale_up_s", "autoscale 1 -> 4 RUNNING after load start, s", "lower", "autoscale"
        ),
        Metric("autoscale_down_s", "autoscale back to 1 after load end, s", "lower", "autoscale"),
    ]
    for event, label in CHAOS_EVENTS:
        m += [
            Metric(f"chaos_{event}_requests", f"{label}: requests", "higher", "chaos", False),
            Metric(f"chaos_{event}_failed", f"{label}: failed requests", "lower", "chaos"),
            Metric(f"chaos_{event}_failed_pct", f"{label}: failed %", "lower", "chaos"),
            Metric(
                f"chaos_{event}_refused",
                f"{label}: of the failed, refused connections",
                "lower",
                "chaos",
                False,
            ),
        ]
        if event in CHAOS_RECOVERY:
            m.append(
                Metric(
                    f"chaos_{event}_recovery_s",
                    f"{label}: s to {CHAOS_RECOVERY[event]}",
                    "lower",
                    "chaos",
                )
            )
        else:
            m.append(Metric(f"chaos_{event}_s", f"{label}: event s", "lower", "chaos", False))
    return m


# The chaos scenario's events, in the order they run: (metric key part, label).
CHAOS_EVENTS = (
    ("rollout", "3 code rollouts, 2 replicas"),
    ("scaledown", "scale-down 4 -> 1"),
    ("zygote", "kill -9 of the fork server (zygote)"),
    ("kill", "kill -9 of 1 of 2 replicas"),
    ("proxy", "kill -9 of the HTTP proxy"),
    ("head", "kill -9 of the head (Ray: its controller)"),
)
# Kill events: what their recovery time measures (from the kill to ...).
CHAOS_RECOVERY = {
    "zygote": "a new fork server",
    "kill": "a RUNNING replacement",
    "proxy": "HTTP 200 on a new connection",
    "head": "a working serve.status()",
}
# Events a system has no counterpart for: (event, system) -> why.
CHAOS_NA = {("zygote", "ray"): "no fork server"}


METRICS = _metrics()
SYSTEMS = ("flotilla", "flotilla-ray", "ray", "bare")
# Ratio columns: numerator / denominator, each shown when both systems are in the run.
PAIRS = (
    ("flotilla", "ray"),
    ("flotilla", "bare"),
    ("flotilla-ray", "ray"),
    ("flotilla-ray", "flotilla"),
)
DEFAULT_COLUMNS = ("flotilla", "ray", "bare")


def columns(systems: list[str] | None) -> tuple[list[str], list[tuple[str, str]]]:
    """The summary's system columns (in SYSTEMS order) and ratio columns for a run of
    `systems` (the ones asked for; None: the default three)."""
    chosen = set(systems or DEFAULT_COLUMNS)
    shown = [s for s in SYSTEMS if s in chosen]
    return shown, [(a, b) for a, b in PAIRS if a in chosen and b in chosen]


def fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def series(records: list[dict[str, Any]], system: str, key: str, rounds: int) -> list[float | None]:
    """The metric's value in each round (None where missing)."""
    out: list[float | None] = [None] * rounds
    for r in records:
        if r["system"] == system and key in r["metrics"]:
            out[r["round"]] = r["metrics"][key]
    return out


def median(vals: list[float | None]) -> float | None:
    xs = [v for v in vals if v is not None]
    return statistics.median(xs) if xs else None


def ratios(a: list[float | None], b: list[float | None]) -> list[float | None]:
    """a/b paired round by round."""
    return [
        x / y if x is not None and y not in (None, 0) else None for x, y in zip(a, b, strict=True)
    ]


def summary_rows(
    records: list[dict[str, Any]], rounds: int, systems: list[str] | None = None
) -> list[list[str]]:
    shown, pairs = columns(systems)
    rows = []
    for m in METRICS:
        if not m.summary:
            continue
        per = {s: series(records, s, m.key, rounds) for s in SYSTEMS}
        if all(median(v) is None for v in per.values()):
            continue
        if m.vs is not None:
            per = {s: v if median(v) is not None else series(records, s, m.vs, rounds) for s, v in per.items()}
        row = [m.label, m.better] + [fmt(median(per[s])) for s in shown]
        for a, b in pairs:
            rs = ratios(per[a], per[b])
            med = median(rs)
            row.append(
                fmt(med)
                + (f" ({', '.join(fmt(x) for x in rs)})" if rounds > 1 and med is not None else "")
            )
        rows.append(row)
    return rows


def summary_head(systems: list[str] | None = None) -> list[str]:
    shown, pairs = columns(systems)
    return ["metric", "better", *shown, *(f"{a}/{b}" for a, b in pairs)]


SUMMARY_HEAD = summary_head()  # the default run's


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def raw_section(records: list[dict[str, Any]], scenario: str) -> str:
    recs = [r for r in records if r["scenario"] == scenario]
    if not recs:
        return ""
    keys = [
        m.key
        for m in METRICS
        if m.scenario == scenario and any(m.key in r["metrics"] for r in recs)
    ]
    rows = []
    for r in recs:
        rows.append(
            [r["system"], str(r["round"] + 1), f"{r['wall_s']:.0f}"]
            + [fmt(r["metrics"].get(k)) for k in keys]
            + [r.get("error") or ""]
        )
    parts = [f"### {scenario}\n", md_table(["system", "round", "wall s", *keys, "error"], rows)]
    notes = [
        (r["system"], r["round"] + 1, k, v) for r in recs for k, v in r.get("notes", {}).items()
    ]
    if notes:
        parts.append("\n<details><summary>details (per process)</summary>\n")
        parts += [f"- {s} round {n}, {k}: `{v}`" for s, n, k, v in notes]
        parts.append("\n</details>")
    return "\n".join(parts) + "\n"


CHAOS_HEAD = [
    "event",
    "system",
    "requests",
    "failed",
    "failed %",
    "of which refused",
    "event s",
    "recovery s",
]


def chaos_rows(records: list[dict[str, Any]], rounds: int) -> list[list[str]]:
    """Per event and Serve system: medians over rounds (per-round values in brackets)."""
    rows = []
    for event, label in CHAOS_EVENTS:
        for system in ("flotilla", "ray"):
            cells = [label, system]
            na = CHAOS_NA.get((event, system))
            if na and any(r["system"] == system and r["scenario"] == "chaos" for r in records):
                rows.append([*cells, f"n/a ({na})", "", "", "", "", ""])
                continue
            for key in ("requests", "failed", "failed_pct", "refused", "s", "recovery_s"):
                vals = series(records, system, f"chaos_{event}_{key}", rounds)
                med = median(vals)
                per_round = f" ({', '.join(fmt(v) for v in vals)})" if rounds > 1 else ""
                cells.append("" if med is None else fmt(med) + per_round)
            if any(cells[2:]):
                rows.append(cells)
    return rows


def chaos_section(records: list[dict[str, Any]], rounds: int) -> str:
    rows = chaos_rows(records, rounds)
    if not rows:
        return ""
    return "\n".join(
        [
            "\n## Chaos: failed requests while the app changes under load\n",
            "wrk `-t1 -c16` POSTs for 1 s before the event, during it and 1 s after it (after "
            "a kill of the fork server, proxy or head: until 1 s after recovery, at most 10 s "
            "after the kill); failed = non-2xx answers + socket errors + answers slower than "
            "5 s + requests still unanswered 4 s after the load stopped. `of which refused`: "
            "attempts on a port nothing listens on (connect or first-write errors); wrk "
            "retries those at once, without a pause, so while the port is closed this counts "
            "its retry rate (about 100,000/s), not users. `event s` is how long the "
            "event took (until its replicas are all RUNNING and the old ones gone). `recovery "
            "s` is from the kill to: a new fork-server process (zygote); a RUNNING "
            "replacement (replica); a 2xx answer to a POST on a new connection (proxy); a "
            "`serve.status()` from the driver that works (head / Ray's ServeController). What "
            "failed, by kind and status, and whether the replicas and proxy survived, is in the "
            "chaos raw table's details.\n",
            md_table(CHAOS_HEAD, rows),
        ]
    )


def markdown(info: dict[str, Any], records: list[dict[str, Any]], scenarios: list[str]) -> str:
    rounds = info["rounds"]
    wake = info.get("wakeup") or {}
    out = [
        "# flotilla benchmark results\n",
        "Written by `bench/run.py`; see bench/README.md for what each number means.\n",
        f"- Date: {info['date']}",
        f"- Machine: {info['machine']}",
        f"- Wake-ups: {wakeup.describe(wake.get('start'), wake.get('end'))}",
        f"- Versions: {info['versions']}",
        f"- Command: `{info['command']}`",
        f"- Rounds: {rounds}; {info['duration']} s per measured HTTP / handle point; "
        f"systems: {', '.join(info['systems'])}; total wall time {info['wall_min']:.1f} min",
    ]
    out += [f"- Note: {n}" for n in info["notes"]]
    out += [
        "\n## Summary (medians over rounds; ratios paired round by round, per-round values in brackets)\n",
        "`better` says which direction is good for the metric itself. A flotilla/ray ratio "
        "above 1 on a `higher` metric, or below 1 on a `lower` one, means flotilla does better"
        + (
            " (likewise flotilla-ray/ray: flotilla's Ray backend against Ray Serve, on the "
            "same Ray instance).\n"
            if "flotilla-ray" in info.get("columns", ())
            else ".\n"
        ),
        md_table(
            summary_head(info.get("columns")), summary_rows(records, rounds, info.get("columns"))
        ),
        chaos_section(records, rounds),
        "\n## Raw results, run by run\n",
    ]
    out += [raw_section(records, s) for s in scenarios]
    errors = [r for r in records if r.get("error")]
    if errors:
        out.append("## Errors\n")
        out += [
            f"- round {r['round'] + 1}, {r['scenario']}, {r['system']}: {r['error']}"
            for r in errors
        ]
        out.append("")
    if info["leftovers"]:
        out.append("## Processes left behind after a clean stop (killed by PID)\n")
        out += [f"- {x}" for x in info["leftovers"]]
        out.append("")
    out.append("## Commands run\n")
    out.append(
        "Every distinct command line the run started, in order (app CONFIG_JSON included):\n"
    )
    out.append("```")
    out += list(dict.fromkeys(info["commands"]))
    out.append("```\n")
    return "\n".join(out)
