"""The systems under test, and starting / stopping their processes by PID.

Each benchmark process (an app driver, a bare server) is started in its own session and
process group. Stopping it closes its stdin (the app shuts its system down cleanly), then
kills, by PID, whatever of its process tree is still alive, and finally anything else
that ended up below the orchestrator (a subreaper), so a run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import procs

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"
TEMPLATE = BENCH / "apps" / "serve_app.py"
BARE_APP = BENCH / "apps" / "bare_app.py"
RAY_VENV = BENCH / ".venv-ray"
IMPORT_MARK = "# BENCH-IMPORT"

# Every command line started, in order (for the report).
COMMANDS: list[str] = []
# Process-tree leftovers that had to be killed after a clean stop, for the report.
LEFTOVERS: list[str] = []


@dataclass
class System:
    name: str  # "flotilla" | "flotilla-ray" | "ray" | "bare"
    python: str
    script: Path
    versions: dict[str, str] = field(default_factory=dict)
    # Set on the environment of its processes (flotilla-ray: PYTHONPATH, FLOTILLA_BACKEND).
    extra_env: dict[str, str] = field(default_factory=dict)
    # The shared local Ray instance the system's drivers join (flotilla-ray, and ray when
    # it runs beside flotilla-ray); None: each driver starts its own (ray.init / flotilla.init).
    cluster: RayCluster | None = None

    @property
    def is_serve(self) -> bool:
        return self.name != "bare"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.name != "flotilla":  # flotilla keeps it: PYTHONPATH=src runs a checkout's code
            env.pop("PYTHONPATH", None)
        env["PYTHONUNBUFFERED"] = "1"
        env["RAY_USAGE_STATS_ENABLED"] = "0"  # no network here, and no prompt
        if self.cluster is not None:
            env.update(self.cluster.client_env)
        elif self.name == "ray":
            # A private instance, as the app's ray.init(num_cpus=2) means: without this, Ray
            # joins the latest `ray start` instance it finds on the machine (someone else's).
            env["RAY_ADDRESS"] = "local"
        env.update(self.extra_env)
        return env

    def roots(self, pid: int) -> list[int]:
        """The process trees that make up the system while `pid` (a driver) runs: the
        driver's, and the shared Ray instance's if it joins one."""
        return [pid] + ([self.cluster.pid] if self.cluster is not None else [])


def render_app(package: str) -> Path:
    """The app template with its marked import lines naming `package` (flotilla or ray)."""
    if package == "flotilla":
        return TEMPLATE
    lines = []
    for line in TEMPLATE.read_text().splitlines(keepends=True):
        lines.append(line.replace("flotilla", package) if IMPORT_MARK in line else line)
    path = OUT / f"apps-{package}" / TEMPLATE.name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))
    return path


def probe_versions(python: str, modules: list[str]) -> dict[str, str]:
    code = (
        "import json, platform, importlib.metadata as m\n"
        f"mods = {modules!r}\n"
        "out = {'python': platform.python_version()}\n"
        "for name in mods:\n"
        "    try: out[name] = m.version(name)\n"
        "    except Exception: out[name] = 'missing'\n"
        "print(json.dumps(out))\n"
    )
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip()[-500:])
    return json.loads(r.stdout)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port(preferred: int) -> int:
    if port_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(port: int, path: str = "/", timeout: float = 2.0) -> bool:
    """One POST; True on a 2xx answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=b'{"x": 1}', headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return 200 <= resp.status < 300
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


class Launched:
    """One benchmark process and its process tree."""

    def __init__(self, system: System, argv: list[str], log_path: Path) -> None:
        self.system = system
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115
        self.log_path = log_path
        COMMANDS.append(shlex.join(argv))
        self.t_start = time.monotonic()
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            start_new_session=True,
            env=system.env(),
            cwd=OUT,
        )
        procs.POPEN_PIDS.add(self.popen.pid)
        self.pid = self.popen.pid
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.seen: dict[tuple[int, int], procs.Proc] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if isinstance(obj, dict) and "event" in obj:
                    self.events.put(obj)
                    continue
            with contextlib.suppress(ValueError, OSError):
                self.log.write(raw)
                self.log.flush()
        self.events.put(None)

    def event(self, timeout: float) -> dict[str, Any]:
        """The next JSON event the process prints; raises on error, exit or timeout."""
        try:
            ev = self.events.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no answer within {timeout:.0f} s; see {self.log_path}") from None
        if ev is None:
            raise RuntimeError(f"exited with code {self.popen.wait()}; see {self.log_path}")
        if ev.get("event") == "error":
            raise RuntimeError(ev.get("error", "error"))
        return ev

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write((line + "\n").encode())
        self.popen.stdin.flush()

    def roles(self, port: int | None, root_label: str = "driver") -> dict[int, str]:
        """Every process of the system (driver tree, plus the shared Ray instance's) by role."""
        roots = self.system.roots(self.pid)
        return procs.roles(roots[0], port, root_label, extra_roots=roots[1:])

    def snapshot(self) -> list[procs.Proc]:
        members = procs.tree(self.pid)
        for p in members:
            self.seen[(p.pid, p.start)] = p
        return members

    def wait_http(self, port: int, timeout: float, path: str = "/") -> float:
        """Poll until a POST answers 2xx; returns seconds since the process started."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"exited with code {self.popen.returncode}; see {self.log_path}")
            if http_ok(port, path, timeout=1.0):
                return time.monotonic() - self.t_start
            time.sleep(0.02)
        raise TimeoutError(
            f"no HTTP 200 on port {port} within {timeout:.0f} s; see {self.log_path}"
        )

    def stop(self, timeout: float = 60.0) -> None:
        """Ask for a clean shutdown (close stdin); then kill survivors by PID."""
        if self.popen.poll() is None:
            self.snapshot()
        with contextlib.suppress(OSError):
            if self.popen.stdin:
                self.popen.stdin.close()
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            LEFTOVERS.append(f"{self.system.name}: driver did not exit within {timeout:.0f} s")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        procs.POPEN_PIDS.discard(self.pid)
        # Give the system's own clean-up a moment, then kill what is left, by PID.
        reap_leftovers(self.seen.values(), f"{self.system.name}", "the driver exited")
        if self.system.cluster is not None:
            self.system.cluster.clear(self.system, self.log)
        kill_orphans(f"{self.system.name} (re-parented)")
        self.log.close()


def reap_leftovers(seen: Any, who: str, after: str) -> None:
    """Wait (10 s) for the processes `seen` to exit; report and kill, by PID, those left."""
    alive = procs.wait_gone(list(seen), 10.0)
    if alive:
        LEFTOVERS.append(
            f"{who}: {len(alive)} process(es) still alive 10 s after {after}: "
            f"{', '.join(' '.join(procs.cmdline(p.pid))[:60] for p in alive)}"
        )
        procs.kill_procs(alive)
        procs.wait_gone(alive, 5.0)


def kill_orphans(label: str) -> None:
    """Kill every process below the orchestrator that is not one of our Popen children
    (subreaper: orphans of the systems under test land here)."""
    me = os.getpid()
    for _ in range(3):
        procs.reap_zombies()
        stray = [
            p
            for p in procs.tree(me, include_root=False)
            if p.pid not in procs.POPEN_PIDS and p.ppid == me
        ]
        if not stray:
            return
        victims = [q for p in stray for q in procs.tree(p.pid)]
        LEFTOVERS.append(
            f"{label}: killed {len(victims)} orphan(s): "
            + ", ".join(" ".join(procs.cmdline(p.pid))[:60] for p in victims)
        )
        procs.kill_procs(victims)
        procs.wait_gone(victims, 5.0)


def launch_app(system: System, mode: str, cfg: dict[str, Any], log: Path) -> Launched:
    if system.cluster is not None:
        cfg = {**cfg, "address": system.cluster.address}
    if system.is_serve:
        argv = [system.python, str(system.script), mode, json.dumps(cfg)]
    else:
        argv = [system.python, str(system.script), json.dumps(cfg)]
    return Launched(system, argv, log)


def flotilla_system(python: str) -> System:
    versions = probe_versions(python, ["flotilla", "uvicorn", "starlette"])
    if versions.get("flotilla") == "missing":
        raise RuntimeError(
            f"flotilla is not installed for {python}; run bench with the project's venv"
        )
    return System("flotilla", python, render_app("flotilla"), versions)


def flotilla_ray_system(flotilla_python: str) -> System:
    """flotilla with backend="ray": the flotilla code that `flotilla_python` imports (its
    PYTHONPATH kept), run by bench/.venv-ray's Python, whose Ray also runs the replicas."""
    code = "import os, flotilla; print(os.path.dirname(os.path.dirname(flotilla.__file__)))"
    env = dict(os.environ)
    r = subprocess.run(
        [flotilla_python, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    if r.returncode != 0:
        raise RuntimeError(f"flotilla is not importable by {flotilla_python}: {r.stderr[-300:]}")
    src = r.stdout.strip()
    python = str(RAY_VENV / "bin" / "python")
    extra = {"PYTHONPATH": src, "FLOTILLA_BACKEND": "ray"}
    versions = probe_versions(flotilla_python, ["flotilla"])
    versions.update(probe_versions(python, ["ray", "uvicorn", "starlette"]))
    versions["flotilla from"] = src
    return System("flotilla-ray", python, render_app("flotilla"), versions, extra)


def ray_system() -> System:
    python = str(RAY_VENV / "bin" / "python")
    versions = probe_versions(python, ["ray", "uvicorn", "starlette"])
    return System("ray", python, render_app("ray"), versions)


def bare_system(python: str) -> System:
    return System("bare", python, BARE_APP, probe_versions(python, ["uvicorn", "starlette"]))


def ensure_ray(spec: str, log: Path) -> str | None:
    """Install `spec` (e.g. ray[serve]==2.60.0) into bench/.venv-ray unless it is there.
    Returns None when ready, else why not."""
    python = RAY_VENV / "bin" / "python"
    want = spec.split("==", 1)[1] if "==" in spec else None
    if python.exists():
        try:
            have = probe_versions(str(python), ["ray", "fastapi"])
            if have["ray"] != "missing" and (want is None or have["ray"] == want):
                return None
        except Exception:
            pass
    print(f"[bench] installing {spec} into {RAY_VENV} (takes a few minutes) ...", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        for argv in (
            [sys.executable, "-m", "venv", str(RAY_VENV)],
            [str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"],
            [str(python), "-m", "pip", "install", "-q", spec],
        ):
            COMMANDS.append(shlex.join(argv))
            if subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                return f"`{shlex.join(argv)}` failed; see {log}"
    return None


def ensure_flotilla_deps(flotilla_python: str, log: Path) -> str | None:
    """pip-install flotilla's requirements (not flotilla itself: it comes from PYTHONPATH)
    into bench/.venv-ray, for flotilla-ray; pip leaves those already there as they are.
    Returns None when ready, else why not."""
    code = (
        "import importlib.metadata as m\n"
        "print('\\n'.join(r for r in m.requires('flotilla') or [] if 'extra ==' not in r))\n"
    )
    r = subprocess.run([flotilla_python, "-c", code], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return f"could not read flotilla's requirements: {r.stderr.strip()[-300:]}"
    reqs = [x for x in r.stdout.splitlines() if x.strip()]
    argv = [str(RAY_VENV / "bin" / "python"), "-m", "pip", "install", "-q", *reqs]
    COMMANDS.append(shlex.join(argv))
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        if subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            return f"`{shlex.join(argv)}` failed; see {log}"
    return None


def _free_port() -> int:
    """A free TCP port outside Ray's default worker port range (10002-19999)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port


class RayCluster:
    """One local Ray instance (`ray start --head --block`, its own temp dir and ports) that
    the drivers of flotilla-ray and ray join in turn (`init(address=...)`).

    `ray start --block` stays the parent of Ray's daemons (GCS, raylet, ...; the raylet of
    the workers), so the instance is one process tree below the orchestrator. Stop: SIGTERM to
    it (Ray drains and stops its processes), then whatever of the tree is left is killed by
    PID."""

    # Serve processes that must not outlive the driver that made them.
    SERVE_ROLES = ("controller", "proxy", "replica")

    def __init__(self, python: str, env: dict[str, str], log_dir: Path, num_cpus: int) -> None:
        self.python = python
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))  # short: Ray's socket paths
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / "ray-cluster.log"
        self.log: IO[bytes] = open(self.log_path, "ab")  # noqa: SIM115
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        # Ray 2.60's `ray start` turns on token authentication, which a plain ray.init (the
        # private instances of the other runs) does not: off, as there.
        self.client_env = {"RAY_AUTH_MODE": "disabled"}
        ray = str(Path(python).parent / "ray")
        argv = [
            ray, "start", "--head", "--block", f"--num-cpus={num_cpus}",
            "--include-dashboard=false", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", f"--port={port}",
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--temp-dir={self.tmp}",
        ]  # fmt: skip
        COMMANDS.append(shlex.join(argv))
        env = {**env, **self.client_env, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        self.t_start = time.monotonic()
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=OUT,
        )
        procs.POPEN_PIDS.add(self.popen.pid)
        self.pid = self.popen.pid
        self.seen: dict[tuple[int, int], procs.Proc] = {}

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Wait until `ray start` says the node is up; returns the seconds it took."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"`ray start` exited with code {self.popen.returncode}; see {self.log_path}"
                )
            if b"Ray runtime started" in self.log_path.read_bytes():
                self.snapshot()
                return time.monotonic() - self.t_start
            time.sleep(0.2)
        raise TimeoutError(f"`ray start` not ready within {timeout:.0f} s; see {self.log_path}")

    def snapshot(self) -> list[procs.Proc]:
        members = procs.tree(self.pid)
        for p in members:
            self.seen[(p.pid, p.start)] = p
        return members

    def serve_procs(self) -> list[procs.Proc]:
        """The instance's processes that belong to a Serve app (controller, proxy, replica)."""
        out = []
        for pid, role in procs.roles(self.pid, None, "ray_start").items():
            p = procs.read_proc(pid) if role in self.SERVE_ROLES else None
            if p is not None:
                out.append(p)
        return out

    def clear(self, system: System, log: IO[bytes]) -> None:
        """After a driver exited: its Serve processes in the instance should be gone (its
        actors end with it; Ray Serve's detached controller with `serve.shutdown()`). Any
        still there after 10 s: `serve.shutdown()` from a new driver (Ray Serve), then kill
        by PID; either is recorded."""
        self.snapshot()
        left = procs.wait_gone(self.serve_procs(), 10.0)
        if not left:
            return
        LEFTOVERS.append(
            f"{system.name}: {len(left)} Serve process(es) still in the Ray instance 10 s "
            f"after the driver exited: {', '.join(' '.join(procs.cmdline(p.pid))[:60] for p in left)}"
        )
        if system.name == "ray":
            code = (
                "import ray; from ray import serve\n"
                f"ray.init(address={self.address!r}, log_to_driver=False)\n"
                "serve.shutdown()\n"
            )
            argv = [system.python, "-c", code]
            COMMANDS.append(shlex.join(argv))
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(
                    argv, stdout=log, stderr=log, env=system.env(), cwd=OUT, timeout=120
                )
            left = procs.wait_gone(left, 10.0)
        if left:
            LEFTOVERS.append(f"{system.name}: killed {len(left)} of them by PID")
            procs.kill_procs(left)
            procs.wait_gone(left, 5.0)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM to `ray start --block` (Ray drains and stops its processes), then kill
        by PID what is left of the tree; Ray's logs are copied into the run's log folder."""
        if self.popen.poll() is None:
            self.snapshot()
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            LEFTOVERS.append(f"ray instance: `ray start` did not exit within {timeout:.0f} s")
            self.popen.kill()
            self.popen.wait()
        procs.POPEN_PIDS.discard(self.pid)
        reap_leftovers(self.seen.values(), "ray instance", "`ray start` exited")
        kill_orphans("ray instance (re-parented)")
        logs = self.tmp / "session_latest" / "logs"
        with contextlib.suppress(OSError, shutil.Error):
            shutil.copytree(logs, self.log_dir / "ray-cluster-logs", symlinks=False)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.log.close()


def ensure_wrk() -> str | None:
    """Find wrk, or install it from apt. Returns None when ready, else why not."""
    if shutil.which("wrk"):
        return None
    print("[bench] installing wrk from apt ...", flush=True)
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    for argv in (
        [*sudo, "apt-get", "install", "-y", "-q", "wrk"],
        [*sudo, "apt-get", "update", "-q"],
        [*sudo, "apt-get", "install", "-y", "-q", "wrk"],
    ):
        COMMANDS.append(shlex.join(argv))
        subprocess.run(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        )
        if shutil.which("wrk"):
            return None
    return "wrk is missing and `apt-get install wrk` failed"
