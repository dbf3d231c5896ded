"""Applying a config file (Ray's `ServeDeploySchema`) in the head: `flotilla deploy`,
`PUT /api/serve/applications/`, `flotilla run config.yaml`.

The head never imports user code, so each application that is new or changed is built by a
short-lived *builder* process (`python -m flotilla._private.builder`): a driver that attaches to
this head, imports the application, applies the file's deployment options over the code's, and
deploys it as `serve.run` would (a rollout like any other; unchanged deployments keep their
replicas, a changed `user_config` is applied in place). Meanwhile the application shows as
DEPLOYING; a build that fails shows as DEPLOY_FAILED with the error, and whatever ran before
keeps running.

Applying a file: validate it (nothing changes if it is bad); delete every application deployed
from a config that is not in it (as Ray does; those deployed by `serve.run` stay); scale every
config application to its `target_capacity`; start a build for every application whose entry
changed (an identical entry changes nothing: applying the same file twice is a no-op). The latest applied config is kept in
the session folder (`applied.json`), so it survives a head restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from flotilla._private import cluster, frontdoor

logger = logging.getLogger("flotilla.deployer")

#: How long a builder may take to import and deploy an application.
BUILD_TIMEOUT_S = float(os.environ.get("FLOTILLA_BUILD_TIMEOUT_S", "120"))


@dataclass
class Build:
    app: dict[str, Any]
    state: str = "BUILDING"  # BUILDING, DONE, FAILED
    message: str = ""
    started: float = field(default_factory=time.time)
    task: asyncio.Task[None] | None = None
    pid: int = 0


class Deployer:
    def __init__(self, head: Any) -> None:
        self.head = head
        self.path = os.path.join(head.session_dir, "applied.json")
        self.applied: dict[str, Any] | None = None
        self.builds: dict[str, Build] = {}
        with contextlib.suppress(OSError, ValueError), open(self.path) as f:
            self.applied = json.load(f)

    def _save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.applied, f)
        os.replace(tmp, self.path)

    async def apply(self, data: Any, cwd: str | None = None, source: str = "request body",
                    pythonpath: str | None = None) -> None:
        """Validate and apply a config; raises ConfigError (naming the field) before anything
        changes when it is bad. `cwd` and `pythonpath`: where the deploying command ran, and
        its PYTHONPATH (the CLI on this machine sends both): builders import from there."""
        from flotilla.serve.deploy_schema import validate_config

        new = validate_config(data, source).to_dict()
        c = self.head.controller
        opts = self._proxy_options(new, cwd, pythonpath)
        if self.head.proxy.options is None:
            await self.head.proxy.start(opts)
        elif opts != self.head.proxy.options and isinstance(data, dict) and (
                "http_options" in data or "proxy_location" in data):
            logger.warning("config: the HTTP proxy keeps its options %s (a running proxy is not changed by a "
                           "config; the file asks for %s)", frontdoor.redact(self.head.proxy.options), frontdoor.redact(opts))
        wanted = {a["name"]: a for a in new.get("applications", [])}
        for name, live in list(c.apps.items()):
            if name not in wanted and live.declarative:  # as Ray's: serve.run's applications stay
                logger.info("config: deleting application %r (not in the applied config)", name)
                c.delete_app(name)
        for name in list(self.builds):
            if name not in wanted:
                self._cancel(name)
        old = {a["name"]: a for a in (self.applied or {}).get("applications", [])}
        c.set_target_capacity(new.get("target_capacity"), self.applied is not None and set(old) == set(wanted))
        app_logging = new.get("logging_config")
        for name, app in wanted.items():
            b = self.builds.get(name)
            unchanged = old.get(name) == app and (self.applied or {}).get("logging_config") == app_logging
            live = name in c.apps and not c.apps[name].deleting
            if unchanged and (live or (b is not None and b.state == "BUILDING")):
                continue
            self._cancel(name)
            self._start(app, app_logging, cwd, pythonpath)
        self.applied = new
        self._save()
        self.head.checkpoint_soon()

    def _proxy_options(self, new: dict[str, Any], cwd: str | None = None,
                       pythonpath: str | None = None) -> dict[str, Any]:
        """The proxy's options from a config: as `serve.start` builds them (API keys from
        FLOTILLA_API_KEYS, TLS files checked), plus its gRPC ingress; servicer modules are
        imported from where the deploying command ran."""
        from flotilla.serve.config import HTTPOptions, gRPCOptions, validate

        data = dict(new.get("http_options") or {})
        loc = new.get("proxy_location")
        if loc is not None and "location" not in data:
            data["location"] = loc
        opts: dict[str, Any] = frontdoor.driver_options(validate(HTTPOptions, data, "http_options").model_dump())
        if new.get("grpc_options"):
            grpc = validate(gRPCOptions, new["grpc_options"], "grpc_options", field_prefix="grpc_options.")
            if grpc.enabled:
                path = [p for p in (pythonpath or "").split(os.pathsep) if p]
                opts["grpc_options"] = {**grpc.model_dump(), "sys_path": [cwd or os.getcwd(), *path, *sys.path]}
        return opts

    def _cancel(self, name: str) -> None:
        b = self.builds.pop(name, None)
        if b is not None and b.task is not None and not b.task.done():
            b.task.cancel()

    def _start(self, app: dict[str, Any], app_logging: Any, cwd: str | None, pythonpath: str | None) -> None:
        b = Build(app)
        self.builds[app["name"]] = b
        b.task = asyncio.get_running_loop().create_task(self._build(b, app_logging, cwd, pythonpath))

    async def _build(self, b: Build, app_logging: Any, cwd: str | None, pythonpath: str | None) -> None:
        app = b.app
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
        env.update((app.get("runtime_env") or {}).get("env_vars") or {})
        env[cluster.ADDRESS_ENV] = self.head.session_dir
        env.pop(cluster.NAMESPACE_ENV, None)
        env.pop("FLOTILLA_BACKEND", None)
        base = cwd if cwd and os.path.isdir(cwd) else os.getcwd()
        wd = os.path.join(base, (app.get("runtime_env") or {}).get("working_dir") or "")
        if not os.path.isdir(wd):
            b.state = "FAILED"
            b.message = f"runtime_env.working_dir {wd!r} is not a directory on the cluster's machine"
            return
        log_path = os.path.join(self.head.session_dir, "logs", f"build-{app['name']}.log")
        payload = json.dumps({"app": app, "logging_config": app_logging})
        logger.info("config: building application %r from %s (in %s)", app["name"], app.get("import_path"), wd)
        proc = None
        try:
            with open(log_path, "ab") as log:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "flotilla._private.builder", payload,
                    cwd=wd, env=env, stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE, stderr=log, start_new_session=True,
                )
            b.pid = proc.pid
            out, _ = await asyncio.wait_for(proc.communicate(), BUILD_TIMEOUT_S)
            result = _last_json(out)
            if proc.returncode == 0 and result.get("ok"):
                b.state, b.message = "DONE", ""
                logger.info("config: application %r built and deployed", app["name"])
                for line in result.get("findings") or []:
                    logger.warning("config: application %r: %s", app["name"], line)
            else:
                b.state = "FAILED"
                b.message = result.get("error") or (
                    f"the builder process exited with code {proc.returncode}; see {log_path}")
                logger.error("config: application %r failed to build: %s", app["name"], b.message)
        except TimeoutError:
            b.state = "FAILED"
            b.message = (f"building the application (importing {app.get('import_path')} and deploying it) "
                         f"took longer than {BUILD_TIMEOUT_S:g}s (FLOTILLA_BUILD_TIMEOUT_S); see {log_path}")
            logger.error("config: %s", b.message)
        except asyncio.CancelledError:
            b.state = "FAILED"
            raise
        finally:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(Exception):
                    await asyncio.shield(proc.wait())

    def overlay(self, status: Any) -> Any:
        """`status` with applications being built shown DEPLOYING, failed builds DEPLOY_FAILED."""
        from flotilla.serve.schema import ApplicationStatus, ApplicationStatusOverview

        for name, b in self.builds.items():
            app = status.applications.get(name)
            if b.state == "BUILDING":
                msg = f"building the application from {b.app.get('import_path')!r} (builder pid {b.pid})"
                if app is None:
                    status.applications[name] = ApplicationStatusOverview(
                        ApplicationStatus.DEPLOYING, msg, route_prefix=b.app.get("route_prefix"))
                else:
                    app.status, app.message = ApplicationStatus.DEPLOYING, msg
            elif b.state == "FAILED":
                if app is None:
                    status.applications[name] = ApplicationStatusOverview(
                        ApplicationStatus.DEPLOY_FAILED, b.message, route_prefix=b.app.get("route_prefix"))
                else:
                    app.status, app.message = ApplicationStatus.DEPLOY_FAILED, b.message
        return status

    def app_config(self, name: str) -> dict[str, Any] | None:
        for app in (self.applied or {}).get("applications", []):
            if app["name"] == name:
                return dict(app)
        return None

    def forget(self) -> None:
        """Every application was deleted (DELETE, serve.shutdown): no applied config."""
        for name in list(self.builds):
            self._cancel(name)
        self.applied = None
        self.head.controller.set_target_capacity(None, False)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _last_json(out: bytes) -> dict[str, Any]:
    for line in reversed(out.decode(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    return value
    return {}
