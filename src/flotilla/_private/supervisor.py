"""The head's only seam to the OS: start, watch, signal and stop worker processes.

`Supervisor` is the interface the controller and the proxy manager use; `ZygoteSupervisor`
implements it with the preloaded fork server (`zygote.py`). Another backend (Ray actors)
implements the same operations: start, adopt, alive, kill, wait, stop, close.

Exits are seen through pidfds, so they are seen for processes that are not our children:
workers orphaned by a dead zygote (reparented to the keeper), and the workers a restarted head
`adopt`s from its checkpoint. For the zygote's own children its exit report (with the exit
code) normally comes first; the pidfd is the fallback when the zygote is gone.

A dead zygote is restarted with backoff (`keeper.restart_delay`); starts wait for the new one.

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
import time
from collections.abc import Callable
from typing import Any

from flotilla._private.keeper import Backoff
from flotilla._private.procfs import start_ticks

logger = logging.getLogger("flotilla.supervisor")

ZYGOTE_START_TIMEOUT_S = 30.0
ZYGOTE_EXIT_TIMEOUT_S = 5.0
#: How long an exit seen by pidfd waits for the zygote's report (which carries the exit code).
EXIT_REPORT_GRACE_S = 1.0


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
        self.exit_reason = ""  # why it exited, in words, when the exit code does not say (Ray)
        self.exited = asyncio.Event()
        self.on_exit = on_exit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wait_report: Callable[[], bool] | None = None

    @property
    def ending(self) -> str:
        """How it ended, in words: its exit reason, the signal that killed it, or its exit code."""
        if self.exit_reason:
            return self.exit_reason
        if self.exit_code is None:
            return "its process exited"
        if self.exit_code < 0:
            try:
                name = signal.Signals(-self.exit_code).name
            except ValueError:
                name = "unknown signal"
            return f"its process was killed by signal {-self.exit_code} ({name})"
        return f"its process exited with code {self.exit_code}"

    def watch(self, wait_report: Callable[[], bool] | None = None) -> None:
        """Notice the exit through the pidfd, on the running loop. While `wait_report()` is
        true (its zygote lives, and will report the exit code), wait a moment for that report."""
        if self.pidfd is None or self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wait_report = wait_report
        self._loop.add_reader(self.pidfd, self._pidfd_readable)

    def _unwatch(self) -> None:
        if self._loop is not None and self.pidfd is not None:
            self._loop.remove_reader(self.pidfd)
        self._loop = None

    def _pidfd_readable(self) -> None:
        loop = self._loop
        self._unwatch()
        if loop is not None and self._wait_report is not None and self._wait_report():
            loop.call_later(EXIT_REPORT_GRACE_S, self.mark_exited, None)
        else:
            self.mark_exited(None)

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
        self._unwatch()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        if self.on_exit is not None:
            cb, self.on_exit = self.on_exit, None
            cb(self)


class Supervisor(abc.ABC):
    """Starts worker processes and reports their exits; the head's one seam to the OS."""

    #: Its workers are processes of this machine (pids the head may read in /proc and signal).
    local = True

    def logs_hint(self, path: str) -> str:
        """Where a worker's log is, for messages: `path` (the file the head gave it)."""
        return path

    @abc.abstractmethod
    async def start(self, kind: str, log_path: str, args: dict[str, Any],
                    on_exit: Callable[[Process], None] | None = None) -> Process:
        """Start a worker of `kind` ("replica", "proxy" or "module:function") logging to `log_path`."""

    def adopt(self, pid: int, kind: str, ticks: int | None,
              on_exit: Callable[[Process], None] | None = None) -> Process | None:
        """Take over a running worker this supervisor did not start (a restarted head re-adopts
        what its checkpoint lists): None if `pid` no longer names the process that started at
        `ticks`. Its exit is seen by pidfd (with no exit code: it is not our child)."""
        proc = Process(pid, kind, ticks, on_exit)
        if ticks is None or proc.pidfd is None or not proc.same_process():
            if proc.pidfd is not None:
                os.close(proc.pidfd)
                proc.pidfd = None
            return None
        proc.watch()
        self._adopted(proc)
        return proc

    @abc.abstractmethod
    def _adopted(self, proc: Process) -> None:
        """Remember an adopted process (it is killed at `close`, as started ones are)."""

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

    async def start_template(self, log_path: str, args: dict[str, Any], spec: dict[str, Any]) -> Template:
        """Start a `fork_after_init` template (template.py) that builds `spec`'s object once and
        forks replicas from it; wait for it with `Template.ready()`."""
        raise TemplateUnusable("fork_after_init works on the local backend only; on Ray each replica "
                               "is an actor that constructs its own copy")

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop everything this supervisor started."""


class TemplateUnusable(Exception):
    """A template cannot fork replicas (its constructor failed, or it is not fork-safe): why."""


class ZygoteSupervisor(Supervisor):
    """Forks workers from the preloaded zygote (JSON lines on its stdin/stdout, see zygote.py)."""

    #: The fork server, in messages.
    what = "the fork server (zygote)"
    #: A dead one is started again (a template is not: the controller decides).
    restarts = True

    def __init__(self, backoff: Backoff | None = None) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready: asyncio.Future[int] | None = None
        self._up = asyncio.Event()  # a zygote is ready to fork
        self._waiting: list[tuple[str, Callable[[Process], None] | None, asyncio.Future[Process]]] = []
        self._live: dict[int, Process] = {}  # pid -> live process; dropped at its exit
        self._lock = asyncio.Lock()
        self._stdin: asyncio.WriteTransport | None = None
        self._reader: asyncio.Task[None] | None = None
        self._dead: BaseException | None = None
        self._closing = False
        self._restart: asyncio.Task[None] | None = None
        self.backoff = backoff or Backoff()
        self.zygote_restarts = 0
        self._templates: set[Template] = set()

    @staticmethod
    def spawn_zygote() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "flotilla._private.zygote"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

    @property
    def live(self) -> dict[int, Process]:
        return self._live

    @property
    def zygote_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _adopted(self, proc: Process) -> None:
        self._track(proc)

    def _track(self, proc: Process) -> None:
        """Keep `proc` in the table of live processes until its exit (however it is seen)."""
        self._live[proc.pid] = proc
        cb = proc.on_exit

        def forget(p: Process) -> None:
            if self._live.get(p.pid) is p:
                del self._live[p.pid]
            if cb is not None:
                cb(p)

        proc.on_exit = forget

    async def use_zygote(self, proc: subprocess.Popen[bytes] | None = None) -> None:
        """Use the zygote process `proc` (started early by `headboot`), or start one."""
        if proc is None:
            proc = self.spawn_zygote()
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._ready.add_done_callback(self._zygote_ready)
        self._dead = None
        self.backoff.started()
        self._proc = proc
        assert proc.stdout is not None and proc.stdin is not None
        stdout = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(stdout)
        await loop.connect_read_pipe(lambda: protocol, proc.stdout)
        self._stdin, _ = await loop.connect_write_pipe(asyncio.Protocol, proc.stdin)
        self._reader = loop.create_task(self._read(stdout))

    def _zygote_ready(self, fut: asyncio.Future[int]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self._up.set()

    def _zygote_lives(self, zygote: subprocess.Popen[bytes] | None) -> Callable[[], bool]:
        return lambda: self._proc is zygote and self._dead is None

    async def _read(self, stdout: asyncio.StreamReader) -> None:
        zygote = self._proc
        while True:
            try:
                line = await stdout.readline()
            except (OSError, ValueError):
                line = b""
            if not line:
                break
            msg = json.loads(line)
            if "ready" in msg:
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(msg["ready"])
            elif "pid" in msg:
                kind, on_exit, fut = self._waiting.pop(0)
                proc = Process(msg["pid"], kind, msg.get("start"), on_exit)
                self._track(proc)
                proc.watch(self._zygote_lives(zygote))
                if not fut.done():
                    fut.set_result(proc)
            elif "exit" in msg:
                proc_or_none = self._live.get(msg["exit"])
                if proc_or_none is not None:
                    proc_or_none.mark_exited(msg["code"])
            elif ("failed" in msg or "unsafe" in msg) and self._ready is not None and not self._ready.done():
                # a template's answer instead of "ready"
                self._ready.set_exception(TemplateUnusable(msg.get("unsafe") or "its constructor failed"))
        # The zygote is gone. Its children live on (they watch the keeper, not the zygote) and
        # their exits are seen by pidfd; starts wait for a new zygote.
        self._up.clear()
        self._dead = RuntimeError(f"{self.what} exited before it answered")
        for _, _, fut in self._waiting:
            if not fut.done():
                fut.set_exception(self._dead)
        self._waiting.clear()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(self._dead)
            self._ready.exception()  # retrieved: logged below, once
        if self._stdin is not None:
            self._stdin.close()
            self._stdin = None
        if self.restarts and not self._closing and zygote is not None and zygote is self._proc:
            self._restart = asyncio.get_running_loop().create_task(self._restart_zygote(zygote))

    async def _restart_zygote(self, old: subprocess.Popen[bytes]) -> None:
        """Reap the dead zygote, wait out the backoff, start a new one (one log line each)."""
        loop = asyncio.get_running_loop()
        try:
            code = await asyncio.wait_for(loop.run_in_executor(None, old.wait), ZYGOTE_EXIT_TIMEOUT_S)
        except TimeoutError:
            old.kill()
            code = await loop.run_in_executor(None, old.wait)
        uptime = self.backoff.uptime()
        delay = self.backoff.failed()
        self.zygote_restarts += 1
        logger.warning(
            "the fork server (zygote, pid %d) exited with code %s after %.1fs; restarting it in %.1fs "
            "(restart %d); running replicas are not affected", old.pid, code, uptime, delay, self.zygote_restarts,
        )
        await asyncio.sleep(delay)
        if self._closing:
            return
        t0 = time.monotonic()
        await self.use_zygote()
        try:
            assert self._ready is not None
            await asyncio.wait_for(asyncio.shield(self._ready), ZYGOTE_START_TIMEOUT_S)
        except Exception as e:
            logger.error("the new fork server did not start: %r", e)
            return
        logger.debug("fork server restarted (pid %s) in %.2fs", self.zygote_pid, time.monotonic() - t0)

    async def start(self, kind: str, log_path: str, args: dict[str, Any],
                    on_exit: Callable[[Process], None] | None = None) -> Process:
        if not self._up.is_set():  # starting, or being restarted after it died
            try:
                await asyncio.wait_for(self._up.wait(), ZYGOTE_START_TIMEOUT_S)
            except TimeoutError:
                raise RuntimeError(
                    f"the fork server (zygote) was not ready within {ZYGOTE_START_TIMEOUT_S:g}s"
                ) from None
        if self._dead is not None or self._stdin is None:
            raise self._dead or RuntimeError("the fork server (zygote) exited")
        async with self._lock:
            fut: asyncio.Future[Process] = asyncio.get_running_loop().create_future()
            self._waiting.append((kind, on_exit, fut))
            self._stdin.write((json.dumps({"kind": kind, "log": log_path, "args": args}) + "\n").encode())
        return await fut

    async def start_template(self, log_path: str, args: dict[str, Any], spec: dict[str, Any]) -> Template:
        t = Template(self, {"log": log_path, "args": args, "spec": spec})
        self._templates.add(t)
        try:
            await t.use_zygote()
        except BaseException:
            await t.close()
            raise
        return t

    async def close(self) -> None:
        self._closing = True
        if self._restart is not None:
            self._restart.cancel()
        for proc in list(self._live.values()):
            self.kill(proc)
        await asyncio.gather(*(t.close() for t in list(self._templates)))
        await self._close_server()

    async def _close_server(self) -> None:
        """Close the fork server's stdin and wait for it to exit (killing it if it does not)."""
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


class Template(ZygoteSupervisor):
    """A `fork_after_init` template (template.py): the zygote protocol, after the constructor.

    The replicas it forks are its owner's to track and kill (one table of live processes);
    closing a template stops only the template, so a retired version's replicas drain as usual.
    """

    what = "the fork_after_init template"
    restarts = False

    def __init__(self, owner: ZygoteSupervisor, first: dict[str, Any]) -> None:
        super().__init__()
        self.owner = owner
        self._live = owner._live
        self._first = first

    def spawn_zygote(self) -> subprocess.Popen[bytes]:  # type: ignore[override]
        return subprocess.Popen([sys.executable, "-m", "flotilla._private.template"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    async def use_zygote(self, proc: subprocess.Popen[bytes] | None = None) -> None:
        await super().use_zygote(proc)
        assert self._stdin is not None
        self._stdin.write((json.dumps(self._first) + "\n").encode())  # buffered: the loop never blocks
        self._first = {}

    @property
    def pid(self) -> int | None:
        return self.zygote_pid

    @property
    def usable(self) -> bool:
        """It forks on request: ready, and not exited or closed."""
        return self._up.is_set() and self._dead is None and not self._closing

    async def ready(self) -> None:
        """Wait until it built the object and can fork; raises TemplateUnusable saying why not."""
        assert self._ready is not None
        try:
            await asyncio.shield(self._ready)
        except TemplateUnusable:
            raise
        except Exception as e:
            code = self._proc.poll() if self._proc is not None else None
            raise TemplateUnusable(f"it exited before it was ready (exit code {code})" if code is not None
                                   else str(e)) from None

    async def close(self) -> None:
        self._closing = True
        self.owner._templates.discard(self)
        if self._proc is not None and not self._up.is_set() and self._proc.poll() is None:
            self._proc.kill()  # still constructing: nothing to wait for
        await self._close_server()
