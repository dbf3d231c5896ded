"""Log rotation by size on live descriptors, and access-log sampling."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from flotilla._private import logrotate, metrics
from flotilla._private.logrotate import Rotator


def _open(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def test_rotation_swaps_the_file_behind_the_same_descriptors(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    a = _open(log)
    b = os.dup(a)
    try:
        r = Rotator(str(log), (a, b), max_bytes=100, backups=2)
        os.write(a, b"1" * 60)
        assert not r.check()
        os.write(b, b"2" * 60)
        assert r.check()
        os.write(a, b"new-a\n")
        os.write(b, b"new-b\n")
        assert (tmp_path / "x.log.1").read_bytes() == b"1" * 60 + b"2" * 60
        assert log.read_bytes() == b"new-a\nnew-b\n"
        for i in range(4):
            os.write(a, str(i).encode() * 200)
            assert r.check()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["x.log", "x.log.1", "x.log.2"]
        assert (tmp_path / "x.log.1").read_bytes() == b"3" * 200
        assert (tmp_path / "x.log.2").read_bytes() == b"2" * 200
    finally:
        os.close(a)
        os.close(b)


def test_no_backups_starts_over(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    fd = _open(log)
    try:
        r = Rotator(str(log), (fd,), max_bytes=10, backups=0)
        os.write(fd, b"x" * 20)
        assert r.check()
        os.write(fd, b"y")
        assert [p.name for p in tmp_path.iterdir()] == ["x.log"] and log.read_bytes() == b"y"
    finally:
        os.close(fd)


def test_rotate_own_log_needs_a_regular_file_and_a_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()
    try:
        assert logrotate.rotate_own_log((w,)) is None  # a pipe is not rotated
    finally:
        os.close(r)
        os.close(w)
    fd = _open(tmp_path / "y.log")
    try:
        monkeypatch.setenv("FLOTILLA_ROTATION_MAX_BYTES", "0")
        assert logrotate.rotate_own_log((fd,)) is None  # 0 turns rotation off
        monkeypatch.setenv("FLOTILLA_ROTATION_MAX_BYTES", "1000")
        monkeypatch.setenv("RAY_ROTATION_BACKUP_COUNT", "7")  # Ray's names are honoured
        rot = logrotate.rotate_own_log((fd,))
        assert rot is not None and (rot.path, rot.max_bytes, rot.backups) == (str(tmp_path / "y.log"), 1000, 7)
        rot.stop()
    finally:
        os.close(fd)


def test_access_log_sampling_keeps_one_in_n_and_every_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOTILLA_ACCESS_LOG_SAMPLE", "4")

    async def go() -> list[str]:
        log = metrics.AccessLog("test t1")
        for i in range(12):
            log.add(f"r{i}", "GET /", 200, 1.0)
        log.add("e1", "GET /", 500, 1.0)
        log.add("e2", "method", "ERROR", 1.0)
        lines = list(log.lines)
        log.pending.clear()
        return lines

    lines = asyncio.run(go())
    assert [ln.split()[5] for ln in lines] == ["r3", "r7", "r11", "e1", "e2"]
