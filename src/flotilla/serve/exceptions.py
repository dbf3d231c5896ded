"""Errors of the serving layer, named as in `ray.serve.exceptions`.

```
RayServeException
 ├── BackPressureError          max_queued_requests exceeded (HTTP 503)
 ├── DeploymentUnavailableError  the deployment has been deleted or never existed
 ├── ReplicaUnavailableError    the replica a request was on went away
 ├── RequestCancelledError      the request was cancelled (also a flotilla.exceptions.TaskCancelledError)
 ├── ConfigError                invalid deployment or application options (also ValueError/TypeError)
 ├── DeploymentNotFoundError    serve.get_deployment_handle of one that does not exist (also KeyError, as Ray raises)
 ├── MethodNotFoundError        a call of a method the deployment lacks (also AttributeError)
 └── ExternalScalerDisabledError the scaling API used on an application without external_scaler_enabled
gRPCStatusError                 raised in a gRPC method to answer with a status code (serve.grpc_util)
```
"""

from __future__ import annotations

from flotilla.exceptions import TaskCancelledError


class RayServeException(Exception):
    """Base of the serving layer's errors."""


class BackPressureError(RayServeException):
    """A request was rejected because the deployment's queue is full. Raised out of an HTTP
    request's code (a call to another deployment that was refused), it is the HTTP answer:
    `status_code` (503, or the deployment's `backpressure_config`) with `Retry-After` when
    `retry_after_s` is set."""

    def __init__(self, num_queued_requests: int, max_queued_requests: int, status_code: int = 503,
                 retry_after_s: float | None = None) -> None:
        self.num_queued_requests = num_queued_requests
        self.max_queued_requests = max_queued_requests
        self.status_code = status_code
        self.retry_after_s = retry_after_s
        super().__init__(num_queued_requests, max_queued_requests, status_code, retry_after_s)

    @property
    def message(self) -> str:
        return (
            f"Request dropped due to backpressure (num_queued_requests={self.num_queued_requests}, "
            f"max_queued_requests={self.max_queued_requests}). Add replicas or raise "
            "max_queued_requests."
        )

    def __str__(self) -> str:
        return self.message


class DeploymentUnavailableError(RayServeException):
    """The deployment a handle points at is not running (deleted, or never deployed)."""


class RequestCancelledError(RayServeException, TaskCancelledError):
    """The request was cancelled before it finished (`response.cancel()`): raised by waiting for
    its result or its stream's next item. Also a `TaskCancelledError`, the name older Ray used."""

    def __init__(self, request_id: str | None = None) -> None:
        self.request_id = request_id
        super().__init__(f"Request {request_id} was cancelled." if request_id else "Request was cancelled.")

    def __reduce__(self):  # one optional argument, not the message
        return (RequestCancelledError, (self.request_id,))


class ReplicaUnavailableError(RayServeException):
    """The replica a request was on became unavailable (Ray's name)."""


class DeploymentNotFoundError(RayServeException, KeyError):
    """`serve.get_deployment_handle` of a deployment that does not exist: a KeyError, as Ray raises."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MethodNotFoundError(RayServeException, AttributeError):
    """A call of a method the deployment does not have (an AttributeError too)."""


def __getattr__(name: str) -> object:
    if name == "gRPCStatusError":  # defined with the gRPC helpers; Ray exports it here too
        from flotilla.serve.grpc_util import gRPCStatusError

        return gRPCStatusError
    raise AttributeError(f"module 'flotilla.serve.exceptions' has no attribute {name!r}")


class ExternalScalerDisabledError(RayServeException):
    """`POST /api/v1/applications/<app>/deployments/<name>/scale` on an application deployed
    without `external_scaler_enabled=True` (HTTP 412)."""


class ConfigError(RayServeException, ValueError, TypeError):
    """Invalid options. The message names the field, the bad value and what is allowed."""
