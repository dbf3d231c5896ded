"""The driver of bench/fork_after_init.py: one process per system under test.

    python fork_app.py build CONFIG_JSON     # build the scikit-learn model file (once)
    python fork_app.py probe CONFIG_JSON     # RSS of a plain process that loads it
    python fork_app.py SYSTEM CONFIG_JSON    # SYSTEM: flotilla-fork | flotilla | ray

The same code serves every system; only the import differs (`ray` for ray, `flotilla` for
the two flotilla runs; flotilla-fork adds `fork_after_init=True` to the options).
Steps, each reported as one JSON line on stdout (logs go to stderr):
  started        init + serve.start
  deployed1      serve.run of 1 replica (its constructor loads the model), first HTTP answer
  scaled         the same app redeployed with N replicas: seconds until N are RUNNING
                 (serve.status() polled every `poll` s); then waits for a line on stdin
                 (the parent measures memory meanwhile)
  zero_deployed  that app deleted; an app with min_replicas 0 / initial_replicas 0 deployed;
                 waits for a line on stdin (the parent measures memory at zero replicas)
  result         one HTTP request from zero replicas: seconds from send to response
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
import urllib.request
from typing import Any

APP, ZERO_APP, DEP = "digits", "digits0", "Digits"


def emit(**obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def build(cfg: dict[str, Any]) -> None:
    """Fit the forest on load_digits (bundled with scikit-learn), upsampled `upsample` times
    with Gaussian noise (std `noise`, pixel values 0-16), and joblib.dump it to cfg["path"]."""
    import joblib
    import numpy as np
    import sklearn
    from sklearn.datasets import load_digits
    from sklearn.ensemble import ExtraTreesClassifier

    t0 = time.perf_counter()
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(cfg["seed"])
    xs = np.concatenate([x + rng.normal(0, cfg["noise"], x.shape) for _ in range(cfg["upsample"])])
    ys = np.tile(y, cfg["upsample"])
    model = ExtraTreesClassifier(
        n_estimators=cfg["trees"], n_jobs=2, random_state=cfg["seed"]
    ).fit(xs, ys)
    model.n_jobs = 1  # predict in the replica's own thread
    tmp = cfg["path"] + ".tmp"
    joblib.dump(model, tmp)
    os.replace(tmp, cfg["path"])
    emit(
        event="built",
        seconds=time.perf_counter() - t0,
        bytes=os.path.getsize(cfg["path"]),
        nodes=int(sum(e.tree_.node_count for e in model.estimators_)),
        samples=len(ys),
        train_accuracy=float(model.score(x, y)),
        sklearn=sklearn.__version__,
    )


def probe(cfg: dict[str, Any]) -> None:
    """A plain process (no serving system): RSS after the imports and after joblib.load."""

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024

    import joblib
    import numpy  # noqa: F401
    import sklearn.ensemble  # noqa: F401

    imports = rss_mb()
    t0 = time.perf_counter()
    model = joblib.load(cfg["path"])
    load_s = time.perf_counter() - t0
    arrays = 0
    for est in model.estimators_:
        state = est.tree_.__getstate__()
        arrays += state["nodes"].nbytes + state["values"].nbytes
    emit(event="probe", imports_rss_mb=imports, loaded_rss_mb=rss_mb(), load_s=load_s,
         tree_arrays_mb=arrays / 2**20)  # fmt: skip


def make_deployment(serve: Any, path: str) -> Any:
    class Digits:
        """Loads the forest from its joblib file; predicts the digit of one 8x8 row."""

        def __init__(self, model_path: str) -> None:
            import joblib

            t0 = time.perf_counter()
            self.model = joblib.load(model_path)
            self.load_s = time.perf_counter() - t0
            self.forked = False

        def __post_fork__(self) -> None:  # flotilla with fork_after_init=True only
            self.forked = True

        async def __call__(self, request: Any) -> dict[str, Any]:
            import numpy as np

            row = json.loads(await request.body())["x"]
            pred = self.model.predict(np.asarray(row, dtype=float).reshape(1, -1))
            return {"y": int(pred[0]), "pid": os.getpid(), "forked": self.forked}

    return serve.deployment(ray_actor_options={"num_cpus": 0})(Digits)


def post(url: str, body: bytes, timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return dict(json.loads(resp.read()))


def states(serve: Any, app: str) -> dict[str, int]:
    try:
        return dict(serve.status().applications[app].deployments[DEP].replica_states)
    except (KeyError, AttributeError):
        return {}


def wait_http(url: str, body: bytes, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return post(url, body, 5.0)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def run_system(system: str, cfg: dict[str, Any]) -> None:
    if system == "ray":
        import ray as runtime
        from ray import serve
    else:
        import flotilla as runtime  # type: ignore[no-redef]
        from flotilla import serve  # type: ignore[no-redef]
    extra: dict[str, Any] = {"fork_after_init": True} if system == "flotilla-fork" else {}
    port, n, poll, timeout = cfg["port"], cfg["replicas"], cfg["poll"], cfg["timeout"]
    body = json.dumps({"x": cfg["row"]}).encode()
    base = f"http://127.0.0.1:{port}"

    t0 = time.perf_counter()
    runtime.init(num_cpus=2, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    emit(event="started", start_s=time.perf_counter() - t0)
    try:
        digits = make_deployment(serve, cfg["model"])

        # 1 replica: the first deploy, and the first answer.
        t0 = time.perf_counter()
        serve.run(
            digits.options(num_replicas=1, **extra).bind(cfg["model"]),
            name=APP, route_prefix="/digits",
        )  # fmt: skip
        deploy1_s = time.perf_counter() - t0
        first = wait_http(base + "/digits", body, timeout)
        emit(event="deployed1", deploy1_s=deploy1_s, http1_s=time.perf_counter() - t0,
             answer=first)  # fmt: skip

        # 1 -> N: serve.run in a thread, serve.status() polled here.
        box: dict[str, Any] = {}

        def redeploy() -> None:
            try:
                serve.run(
                    digits.options(num_replicas=n, **extra).bind(cfg["model"]),
                    name=APP, route_prefix="/digits",
                )  # fmt: skip
                box["returned_s"] = time.perf_counter() - t0
            except BaseException as e:
                box["error"] = f"{type(e).__name__}: {e}"[:300]

        th = threading.Thread(target=redeploy, daemon=True)
        t0 = time.perf_counter()
        th.start()
        scale_s, polls = None, 0
        while time.perf_counter() - t0 < timeout and "error" not in box:
            st = states(serve, APP)
            polls += 1
            if st.get("RUNNING", 0) == n and sum(st.values()) == n:
                scale_s = time.perf_counter() - t0
                break
            time.sleep(poll)
        th.join(timeout)
        if "error" in box:
            raise RuntimeError(f"redeploy with {n} replicas: {box['error']}")
        if scale_s is None:
            raise TimeoutError(f"not {n} RUNNING within {timeout} s: {states(serve, APP)}")
        answers = [post(base + "/digits", body, 30.0) for _ in range(4 * n)]
        emit(
            event="scaled", scale_s=scale_s, run_returned_s=box.get("returned_s"), polls=polls,
            running=states(serve, APP).get("RUNNING", 0),
            pids_answering=len({a["pid"] for a in answers}),
            forked_answers=sum(1 for a in answers if a.get("forked")),
            predictions=sorted({a["y"] for a in answers}),
        )  # fmt: skip
        sys.stdin.readline()

        # From zero: delete the N-replica app, deploy the scale-to-zero one.
        serve.delete(APP)
        deadline = time.monotonic() + timeout
        while APP in serve.status().applications and time.monotonic() < deadline:
            time.sleep(0.05)
        autoscaling = {
            "min_replicas": 0, "max_replicas": 1, "initial_replicas": 0, "upscale_delay_s": 0,
        }  # fmt: skip
        t0 = time.perf_counter()
        serve.run(
            digits.options(autoscaling_config=autoscaling, **extra).bind(cfg["model"]),
            name=ZERO_APP, route_prefix="/zero",
        )  # fmt: skip
        deploy0_s = time.perf_counter() - t0
        time.sleep(cfg["idle_before_request"])
        emit(event="zero_deployed", deploy0_s=deploy0_s, states=states(serve, ZERO_APP))
        sys.stdin.readline()
        t0 = time.perf_counter()
        answer = post(base + "/zero", body, timeout)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        post(base + "/zero", body, 30.0)
        second_s = time.perf_counter() - t0
        emit(event="result", first_response_s=first_s, second_response_s=second_s,
             answer=answer, states=states(serve, ZERO_APP))  # fmt: skip
    finally:
        serve.shutdown()
        runtime.shutdown()


def main() -> None:
    what, cfg = sys.argv[1], json.loads(sys.argv[2])
    try:
        if what == "build":
            build(cfg)
        elif what == "probe":
            probe(cfg)
        else:
            run_system(what, cfg)
    except BaseException as e:
        traceback.print_exc()
        emit(event="error", error=f"{type(e).__name__}: {e}"[:500])
        sys.exit(1)


if __name__ == "__main__":
    main()
