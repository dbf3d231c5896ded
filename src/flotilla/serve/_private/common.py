"""Names Ray Serve users import from `ray.serve._private.common`."""

from flotilla.serve.schema import (
    ApplicationStatus,
    DeploymentID,
    DeploymentStatus,
    DeploymentStatusTrigger,
    ProxyStatus,
    ReplicaID,
    ReplicaState,
)

__all__ = [
    "ApplicationStatus",
    "DeploymentID",
    "DeploymentStatus",
    "DeploymentStatusTrigger",
    "ProxyStatus",
    "ReplicaID",
    "ReplicaState",
]
