"""Session folders: one private temporary folder per cluster (sockets, logs, the checkpoint,
the pid of the session's keeper).

A cluster that shuts down cleanly removes its folder and keeps its logs under
`<tmp>/flotilla-logs/<session>/`, where only the newest KEEP_LOGS sessions stay. A folder left
behind by a session whose keeper died (SIGKILL, machine crash) is cleaned the same way by the
next `flotilla.init()`: a session is finished when the process in its `head.pid` is gone. (The
file keeps its name; it records the keeper, whose life is the session's, not the head, which a
session may restart.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tempfile

from flotilla._private.procfs import start_ticks

logger = logging.getLogger("flotilla")

PREFIX = "flotilla-"
KEEP_LOGS = 5
HEAD_PID = "head.pid"


def logs_root(tmp: str | None = None) -> str:
    """`<tmp>/flotilla-logs` (or `flotilla-logs-<uid>` if another user owns that name)."""
    tmp = tmp or tempfile.gettempdir()
    root = os.path.join(tmp, "flotilla-logs")
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        with contextlib.suppress(FileExistsError):
            os.mkdir(root, 0o700)
        return root
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
        return root
    root = f"{root}-{os.getuid()}"
    os.makedirs(root, 0o700, exist_ok=True)
    return root


def create(tmp: str | None = None) -> str:
    """A new private session folder with its `logs/`; finished sessions are cleaned first."""
    prune_finished(tmp)
    path = tempfile.mkdtemp(prefix=PREFIX, dir=tmp)
    os.makedirs(os.path.join(path, "logs"), exist_ok=True)
    return path


def record_head(session_dir: str, pid: int | None = None) -> None:
    """Write the head's pid and start time, so later sessions can tell this one finished."""
    pid = pid or os.getpid()
    tmp = os.path.join(session_dir, HEAD_PID + ".tmp")
    with open(tmp, "w") as f:
        f.write(f"{pid} {start_ticks(pid)}\n")
    os.replace(tmp, os.path.join(session_dir, HEAD_PID))


def head_alive(session_dir: str) -> bool | None:
    """Whether the session's head still runs; None when the folder records no head."""
    try:
        with open(os.path.join(session_dir, HEAD_PID)) as f:
            pid_s, ticks_s = f.read().split()
    except (OSError, ValueError):
        return None
    ticks = start_ticks(int(pid_s))
    return ticks is not None and str(ticks) == ticks_s


def finish(session_dir: str) -> None:
    """Keep the session's logs under `logs_root()`, remove its folder, prune old logs."""
    if not os.path.isdir(session_dir):
        return
    tmp = os.path.dirname(session_dir)
    logs = os.path.join(session_dir, "logs")
    if os.path.isdir(logs):
        root = logs_root(tmp)
        dest = os.path.join(root, os.path.basename(session_dir))
        try:
            os.rename(logs, dest)
        except OSError:
            with contextlib.suppress(OSError, shutil.Error):
                shutil.move(logs, dest)
        with contextlib.suppress(OSError):
            os.utime(dest)  # its age is when the session finished
        prune_logs(root)
    shutil.rmtree(session_dir, ignore_errors=True)


def prune_logs(root: str, keep: int = KEEP_LOGS) -> None:
    """Remove all but the `keep` most recently finished sessions' logs."""
    try:
        entries = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False) and e.name.startswith(PREFIX)]
    except OSError:
        return
    entries.sort(key=lambda e: e.stat(follow_symlinks=False).st_mtime, reverse=True)
    for e in entries[keep:]:
        shutil.rmtree(e.path, ignore_errors=True)


def prune_finished(tmp: str | None = None) -> None:
    """Finish every session folder of this user whose head is no longer alive."""
    tmp = tmp or tempfile.gettempdir()
    try:
        entries = list(os.scandir(tmp))
    except OSError:
        return
    uid = os.getuid()
    for e in entries:
        if not e.name.startswith(PREFIX) or e.name.startswith("flotilla-logs"):
            continue
        try:
            if not e.is_dir(follow_symlinks=False) or e.stat(follow_symlinks=False).st_uid != uid:
                continue
        except OSError:
            continue
        if head_alive(e.path) is False:
            logger.info("cleaning up finished session %s", e.path)
            finish(e.path)
