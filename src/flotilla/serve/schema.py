"""Status objects returned by `serve.status()`, shaped and named as Ray Serve's."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flotilla.serve.config import LoggingConfig as LoggingConfig
    from flotilla.serve.deploy_schema import DeploymentSchema as DeploymentSchema
    from flotilla.serve.deploy_schema import ServeApplicationSchema as ServeApplicationSchema
    from flotilla.serve.deploy_schema import ServeDeploySchema as ServeDeploySchema
    from flotilla.serve.gang import GangContext

_CONFIG_SCHEMAS = ("DeploymentSchema", "ServeApplicationSchema", "ServeDeploySchema", "HTTPOptionsSchema")
#: Ray's REST details models (`serve.details`).
_DETAILS = ("APIType", "ApplicationDetails", "DeploymentDetails", "ProxyDetails", "ReplicaDetails",
            "ServeActorDetails", "ServeInstanceDetails")
#: Ray's names in `ray.serve.schema` for option models that live in `serve.config` here.
_OPTION_SCHEMAS = {"RayActorOptionsSchema": "RayActorOptions", "gRPCOptionsSchema": "gRPCOptions",
                   "ProxyLocation": "ProxyLocation", "TracingConfig": "TracingConfig",
                   "AutoscalingConfig": "AutoscalingConfig", "BackpressureConfig": "BackpressureConfig",
                   "RequestRouterConfig": "RequestRouterConfig", "GangSchedulingConfig": "GangSchedulingConfig",
                   "DeploymentActorConfig": "DeploymentActorConfig", "ControllerOptions": "ControllerOptions",
                   "ScaleDeploymentRequest": "ScaleDeploymentRequest"}


def __getattr__(name: str) -> Any:
    # `from flotilla.serve.schema import LoggingConfig`, as Ray users write it, without making
    # every process that reads status objects import pydantic (the config-file schemas too).
    if name == "LoggingConfig":
        from flotilla.serve.config import LoggingConfig

        return LoggingConfig
    if name in _CONFIG_SCHEMAS:
        from flotilla.serve import deploy_schema

        return getattr(deploy_schema, name)
    if name in _DETAILS:
        from flotilla.serve import details

        return getattr(details, name)
    if name in _OPTION_SCHEMAS:
        from flotilla.serve import config

        return getattr(config, _OPTION_SCHEMAS[name])
    raise AttributeError(f"module 'flotilla.serve.schema' has no attribute {name!r}")


class EncodingType(str, Enum):
    """Encodings of `LoggingConfig.encoding`."""

    TEXT = "TEXT"
    JSON = "JSON"


class ApplicationStatus(str, Enum):
    NOT_STARTED = "NOT_STARTED"
    DEPLOYING = "DEPLOYING"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    RUNNING = "RUNNING"
    UNHEALTHY = "UNHEALTHY"
    DELETING = "DELETING"


class DeploymentStatus(str, Enum):
    UPDATING = "UPDATING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    UPSCALING = "UPSCALING"
    DOWNSCALING = "DOWNSCALING"


class DeploymentStatusTrigger(str, Enum):
    UNSPECIFIED = "UNSPECIFIED"
    CONFIG_UPDATE_STARTED = "CONFIG_UPDATE_STARTED"
    CONFIG_UPDATE_COMPLETED = "CONFIG_UPDATE_COMPLETED"
    UPSCALE_COMPLETED = "UPSCALE_COMPLETED"
    DOWNSCALE_COMPLETED = "DOWNSCALE_COMPLETED"
    AUTOSCALING = "AUTOSCALING"
    REPLICA_STARTUP_FAILED = "REPLICA_STARTUP_FAILED"
    HEALTH_CHECK_FAILED = "HEALTH_CHECK_FAILED"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    DELETING = "DELETING"


class ReplicaState(str, Enum):
    """Replica lifecycle: STARTING -> RUNNING -> STOPPING; RUNNING <-> UPDATING (reconfigure).

    A replica waiting for resources is STARTING (its status message says what is short).
    """

    STARTING = "STARTING"
    UPDATING = "UPDATING"
    RECOVERING = "RECOVERING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    PENDING_MIGRATION = "PENDING_MIGRATION"


class ProxyStatus(str, Enum):
    STARTING = "STARTING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DRAINING = "DRAINING"
    DRAINED = "DRAINED"


@dataclass
class AutoscalingStatus:
    """flotilla extra: what the autoscaler aims for and why."""

    target_replicas: int
    running_replicas: int
    last_decision: str = ""
    last_decision_time_s: float = 0.0


@dataclass
class ReplicaMemory:
    """flotilla extra: one replica process's memory in bytes (local backend). `uss_bytes`:
    private, freed when it exits; `shared_bytes`: resident pages other processes map too
    (e.g. weights shared copy-on-write); `pss_bytes`: private plus its share of each shared
    page; `rss_bytes`: private plus shared, which over-counts shared pages across replicas."""

    rss_bytes: int
    pss_bytes: int
    uss_bytes: int
    shared_bytes: int


@dataclass
class DeploymentStatusOverview:
    status: DeploymentStatus
    status_trigger: DeploymentStatusTrigger = DeploymentStatusTrigger.UNSPECIFIED
    replica_states: dict[str, int] = field(default_factory=dict)  # state name (ReplicaState's value) -> count
    message: str = ""
    target_num_replicas: int = 0
    autoscaling: AutoscalingStatus | None = None
    #: flotilla extra: live findings on its running replicas ({code, severity, deployment,
    #: message, fix}; see `flotilla doctor`), empty when there are none.
    findings: list[dict[str, str]] = field(default_factory=list)
    #: flotilla extra: replica id -> its process's memory at the last sample; empty until the
    #: first sample (`FLOTILLA_CPU_SAMPLE_S`) and on the Ray backend.
    replica_memory: dict[str, ReplicaMemory] = field(default_factory=dict)
    #: flotilla extra: the memory of its version's `fork_after_init` template (which holds the
    #: one copy its replicas share), None when it has none.
    template_memory: ReplicaMemory | None = None


@dataclass
class ApplicationStatusOverview:
    status: ApplicationStatus
    message: str = ""
    last_deployed_time_s: float = 0.0
    deployments: dict[str, DeploymentStatusOverview] = field(default_factory=dict)
    route_prefix: str | None = None


@dataclass
class CanaryStatus:
    """flotilla extra: a canary rollout on a traffic split (`serve.start_canary`).

    `phase`: RUNNING, PROMOTED or ROLLED_BACK; `share`: the new version's share now; `step`:
    1-based index into `steps`; `old_figures` / `new_figures`: requests, errors (5xx), error
    rate and p95 latency (ms) of the old version since the canary began and of the new one
    since its step began; `reason`: why the last decision was taken."""

    phase: str
    old: str
    new: str
    share: float
    step: int
    steps: list[float] = field(default_factory=list)
    reason: str = ""
    last_decision_time_s: float = 0.0
    old_figures: dict[str, Any] = field(default_factory=dict)
    new_figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrafficStatus:
    """flotilla extra: a traffic split (`serve.set_traffic`), as `ServeStatus.traffic[name]`."""

    route_prefix: str
    traffic: dict[str, float] = field(default_factory=dict)
    sticky_header: str | None = None
    sticky_cookie: str | None = None
    message: str = ""
    canary: CanaryStatus | None = None


@dataclass
class ShadowStatus:
    """flotilla extra: shadow traffic on a route (`serve.set_shadow`), as `ServeStatus.shadows[route]`."""

    route_prefix: str | None
    target: str
    fraction: float
    max_queue: int = 100
    message: str = ""


@dataclass
class ServeStatus:
    proxies: dict[str, ProxyStatus] = field(default_factory=dict)
    applications: dict[str, ApplicationStatusOverview] = field(default_factory=dict)
    target_capacity: float | None = None
    #: flotilla extra: traffic splits by name (`serve.set_traffic`).
    traffic: dict[str, TrafficStatus] = field(default_factory=dict)
    #: flotilla extra: shadowed routes by route name (`serve.set_shadow`).
    shadows: dict[str, ShadowStatus] = field(default_factory=dict)


@dataclass(frozen=True)
class DeploymentID:
    name: str
    app_name: str = "default"

    def __str__(self) -> str:
        return f"Deployment(name='{self.name}', app='{self.app_name}')"

    __repr__ = __str__


#: Where a full replica id string starts (`ReplicaID.to_full_id_str`), as in Ray Serve.
REPLICA_ID_FULL_ID_STR_PREFIX = "SERVE_REPLICA::"


@dataclass(frozen=True)
class ReplicaID:
    unique_id: str
    deployment_id: DeploymentID

    def to_full_id_str(self) -> str:
        d = self.deployment_id
        return f"{REPLICA_ID_FULL_ID_STR_PREFIX}{d.app_name + '#' if d.app_name else ''}{d.name}#{self.unique_id}"

    @staticmethod
    def is_full_id_str(s: str) -> bool:
        return s.startswith(REPLICA_ID_FULL_ID_STR_PREFIX)

    @classmethod
    def from_full_id_str(cls, s: str) -> ReplicaID:
        parts = s[len(REPLICA_ID_FULL_ID_STR_PREFIX):].split("#") if cls.is_full_id_str(s) else []
        if len(parts) not in (2, 3):
            raise ValueError(f"{s!r} is not a full replica id string "
                             f"('{REPLICA_ID_FULL_ID_STR_PREFIX}app#deployment#id' or '...deployment#id').")
        app = parts[0] if len(parts) == 3 else ""
        return cls(parts[-1], DeploymentID(parts[-2], app))

    def __str__(self) -> str:
        d = self.deployment_id
        return f"Replica(id='{self.unique_id}', deployment='{d.name}', app='{d.app_name}')"

    __repr__ = __str__


class ReplicaRank(int):
    """A replica's rank in its deployment: `rank` (0..N-1 across the deployment), `node_rank`
    (its node's, among the deployment's nodes) and `local_rank` (among the deployment's
    replicas on its node). It is also the int `rank`, so code written for either form works."""

    node_rank: int
    local_rank: int

    def __new__(cls, rank: int = 0, node_rank: int = 0, local_rank: int = 0) -> ReplicaRank:
        self = super().__new__(cls, rank)
        self.node_rank = int(node_rank)
        self.local_rank = int(local_rank)
        return self

    @property
    def rank(self) -> int:
        return int(self)

    @property
    def parts(self) -> tuple[int, int, int]:
        """(rank, node_rank, local_rank): what tells two ranks apart (`==` compares the int)."""
        return (int(self), self.node_rank, self.local_rank)

    def model_dump(self) -> dict[str, int]:
        return {"rank": int(self), "node_rank": self.node_rank, "local_rank": self.local_rank}

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (ReplicaRank, (int(self), self.node_rank, self.local_rank))

    def __repr__(self) -> str:
        return f"ReplicaRank(rank={int(self)}, node_rank={self.node_rank}, local_rank={self.local_rank})"

    def __str__(self) -> str:
        return str(int(self))


@dataclass
class ReplicaContext:
    """What `serve.get_replica_context()` returns inside a replica."""

    app_name: str
    deployment: str
    replica_tag: str
    replica_id: ReplicaID
    servable_object: Any = None
    rank: ReplicaRank = field(default_factory=ReplicaRank)
    world_size: int = 1
    #: Ray 2.60's gang of a gang-scheduled deployment (`serve.gang.GangContext`): None here,
    #: replicas are placed one at a time.
    gang_context: GangContext | None = None
    #: The deployment's code version: a hash of its code, arguments and replica options (of
    #: the config file's `code_version` when one is given); a new one starts new replicas.
    code_version: str | None = None
