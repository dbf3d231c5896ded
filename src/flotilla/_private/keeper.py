"""The keeper: one small, long-lived process per session, and the one the driver starts.

```
driver ──stdin/stdout──▶ keeper ──▶ head ──▶ zygote ──fork──▶ replicas, proxy
                           ▲ subreaper: orphans of a dead head/zygote are reparented here
```

What it does, and nothing more (it imports only the standard library, so it cannot break
when user code or the framework does):
- sets `PR_SET_CHILD_SUBREAPER`, so replicas and the proxy orphaned by a dead head or zygote
  become its children; it reaps them (killing the rest of their process group first, as the
  zygote does);
- starts the head and forwards its first ready line to the driver; restarts the head when it
  dies unexpectedly, after a delay from `restart_delay` (0.2 s doubling to 5 s, back to 0.2 s
  after a run of a minute), one log line per restart;
- holds the listening sockets the head hands it (SCM_RIGHTS over a SEQPACKET socket pair),
  so the HTTP port outlives the proxy and the head, and passes them to each new head;
- ends the session when the driver's stdin closes (the head is told by its own stdin closing;
  not for a detached cluster, `flotilla start`, whose record it removes at the end),
  when the head exits with code 0 (`shutdown`), or on SIGTERM (forwarded to the head, which
  drains); after a bounded wait it kills what is left, then `session.finish` keeps the logs
  and removes the session folder.

Replicas and the proxy watch this process (a pidfd, see `zygote.watch_keeper`) and exit when
it is gone, so nothing outlives the session; the head dies with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from flotilla._private.procfs import exited_child, proc_stats, reap_group, start_ticks

PR_SET_CHILD_SUBREAPER = 36
FIRST_DELAY_S = 0.2
MAX_DELAY_S = 5.0
STABLE_S = 60.0
#: How long a head told to stop (driver gone) may take before it and the rest are killed.
STOP_TIMEOUT_S = 20.0
#: The same after SIGTERM, which drains every replica first (head.SHUTDOWN_DRAIN_TIMEOUT_S).
DRAIN_TIMEOUT_S = 45.0
#: How long to keep killing and reaping leftovers at the end.
CLEANUP_TIMEOUT_S = 5.0
#: Environment variable (inherited by the head, zygote and workers): "pid:start-ticks".
ENV = "FLOTILLA_KEEPER"


def restart_delay(previous: float | None, uptime: float, first: float = FIRST_DELAY_S,
                  cap: float = MAX_DELAY_S, stable: float = STABLE_S) -> float:
    """Seconds to wait before restarting a process that ran `uptime` s and died.

    The first restart, and any after a stable run (`uptime >= stable`), waits `first`; each
    further one doubles the previous delay, up to `cap`. Never zero: no hot loop.
    """
    if previous is None or uptime >= stable:
        return first
    return min(cap, previous * 2)


class Backoff:
    """`restart_delay` with its memory: call `started()` at each start, `failed()` at each
    unexpected exit (it returns the delay to wait). `clock` is injectable for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, first: float = FIRST_DELAY_S,
                 cap: float = MAX_DELAY_S, stable: float = STABLE_S) -> None:
        self.clock = clock
        self.first, self.cap, self.stable = first, cap, stable
        self.delay: float | None = None
        self.started_at: float | None = None
        self.failures = 0

    def started(self) -> None:
        self.started_at = self.clock()

    def uptime(self) -> float:
        return 0.0 if self.started_at is None else self.clock() - self.started_at

    def failed(self) -> float:
        self.delay = restart_delay(self.delay, self.uptime(), self.first, self.cap, self.stable)
        self.failures += 1
        return self.delay


def keeper_from_env() -> tuple[int, int | None] | None:
    """(pid, start ticks) of this session's keeper, from the environment; None outside one."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    pid_s, _, ticks_s = spec.partition(":")
    try:
        return int(pid_s), (int(ticks_s) if ticks_s and ticks_s != "None" else None)
    except ValueError:
        return None


class KeeperLink:
    """The head's side: hand listening sockets to the keeper, or take them back.

    Messages are single SEQPACKET datagrams: b"hold <name>" with one descriptor attached, or
    b"drop <name>". Without a keeper (a head started by hand, tests) every call does nothing.
    """

    def __init__(self, fd: int | None) -> None:
        self.sock = socket.socket(fileno=fd) if fd is not None else None

    def hold(self, name: str, sock: socket.socket) -> None:
        if self.sock is not None:
            socket.send_fds(self.sock, [f"hold {name}".encode()], [sock.fileno()])

    def drop(self, name: str) -> None:
        if self.sock is not None:
            self.sock.send(f"drop {name}".encode())


def _log(level: str, msg: str) -> None:
    t = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f",{int(t * 1000) % 1000:03d}"
    try:
        sys.stderr.write(f"{stamp} {level} flotilla.keeper: {msg}\n")
        sys.stderr.flush()
    except OSError:
        pass


def _children(pid: int) -> list[int]:
    return [child for child, fields in proc_stats() if int(fields[1]) == pid]


class Keeper:
    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.session_dir: str = cfg["session_dir"]
        self.head: subprocess.Popen[bytes] | None = None
        self.head_out = b""
        self.ready_sent = False
        self.ending = ""  # why the session ends ("" while it runs)
        self.deadline = 0.0  # when a head still running at the end is killed
        self.next_start = 0.0
        self.code = 0
        self.held: dict[str, socket.socket] = {}
        self.backoff = Backoff()
        self.sel = selectors.DefaultSelector()
        self.mine, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.mine.setblocking(False)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sigterm = False

    # ---- setup ----------------------------------------------------------------------------
    def setup(self) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
                _log("WARNING", "could not become a child subreaper; orphaned workers go to init")
        except (OSError, AttributeError):
            pass
        os.environ[ENV] = f"{os.getpid()}:{start_ticks(os.getpid())}"
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        if not self.cfg.get("detached"):  # a detached cluster (`flotilla start`) outlives its shell
            os.set_blocking(0, False)
            self.sel.register(0, selectors.EVENT_READ, "driver")
        self.sel.register(self.mine, selectors.EVENT_READ, "held")
        self.sel.register(self._wake_r, selectors.EVENT_READ, "signal")

    def _on_sigterm(self, *_: object) -> None:
        self._sigterm = True

    # ---- the head -------------------------------------------------------------------------
    def start_head(self) -> None:
        cfg = dict(self.cfg, keeper_fd=self.theirs.fileno(),
                   held={name: s.fileno() for name, s in self.held.items()},
                   restarts=self.backoff.failures)
        self.head = subprocess.Popen(
            [sys.executable, "-m", "flotilla._private.headboot", json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            pass_fds=[self.theirs.fileno(), *(s.fileno() for s in self.held.values())],
        )
        self.backoff.started()
        self.head_out = b""
        assert self.head.stdout is not None
        os.set_blocking(self.head.stdout.fileno(), False)
        self.sel.register(self.head.stdout.fileno(), selectors.EVENT_READ, "head")

    def _head_output(self) -> None:
        assert self.head is not None and self.head.stdout is not None
        fd = self.head.stdout.fileno()
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(fd)
            return
        self.head_out += data
        while b"\n" in self.head_out:
            line, self.head_out = self.head_out.split(b"\n", 1)
            if not self.ready_sent:
                self.ready_sent = True
                try:
                    os.write(1, line + b"\n")
                except OSError:
                    pass
            else:
                _log("INFO", f"head restarted (pid {self.head.pid}) and ready "
                             f"{self.backoff.uptime():.2f}s after it was started")

    def _head_exited(self, code: int) -> None:
        assert self.head is not None
        pid = self.head.pid
        uptime = self.backoff.uptime()
        if self.head.stdout is not None:
            try:
                self.sel.unregister(self.head.stdout.fileno())
            except (KeyError, ValueError):
                pass
            self.head.stdout.close()
        if self.head.stdin is not None:
            try:
                self.head.stdin.close()
            except OSError:
                pass
        self.head = None
        if not self.ready_sent:
            _log("ERROR", f"the head (pid {pid}) exited with code {code} before it was ready")
            self.code = 1
            self._end("the head could not start")
        elif self.ending or code == 0:
            self._end(f"the head exited with code {code}")
        else:
            delay = self.backoff.failed()
            self.next_start = time.monotonic() + delay
            _log("WARNING", f"the head (pid {pid}) died (exit code {code}) after {uptime:.1f}s; "
                            f"restarting it in {delay:.1f}s (restart {self.backoff.failures})")

    # ---- events ---------------------------------------------------------------------------
    def _end(self, why: str, drain: bool = False) -> None:
        if self.ending:
            return
        self.ending = why
        _log("INFO", f"ending the session: {why}")
        self.deadline = time.monotonic() + (DRAIN_TIMEOUT_S if drain else STOP_TIMEOUT_S)
        if self.head is not None:
            if drain:
                self.head.send_signal(signal.SIGTERM)
            elif self.head.stdin is not None:
                try:
                    self.head.stdin.close()  # the head stops everything at once
                except OSError:
                    pass

    def _driver_input(self) -> None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(0)
            self._end("the driver is gone (its pipe closed)")

    def _held_message(self) -> None:
        try:
            msg, fds, _, _ = socket.recv_fds(self.mine, 1024, 4)
        except (BlockingIOError, InterruptedError):
            return
        words = msg.decode(errors="replace").split(" ", 1)
        if len(words) == 2 and words[0] == "hold" and fds:
            old = self.held.pop(words[1], None)
            if old is not None:
                old.close()
            self.held[words[1]] = socket.socket(fileno=fds[0])
            fds = fds[1:]
        elif len(words) == 2 and words[0] == "drop":
            old = self.held.pop(words[1], None)
            if old is not None:
                old.close()
        for fd in fds:
            os.close(fd)

    def _reap(self) -> None:
        while (pid := exited_child()) is not None:
            if self.head is not None and pid == self.head.pid:
                self._head_exited(self.head.wait())
            else:  # an orphaned worker, or the zygote
                reap_group(pid)

    # ---- main loop ------------------------------------------------------------------------
    def run(self) -> int:
        self.setup()
        while True:
            now = time.monotonic()
            if self._sigterm:
                self._sigterm = False
                self._end("SIGTERM: draining every replica", drain=True)
            if self.head is None:
                if self.ending:
                    break
                if now >= self.next_start:
                    self.start_head()
                    continue
                timeout: float | None = self.next_start - now
            elif self.ending:
                if now >= self.deadline:
                    _log("WARNING", f"the head (pid {self.head.pid}) did not stop in time; killing it")
                    self.head.kill()
                    self.deadline = now + CLEANUP_TIMEOUT_S
                timeout = max(0.0, self.deadline - now)
            else:
                timeout = None
            for key, _ in self.sel.select(timeout):
                what = key.data
                if what == "driver":
                    self._driver_input()
                elif what == "head":
                    if self.head is not None:
                        self._head_output()
                elif what == "held":
                    self._held_message()
                elif what == "signal":
                    try:
                        while os.read(self._wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
            self._reap()
        self.cleanup()
        return self.code

    def cleanup(self) -> None:
        """Kill whatever is left below us (orphaned workers), reap it, finish the session."""
        deadline = time.monotonic() + CLEANUP_TIMEOUT_S
        me = os.getpid()
        while time.monotonic() < deadline:
            kids = _children(me)
            if not kids:
                break
            for pid in kids:
                for kill in (os.killpg, os.kill):
                    try:
                        kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            self._reap()
            time.sleep(0.02)
        for s in self.held.values():
            s.close()
        record = self.cfg.get("record")
        if record:
            try:
                with open(record) as f:
                    mine = json.load(f).get("keeper_pid") == os.getpid()
                if mine:
                    os.unlink(record)
            except (OSError, ValueError):
                pass
        if self.code == 0:
            from flotilla._private import session

            session.finish(self.session_dir)
        _log("INFO", "session finished")


def main() -> None:
    from flotilla._private.proctitle import set_title

    set_title("flotilla::keeper")
    cfg = json.loads(sys.argv[1])
    sys.exit(Keeper(cfg).run())


if __name__ == "__main__":
    main()
