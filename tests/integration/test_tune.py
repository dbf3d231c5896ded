"""`flotilla tune` end to end: a real private cluster, real HTTP load, a config file written."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flotilla.serve.deploy_schema import load_config_file
from tests.conftest import local_only

pytestmark = [
    pytest.mark.slow,
    local_only("the tuner starts a private local cluster and reads its processes' CPU from /proc"),
]

APP = '''
from flotilla import serve


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Noop:
    async def __call__(self, request):
        body = await request.body()
        return {"n": len(body)}


app = Noop.bind()
'''

BUDGET_S = 20.0
SLO_MS = 200.0


def test_tune_writes_a_deployable_config_within_budget(tmp_path: Path) -> None:
    (tmp_path / "noop_app.py").write_text(APP)
    (tmp_path / "body.json").write_text('{"x": 1}')
    out = tmp_path / "tuned.yaml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "flotilla", "tune", "noop_app:app", "--slo-p95-ms", str(SLO_MS), "--body", "body.json",
         "--budget-s", str(BUDGET_S), "-o", str(out)],
        capture_output=True, text=True, timeout=BUDGET_S + 60, cwd=tmp_path, env=env,
    )
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert took <= BUDGET_S + 10, f"took {took:.1f}s for a {BUDGET_S:g}s budget"  # + interpreter start, imports
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("setting"))
    for col in ("req/s", "p50 ms", "p95 ms", "p99 ms", "CPU ms/req", "errors"):
        assert col in lines[header]
    rows = [line for line in lines[header + 2:] if line.startswith("replicas=")]
    assert rows and lines[header + 2].startswith("replicas=1 cpus=0.5 max_ongoing=5")  # the code's options first
    chosen = [r for r in rows if r.endswith("<- chosen")]
    assert len(chosen) == 1
    cells = chosen[0].split()
    p95, cpu_ms, errors = float(cells[6]), float(cells[8]), int(cells[9])
    assert p95 <= SLO_MS and errors == 0 and cpu_ms > 0
    assert "[" in proc.stderr and "%" in proc.stderr  # the progress bar
    assert f"flotilla deploy {out}" in proc.stdout

    config = load_config_file(str(out)).to_dict()
    (app,) = config["applications"]
    assert app["import_path"] == "noop_app:app"
    (entry,) = app["deployments"]
    label = " ".join(cells[:3])
    assert label == (f"replicas={entry['num_replicas']} cpus={entry['ray_actor_options']['num_cpus']:g} "
                     f"max_ongoing={entry['max_ongoing_requests']}")


def test_tune_fails_clearly_when_nothing_meets_the_slo(tmp_path: Path) -> None:
    (tmp_path / "noop_app.py").write_text(APP)
    out = tmp_path / "tuned.yaml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-m", "flotilla", "tune", "noop_app:app", "--slo-p95-ms", "0.001", "--budget-s", "12",
         "-o", str(out)],
        capture_output=True, text=True, timeout=80, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 1
    assert "no setting met the SLO" in proc.stderr and "over SLO" in proc.stdout
    assert not out.exists()
