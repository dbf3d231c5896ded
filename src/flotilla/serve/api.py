"""The serving API: run, start, delete, status, shutdown, and handle look-ups."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flotilla._private import codepickle, context, frontdoor
from flotilla._private.args import check as check_kwargs
from flotilla._private.client import Runtime
from flotilla.serve.asgi import ASGI_ATTR
from flotilla.serve.config import (
    HTTPOptions,
    LoggingConfig,
    gRPCOptions,
    validate,
    warn_not_honoured,
)
from flotilla.serve.deployments import Application, Deployment, map_nested, walk_deployments
from flotilla.serve.exceptions import ConfigError, DeploymentNotFoundError, RayServeException
from flotilla.serve.handle import DeploymentHandle, SplitHandle
from flotilla.serve.legacy import ServeControllerClient
from flotilla.serve.schema import ReplicaContext, ServeStatus

logger = logging.getLogger("flotilla")

__all__ = [
    "delete",
    "delete_shadow",
    "delete_traffic",
    "get_app_handle",
    "get_deployment_handle",
    "get_replica_context",
    "run",
    "set_shadow",
    "set_traffic",
    "shutdown",
    "start",
    "status",
]

_WAIT_STEP_S = 5.0


def _check_route_prefix(route_prefix: str | None) -> None:
    if route_prefix is None:
        return
    if not isinstance(route_prefix, str) or not route_prefix.startswith("/"):
        raise ConfigError(f"Invalid route_prefix {route_prefix!r}, must start with a forward slash ('/').")
    if route_prefix != "/" and route_prefix.endswith("/"):
        raise ConfigError(f"Invalid route_prefix {route_prefix!r}, may not end with a trailing '/'.")
    if "{" in route_prefix or "}" in route_prefix:
        raise ConfigError(f"Invalid route_prefix {route_prefix!r}, may not contain wildcards.")


#: Ray's `serve.start` arguments accepted and ignored (with a one-time warning), and why.
START_IGNORED = {
    "detached": "a cluster started by a driver lives as long as it; `flotilla start` starts one that outlives every driver",
    "dedicated_cpu": "the proxy reserves no CPU",
    "tracing_config": "flotilla traces every request itself (GET /api/flotilla/trace/?id=<request id>, "
                      "docs: Latency breakdown and traces); it has no OpenTelemetry exporter to configure",
    "controller_options": "flotilla's controller takes its options from flotilla.init and the environment",
}
#: Ray's `serve.run` arguments accepted and ignored (with a one-time warning), and why.
RUN_IGNORED = {
    "controller_options": "flotilla's controller takes its options from flotilla.init and the environment",
}
#: Arguments Ray's `serve.run` no longer has; refused with what to use instead.
RUN_REFUSED = {
    "host": "removed from serve.run in Ray 2; use serve.start(http_options={'host': ...})",
    "port": "removed from serve.run in Ray 2; use serve.start(http_options={'port': ...})",
}


def start(
    proxy_location: Any = None,
    http_options: dict[str, Any] | HTTPOptions | None = None,
    grpc_options: dict[str, Any] | gRPCOptions | None = None,
    logging_config: dict[str, Any] | LoggingConfig | None = None,
    **kwargs: Any,
) -> ServeControllerClient:
    """Start the HTTP proxy (default 127.0.0.1:8000). Implicit in `serve.run`.

    Returns a `ServeControllerClient` (Ray 1.x's client: `get_handle`, `list_deployments`,
    `delete_deployment`, `shutdown`); modern code ignores it.

    `proxy_location` (or `http_options["location"]`): "EveryNode" (the default) runs a proxy
    on every Ray node on the Ray backend, all on the same port; "HeadOnly" one, on the head's
    machine (on the local backend both mean that); "Disabled" none (handles only).
    `logging_config` applies to the proxy's log (level, encoding, access log, folder).
    `grpc_options` (a dict or `gRPCOptions`): a gRPC server in the proxy, on the HTTP host
    (needs `flotilla[grpc]`); off when its port is 0 or it has no servicer functions.

    Raises:
        TypeError: an unknown keyword argument (Ray's `detached` and `dedicated_cpu` are
            accepted with a warning).
        ImportError: `grpc_options` without grpcio installed.
    """
    if http_options is None and isinstance(proxy_location, (dict, HTTPOptions)):
        http_options, proxy_location = proxy_location, None  # http_options given first, as it once was
    if kwargs.get("detached") is False:  # Ray 1.x's default, and what happens here anyway
        del kwargs["detached"]
    check_kwargs("serve.start", kwargs, ("http_options", "proxy_location", "logging_config", "grpc_options"), START_IGNORED)
    opts = _http_options(http_options, proxy_location)
    options = frontdoor.driver_options(opts.model_dump())  # API keys hashed, middlewares pickled
    grpc = _grpc_options(grpc_options)
    if grpc is not None:
        options["grpc_options"] = grpc
    lc = _logging_config(logging_config)
    if lc is not None:
        options["logging_config"] = lc
        warn_not_honoured(
            "serve.start(logging_config=...)",
            "applied to the HTTP proxy's log; the head process (controller) keeps logging TEXT "
            "at INFO to head.log on the local backend. Deployments take theirs from "
            "@serve.deployment(logging_config=...) or serve.run(logging_config=...).",
        )
    rt = Runtime.get_or_start()
    url = rt.call_head("start_http", options, timeout=60)
    if url:
        logger.info("HTTP proxy listening at %s", url)
        if http_options is not None:
            _warn_if_kept(url, opts)
    elif opts.proxy_disabled:
        logger.info("HTTP proxy disabled (location=%s): applications answer handles only", opts.location)
    return ServeControllerClient()


def _warn_if_kept(url: str, opts: HTTPOptions) -> None:
    """Warn when the proxy that answers is not where these options asked for one (it ran
    already, with other options, which stay until serve.shutdown())."""
    from urllib.parse import urlsplit

    where = urlsplit(url)
    differ = [name for name, want, got in (("host", opts.host, where.hostname), ("port", opts.port, where.port))
              if name in opts.model_fields_set and want not in (None, 0) and str(want).strip("[]") != str(got)]
    if differ:
        logger.warning(
            "serve.start(http_options=...) ignored %s: the HTTP proxy already runs at %s and keeps "
            "its options until serve.shutdown()", ", ".join(f"{n}={getattr(opts, n)!r}" for n in differ), url)


def _grpc_options(value: dict[str, Any] | gRPCOptions | None) -> dict[str, Any] | None:
    """Validated gRPC options as a plain dict, or None when gRPC stays off."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = validate(gRPCOptions, value, "grpc_options", field_prefix="grpc_options.")
    if not isinstance(value, gRPCOptions):
        raise ConfigError(f"grpc_options must be a dict or a gRPCOptions, got {type(value).__name__}")
    if not value.enabled:
        return None
    try:
        import grpc  # noqa: F401
    except ImportError:
        raise ImportError(
            "serve.start(grpc_options=...) needs grpcio: pip install 'flotilla[grpc]'"
        ) from None
    # The proxy imports the servicer functions: it gets the driver's sys.path (as replicas do).
    return {**value.model_dump(), "sys_path": [os.path.abspath(p) if p else os.getcwd() for p in sys.path]}


def _http_options(http_options: dict[str, Any] | HTTPOptions | None, proxy_location: Any = None) -> HTTPOptions:
    if isinstance(http_options, HTTPOptions):
        if proxy_location is None:
            return http_options
        http_options = http_options.model_dump(exclude_unset=True)
    data = dict(http_options or {})
    if proxy_location is not None and "location" not in data:
        data["location"] = getattr(proxy_location, "value", proxy_location)
    return validate(HTTPOptions, data, "http_options")


def _logging_config(value: dict[str, Any] | LoggingConfig | None) -> dict[str, Any] | None:
    """A validated logging config as a plain dict (what travels to the processes), or None."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = validate(LoggingConfig, value, "logging_config", field_prefix="logging_config.")
    if not isinstance(value, LoggingConfig):
        raise ConfigError(f"logging_config must be a dict or a LoggingConfig, got {type(value).__name__}")
    return _absolute_logs_dir(value.model_dump(mode="json"))


def _absolute_logs_dir(config: dict[str, Any]) -> dict[str, Any]:
    """A relative `logs_dir` is relative to the driver's working directory."""
    if config.get("logs_dir"):
        return {**config, "logs_dir": os.path.abspath(config["logs_dir"])}
    return config


_source_hashes: dict[tuple[str, float, int], bytes] = {}


def file_digest(path: str) -> bytes:
    """SHA-256 of a file's content (b"" if unreadable), read again only when it changed."""
    try:
        st = os.stat(path)
        key = (path, st.st_mtime, st.st_size)
        if key not in _source_hashes:
            with open(path, "rb") as f:
                _source_hashes[key] = hashlib.sha256(f.read()).digest()
        return _source_hashes[key]
    except OSError:
        return b""


def _source_hash(obj: Any) -> bytes:
    """A hash of the source file of `obj`'s module: cloudpickle pickles importable classes
    by reference, so a changed file would otherwise leave the version unchanged."""
    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    path = getattr(module, "__file__", None)
    return file_digest(path) if path else b""


def _walk(
    app: Application, app_name: str, out: dict[int, dict[str, Any]], names: dict[int, str],
    app_logging: dict[str, Any] | None = None, app_env: dict[str, str] | None = None,
    code_version: str | None = None,
) -> str:
    """Collect the deployments of an application graph; returns the root's unique name.

    `names`: each bound deployment's name (`walk_deployments`); `app_logging`: the
    application's logging config, for deployments without their own;
    `app_env`: environment variables for all its replicas (a config file's
    `runtime_env.env_vars`; a deployment's own take precedence); `code_version`: set by a
    config file's builder (import path, args, runtime_env and the application's source files),
    it stands for the code and its arguments, whose pickles differ from process to process."""
    if id(app) in out:
        return out[id(app)]["name"]
    dep = app.deployment
    name = names[id(app)]
    out[id(app)] = {"name": name}

    def swap(v: Any) -> Any:
        if isinstance(v, Application):
            return DeploymentHandle(_walk(v, app_name, out, names, app_logging, app_env, code_version), app_name)
        if isinstance(v, Deployment):
            raise ConfigError(
                f"deployment '{v.name}' was passed unbound to another deployment; call "
                f"{v.name}.bind(...) first"
            )
        return v

    args = tuple(map_nested(a, swap) for a in app._args)
    kwargs = {k: map_nested(v, swap) for k, v in app._kwargs.items()}
    cfg = dep.config
    def_bytes = codepickle.dumps(dep.func_or_class)
    try:
        args_bytes = codepickle.dumps((args, kwargs))
    except Exception as e:
        raise ConfigError(f"the arguments bound to deployment '{name}' cannot be pickled: {e}") from e
    config = cfg.model_dump(mode="json")
    config["name"] = name
    logging_config = config["logging_config"] = _absolute_logs_dir(config["logging_config"] or app_logging or {}) or None
    # What a running replica cannot change in place: a change starts new replicas.
    env = {**(app_env or {}), **cfg.ray_actor_options.runtime_env.get("env_vars", {})}
    replica_opts = json.dumps([
        config["ray_actor_options"], config["max_batch_size"], config["batch_wait_timeout_s"],
        config.get("batch_latency_target_s"),
        config["placement_group_bundles"], (logging_config or {}).get("logs_dir"),
        *([env] if app_env else []),
        *([config["placement_group_bundle_label_selector"]] if config.get("placement_group_bundle_label_selector") else []),
    ], sort_keys=True)
    if code_version is not None:
        code = f"{code_version}:{getattr(dep.func_or_class, '__qualname__', '')}:{name}".encode()
    else:
        code = def_bytes + _source_hash(dep.func_or_class) + args_bytes
    version = hashlib.sha256(code + replica_opts.encode()).hexdigest()[:16]
    out[id(app)] = {
        "name": name,
        "config": config,
        "def_bytes": def_bytes,
        "args_bytes": args_bytes,
        "version": version,
        "initial_replicas": cfg.initial_replicas,
        "demand": cfg.demand(),
        "env": env,
        "sys_path": [os.path.abspath(p) if p else os.getcwd() for p in sys.path],
        "cwd": os.getcwd(),
    }
    if cfg.request_router_config is not None and cfg.request_router_config.is_custom:
        out[id(app)]["router_cls"] = cfg.request_router_config.serialized_class
    return name


def run(
    target: Application,
    blocking: bool = False,
    name: str = "default",
    route_prefix: str | None = "/",
    logging_config: dict[str, Any] | LoggingConfig | None = None,
    _local_testing_mode: bool = False,
    external_scaler_enabled: bool = False,
    _blocking: bool = True,
    **_ray_compat: Any,
) -> DeploymentHandle:
    """Deploy an application and wait until it is running; returns the ingress handle.

    Re-running with the same name updates the app in place: unchanged deployments keep
    their replicas, a new `user_config` or `logging_config` is applied in place, and changed
    code or options replace replicas without failing accepted requests.

    `logging_config` applies to the application's deployments that set none themselves.
    `external_scaler_enabled`: the REST API's `POST /api/v1/applications/<name>/deployments/
    <deployment>/scale` may set its deployments' replica counts (Ray 2.60's external scaling).

    Raises:
        TypeError: `target` is not a bound application, or an unknown keyword argument.
        ConfigError: bad route prefix, or the prefix is used by another application.
        RuntimeError: the application failed to deploy (the user's traceback is included).
    """
    check_kwargs("serve.run", _ray_compat, _RUN_PARAMS, RUN_IGNORED, RUN_REFUSED)
    spec = _checked_spec("serve.run()", target, name, route_prefix, logging_config)
    spec["external_scaler_enabled"] = bool(external_scaler_enabled)
    if _local_testing_mode:
        warn_not_honoured(
            "_local_testing_mode",
            "the local backend always runs an application in its own processes (a head, a "
            "proxy, one process per replica), which is already light; the application runs "
            "as serve.run normally does.",
        )
    [handle] = _deploy([(target, spec)], _blocking)
    if blocking:
        _block_forever()
    return handle


def _run(target: Application, _blocking: bool = True, name: str = "default", route_prefix: str | None = "/",
         logging_config: dict[str, Any] | LoggingConfig | None = None, **kwargs: Any) -> DeploymentHandle:
    """Ray's private `serve._run` (used by Ray's own tests and some examples): `serve.run`
    with `_blocking=False` to return before the application runs."""
    return run(target, name=name, route_prefix=route_prefix, logging_config=logging_config, _blocking=_blocking,
               **kwargs)


def _checked_spec(who: str, target: Any, name: Any, route_prefix: str | None,
                  logging_config: dict[str, Any] | LoggingConfig | None,
                  app_env: dict[str, str] | None = None) -> dict[str, Any]:
    """The `deploy_app` spec of one application, its arguments checked first (`app_env`:
    environment variables for all its replicas)."""
    if isinstance(target, Deployment):
        raise TypeError(f"{who} needs a bound application: call {target.name}.bind(...) first")
    if not isinstance(target, Application):
        raise TypeError(f"{who} needs an Application (from Deployment.bind()), got {type(target).__name__}")
    _check_route_prefix(route_prefix)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"application name must be a non-empty string, got {name!r}")
    route_prefix = _deployment_route_prefix(who, target, route_prefix)
    return app_spec(target, name, route_prefix, _logging_config(logging_config), app_env)


def _deployment_route_prefix(who: str, target: Application, route_prefix: str | None) -> str | None:
    """The application's route prefix given a `route_prefix` deployment option (Ray 1.x's,
    which `.deploy()` uses; Ray 2.60 refuses it): the ingress's is used where `who` was given
    the default "/", any other is ignored; either way a warning says what to write instead."""
    for _, node in walk_deployments(target):
        dep = node.deployment
        if "route_prefix" not in dep._options:
            continue
        given = dep._options["route_prefix"]
        if node is target and given == route_prefix:  # `.deploy()`, or the same prefix given twice
            continue
        call = (who.replace("()", f"(..., route_prefix={given!r})") if who.endswith("()")
                else f"{who} with route_prefix={given!r}")
        if node is target and route_prefix == "/" and given is not None:
            _check_route_prefix(given)
            message = (f"deployment '{dep.name}' sets route_prefix={given!r}, a Ray 1.x deployment option: "
                       f"the application is served there. Write {call} instead (Ray Serve 2.60 refuses "
                       "the deployment option).")
            route_prefix = given
        else:
            message = (f"deployment '{dep.name}' sets route_prefix={given!r}, a Ray 1.x deployment option "
                       f"that {who} ignores (it applies to the ingress deployment, and only where {who} is "
                       f"given no route_prefix): the application is served at {route_prefix!r}.")
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=4)
    return route_prefix


def _deploy(apps: list[tuple[Application, dict[str, Any]]], wait: bool) -> list[DeploymentHandle]:
    """Deploy checked applications (the HTTP proxy started first if one has a route); with
    `wait`, return once each is RUNNING. Returns their ingress handles, in order."""
    rt = Runtime.get_or_start()
    if any(spec["route_prefix"] is not None for _, spec in apps) and rt.call_head("http_url") is None:
        start()
    handles = []
    for target, spec in apps:
        doctor_warnings(rt, target, spec)
        rt.call_head("deploy_app", spec)
        handle = DeploymentHandle(spec["ingress"], spec["name"])
        handle._warm_up()
        handles.append(handle)
    if wait:
        for _, spec in apps:
            _wait_running(rt, spec["name"])
            url, prefix = rt.call_head("http_url"), spec["route_prefix"]
            if url and prefix is not None:
                logger.info("Application '%s' is ready at %s%s", spec["name"], url, "" if prefix == "/" else prefix)
    return handles


def app_spec(target: Application, name: str, route_prefix: str | None,
             app_logging: dict[str, Any] | None = None, app_env: dict[str, str] | None = None,
             code_version: str | None = None) -> dict[str, Any]:
    """What `deploy_app` sends the head for an application (serve.run and config builds)."""
    collected: dict[int, dict[str, Any]] = {}
    nodes = walk_deployments(target)
    names = {id(node): n for n, node in nodes}
    if sum(hasattr(node.deployment.func_or_class, ASGI_ATTR) for _, node in nodes) > 1:
        raise RayServeException(
            f'Found multiple FastAPI deployments in application "{name}". Please only include one '
            "deployment with @serve.ingress in your application to avoid this issue.")
    ingress = _walk(target, name, collected, names, app_logging, app_env, code_version)
    return {"name": name, "route_prefix": route_prefix, "ingress": ingress, "deployments": list(collected.values())}


def doctor_warnings(rt: Runtime, target: Application, spec: dict[str, Any],
                    env: dict[str, str] | None = None) -> list[Any]:
    """Log the config doctor's findings for an application being deployed (WARNING on the
    `flotilla` logger), once per deployment version; a deploy never fails for them."""
    from flotilla._private import doctor

    try:
        totals = dict(rt.call_head("cluster_resources")) if rt.backend == "ray" else dict(rt.resources)
    except Exception:
        return []
    versions = {d["name"]: d["version"] for d in spec["deployments"]}
    return doctor.deploy_warnings(target, spec["name"], totals, versions, env)


_RUN_PARAMS = tuple(p for p in inspect.signature(run).parameters if p not in ("target", "_ray_compat"))


@dataclass
class RunTarget:
    """One application for `run_many`: what `serve.run` takes besides `blocking`."""

    target: Application
    name: str = "default"
    route_prefix: str | None = "/"
    logging_config: dict[str, Any] | LoggingConfig | None = None
    external_scaler_enabled: bool = False


def run_many(
    targets: Sequence[RunTarget],
    blocking: bool = False,
    wait_for_ingress_deployment_creation: bool = True,
    wait_for_applications_running: bool = True,
    _local_testing_mode: bool = False,
    controller_options: Any = None,
) -> list[DeploymentHandle]:
    """Deploy several applications at once (as Ray Serve's `run_many`); returns their ingress
    handles in order. All are checked before any is deployed: a bad target, or two with the
    same name or route prefix, deploys none. With `wait_for_applications_running` (the
    default) it returns once every one is RUNNING, raising for one that failed; the ingress
    deployments exist once it returns either way (`wait_for_ingress_deployment_creation`)."""
    if not targets:
        raise ValueError("No applications provided.")
    apps: list[tuple[Application, dict[str, Any]]] = []
    for t in targets:
        if not isinstance(t, RunTarget):
            raise TypeError(f"serve.run_many() takes RunTarget(target=..., name=...) items, got {type(t).__name__}")
        spec = _checked_spec(f"RunTarget '{t.name}'", t.target, t.name, t.route_prefix, t.logging_config)
        for _, other in apps:
            if other["name"] == t.name:
                raise ConfigError(f"two RunTargets are named '{t.name}': application names must be unique")
            if t.route_prefix is not None and other["route_prefix"] == t.route_prefix:
                raise ConfigError(f"two RunTargets use route_prefix '{t.route_prefix}': give each application its own")
        spec["external_scaler_enabled"] = bool(t.external_scaler_enabled)
        apps.append((t.target, spec))
    if _local_testing_mode:
        warn_not_honoured("_local_testing_mode", "the local backend always runs applications in processes of their own")
    if controller_options is not None:
        warn_not_honoured("controller_options", "flotilla's controller takes its options from flotilla.init and "
                          "the environment")
    handles = _deploy(apps, wait_for_applications_running)
    if blocking:
        _block_forever()
    return handles


def _wait_running(rt: Runtime, name: str) -> None:
    last_log = time.monotonic()
    while True:
        status, message = rt.call_head("wait_app", name, _WAIT_STEP_S, timeout=_WAIT_STEP_S + 30)
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            raise RuntimeError(f"Deploying application {name} failed: {message}")
        if status == "NOT_STARTED":
            raise RuntimeError(f"Application {name} was deleted while it was being deployed.")
        if time.monotonic() - last_log > 10 and message:
            logger.warning("Application '%s' is still %s: %s", name, status, message)
            last_log = time.monotonic()


def _block_forever() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("shutting down")
        import flotilla

        flotilla.shutdown()


def delete(name: str, _blocking: bool = True) -> None:
    """Delete an application: drain and stop its replicas, remove its route."""
    if Runtime.existing() is None:
        return
    rt = Runtime.current()  # (raises if its cluster is gone)
    rt.call_head("delete_app", name)
    if _blocking:
        rt.call_head("wait_deleted", name, 60.0, timeout=90)


def status() -> ServeStatus:
    """Status of the proxy, every application and its deployments."""
    rt = Runtime.existing()
    if rt is None:
        return ServeStatus()
    return rt.call_head("status")


async def shutdown_async() -> None:
    """`shutdown` for async code: the same, without blocking the caller's event loop."""
    await asyncio.get_running_loop().run_in_executor(None, shutdown)


def shutdown() -> None:
    """Delete every application and stop the proxy. The cluster (flotilla.init) stays up,
    except on a Ray cluster joined with an address: there the controller actor is stopped too
    (as Ray Serve's is), and the next `serve.run` or `serve.start` starts a new one."""
    rt = Runtime._instance
    if rt is None:
        return
    rt.call_head("serve_shutdown", timeout=120)
    if rt.actor is not None:
        import flotilla

        with flotilla._init_lock:
            if Runtime._instance is rt:
                Runtime._instance = None
            rt.stop_controller()


#: Handles given out by `get_app_handle` / `get_deployment_handle`, by (deployment, app): the
#: same call gives the same handle, as Ray's client caches them; for the runtime they were
#: made under (a new cluster starts a new cache).
_handles: tuple[Any, dict[tuple[str, str], DeploymentHandle]] = (None, {})


def _cached_handle(rt: Runtime | None, deployment_name: str, app_name: str) -> DeploymentHandle:
    global _handles
    if _handles[0] is not rt:
        _handles = (rt, {})
    cache = _handles[1]
    h = cache.get((deployment_name, app_name))
    if h is None:
        h = cache[(deployment_name, app_name)] = DeploymentHandle(deployment_name, app_name)
    return h


def get_app_handle(name: str) -> DeploymentHandle:
    """A handle to the ingress deployment of application `name`; for the name of a traffic
    split (`set_traffic`), a handle that sends each call to one of its applications by weight."""
    rt = Runtime.existing()
    info = rt.call_head("app_info", name) if rt is not None else None
    if info is None:
        raise RayServeException(f"Application '{name}' does not exist.")
    if "split" in info:
        return SplitHandle(name)
    return _cached_handle(rt, info["ingress"], name)


#: How far from 1 the weights of a traffic split may add up.
WEIGHT_TOLERANCE = 1e-6


def _check_traffic(name: str, traffic: Any) -> dict[str, float]:
    """The weights as a plain dict of floats, or ValueError naming the bad entry."""
    if not isinstance(traffic, dict) or not traffic:
        raise ValueError(f"traffic for split '{name}' must be a non-empty dict of application name -> weight, got {traffic!r}")
    out: dict[str, float] = {}
    for app, w in traffic.items():
        if not isinstance(app, str) or not app:
            raise ValueError(f"traffic for split '{name}': key {app!r} is not an application name")
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ValueError(f"traffic for split '{name}': weight of '{app}' must be a number, got {w!r}")
        w = float(w)
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"traffic for split '{name}': weight of '{app}' must be a non-negative number, got {w!r}")
        out[app] = w
    total = math.fsum(out.values())
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise ValueError(
            f"traffic for split '{name}': weights must add up to 1, but {out} add up to {total:g}")
    return out


def set_traffic(
    name: str,
    traffic: dict[str, float],
    *,
    route_prefix: str | None = None,
    sticky_header: str | None = None,
    sticky_cookie: str | None = None,
) -> None:
    """Create or update the traffic split `name`: HTTP requests at `route_prefix` (default
    `/{name}`) go to the ingress of one of the applications named in `traffic`, by weight.

    Weights are non-negative and add up to 1. The applications keep their own routes; the
    path below the split's prefix reaches the chosen application as if requested under its
    own prefix. With `sticky_header` (or `sticky_cookie`), the application is chosen by a
    stable hash of that header's (cookie's) value: one value always gets the same application
    while the weights stay the same; requests without it are drawn at random by weight.
    Changing the weights swaps the proxy's route table at once; no request is dropped.
    `serve.get_app_handle(name)` gives a handle that splits calls by the same weights.

    Raises:
        ValueError: bad weights (negative, not numbers, not adding up to 1), naming the entry.
        ConfigError: an application that does not exist, a prefix another application or
            split uses, a name that is an application's, or a bad route prefix.
    """
    spec = _split_spec(name, route_prefix, sticky_header, sticky_cookie)
    spec["traffic"] = _check_traffic(name, traffic)
    _split_runtime().call_head("set_traffic", spec)


def _split_spec(name: Any, route_prefix: str | None, sticky_header: str | None,
                sticky_cookie: str | None) -> dict[str, Any]:
    """What every split has, checked: its name, prefix and sticky key."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a traffic split needs a non-empty name, got {name!r}")
    prefix = f"/{name}" if route_prefix is None else route_prefix
    _check_route_prefix(prefix)
    if sticky_header is not None and sticky_cookie is not None:
        raise ValueError("give sticky_header or sticky_cookie, not both")
    for what, v in (("sticky_header", sticky_header), ("sticky_cookie", sticky_cookie)):
        if v is not None and (not isinstance(v, str) or not v):
            raise ValueError(f"{what} must be a non-empty string, got {v!r}")
    return {"name": name, "route_prefix": prefix, "sticky_header": sticky_header, "sticky_cookie": sticky_cookie}


def _split_runtime() -> Runtime:
    rt = Runtime.get_or_start()
    if rt.call_head("http_url") is None:
        start()
    return rt


def start_canary(
    name: str,
    old: str,
    new: str,
    *,
    steps: tuple[float, ...] | list[float] = (0.01, 0.1, 0.5, 1.0),
    hold_s: float = 60.0,
    max_error_rate_increase: float = 0.01,
    max_p95_ratio: float = 1.5,
    p95_slack_ms: float = 5.0,
    min_requests: int = 20,
    route_prefix: str | None = None,
    sticky_header: str | None = None,
    sticky_cookie: str | None = None,
) -> None:
    """Roll traffic on the split `name` (at `route_prefix`, default `/{name}`) from application
    `old` to application `new` in `steps` (the new one's share), each held `hold_s` seconds.

    A step is promoted only while the new version's error rate (5xx) stays within
    `max_error_rate_increase` of the old one's and its p95 latency within `max_p95_ratio`
    times the old one's plus `p95_slack_ms`, judged once it has `min_requests` requests in the step; a breach
    rolls all traffic back to `old` at once. The last step (1.0) held within bounds promotes
    `new`. `serve.status().traffic[name].canary` shows the phase, step, both versions' figures
    and the reason for the last decision; each decision is logged and counted in
    `flotilla_canary_decisions_total`. A later `set_traffic(name, ...)` takes the weights back
    (the canary stops); `delete_traffic(name)` removes the split.

    Raises:
        ValueError: bad steps or bounds (naming them), or `old` == `new`.
        ConfigError: an application that does not exist, or a prefix in use.
    """
    from flotilla._private.canary import CanaryConfig

    spec = _split_spec(name, route_prefix, sticky_header, sticky_cookie)
    for what, app in (("old", old), ("new", new)):
        if not isinstance(app, str) or not app:
            raise ValueError(f"canary '{name}': {what} must be an application name, got {app!r}")
    if old == new:
        raise ValueError(f"canary '{name}': old and new are the same application ({old!r})")
    config = CanaryConfig(steps=tuple(steps), hold_s=hold_s, max_error_rate_increase=max_error_rate_increase,
                          max_p95_ratio=max_p95_ratio, p95_slack_ms=p95_slack_ms, min_requests=min_requests)
    spec.update(old=old, new=new, config={
        "steps": config.steps, "hold_s": config.hold_s, "max_error_rate_increase": config.max_error_rate_increase,
        "max_p95_ratio": config.max_p95_ratio, "p95_slack_ms": config.p95_slack_ms,
        "min_requests": config.min_requests,
    })
    _split_runtime().call_head("start_canary", spec)


def delete_traffic(name: str) -> None:
    """Remove the traffic split `name` and its route (its applications keep running).

    Raises:
        RayServeException: there is no traffic split of that name."""
    rt = Runtime.existing()
    if rt is None or not rt.call_head("delete_traffic", name):
        raise RayServeException(f"Traffic split '{name}' does not exist.")


def set_shadow(name: str, target: str, fraction: float, *, max_queue: int = 100) -> None:
    """Mirror `fraction` of the HTTP requests on route `name` (an application's route, or a
    traffic split's from `set_traffic`) to application `target`.

    The client's request is served as before; a copy chosen at random (method, headers, the
    path below the route's prefix moved under the target's prefix, the body when at most
    1 MiB) is queued in the proxy and sent to `target` in the background, its answer read and
    discarded. Each proxy keeps at most `max_queue` copies waiting; more are dropped. Outcomes
    (ok, error, dropped, skipped) and latency are exported as `flotilla_shadow_requests_total`
    and `flotilla_shadow_latency_ms`. Calling it again replaces the route's shadow.

    Raises:
        ValueError: `fraction` not in (0, 1], or `max_queue` not a positive integer.
        ConfigError: `name` is not an application with a route nor a split, or `target` is
            not an application (the message lists those that exist).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"set_shadow needs a route name (an application or a traffic split), got {name!r}")
    if not isinstance(target, str) or not target:
        raise ValueError(f"set_shadow needs a target application name, got {target!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (0 < fraction <= 1):
        raise ValueError(f"fraction for the shadow of '{name}' must be a number in (0, 1], got {fraction!r}")
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
        raise ValueError(f"max_queue for the shadow of '{name}' must be a positive integer, got {max_queue!r}")
    rt = Runtime.get_or_start()
    if rt.call_head("http_url") is None:
        start()
    rt.call_head("set_shadow", {"route": name, "target": target, "fraction": float(fraction), "max_queue": max_queue})


def delete_shadow(name: str) -> None:
    """Stop mirroring route `name`'s requests (`set_shadow`).

    Raises:
        RayServeException: route `name` has no shadow."""
    rt = Runtime.existing()
    if rt is None or not rt.call_head("delete_shadow", name):
        raise RayServeException(f"Route '{name}' has no shadow traffic.")


def get_deployment_handle(deployment_name: str, app_name: str | None = None, _check_exists: bool = True,
                          _record_telemetry: bool = True) -> DeploymentHandle:
    """A handle to deployment `deployment_name` of `app_name` (default: this replica's app;
    outside a replica it must be given, as in Ray). `_check_exists=False` (Ray's) skips asking
    the head. Raises DeploymentNotFoundError (a KeyError, as Ray's) if it does not exist."""
    if app_name is None:
        ctx = context.replica_context
        if ctx is None:
            raise RayServeException("Please specify an application name when getting a deployment handle "
                                    "outside of a Serve application.")
        app_name = ctx.app_name
    rt = Runtime.existing()
    if _check_exists and rt is not None and not rt.in_loop():
        info = rt.call_head("status")
        app = info.applications.get(app_name)
        if app is None or deployment_name not in app.deployments:
            raise DeploymentNotFoundError(f"Deployment(name='{deployment_name}', app='{app_name}') does not exist.")
    return _cached_handle(rt, deployment_name, app_name)


def get_replica_context() -> ReplicaContext:
    """Inside a replica: which app, deployment and replica this is."""
    ctx = context.replica_context
    if ctx is None:
        raise RayServeException(
            "`serve.get_replica_context()` may only be called from within a deployment's replica."
        )
    return ctx


def get_deployment_actor(actor_name: str) -> Any:
    """Ray 2.60's handle to a deployment-scoped actor (`deployment_actors`): flotilla creates
    none, so this raises ValueError (as Ray's does for an actor it does not know)."""
    raise ValueError(
        f"No deployment-scoped actor named {actor_name!r}: flotilla does not create the actors of a "
        "deployment's deployment_actors option (on either backend). Create the actor yourself (on the "
        "Ray backend, with ray.remote) and pass its handle to the deployment's constructor.")


def get_deployment_actor_context() -> Any:
    """Ray 2.60's context of a deployment-scoped actor, for code running in one: flotilla
    creates no such actors, so this raises RayServeException (as Ray's does outside one)."""
    raise RayServeException(
        "`serve.get_deployment_actor_context()` may only be called from within a deployment-scoped actor, "
        "and flotilla creates none (the deployment_actors option is accepted and ignored).")


def get_trace_context() -> dict[str, str] | None:
    """Ray's OpenTelemetry trace context of the request being served: None here (flotilla's
    own traces are keyed by the request id, `serve.get_request_context().request_id`)."""
    return None
