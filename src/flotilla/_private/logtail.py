"""What the replicas print, shown in the driver's terminal, as Ray's `log_to_driver` does.

A daemon thread of a driver that started a private local cluster polls the session's
`replica_*.log` files and writes each new line the user's code produced (print(), its own
loggers, tracebacks) to the driver's stderr, prefixed `(ServeReplica:<app>_<deployment>
<replica id>)`, JSON lines as Ray's text lines (Ray's terminal shows text whatever the
encoding). flotilla's own log lines and access lines are left in the files. Off with
`flotilla.init(log_to_driver=False)` or FLOTILLA_LOG_TO_DRIVER=0.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from typing import IO, Any

POLL_S = 0.25
#: A line of flotilla's own loggers (TEXT encoding).
_OURS = re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ \S+ \S+ \[[^\]]*\] flotilla[.:]")
#: An access line's tail (TEXT, `INFO <time> <app>_<deployment> <replica> <request id> -- GET /r
#: 200 1.2ms`), matched from its last " -- ": most of a busy replica's log, so checked cheaply
_ACCESS_TAIL = re.compile(rb" -- (?:[A-Z]+ )?\S+ (?:\d+|[A-Z_]+) \d+\.\dms$")
_READ_MAX = 1 << 20  # bytes read from one file per poll (a flood is skipped, not buffered)


def enabled(option: bool | None) -> bool:
    if option is not None:
        return bool(option)
    return os.environ.get("FLOTILLA_LOG_TO_DRIVER", "1").strip().lower() not in ("0", "false", "no", "off")


def ours(line: bytes) -> bool:
    """flotilla's own log or access line (TEXT or JSON encoding), not the user's output."""
    if line.startswith(b"{"):
        return b'"name": "flotilla' in line or b'"serve_access_log": true' in line
    if line[-2:] == b"ms" and _ACCESS_TAIL.match(line, line.rfind(b" -- ")):
        return True
    return _OURS.match(line) is not None


def as_text(line: bytes) -> str:
    """A line for the terminal: a JSON log line as Ray's text line (Ray's terminal shows
    text whatever the file's encoding), any other line as it is."""
    text = line.decode("utf-8", "replace")
    if not line.startswith(b"{"):
        return text
    try:
        rec = json.loads(text)
    except ValueError:
        return text
    if not isinstance(rec, dict) or "message" not in rec:
        return text
    rid = rec.get("request_id")
    parts = [rec.get("levelname", "INFO"), rec.get("asctime", ""), rec.get("deployment", ""), rec.get("replica", "")]
    if rid:
        parts.append(rid)
    line_text = " ".join(str(p) for p in parts if p) + f" -- {rec['message']}"
    exc = rec.get("exc_text")
    return f"{line_text}\n{exc}" if exc else line_text


class LogTail:
    """Polls `folder` for replica logs and writes the user's lines to `out`."""

    def __init__(self, folder: str, out: IO[str] | None = None) -> None:
        self.folder = folder
        self.out = out
        self.offsets: dict[str, int] = {}
        self.partial: dict[str, bytes] = {}
        self._stop = threading.Event()
        self._scan(first=True)
        self.thread = threading.Thread(target=self._run, name="flotilla-logtail", daemon=True)

    def start(self) -> LogTail:
        self.thread.start()
        return self

    def stop(self, wait_s: float = 1.0) -> None:
        """Show what came since the last poll and stop; waits at most `wait_s` (a terminal
        that does not read, e.g. a full pipe, never holds up the caller)."""
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(wait_s)

    def _scan(self, first: bool = False) -> list[str]:
        try:
            names = [n for n in os.listdir(self.folder) if n.startswith("replica_") and n.endswith(".log")]
        except OSError:
            return []
        for n in names:
            if n not in self.offsets:  # files there at the start: only what comes after
                self.offsets[n] = os.path.getsize(os.path.join(self.folder, n)) if first else 0
        return names

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(POLL_S)
            try:
                self.poll()
            except Exception:  # never take the driver down for its terminal output
                pass
            if stopping:
                return

    def poll(self) -> None:
        out: Any = self.out or sys.stderr
        lines: list[str] = []
        for name in self._scan():
            path = os.path.join(self.folder, name)
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets[name])
                    data = f.read(_READ_MAX)
            except OSError:
                continue
            if not data:
                continue
            self.offsets[name] += len(data)
            data = self.partial.pop(name, b"") + data
            *complete, rest = data.split(b"\n")
            if rest:
                self.partial[name] = rest[-_READ_MAX:]
            prefix = f"(ServeReplica:{name[len('replica_'):-len('.log')].rsplit('_', 1)[0]} " \
                     f"{name[:-len('.log')].rsplit('_', 1)[-1]}) "
            tail = _ACCESS_TAIL.match  # access lines dropped inline (no call per line), then the rest
            lines.extend(prefix + as_text(line) for line in complete if line and not (
                line[-2:] == b"ms" and tail(line, line.rfind(b" -- "))) and not ours(line))
        if lines:
            out.write("\n".join(lines) + "\n")
            out.flush()
