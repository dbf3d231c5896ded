"""Size-based rotation of a process's own log file (head.log, proxy.log, replica_*.log).

Each process's stdout/stderr are the log file itself (the zygote redirects a child's fds 1 and
2; the driver gives the head its stderr), so user `print`s, tracebacks and logging all land in
it. A daemon thread checks the file's size every CHECK_INTERVAL_S; past `max_bytes` it renames
`name.log` -> `name.log.1` (shifting older ones up, dropping those beyond `backup_count`),
opens a fresh `name.log` and `dup2`s it onto the same descriptors. Writers never notice: the
descriptor numbers stay, only the file behind them changes.

Settings (environment of the process that starts the cluster, inherited by every process):
FLOTILLA_ROTATION_MAX_BYTES (default 512 MiB; 0 turns rotation off) and
FLOTILLA_ROTATION_BACKUP_COUNT (default 5), as Ray's RAY_ROTATION_MAX_BYTES and
RAY_ROTATION_BACKUP_COUNT, which are honoured too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import Sequence

logger = logging.getLogger("flotilla")

CHECK_INTERVAL_S = 0.5
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
DEFAULT_BACKUP_COUNT = 5


def _env_int(names: Sequence[str], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                logger.warning("ignoring %s=%r: not an integer", name, value)
    return default


def max_bytes() -> int:
    return _env_int(("FLOTILLA_ROTATION_MAX_BYTES", "RAY_ROTATION_MAX_BYTES"), DEFAULT_MAX_BYTES)


def backup_count() -> int:
    return max(0, _env_int(("FLOTILLA_ROTATION_BACKUP_COUNT", "RAY_ROTATION_BACKUP_COUNT"), DEFAULT_BACKUP_COUNT))


class Rotator:
    """Rotates `path`, the file open on descriptors `fds`, once it reaches `max_bytes`."""

    def __init__(self, path: str, fds: Sequence[int], max_bytes: int, backups: int) -> None:
        self.path = path
        self.fds = tuple(fds)
        self.max_bytes = max_bytes
        self.backups = backups
        self.rotations = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """Rotate if the file is over the limit; True if it did."""
        try:
            size = os.fstat(self.fds[0]).st_size
        except OSError:
            return False
        if size < self.max_bytes:
            return False
        self.rotate()
        return True

    def rotate(self) -> None:
        path, n = self.path, self.backups
        if n > 0:
            for i in range(n - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{path}.{i}", f"{path}.{i + 1}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, f"{path}.1")
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for target in self.fds:
                os.dup2(fd, target)
        finally:
            os.close(fd)
        self.rotations += 1

    def start(self, interval: float = CHECK_INTERVAL_S) -> Rotator:
        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.check()
                except OSError:
                    pass  # a full or vanished disk: try again later

        self._thread = threading.Thread(target=run, name="flotilla-logrotate", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


def _file_path(fd: int) -> str | None:
    """The path of the regular file open on `fd`, or None (a pipe, a terminal, a deleted file)."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return path if os.path.isabs(path) and not path.endswith(" (deleted)") else None


def rotate_own_log(fds: Sequence[int] = (1, 2)) -> Rotator | None:
    """Start rotating the log file this process writes on `fds` (those open on the same file as
    the first); None when rotation is off or the first fd is not a regular file."""
    limit = max_bytes()
    path = _file_path(fds[0])
    if limit <= 0 or path is None:
        return None
    ino = os.fstat(fds[0]).st_ino
    same = [fd for fd in fds if _file_path(fd) == path and os.fstat(fd).st_ino == ino]
    return Rotator(path, same, limit, backup_count()).start()
