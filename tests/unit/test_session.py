"""Session folders: finished ones are removed, their logs kept for the last KEEP_LOGS sessions,
live ones and folders that record no head are left alone."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from flotilla._private import session


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def make_session(tmp: Path, name: str, pid: int | None, age_s: float = 0.0) -> Path:
    d = tmp / f"{session.PREFIX}{name}"
    (d / "logs").mkdir(parents=True)
    (d / "logs" / "head.log").write_text(f"log of {name}\n")
    (d / "head.sock").write_text("")
    if pid is not None:
        session.record_head(str(d), pid)
    return d


def test_finish_keeps_the_logs_and_removes_the_folder(tmp_path: Path) -> None:
    d = make_session(tmp_path, "one", os.getpid())
    session.finish(str(d))
    assert not d.exists()
    kept = Path(session.logs_root(str(tmp_path))) / d.name
    assert (kept / "head.log").read_text() == "log of one\n"
    session.finish(str(d))  # twice is fine


def test_init_cleans_finished_sessions_and_keeps_the_last_logs(tmp_path: Path) -> None:
    gone = dead_pid()
    finished = [make_session(tmp_path, f"old{i}", gone) for i in range(session.KEEP_LOGS + 2)]
    live = make_session(tmp_path, "live", os.getpid())
    unknown = make_session(tmp_path, "unknown", None)
    root = Path(session.logs_root(str(tmp_path)))
    for i in range(3):  # logs of sessions that finished long ago
        (root / f"{session.PREFIX}earlier{i}").mkdir()
        os.utime(root / f"{session.PREFIX}earlier{i}", (1000 + i, 1000 + i))
    new = session.create(str(tmp_path))
    assert Path(new, "logs").is_dir() and not Path(new, session.HEAD_PID).exists()
    assert not any(d.exists() for d in finished)
    assert live.exists() and unknown.exists()
    kept = sorted(p.name for p in root.iterdir())
    assert len(kept) == session.KEEP_LOGS
    assert all(name.startswith(f"{session.PREFIX}old") for name in kept), kept  # the newest
    assert session.head_alive(str(live)) is True and session.head_alive(str(unknown)) is None


def test_a_reused_pid_does_not_keep_a_session_alive(tmp_path: Path) -> None:
    d = make_session(tmp_path, "reused", None)
    (d / session.HEAD_PID).write_text(f"{os.getpid()} 1\n")  # our pid, another start time
    assert session.head_alive(str(d)) is False
