"""The process supervisor with a real zygote and real processes: group kill, exit records,
SIGTERM then SIGKILL, and no signal to a number that may name another process now."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from flotilla._private.supervisor import Process, ZygoteSupervisor, start_ticks
from tests.conftest import alive, wait_for

pytestmark = pytest.mark.slow
HERE = "tests.unit.test_supervisor"


# ---- what the zygote's children run (kind "tests.unit.test_supervisor:<function>") ----------


def parent_of_sleeper(args: dict[str, Any]) -> None:
    """Start a grandchild (`sleep`), write its pid to args["pidfile"], then sleep or exit."""
    child = subprocess.Popen(["sleep", "60"])
    Path(args["pidfile"] + ".tmp").write_text(str(child.pid))
    os.replace(args["pidfile"] + ".tmp", args["pidfile"])
    if args.get("exit_code") is not None:
        sys.exit(args["exit_code"])
    if args.get("ignore_sigterm"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)


def quick_exit(args: dict[str, Any]) -> None:
    sys.exit(args.get("code", 0))


# ---- helpers -------------------------------------------------------------------------------


def with_supervisor(body: Callable[[ZygoteSupervisor], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        sup = ZygoteSupervisor()
        await sup.use_zygote()
        try:
            return await body(sup)
        finally:
            await sup.close()

    return asyncio.run(main())


async def poll(pred: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or pred}")


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


# ---- tests ---------------------------------------------------------------------------------


def test_kill_takes_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild"

    async def body(sup: ZygoteSupervisor) -> tuple[int, int, int | None]:
        proc = await sup.start(f"{HERE}:parent_of_sleeper", str(tmp_path / "log"), {"pidfile": str(pidfile)})
        grandchild = await poll(lambda: read_pid(pidfile), what="the grandchild's pid")
        assert sup.alive(proc) and alive({grandchild})
        sup.kill(proc)
        assert await sup.wait(proc, 10)
        return proc.pid, grandchild, proc.exit_code

    pid, grandchild, code = with_supervisor(body)
    assert code == -signal.SIGKILL
    wait_for(lambda: not alive({pid, grandchild}), timeout=10, what="child and grandchild gone")


def test_a_child_that_exits_takes_its_group_with_it(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild"

    async def body(sup: ZygoteSupervisor) -> tuple[int, int | None]:
        exits: list[Process] = []
        proc = await sup.start(f"{HERE}:parent_of_sleeper", str(tmp_path / "log"),
                               {"pidfile": str(pidfile), "exit_code": 3}, exits.append)
        assert await sup.wait(proc, 10)
        assert exits == [proc]
        grandchild = read_pid(pidfile)
        assert grandchild is not None
        return grandchild, proc.exit_code

    grandchild, code = with_supervisor(body)
    assert code == 3
    wait_for(lambda: not alive({grandchild}), timeout=10, what="the orphaned grandchild killed")


def test_exit_records_are_pruned(tmp_path: Path) -> None:
    async def body(sup: ZygoteSupervisor) -> list[Process]:
        procs = await asyncio.gather(*(
            sup.start(f"{HERE}:quick_exit", str(tmp_path / "log"), {"code": i}) for i in range(20)
        ))
        for p in procs:
            assert await sup.wait(p, 10)
        assert sup.live == {}  # nothing kept for exited processes
        return procs

    procs = with_supervisor(body)
    assert [p.exit_code for p in procs] == list(range(20))
    assert all(p.pidfd is None for p in procs)  # closed at exit


def test_stop_is_sigterm_then_sigkill(tmp_path: Path) -> None:
    async def body(sup: ZygoteSupervisor) -> tuple[int | None, int | None, float]:
        polite = await sup.start(f"{HERE}:parent_of_sleeper", str(tmp_path / "log"), {"pidfile": str(tmp_path / "a")})
        stubborn = await sup.start(f"{HERE}:parent_of_sleeper", str(tmp_path / "log"),
                                   {"pidfile": str(tmp_path / "b"), "ignore_sigterm": True})
        await poll(lambda: read_pid(tmp_path / "a") and read_pid(tmp_path / "b"), what="both started")
        await sup.stop(polite, 5)
        t0 = time.monotonic()
        await sup.stop(stubborn, 0.3)
        return polite.exit_code, stubborn.exit_code, time.monotonic() - t0

    polite, stubborn, took = with_supervisor(body)
    assert polite == -signal.SIGTERM and stubborn == -signal.SIGKILL
    assert took < 5


def test_no_signal_reaches_a_process_that_reuses_the_number() -> None:
    victim = subprocess.Popen(["sleep", "60"])
    try:
        # A process that ran and was reaped; then pretend its number now names the victim.
        old = subprocess.Popen(["sleep", "60"])
        handle = Process(old.pid, "test", start_ticks(old.pid))
        assert handle.pidfd is not None and handle.same_process()
        old.kill()
        old.wait()
        handle.pid = victim.pid
        assert not handle.same_process()
        assert handle.send(signal.SIGKILL) is False  # the pidfd knows its process was reaped
        # Without a pidfd, the start time tells the processes apart (the recorded one is of an
        # earlier process; two processes started in one clock tick would share it).
        victim_ticks = start_ticks(victim.pid)
        assert victim_ticks is not None
        by_ticks = Process(victim.pid, "test", victim_ticks - 1)
        assert by_ticks.pidfd is None  # the mismatch is seen when the pidfd is opened
        assert by_ticks.send(signal.SIGKILL) is False
        # Once an exit is recorded, nothing is sent to that number again.
        same = Process(victim.pid, "test", start_ticks(victim.pid))
        assert same.same_process()
        same.mark_exited(0)
        assert same.send(signal.SIGKILL) is False
        assert victim.poll() is None, "the victim was signalled"
        # The guard does not stop a legitimate signal.
        live = Process(victim.pid, "test", start_ticks(victim.pid))
        assert live.send(signal.SIGKILL) is True
        assert victim.wait(10) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
