"""Ray Serve's REST "details" models (`ServeInstanceDetails` and the models inside it), for
parsing what `GET /api/serve/applications/` returns: `ServeInstanceDetails(**response.json())`.

Fields are Ray's (2.60); extra keys are allowed, since flotilla adds a few (each replica's
memory figures).
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from flotilla.serve.schema import (
    ApplicationStatus,
    DeploymentStatus,
    DeploymentStatusTrigger,
    ProxyStatus,
    ReplicaState,
)

__all__ = ["APIType", "ApplicationDetails", "DeploymentDetails", "ProxyDetails", "ReplicaDetails",
           "ServeActorDetails", "ServeInstanceDetails"]


class APIType(str, Enum):
    """How an application was deployed: `serve.run` (imperative) or a config file (declarative)."""

    UNKNOWN = "unknown"
    IMPERATIVE = "imperative"
    DECLARATIVE = "declarative"


class ServeActorDetails(BaseModel):
    """Where a Serve process runs."""

    model_config = ConfigDict(extra="allow", frozen=True)

    node_id: str | None = None
    node_ip: str | None = None
    node_instance_id: str | None = None
    actor_id: str | None = None
    actor_name: str | None = None
    worker_id: str | None = None
    log_file_path: str | None = None


class ReplicaDetails(ServeActorDetails):
    replica_id: str
    state: ReplicaState
    pid: int | None = None
    start_time_s: float | None = None


class ProxyDetails(ServeActorDetails):
    status: ProxyStatus


class DeploymentDetails(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    status: DeploymentStatus
    status_trigger: DeploymentStatusTrigger
    message: str = ""
    deployment_config: dict[str, Any] = Field(default_factory=dict)
    target_num_replicas: int = Field(0, ge=0)
    required_resources: dict[str, float] = Field(default_factory=dict)
    replicas: list[ReplicaDetails] = Field(default_factory=list)


class ApplicationDetails(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    route_prefix: str | None = None
    docs_path: str | None = None
    status: ApplicationStatus
    message: str = ""
    last_deployed_time_s: float = 0.0
    deployed_app_config: dict[str, Any] | None = None
    source: APIType = APIType.UNKNOWN
    deployments: dict[str, DeploymentDetails] = Field(default_factory=dict)
    external_scaler_enabled: bool = False


class ServeInstanceDetails(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    controller_info: ServeActorDetails = Field(default_factory=ServeActorDetails)
    proxy_location: str | None = None
    http_options: dict[str, Any] | None = None
    grpc_options: dict[str, Any] | None = None
    proxies: dict[str, ProxyDetails] = Field(default_factory=dict)
    applications: dict[str, ApplicationDetails] = Field(default_factory=dict)
    target_capacity: float | None = None
