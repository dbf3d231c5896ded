"""The head's only seam to the OS: start, watch, signal and stop worker processes.

`Supervisor` is the interface the controller and the proxy manager use; `ZygoteSupervisor`
implements it with the preloaded fork server (`zygote.py`). Another backend (Ray actors)
implements the same five operations.

Safety rules, so a signal never reaches the wrong process:
- Each worker leads its own process group (`setsid` in the zygote's child); stopping it
  signals the group, so subprocesses the user's code started go with it. The zygote also
  kills the group of a child that exited before it reaps it.
- A process is identified by its pid *and* a pidfd (or, where pidfds are missing, its
  start time in /proc): once its exit is reported, or its pidfd says it was reaped, or the
  start time differs, nothing is sent to that number again.
- Exit records live on the `Process` handle; the supervisor's table holds live processes
  only and drops each one as its exit arrives.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("flotilla.supervisor")

ZYGOTE_START_TIMEOUT_S = 30.0
ZYGOTE_EXIT_TIMEOUT_S = 5.0


def start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _open_pidfd(pid: int, ticks: int | None) -> int | None:
    """A pidfd for `pid` if it is still the process that started at `ticks`."""
    if not hasattr(os, "pidfd_open"):
        return None
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    if ticks is not None and start_ticks(pid) != ticks:  # the number was reused before we looked
        os.close(fd)
        return None
    return fd


class Process:
    """One worker process: identity, exit record, and the callback to run when it exits."""

    def __init__(self, pid: int, kind: str, ticks: int | None, on_exit: Callable[[Process], None] | None = None) -> None:
        self.pid = pid
        self.kind = kind
        self.ticks = ticks
        self.pidfd = _open_pidfd(pid, ticks)
        self.exit_code: int | None = None
        self.exited = asyncio.Event()
        self.on_exit = on_exit

    def __repr__(self) -> str:
        state = "running" if self.exit_code is None and not self.exited.is_set() else f"exited {self.exit_code}"
        return f"Process({self.kind}, pid {self.pid}, {state})"

    def same_process(self) -> bool:
        """True while `pid` still names this process (not exited and reaped, not reused)."""
        if self.exited.is_set():
            return False
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        return self.ticks is not None and start_ticks(self.pid) == self.ticks

    def send(self, sig: int) -> bool:
        """Signal the process's group (or the process alone if it leads no group yet).

        Returns False, sending nothing, when the process is no longer the one started.
        """
        if not self.same_process():
            return False
        try:
            # The group id is the leader's pid; while the leader is not reaped the number
            # cannot name anything else (and the zygote kills the group before reaping).
            os.killpg(self.pid, sig)
            return True
        except ProcessLookupError:
            pass  # not a group leader yet (forked, setsid not reached)
        except PermissionError:
            return False
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
            else:
                os.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def mark_exited(self, code: int | None) -> None:
        if self.exited.is_set():
            return
        self.exit_code = code
        self.exited.set()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        if self.on_exit is not None:
            cb, self.on_exit = self.on_exit, None
            cb(self)


class Supervisor(abc.ABC):
    """Starts worker processes and reports their exits; the head's one seam to the OS."""

    @abc.abstractmethod
    async def start(self, kind: str, log_path: str, args: dict[str, Any],
                    on_exit: Callable[[Process], None] | None = None) -> Process:
        """Start a worker of `kind` ("replica", "proxy" or "module:function") logging to `log_path`."""

    def alive(self, proc: Process) -> bool:
        """The process has not exited (a cheap ping of the OS, no message to the worker)."""
        return proc.same_process()

    def kill(self, proc: Process) -> None:
        """SIGKILL the process and its group; a no-op once it exited."""
        proc.send(signal.SIGKILL)

    async def wait(self, proc: Process, timeout: float) -> bool:
        """Wait up to `timeout` s for the exit report; True if it exited."""
        if proc.exited.is_set():
            return True
        try:
            await asyncio.wait_for(proc.exited.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self, proc: Process, timeout: float) -> None:
        """SIGTERM the group, then SIGKILL it if the process has not exited after `timeout` s."""
        proc.send(signal.SIGTERM)
        if not await self.wait(proc, timeout):
            logger.warning("%r did not exit %.1fs after SIGTERM; killing its process group", proc, timeout)
            self.kill(proc)
            await self.wait(proc, timeout)

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop everything this supervisor started."""


class ZygoteSupervisor(Supervisor):
    """Forks workers from the preloaded zygote (JSON lines on its stdin/stdout, see zygote.py)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready: asyncio.Future[int] | None = None
        self._waiting: list[tuple[str, Callable[[Process], None] | None, asyncio.Future[Process]]] = []
        self._live: dict[int, Process] = {}  # pid -> live process; dropped at its exit
        self._lock = asyncio.Lock()
        self._stdin: asyncio.WriteTransport | None = None
        self._reader: asyncio.Task[None] | None = None
        self._dead: BaseException | None = None

    @staticmethod
    def spawn_zygote() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "flotilla._private.zygote"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

    @property
    def live(self) -> dict[int, Process]:
        return self._live

    async def adopt(self, proc: subprocess.Popen[bytes] | None = None) -> None:
        """Use the zygote process `proc` (started early by `headboot`), or start one."""
        if proc is None:
            proc = self.spawn_zygote()
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._proc = proc
        assert proc.stdout is not None and proc.stdin is not None
        stdout = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(stdout)
        await loop.connect_read_pipe(lambda: protocol, proc.stdout)
        self._stdin, _ = await loop.connect_write_pipe(asyncio.Protocol, proc.stdin)
        self._reader = loop.create_task(self._read(stdout))

    async def _read(self, stdout: asyncio.StreamReader) -> None:
        while True:
            line = await stdout.readline()
            if not line:
                break
            msg = json.loads(line)
            if "ready" in msg:
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(msg["ready"])
            elif "pid" in msg:
                kind, on_exit, fut = self._waiting.pop(0)
                proc = Process(msg["pid"], kind, msg.get("start"), on_exit)
                self._live[proc.pid] = proc
                if not fut.done():
                    fut.set_result(proc)
            elif "exit" in msg:
                proc_or_none = self._live.pop(msg["exit"], None)
                if proc_or_none is not None:
                    proc_or_none.mark_exited(msg["code"])
        # The zygote is gone, and its children with it (PR_SET_PDEATHSIG).
        self._dead = RuntimeError("the zygote process exited")
        for _, _, fut in self._waiting:
            if not fut.done():
                fut.set_exception(self._dead)
        self._waiting.clear()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(self._dead)
        for proc in list(self._live.values()):
            proc.send(signal.SIGKILL)
            proc.mark_exited(None)
        self._live.clear()

    async def start(self, kind: str, log_path: str, args: dict[str, Any],
                    on_exit: Callable[[Process], None] | None = None) -> Process:
        assert self._ready is not None, "adopt() a zygote first"
        await asyncio.wait_for(asyncio.shield(self._ready), ZYGOTE_START_TIMEOUT_S)
        if self._dead is not None or self._stdin is None:
            raise RuntimeError("the zygote process exited")
        async with self._lock:
            fut: asyncio.Future[Process] = asyncio.get_running_loop().create_future()
            self._waiting.append((kind, on_exit, fut))
            self._stdin.write((json.dumps({"kind": kind, "log": log_path, "args": args}) + "\n").encode())
        return await fut

    async def close(self) -> None:
        for proc in list(self._live.values()):
            self.kill(proc)
        zygote = self._proc
        if zygote is None:
            return
        if self._stdin is not None:
            self._stdin.close()
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, zygote.wait), ZYGOTE_EXIT_TIMEOUT_S)
        except TimeoutError:
            zygote.kill()
            zygote.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader, ZYGOTE_EXIT_TIMEOUT_S)
