"""Ray Serve-compatible public API: `from flotilla import serve`.

Names are loaded on first use, so internal processes that only need `serve.schema` or
`serve.exceptions` do not pay for the whole API (pydantic, cloudpickle, ...).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Application": "deployments",
    "AutoscalingConfig": "config",
    "Deployment": "deployments",
    "DeploymentConfig": "config",
    "DeploymentHandle": "handle",
    "DeploymentResponse": "handle",
    "DeploymentResponseGenerator": "handle",
    "HTTPOptions": "config",
    "batch": "batching",
    "delete": "api",
    "delete_shadow": "api",
    "delete_traffic": "api",
    "deployment": "deployments",
    "get_app_handle": "api",
    "get_deployment": "legacy",
    "get_deployment_handle": "api",
    "get_deployment_actor": "api",
    "get_deployment_actor_context": "api",
    "get_trace_context": "api",
    "ControllerOptions": "config",
    "TracingConfig": "config",
    "get_multiplexed_model_id": "multiplex",
    "get_request_context": "multiplex",
    "get_replica_context": "api",
    "ingress": "asgi",
    "list_deployments": "legacy",
    "multiplexed": "multiplex",
    "RunTarget": "api",
    "run": "api",
    "_run": "api",
    "run_many": "api",
    "set_shadow": "api",
    "set_traffic": "api",
    "start_canary": "api",
    "shutdown": "api",
    "shutdown_async": "api",
    "start": "api",
    "status": "api",
}

# Submodules reachable as attributes right after `from flotilla import serve`, as in Ray
# (`serve.metrics.Counter(...)`, `serve.schema.LoggingConfig`).
_SUBMODULES = frozenset({"api", "autoscaling_policy", "batching", "config", "context", "exceptions", "gang", "generated",
                         "grpc_util", "handle", "metrics", "multiplex", "request_router", "schema"})

__all__ = [
    "Application",
    "AutoscalingConfig",
    "Deployment",
    "DeploymentConfig",
    "DeploymentHandle",
    "DeploymentResponse",
    "DeploymentResponseGenerator",
    "HTTPOptions",
    "RunTarget",
    "batch",
    "delete",
    "delete_shadow",
    "delete_traffic",
    "deployment",
    "get_app_handle",
    "get_deployment",
    "get_deployment_handle",
    "get_multiplexed_model_id",
    "get_replica_context",
    "get_request_context",
    "ingress",
    "list_deployments",
    "multiplexed",
    "run",
    "run_many",
    "set_shadow",
    "set_traffic",
    "shutdown",
    "shutdown_async",
    "start",
    "start_canary",
    "status",
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"flotilla.serve.{name}")
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'flotilla.serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"flotilla.serve.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from flotilla.serve import config as config
    from flotilla.serve import context as context
    from flotilla.serve import exceptions as exceptions
    from flotilla.serve import handle as handle
    from flotilla.serve import metrics as metrics
    from flotilla.serve import schema as schema
    from flotilla.serve.api import (
        RunTarget,
        delete,
        delete_shadow,
        delete_traffic,
        get_app_handle,
        get_deployment_handle,
        get_replica_context,
        run,
        run_many,
        set_shadow,
        set_traffic,
        shutdown,
        shutdown_async,
        start,
        start_canary,
        status,
    )
    from flotilla.serve.batching import batch
    from flotilla.serve.config import AutoscalingConfig, DeploymentConfig, HTTPOptions
    from flotilla.serve.deployments import Application, Deployment, deployment
    from flotilla.serve.handle import (
        DeploymentHandle,
        DeploymentResponse,
        DeploymentResponseGenerator,
    )
    from flotilla.serve.legacy import get_deployment, list_deployments
