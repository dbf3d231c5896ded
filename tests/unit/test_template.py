"""The fork_after_init template process (template.py), spoken to over its real pipes."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import cloudpickle


class GoodModel:
    def __init__(self, n: int) -> None:
        self.weights = list(range(n))


class ThreadedModel:
    def __init__(self) -> None:
        self.stop = threading.Event()
        threading.Thread(target=self.stop.wait, name="loader-thread", daemon=True).start()


class BrokenModel:
    def __init__(self) -> None:
        print("this print goes to the log, not into the protocol")
        raise ValueError("no weights")


class Configured:
    def __init__(self) -> None:
        self.config: Any = None

    async def reconfigure(self, config: Any) -> None:
        self.config = config


def _answer(tmp_path: Path, target: Any, args: tuple[Any, ...] = (), user_config: Any = None) -> dict[str, Any]:
    """Start a template for `target`, return its first answer, then close its stdin."""
    spec = {"config": {"user_config": user_config},
            "def_bytes": base64.b64encode(cloudpickle.dumps(target)).decode(),
            "args_bytes": base64.b64encode(cloudpickle.dumps((args, {}))).decode()}
    first = {"log": str(tmp_path / "template.log"), "spec": spec,
             "args": {"app": "app", "deployment": "Dep", "version": "v1", "sys_path": sys.path, "cwd": str(tmp_path),
                      "env": {"OMP_NUM_THREADS": "1"}}}
    proc = subprocess.Popen([sys.executable, "-m", "flotilla._private.template"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write((json.dumps(first) + "\n").encode())
        proc.stdin.flush()
        answer = json.loads(proc.stdout.readline())
        proc.stdin.close()
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    return answer


def test_a_good_constructor_makes_a_ready_template(tmp_path: Path) -> None:
    assert "ready" in _answer(tmp_path, GoodModel, (1000,))


def test_async_reconfigure_runs_in_the_template(tmp_path: Path) -> None:
    assert "ready" in _answer(tmp_path, Configured, user_config={"k": 1})


def test_a_thread_left_running_makes_it_unsafe(tmp_path: Path) -> None:
    answer = _answer(tmp_path, ThreadedModel)
    assert "loader-thread" in answer["unsafe"]


def test_a_failing_constructor_is_reported_and_its_output_stays_in_the_log(tmp_path: Path) -> None:
    answer = _answer(tmp_path, BrokenModel)
    assert "ValueError: no weights" in answer["failed"]
    log = (tmp_path / "template.log").read_text()
    assert "this print goes to the log" in log and "no weights" in log


def test_fork_unsafe_names_the_threads_left_running() -> None:
    code = textwrap.dedent("""
        import threading
        from flotilla._private.template import fork_unsafe
        print(repr(fork_unsafe()))
        stop = threading.Event()
        threading.Thread(target=stop.wait, name="warmup", daemon=True).start()
        print(fork_unsafe())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    first, second = out.stdout.splitlines()
    assert first == "''"
    assert "1 thread(s) running (warmup)" in second
