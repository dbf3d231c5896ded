"""The registry of detached clusters (`_private/cluster.py`): namespaces, stale records,
`resolve`'s errors, and which addresses are flotilla's. No cluster is started: records point at
this test process (alive) or at a process that has exited (stale)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from flotilla._private import cluster
from flotilla._private.procfs import start_ticks


@pytest.fixture(autouse=True)
def registry_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The registry lands under tmp_path; no address or namespace comes from the environment."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    for var in (cluster.ADDRESS_ENV, cluster.NAMESPACE_ENV, cluster.TOKEN_ENV):
        monkeypatch.delenv(var, raising=False)
    return tmp


def _record(ns: str, sock: Path, pid: int | None = None, ticks: Any = "own", **extra: Any) -> dict[str, Any]:
    sock.touch()
    pid = os.getpid() if pid is None else pid
    return {"namespace": ns, "session_dir": str(sock.parent), "sock": str(sock), "keeper_pid": pid,
            "keeper_ticks": start_ticks(pid) if ticks == "own" else ticks,
            "dashboard_url": "http://127.0.0.1:1", **extra}


def _exited_pid() -> tuple[int, int]:
    """The pid and start ticks of a process that has exited (and been reaped)."""
    p = subprocess.Popen(["sleep", "60"])
    ticks = start_ticks(p.pid)
    assert ticks is not None
    p.kill()
    p.wait()
    return p.pid, ticks


@pytest.mark.parametrize("ns", ["default", "a", "rest-1f2e", "My_ns.v2", "9lives", "x" * 63])
def test_check_namespace_accepts(ns: str) -> None:
    assert cluster.check_namespace(ns) == ns


@pytest.mark.parametrize("ns", ["-x", ".hidden", "_x", "a/b", "a b", "../etc", "x" * 64, "ns\n", "é"])
def test_check_namespace_refuses(ns: str) -> None:
    with pytest.raises(ValueError, match=r"namespace .* is not valid"):
        cluster.check_namespace(ns)


def test_check_namespace_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cluster.check_namespace(None) == "default"
    monkeypatch.setenv(cluster.NAMESPACE_ENV, "from-env")
    assert cluster.check_namespace(None) == "from-env"
    assert cluster.check_namespace("given") == "given"  # an explicit namespace wins
    monkeypatch.setenv(cluster.NAMESPACE_ENV, "bad/env")
    with pytest.raises(ValueError, match="bad/env"):
        cluster.check_namespace(None)


def test_registry_is_private(registry_tmp: Path, tmp_path: Path) -> None:
    path = cluster.write_record(_record("priv", tmp_path / "head.sock"))
    assert os.path.dirname(path) == str(registry_tmp / f"flotilla-clusters-{os.getuid()}")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".tmp")]


def test_find_returns_a_live_record(tmp_path: Path) -> None:
    info = _record("live", tmp_path / "head.sock", token="t0k")
    path = cluster.write_record(info)
    assert cluster.find("live") == info
    assert os.path.exists(path)
    assert [c["namespace"] for c in cluster.running()] == ["live"]
    assert cluster.find("other") is None


@pytest.mark.parametrize("why", ["exited", "pid reused", "no socket"])
def test_find_removes_a_stale_record(tmp_path: Path, why: str) -> None:
    sock = tmp_path / "head.sock"
    if why == "exited":
        pid, ticks = _exited_pid()
        info = _record("stale", sock, pid=pid, ticks=ticks)
    elif why == "pid reused":  # our pid, but another process's start time
        info = _record("stale", sock, ticks=(start_ticks(os.getpid()) or 0) - 1)
    else:
        info = _record("stale", sock)
        sock.unlink()
    path = cluster.write_record(info)
    assert cluster.find("stale") is None
    assert not os.path.exists(path)
    assert cluster.running() == []


def test_find_ignores_a_corrupt_record(tmp_path: Path) -> None:
    path = cluster.record_path("broken")
    Path(path).write_text("{not json")
    assert cluster.find("broken") is None


def test_resolve_auto_finds_the_namespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = _record("mine", tmp_path / "head.sock")
    cluster.write_record(info)
    assert cluster.resolve("auto", "mine") == info
    assert cluster.resolve(None, "mine") == info
    monkeypatch.setenv(cluster.NAMESPACE_ENV, "mine")
    assert cluster.resolve(None, None) == info


def test_resolve_without_a_record_says_how_to_start_one(tmp_path: Path) -> None:
    cluster.write_record(_record("other-one", tmp_path / "a.sock"))
    cluster.write_record(_record("second", tmp_path / "b.sock"))
    with pytest.raises(cluster.NoClusterError) as e:
        cluster.resolve("auto", "ns")
    msg = str(e.value)
    assert "`flotilla start --namespace ns`" in msg
    assert "'ns'" in msg
    assert "'other-one'" in msg and "'second'" in msg
    # the default namespace needs no flag; no other cluster, no list
    for name in ("other-one", "second"):
        os.unlink(cluster.record_path(name))
    with pytest.raises(cluster.NoClusterError) as e:
        cluster.resolve("auto", None)
    msg = str(e.value)
    assert "`flotilla start`" in msg and "running:" not in msg


def test_resolve_refuses_a_bad_namespace() -> None:
    with pytest.raises(ValueError, match="not valid"):
        cluster.resolve("auto", "no/slashes")


@pytest.mark.parametrize("addr", ["bogus", "127.0.0.1:8265", "ray://127.0.0.1:10001", "/no/such/folder"])
def test_resolve_bad_address_explains_the_forms(addr: str) -> None:
    with pytest.raises(cluster.NoClusterError) as e:
        cluster.resolve(addr, "ns")
    msg = str(e.value)
    assert repr(addr) in msg
    assert "'auto'" in msg and "http://127.0.0.1:8265" in msg and "session folder" in msg


def test_resolve_address_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cluster.ADDRESS_ENV, "not-an-address")
    with pytest.raises(cluster.NoClusterError, match="not-an-address"):
        cluster.resolve(None, "ns")


def test_resolve_session_folder(tmp_path: Path) -> None:
    session = tmp_path / "session"
    session.mkdir()
    info = _record("folder", session / "head.sock")
    (session / "cluster.json").write_text(json.dumps(info))
    assert cluster.resolve(str(session), None) == info
    pid, ticks = _exited_pid()
    (session / "cluster.json").write_text(json.dumps(dict(info, keeper_pid=pid, keeper_ticks=ticks)))
    with pytest.raises(cluster.NoClusterError, match="no longer running"):
        cluster.resolve(str(session), None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(cluster.NoClusterError, match="not the session folder"):
        cluster.resolve(str(empty), None)


def test_resolve_url_nobody_answers() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(cluster.NoClusterError, match=f"no flotilla cluster answers at http://127.0.0.1:{port}"):
        cluster.resolve(f"http://127.0.0.1:{port}", "ns")


def test_is_local_address(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("")
    assert cluster.is_local_address("http://127.0.0.1:8265")
    assert cluster.is_local_address("https://example.com:8265")
    assert cluster.is_local_address(str(tmp_path))
    assert not cluster.is_local_address(None)
    assert not cluster.is_local_address("auto")
    assert not cluster.is_local_address("ray://127.0.0.1:10001")
    assert not cluster.is_local_address("127.0.0.1:6379")
    assert not cluster.is_local_address(str(tmp_path / "missing"))
    assert not cluster.is_local_address(str(f))
