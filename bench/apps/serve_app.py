"""The benchmark app, written once for every Serve system.

This file runs as is for flotilla. For Ray Serve, bench/systems.py renders a copy in
which the two lines marked `BENCH-IMPORT` say `ray` instead of `flotilla`; nothing else
differs.

    python serve_app.py MODE CONFIG_JSON

Modes (each one process: the "driver" of the system under test):
  serve      deploy apps, print {"event": "ready"}, serve until stdin closes, shut down
  handle     call the deployment through a handle from this driver; print a result
  deploy     time `serve.run` of a 4-replica app on an already running cluster
  memory     deploy 0, 1, then 4 replicas, stopping after each for the parent to measure
  autoscale  time an autoscaling deployment going 1 -> 4 -> 1 replicas under 8 clients
  payload    time handle calls with 1/10/100 MB numpy arrays (argument, round trip), then
             serve the same deployment over HTTP for the parent's POSTs until stdin closes
  chaos      deploy a 2-replica app, then run the parent's commands (rollouts, scaling,
             waiting for a killed replica's replacement, timing the first serve.status()
             that works after the parent killed the head / controller) while the parent
             sends load
With an "address" in CONFIG_JSON the driver joins that Ray instance (`init(address=...)`;
for flotilla that means its Ray backend) instead of starting its own.
Output: one JSON object per line on stdout; logs go to stderr.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import traceback
import urllib.request
from typing import Any

from starlette.responses import Response

import flotilla as runtime  # BENCH-IMPORT
from flotilla import serve  # BENCH-IMPORT

NO_CPU = {"num_cpus": 0}  # 4 replicas must fit on a 2-core cluster


@serve.deployment(ray_actor_options=NO_CPU)
class Echo:
    """The app: answers a POST with a tiny JSON body."""

    async def __call__(self, request: Any) -> dict[str, bool]:
        await request.body()
        return {"ok": True}

    async def ping(self, x: int) -> dict[str, bool]:
        return {"ok": True}


@serve.deployment(ray_actor_options=NO_CPU)
class EchoBatched:
    """The same handler, with requests grouped by `@serve.batch`."""

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def handle_batch(self, bodies: list[bytes]) -> list[dict[str, bool]]:
        return [{"ok": True} for _ in bodies]

    async def __call__(self, request: Any) -> dict[str, bool]:
        return await self.handle_batch(await request.body())


@serve.deployment(ray_actor_options=NO_CPU)
class Sleeper:
    """A 100 ms request, for autoscaling."""

    async def __call__(self, request: Any) -> dict[str, bool]:
        await request.body()
        await asyncio.sleep(0.1)
        return {"ok": True}


@serve.deployment(ray_actor_options=NO_CPU)
class EchoVersioned:
    """Echo with an init argument: binding another value is a code rollout."""

    def __init__(self, version: int) -> None:
        self.version = version

    async def __call__(self, request: Any) -> dict[str, bool]:
        await request.body()
        return {"ok": True}


@serve.deployment(ray_actor_options=NO_CPU)
class Payload:
    """Large payloads: a numpy array or a bytes object as a method's argument (`size`) and
    back (`echo`); over HTTP, POST /size answers the body's length and POST /echo the body
    itself."""

    async def size(self, a: Any) -> int:
        return len(a) if isinstance(a, bytes) else int(a.nbytes)

    async def echo(self, a: Any) -> Any:
        return a

    async def __call__(self, request: Any) -> Any:
        body = await request.body()
        if request.url.path.rstrip("/").endswith("/echo"):
            return Response(body, media_type="application/octet-stream")
        return {"n": len(body)}


DEPLOYMENTS = {"Echo": Echo, "EchoBatched": EchoBatched, "Sleeper": Sleeper}


def emit(**obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def start(cfg: dict[str, Any]) -> None:
    if cfg.get("address"):  # join the run's shared Ray instance (flotilla: its Ray backend)
        runtime.init(address=cfg["address"])
    else:
        runtime.init(num_cpus=cfg.get("num_cpus", 2), include_dashboard=False)
    http_options = {"host": "127.0.0.1", "port": cfg["port"]}
    if cfg.get("num_proxies"):
        http_options["num_proxies"] = cfg["num_proxies"]
    serve.start(http_options=http_options)


def wait_for_parent() -> str:
    """Block until the parent writes a line (returned) or closes stdin ("")."""
    return sys.stdin.readline().strip()


def stop() -> None:
    serve.shutdown()
    runtime.shutdown()


def mode_serve(cfg: dict[str, Any]) -> None:
    start(cfg)
    for app in cfg["apps"]:
        dep = DEPLOYMENTS[app["deployment"]].options(**app.get("options", {}))
        serve.run(dep.bind(), name=app["name"], route_prefix=app["route"])
    for sp in cfg.get("traffic", []):  # flotilla only (the traffic scenario)
        serve.set_traffic(sp["name"], sp["weights"], route_prefix=sp["route"])
    for sh in cfg.get("shadows", []):
        serve.set_shadow(sh["route"], sh["target"], sh["fraction"])
    emit(event="ready", t=time.time())
    while wait_for_parent() == "shadow_counts":
        emit(event="shadow_counts", counts=shadow_counts())
    stop()


def shadow_counts() -> dict[str, float]:
    """flotilla_shadow_requests_total by outcome, from /metrics (flotilla only)."""
    counts: dict[str, float] = {}
    text = urllib.request.urlopen(runtime.metrics_url(), timeout=30).read().decode()
    for line in text.splitlines():
        if line.startswith("flotilla_shadow_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            outcome = labels.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = counts.get(outcome, 0.0) + float(value)
    return counts


def mode_handle(cfg: dict[str, Any]) -> None:
    start(cfg)
    handle = serve.run(Echo.bind(), name="handle", route_prefix="/")
    duration, inflight = cfg["duration"], cfg["inflight"]
    for _ in range(200):  # warm-up
        handle.ping.remote(1).result()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < duration:
        handle.ping.remote(1).result()
        n += 1
    seq = n / (time.perf_counter() - t0)
    try:
        conc, how = asyncio.run(_in_flight(handle, inflight, duration)), "asyncio tasks"
        aseq = asyncio.run(_in_flight(handle, 1, duration))
    except Exception as e:  # a handle that cannot be awaited here: fall back to waves
        print(f"awaiting handle calls failed ({e!r}); using waves", file=sys.stderr)
        conc, how, aseq = _waves(handle, inflight, duration), "waves", None
    emit(event="result", seq_cps=seq, aseq_cps=aseq, inflight_cps=conc, inflight=inflight, how=how)
    stop()


async def _in_flight(handle: Any, inflight: int, duration: float) -> float:
    """`inflight` asyncio tasks, each awaiting one call after another."""
    count = 0
    t0 = time.perf_counter()
    end = t0 + duration

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < end:
            await handle.ping.remote(1)
            count += 1

    await asyncio.gather(*(worker() for _ in range(inflight)))
    return count / (time.perf_counter() - t0)


def _waves(handle: Any, inflight: int, duration: float) -> float:
    """Send `inflight` calls, wait for all, repeat."""
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < duration:
        for r in [handle.ping.remote(1) for _ in range(inflight)]:
            r.result()
        count += inflight
    return count / (time.perf_counter() - t0)


def mode_payload(cfg: dict[str, Any]) -> None:
    """For each size, a numpy array and then a bytes object: `size` calls (as the argument)
    and `echo` calls (there and back), sequential, for `seconds` and at least `min_calls`
    each, after one unmeasured call."""
    import numpy as np

    start(cfg)
    handle = serve.run(Payload.bind(), name="payload", route_prefix="/")
    out: dict[str, Any] = {}
    for kind in ("array", "bytes"):
        for mb in cfg["sizes_mb"]:
            a: Any = np.random.default_rng(mb).random(mb * 125_000)  # mb * 10**6 bytes of float64
            if kind == "bytes":
                a = a.tobytes()
            nbytes = len(a) if kind == "bytes" else a.nbytes
            for label, method in (("arg", handle.size), ("rt", handle.echo)):
                r = method.remote(a).result()  # warm-up, and a check of the answer
                got = r if label == "arg" else len(r) if kind == "bytes" else r.nbytes
                if got != nbytes:
                    raise RuntimeError(f"{kind} {label} {mb} MB: answer has {got} bytes, not {nbytes}")
                n, t0 = 0, time.perf_counter()
                while n < cfg["min_calls"] or time.perf_counter() - t0 < cfg["seconds"]:
                    method.remote(a).result()
                    n += 1
                key = f"{label}_{mb}" if kind == "array" else f"b{label}_{mb}"
                out[key] = {"calls": n, "s": time.perf_counter() - t0, "bytes": nbytes}
            del a
    emit(event="handle", results=out)
    emit(event="ready")
    wait_for_parent()
    stop()


def mode_deploy(cfg: dict[str, Any]) -> None:
    start(cfg)
    serve.run(Echo.bind(), name="warm", route_prefix="/warm")
    t0 = time.perf_counter()
    serve.run(Echo.options(num_replicas=cfg["replicas"]).bind(), name="four", route_prefix="/four")
    emit(event="result", deploy_s=time.perf_counter() - t0, replicas=cfg["replicas"])
    stop()


def mode_memory(cfg: dict[str, Any]) -> None:
    start(cfg)
    emit(event="ready", phase="base")
    wait_for_parent()
    for n in cfg["replicas"]:
        serve.run(Echo.options(num_replicas=n).bind(), name="mem", route_prefix="/")
        emit(event="ready", phase=f"replicas={n}", running=_running("mem", "Echo"))
        wait_for_parent()
    stop()


def _running(app: str, dep: str) -> int:
    try:
        states = serve.status().applications[app].deployments[dep].replica_states
    except (KeyError, AttributeError):
        return 0
    return int(states.get("RUNNING", 0))


def _total(app: str, dep: str) -> int:
    try:
        return sum(serve.status().applications[app].deployments[dep].replica_states.values())
    except (KeyError, AttributeError):
        return 0


def mode_autoscale(cfg: dict[str, Any]) -> None:
    start(cfg)
    autoscaling = {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 2,
        "upscale_delay_s": 0,
        "downscale_delay_s": 5,
    }
    app = Sleeper.options(autoscaling_config=autoscaling)
    serve.run(app.bind(), name="auto", route_prefix="/")
    url = f"http://127.0.0.1:{cfg['port']}/"
    stop_load = threading.Event()
    counts = {"ok": 0, "err": 0}
    lock = threading.Lock()

    def client() -> None:
        while not stop_load.is_set():
            try:
                req = urllib.request.Request(url, data=b'{"x": 1}', method="POST")
                with urllib.request.urlopen(req, timeout=30) as resp:
                    resp.read()
                outcome = "ok"
            except Exception:
                outcome = "err"
                time.sleep(0.05)
            with lock:
                counts[outcome] += 1

    clients = [threading.Thread(target=client, daemon=True) for _ in range(cfg["clients"])]
    peak, up_s, down_s = 0, None, None
    t0 = time.monotonic()
    for c in clients:
        c.start()
    while time.monotonic() - t0 < cfg["up_timeout"]:
        running = _running("auto", "Sleeper")
        peak = max(peak, running)
        if running >= 4:
            up_s = time.monotonic() - t0
            break
        time.sleep(cfg["poll"])
    stop_load.set()
    t1 = time.monotonic()
    for c in clients:
        c.join(35)
    while time.monotonic() - t1 < cfg["down_timeout"]:
        if _running("auto", "Sleeper") == 1 and _total("auto", "Sleeper") == 1:
            down_s = time.monotonic() - t1
            break
        time.sleep(cfg["poll"])
    emit(event="result", up_s=up_s, down_s=down_s, peak_running=peak, **counts)
    stop()


def _settle(app: str, dep: str, n: int, timeout: float) -> None:
    """Wait until exactly `n` replicas exist and all are RUNNING (old ones gone)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if _running(app, dep) == n and _total(app, dep) == n:
                return
            last: Any = None
        except Exception as e:  # a control plane that is coming back: ask again
            last = e
        if time.monotonic() > deadline:
            if last is not None:
                raise TimeoutError(f"serve.status() failing after {timeout:.0f} s: {last!r}")
            states = serve.status().applications[app].deployments[dep].replica_states
            raise TimeoutError(f"not {n} RUNNING replicas after {timeout:.0f} s: {states}")
        time.sleep(0.05)


def _status_into(box: dict[str, Any]) -> None:
    try:
        serve.status()
        box["ok"] = True
    except BaseException as e:  # any failure means "not yet"
        box["error"] = f"{type(e).__name__}: {e}"[:200]


def _status_works_by(deadline: float) -> dict[str, Any]:
    """Call `serve.status()` until one call works or the deadline (time.monotonic(), which is
    CLOCK_MONOTONIC: the same clock in every process) passes. Each call runs in a thread, so
    one that blocks (a control plane that is away) cannot outlast the deadline. Returns the
    monotonic time the first working call returned (None if none did), the attempts, and the
    last error."""
    attempts, last = 0, ""
    while time.monotonic() < deadline:
        attempts += 1
        box: dict[str, Any] = {}
        t = threading.Thread(target=_status_into, args=(box,), daemon=True)
        t.start()
        t.join(max(0.0, deadline - time.monotonic()))
        if box.get("ok"):
            return {"t_ok": time.monotonic(), "attempts": attempts, "last_error": last}
        if t.is_alive():
            last = "serve.status() still blocked at the deadline"
            break
        last = box.get("error", "")
        time.sleep(0.05)
    return {"t_ok": None, "attempts": attempts, "last_error": last}


def mode_chaos(cfg: dict[str, Any]) -> None:
    """Commands from the parent, one a line; each answered by a "done" event:
    `rollouts K` (K code rollouts in a row), `scale N`, `settle N` (wait for N RUNNING),
    `status DEADLINE` (call serve.status() until one works, at most until DEADLINE, a
    time.monotonic() value)."""
    start(cfg)
    app, dep, timeout = "chaos", "EchoVersioned", cfg["timeout"]
    state = {"version": 0, "replicas": cfg["replicas"]}

    def deploy() -> float:
        t0 = time.monotonic()
        d = EchoVersioned.options(num_replicas=state["replicas"])
        serve.run(d.bind(state["version"]), name=app, route_prefix="/")
        _settle(app, dep, state["replicas"], timeout)
        return time.monotonic() - t0

    deploy()
    emit(event="ready")
    while line := wait_for_parent():
        cmd, _, arg = line.partition(" ")
        t0 = time.monotonic()
        steps: list[float] = []
        if cmd == "rollouts":
            for _ in range(int(arg)):
                state["version"] += 1
                steps.append(deploy())
        elif cmd == "scale":
            state["replicas"] = int(arg)
            steps.append(deploy())
        elif cmd == "settle":
            _settle(app, dep, int(arg), timeout)
        elif cmd == "status":
            emit(event="done", cmd=cmd, **_status_works_by(float(arg)))
            continue
        else:
            raise ValueError(f"unknown command {line!r}")
        emit(event="done", cmd=cmd, seconds=time.monotonic() - t0, steps=steps)
    stop()


MODES = {
    "serve": mode_serve,
    "handle": mode_handle,
    "deploy": mode_deploy,
    "payload": mode_payload,
    "memory": mode_memory,
    "autoscale": mode_autoscale,
    "chaos": mode_chaos,
}


def main() -> None:
    mode, cfg = sys.argv[1], json.loads(sys.argv[2])
    try:
        MODES[mode](cfg)
    except BaseException as e:
        traceback.print_exc()
        emit(event="error", error=f"{type(e).__name__}: {e}"[:500])
        try:
            stop()
        finally:
            sys.exit(1)


if __name__ == "__main__":
    main()
