"""flotilla: Ray Serve's API, faster and lighter, on one machine by default.

```python
import flotilla
from flotilla import serve

flotilla.init()            # optional: serve.run() calls it for you
```
"""

from __future__ import annotations

import os
import threading
from typing import Any

__version__ = "0.1.0"
__all__ = [
    "__version__",
    "available_resources",
    "cluster_resources",
    "dashboard_url",
    "init",
    "is_initialized",
    "metrics_url",
    "shutdown",
]

_init_lock = threading.Lock()


def _detect_gpus() -> int:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return len([d for d in env.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len([n for n in os.listdir("/proc/driver/nvidia/gpus")])
    except OSError:
        return 0


def _detect_memory() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) * 0.7
    except (ValueError, OSError):
        return 0.0


_LOCAL_ONLY = "the local backend runs everything on this machine, in its own processes"
#: Arguments of Ray's `ray.init` accepted and ignored (with a one-time warning), and why.
INIT_IGNORED = {
    **dict.fromkeys(
        ("labels", "object_store_memory", "local_mode", "job_config",
         "enable_resource_isolation", "cgroup_path", "system_reserved_cpu", "system_reserved_memory",
         "proxy_server_url", "_enable_object_reconstruction", "_plasma_directory", "_node_ip_address",
         "_driver_object_store_memory", "_memory", "_redis_password", "_system_config",
         "_tracing_startup_hook", "_node_name"),
        _LOCAL_ONLY,
    ),
    **dict.fromkeys(("configure_logging", "logging_level", "logging_format", "logging_config"),
                    "replica and proxy logs are written under the session's logs/ folder"),
    "runtime_env": "set env_vars per deployment with ray_actor_options={'runtime_env': {'env_vars': ...}}",
    "_temp_dir": "session folders live in the system temporary folder",
}


def init(
    address: str | None = None,
    *,
    backend: str | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    resources: dict[str, float] | None = None,
    ignore_reinit_error: bool = False,
    metrics_export_port: int | None = None,
    _metrics_export_port: int | None = None,
    log_to_driver: bool | None = None,
    **_ray_compat: Any,
) -> None:
    """Start flotilla on this machine (a head process that owns replicas and the proxy), or
    join a Ray cluster: with an address (or RAY_ADDRESS) the controller is a detached Ray actor
    that this driver creates or attaches to, and that outlives it (see `shutdown`).

    Args:
        address: local backend: None or "local" start a private cluster that stops with this
            process; "auto" attaches to the running cluster of `namespace` (`flotilla start`),
            as does a REST URL ("http://127.0.0.1:8265") or a session folder; the cluster
            outlives this driver. Default: the FLOTILLA_ADDRESS environment variable. Ray backend: None (or "local") starts
            a private local Ray instance (unless RAY_ADDRESS is set: then it joins that),
            "auto", "host:6379" or "ray://host:10001" join that Ray cluster (`ray.init(address=...)`).
        backend: "local" (default: this machine, its own processes) or "ray" (replicas are Ray
            actors placed by Ray). Default: the FLOTILLA_BACKEND environment variable, else
            "ray" when `address` names a Ray cluster, else "local". Needs
            `pip install "flotilla[ray]"`.
        num_cpus, num_gpus: override what is detected on this machine, e.g. to declare GPUs
            on a machine without any and test placement.
        resources: custom resources, e.g. {"accelerator_type:A100": 1, "my_res": 4}.
        ignore_reinit_error: do nothing, instead of raising, if already initialized.
        namespace: the cluster to attach to with an address (`flotilla start --namespace`;
            default: FLOTILLA_NAMESPACE, else "default"); on the Ray backend, Ray's namespace.
        metrics_export_port: port of the Prometheus endpoint on 127.0.0.1 (default: the
            FLOTILLA_METRICS_PORT environment variable, else a free port; see `metrics_url()`).
            Ray's `_metrics_export_port` is the same.
        log_to_driver: a private local cluster: what replicas print (and their own loggers
            and tracebacks) is shown on this process's stderr, prefixed with the replica, as
            Ray shows its workers' output (default: on, unless FLOTILLA_LOG_TO_DRIVER=0).
        include_dashboard, dashboard_host, dashboard_port: as Ray's, for the dashboard and REST
            API a private local cluster's head serves (see `dashboard_url()`): on unless
            include_dashboard=False, on 127.0.0.1:8265 by default (a free port when 8265 is
            taken; a port given and taken is an error). On the Ray backend they go to `ray.init`
            (Ray's own dashboard) and flotilla's takes 8265 or a free port.

    Other `ray.init` arguments (`INIT_IGNORED`) are accepted with a one-time warning; on the Ray
    backend those in `backend.RAY_INIT_OPTIONS` (runtime_env, namespace, _system_config, ...) go
    to `ray.init`.

    Raises:
        RuntimeError: already initialized (unless ignore_reinit_error), or the head failed to start.
        TypeError: an unknown keyword argument.
        ValueError: negative resource amounts, or an unsupported address.
        ConnectionError: no running cluster at `address` (the message says how to start one).
    """
    from flotilla._private import backend as backends
    from flotilla._private import cluster
    from flotilla._private.args import check
    from flotilla._private.client import Runtime
    from flotilla._private.dashboard import DEFAULT

    if address is None and backend is None and os.environ.get(cluster.ADDRESS_ENV):
        address = os.environ[cluster.ADDRESS_ENV]
    chosen = "local" if backend is None and cluster.is_local_address(address) else backends.select(backend, address)
    namespace = _ray_compat.pop("namespace", None) if chosen == "local" else None
    dashboard: dict[str, Any] | None = None
    if chosen == "local":
        dashboard = _dashboard_options(_ray_compat.pop("include_dashboard", None),
                                       _ray_compat.pop("dashboard_host", None), _ray_compat.pop("dashboard_port", None))
    extra = {k: v for k, v in _ray_compat.items() if not (chosen == "ray" and k in backends.RAY_INIT_OPTIONS)}
    check("flotilla.init", extra, ("address", "backend", "num_cpus", "num_gpus", "resources", "ignore_reinit_error",
                                   "metrics_export_port", "_metrics_export_port", "log_to_driver"), INIT_IGNORED)
    if metrics_export_port is None:
        metrics_export_port = _metrics_export_port

    ray_opts = None
    if chosen == "ray":
        backends.require_ray()
        for name, amount in [("num_cpus", num_cpus), ("num_gpus", num_gpus), *(resources or {}).items()]:
            if amount is not None and amount < 0:
                raise ValueError(f"resource {name!r} must be >= 0, got {amount}")
        passed = {k: v for k, v in _ray_compat.items() if k in backends.RAY_INIT_OPTIONS}
        ray_opts = backends.ray_options(address, num_cpus, num_gpus, resources, passed)

    with _init_lock:
        if Runtime._instance is not None and Runtime._instance.dead:
            rt, Runtime._instance = Runtime._instance, None  # its cluster is gone: start anew
            rt.shutdown()
        if Runtime._instance is not None:
            if ignore_reinit_error:
                return
            raise RuntimeError(
                "flotilla.init() was already called; call flotilla.shutdown() first, or pass "
                "ignore_reinit_error=True"
            )
        if metrics_export_port is None:
            metrics_export_port = int(os.environ.get("FLOTILLA_METRICS_PORT", "0"))
        Runtime._reinit = None
        if ray_opts is not None:
            if backends.detached(address):
                Runtime.start_detached(ray_opts, metrics_export_port)
                Runtime._reinit = {"backend": "ray", "address": address, **passed}
            else:
                Runtime.start_local({}, metrics_export_port, ray=ray_opts, dashboard=dict(DEFAULT))
            return
        if address not in (None, "local"):
            if address != "auto" and not cluster.is_local_address(address):
                raise ValueError(
                    f"address={address!r} is not supported by the local backend; use None, 'auto', "
                    'a flotilla REST URL or a session folder, or backend="ray" to join a Ray cluster'
                )
            for name, given in (("num_cpus", num_cpus), ("num_gpus", num_gpus), ("resources", resources)):
                if given is not None:
                    raise ValueError(f"{name} cannot be set when attaching to a running cluster "
                                     f"(address={address!r}); pass it to `flotilla start` instead")
            try:
                info = cluster.resolve(address, namespace)
            except cluster.NoClusterError as e:
                raise ConnectionError(str(e)) from None
            Runtime.attach_cluster(info)
            return
        if namespace is not None:
            cluster.check_namespace(namespace)
        total: dict[str, float] = {
            "CPU": float(os.cpu_count() or 1) if num_cpus is None else float(num_cpus),
            "GPU": float(_detect_gpus()) if num_gpus is None else float(num_gpus),
            "memory": _detect_memory(),
        }
        for k, v in (resources or {}).items():
            total[k] = float(v)
        for k, v in total.items():
            if v < 0:
                raise ValueError(f"resource {k!r} must be >= 0, got {v}")
        Runtime.start_local(total, metrics_export_port, dashboard=dashboard, log_to_driver=log_to_driver)


def _dashboard_options(include: bool | None, host: str | None, port: int | None) -> dict[str, Any] | None:
    from flotilla._private.dashboard import DEFAULT as DASHBOARD

    if include is False:
        return None
    if port is not None and (not isinstance(port, int) or not 0 <= port < 65536):
        raise ValueError(f"dashboard_port must be a port number, got {port!r}")
    return {"host": host or DASHBOARD["host"], "port": DASHBOARD["port"] if port is None else port,
            "fallback": port is None}


def dashboard_url() -> str | None:
    """URL of the dashboard (and REST API) of the cluster this driver is connected to, e.g.
    "http://127.0.0.1:8265"; None when it runs none (`init(include_dashboard=False)`)."""
    from flotilla._private.client import Runtime

    return Runtime.current().dashboard_url


def is_initialized() -> bool:
    """Whether `init()` has been called (and not shut down) in this process, and its cluster
    still exists (False once the session's keeper process is gone)."""
    from flotilla._private.client import Runtime

    rt = Runtime._instance
    if rt is None and Runtime._forked_from:  # a forked child: its parent's cluster, joined at first use
        return True
    return rt is not None and (rt.process is not None or rt.actor is not None or rt.attached is not None) and not rt.dead


def shutdown() -> None:
    """Stop every application, replica, proxy and the head process. Safe to call twice.

    On a Ray cluster joined with an address (the controller is a detached Ray actor) it only
    disconnects this driver, as `ray.shutdown()` does for Ray Serve: the applications keep
    running; `serve.shutdown()` stops them and the controller."""
    import sys

    from flotilla._private.client import Runtime

    with _init_lock:
        rt = Runtime._instance
        Runtime._instance = None
        Runtime._reinit = None
        if rt is not None:
            rt.shutdown()
        if "flotilla._private.ray_controller" in sys.modules:
            sys.modules["flotilla._private.ray_controller"].release()


def cluster_resources() -> dict[str, float]:
    """Total resources of the cluster."""
    from flotilla._private.client import Runtime

    rt = Runtime.current()
    if rt.backend == "ray":  # Ray's nodes come and go
        return dict(rt.call_head("cluster_resources"))
    return dict(rt.resources)


def available_resources() -> dict[str, float]:
    """Resources not held by replicas right now."""
    from flotilla._private.client import Runtime

    return Runtime.current().call_head("available_resources")


def metrics_url() -> str:
    """URL of the Prometheus endpoint that aggregates every flotilla process."""
    from flotilla._private.client import Runtime

    return f"http://127.0.0.1:{Runtime.current().metrics_port}/metrics"
