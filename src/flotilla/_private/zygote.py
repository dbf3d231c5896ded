"""The fork server: a single-threaded process with the framework preloaded.

The head starts it once; it forks replica and proxy processes on request, so a new
replica skips interpreter start-up and imports (tens of ms instead of ~0.5 s).

Protocol on stdin/stdout, one JSON object per line:
  head -> zygote  {"kind": "replica" | "proxy" | "module:function", "log": path, "args": {...}}
  zygote -> head  {"pid": N, "start": T}          (answer to each request, in order; T is the
                                                   child's start time from /proc, for PID reuse)
  zygote -> head  {"exit": N, "code": C}          (a child exited; always after its "pid" line)
Each child leads its own process group (setsid); when a child exits, the zygote kills what is
left of its group before reaping it, so subprocesses of a replica never outlive it.
Children live as long as the session's keeper (`watch_keeper`), not as long as the zygote:
they keep serving when the zygote or the head dies, and are reparented to the keeper (a
child subreaper). The zygote dies with the head (PR_SET_PDEATHSIG); the head restarts it.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import select
import signal
import sys
import threading
from collections.abc import Callable
from typing import BinaryIO

from flotilla._private.keeper import keeper_from_env
from flotilla._private.procfs import exited_child, reap_group, start_ticks
from flotilla._private.proctitle import set_title

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def watch_keeper() -> None:
    """Tie this process's life (and its group's) to the session's keeper, not to its parent.

    A replica or the proxy keeps serving when the zygote or the head dies; it exits when the
    keeper is gone (the session is over). A thread blocks on a pidfd of the keeper, so a busy
    event loop cannot delay it. Outside a keeper's session: die with the parent, as before.
    """
    k = keeper_from_env()
    if k is None or not hasattr(os, "pidfd_open"):
        die_with_parent()
        return
    pid, ticks = k
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        os._exit(1)  # the keeper is already gone
    if ticks is not None and start_ticks(pid) != ticks:
        os._exit(1)  # the number names another process now: ours is gone

    def wait() -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not poller.poll():
            pass
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=wait, name="flotilla-keeper-watch", daemon=True).start()


#: Where protocol lines go: stdout for the zygote, a private copy of it for a template (whose
#: stdout is its log, so that the user's prints cannot break the protocol).
_out_fd = 1


def _write(obj: dict) -> None:
    data = (json.dumps(obj) + "\n").encode()
    while data:
        try:
            n = os.write(_out_fd, data)
        except InterruptedError:
            continue
        data = data[n:]


def _reap(signum: int, frame: object) -> None:
    while (pid := exited_child()) is not None:
        _write({"exit": pid, "code": reap_group(pid)})


_KINDS = {"replica": "flotilla._private.replica:main", "proxy": "flotilla._private.proxy:main"}


def _title(req: dict) -> str:
    kind = req["kind"]
    if kind == "replica":
        return f"flotilla::replica:{req['args'].get('app')}:{req['args'].get('deployment')}"
    if kind == "proxy":
        return "flotilla::proxy"
    return f"flotilla::worker:{kind}"


def redirect_output(log_path: str) -> None:
    """stdin from /dev/null; stdout and stderr appended to `log_path`."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)


def _run_kind(req: dict) -> None:
    module, _, func = _KINDS.get(req["kind"], req["kind"]).partition(":")
    getattr(importlib.import_module(module), func)(req["args"])


def _child(req: dict, run: Callable[[dict], None] = _run_kind, close: tuple[int, ...] = ()) -> None:
    """The forked child: its own session, its log as stdout/stderr, then `run(req)`; never returns.
    `close`: the parent's protocol descriptors, which the child must not hold open."""
    for fd in close:
        os.close(fd)
    set_title(_title(req))
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    watch_keeper()
    redirect_output(req["log"])
    code = 0
    try:
        run(req)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def preload() -> None:
    """Import what every child needs, once: forks then skip these imports."""
    import cloudpickle  # noqa: F401
    import starlette.requests
    import starlette.responses  # noqa: F401
    import uvicorn
    import uvicorn.config
    import uvicorn.protocols.http.httptools_impl
    import uvicorn.server  # noqa: F401
    import uvloop  # noqa: F401

    import flotilla._private.client
    import flotilla._private.proxy
    import flotilla._private.replica  # noqa: F401


def serve_forks(stdin: BinaryIO, run: Callable[[dict], None] = _run_kind, close: tuple[int, ...] = ()) -> None:
    """Say ready, then fork a child per request line until stdin closes (see the protocol above)."""
    signal.signal(signal.SIGCHLD, _reap)
    _write({"ready": os.getpid()})
    while True:
        line = stdin.readline()
        if not line:
            break
        req = json.loads(line)
        # SIGCHLD waits until the "pid" line is out: an exit is never reported before its pid.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            pid = os.fork()
            if pid == 0:
                _child(req, run, close)
            _write({"pid": pid, "start": start_ticks(pid)})
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    for sig in (signal.SIGTERM,):
        signal.signal(sig, signal.SIG_DFL)


def main() -> None:
    set_title("flotilla::zygote")
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    preload()
    serve_forks(sys.stdin.buffer)


if __name__ == "__main__":
    main()
