"""Validated options: one pydantic model per concept, one source of truth.

`DeploymentConfig` holds everything `@serve.deployment(...)` and `.options(...)` accept;
`RayActorOptions` the per-replica resources; `HTTPOptions` the proxy's. Errors are raised
as `ConfigError` (a `ValueError` and a `TypeError`) whose message names each bad field.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable
from enum import Enum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from flotilla._private.args import json_only
from flotilla._private.autoscaling import (
    AggregationFunction,
    AutoscalingConfig,
    AutoscalingContext,
    AutoscalingPolicy,
    auto_autoscaling_config,
)
from flotilla.serve.exceptions import ConfigError
from flotilla.serve.schema import DeploymentID  # where Ray's policy examples import it from

__all__ = [
    "AggregationFunction",
    "AutoscalingConfig",
    "AutoscalingContext",
    "AutoscalingPolicy",
    "BackpressureConfig",
    "ControllerOptions",
    "DeploymentActorConfig",
    "DeploymentConfig",
    "DeploymentID",
    "GangPlacementStrategy",
    "GangRuntimeFailurePolicy",
    "GangSchedulingConfig",
    "HTTPOptions",
    "LoggingConfig",
    "ProxyLocation",
    "RayActorOptions",
    "RequestRouterConfig",
    "ScaleDeploymentRequest",
    "TracingConfig",
    "validate",
    "warn_not_honoured",
]

_SUPPORTED_RUNTIME_ENV = {"env_vars"}
_IGNORED_RUNTIME_ENV = {"pip", "uv", "conda", "working_dir", "py_modules", "excludes", "container", "config", "image_uri", "py_executable", "nsight", "worker_process_setup_hook"}


def _ray_backend() -> bool:
    """The Ray backend runs (or will: FLOTILLA_BACKEND=ray): runtime_env is Ray's to honour."""
    if os.environ.get("FLOTILLA_BACKEND", "").strip().lower() == "ray":
        return True
    client = sys.modules.get("flotilla._private.client")
    rt = getattr(getattr(client, "Runtime", None), "_instance", None)
    return getattr(rt, "backend", "local") == "ray"


class RayActorOptions(BaseModel):
    """Resources and environment of each replica (the `ray_actor_options` dict)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica (fractional allowed).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; fractions share a GPU.")
    memory: float | None = Field(None, ge=0, description="Bytes of memory reserved per replica.")
    object_store_memory: float | None = Field(None, ge=0, description="Accepted for compatibility; unused locally.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom resources per replica.")
    accelerator_type: str | None = Field(None, description="Required accelerator, e.g. 'A100'.")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="Only env_vars applies locally.")

    @model_validator(mode="before")
    @classmethod
    def _none_is_default(cls, data: Any) -> Any:
        """`{"num_cpus": None}` means the default, as Ray takes it."""
        if isinstance(data, dict) and any(data.get(k, 0) is None for k in ("num_cpus", "num_gpus")):
            data = {k: v for k, v in data.items() if not (k in ("num_cpus", "num_gpus") and v is None)}
        return data

    @field_validator("num_gpus")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"num_gpus above 1 must be a whole number, got {v}")
        return v

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        for key, amount in v.items():
            if key in ("CPU", "GPU", "memory"):
                raise ValueError(f"use num_cpus/num_gpus/memory instead of resources[{key!r}]")
            if amount < 0:
                raise ValueError(f"resources[{key!r}] must be >= 0, got {amount}")
        return v

    @field_validator("runtime_env")
    @classmethod
    def _runtime_env(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if key in _IGNORED_RUNTIME_ENV:
                if _ray_backend():
                    continue  # Ray sets the environment up
                warnings.warn(
                    f"runtime_env[{key!r}] is ignored by the local backend: install dependencies "
                    "in the driver's environment instead",
                    UserWarning,
                    stacklevel=2,
                )
            elif key not in _SUPPORTED_RUNTIME_ENV:
                raise ValueError(f"unknown runtime_env field {key!r}; supported: env_vars")
        env = v.get("env_vars", {})
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(val, str) for k, val in env.items()
        ):
            raise ValueError("runtime_env['env_vars'] must map str to str")
        return v

    def required(self) -> dict[str, float]:
        """The resource demand of one replica, as the scheduler counts it."""
        req: dict[str, float] = {"CPU": self.num_cpus}
        if self.num_gpus:
            req["GPU"] = self.num_gpus
        if self.memory:
            req["memory"] = self.memory
        req.update(self.resources)
        if self.accelerator_type:
            req[f"accelerator_type:{self.accelerator_type}"] = 0.001
        return {k: v for k, v in req.items() if v}


# ---- options the local backend cannot honour: one warning per option per process -------------

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_warned: set[str] = set()


def _user_stacklevel() -> int:
    """The `stacklevel` that points `warnings.warn` (called by our caller) at the first frame
    outside flotilla, so the warning names the user's line."""
    frame = sys._getframe(2)
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


def warn_not_honoured(option: str, why: str) -> None:
    """Say once per process (a `UserWarning` and a log line) that `option` is not honoured."""
    if option in _warned:
        return
    _warned.add(option)
    message = f"{option}: {why}"
    logging.getLogger("flotilla.serve").warning(message)
    warnings.warn(message, UserWarning, stacklevel=_user_stacklevel())


# ---- logging_config -----------------------------------------------------------------------------

#: Attributes of `logging.LogRecord` that `additional_log_standard_attrs` may name (Ray's list).
LOGRECORD_STANDARD_ATTRS = frozenset({
    "args", "asctime", "created", "exc_info", "exc_text", "filename", "funcName", "levelname",
    "levelno", "lineno", "message", "module", "msecs", "msg", "name", "pathname", "process",
    "processName", "relativeCreated", "stack_info", "thread", "threadName", "taskName",
})
_ENCODINGS = ("TEXT", "JSON")


class LoggingConfig(BaseModel):
    """How a replica logs, as Ray Serve's `ray.serve.schema.LoggingConfig` (also importable
    from `flotilla.serve.schema`). Give it to `@serve.deployment(logging_config=...)`,
    `.options(...)` or `serve.run(..., logging_config=...)` (for deployments without their own),
    as this object or as a dict.

    - `encoding`: "TEXT" (default) or "JSON" (one JSON object per line, with the deployment,
      replica, application and request id), for the replica's log lines and access lines.
    - `log_level`: level of the replica's loggers (the root logger, so `ray.serve`, `flotilla`
      and the user's own loggers): a name ("DEBUG") or a number (10).
    - `logs_dir`: folder for the replica's log file instead of the session's `logs/`.
    - `enable_access_log`: False drops the replica's one line per request.
    - `additional_log_standard_attrs`: `LogRecord` attributes added to every line.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    encoding: str = "TEXT"
    log_level: int | str = "INFO"
    logs_dir: str | None = None
    enable_access_log: bool = True
    additional_log_standard_attrs: list[str] = Field(default_factory=list)

    @field_validator("encoding", mode="before")
    @classmethod
    def _encoding(cls, v: Any) -> Any:
        if isinstance(v, Enum):
            v = v.value
        if v not in _ENCODINGS:
            raise ValueError(f"Got {v!r} for encoding. Encoding must be one of {set(_ENCODINGS)}.")
        return v

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: int | str) -> str:
        if isinstance(v, int):
            if isinstance(v, bool) or v not in logging._levelToName:
                raise ValueError(f"Got {v!r} for log_level. log_level must be one of {list(logging._levelToName)}.")
            return logging._levelToName[v]
        if v not in logging._nameToLevel:
            raise ValueError(f"Got {v!r} for log_level. log_level must be one of {list(logging._nameToLevel)}.")
        return v

    @field_validator("additional_log_standard_attrs")
    @classmethod
    def _attrs(cls, v: list[str]) -> list[str]:
        for attr in v:
            if attr not in LOGRECORD_STANDARD_ATTRS:
                raise ValueError(f"Unknown attribute {attr!r}; must be one of {sorted(LOGRECORD_STANDARD_ATTRS)}")
        return sorted(set(v))


class ScaleDeploymentRequest(BaseModel):
    """The body of the external scaler's `POST .../deployments/<name>/scale` (Ray 2.60's):
    validated as Ray's (lax: "2" and 2.0 are 2; other keys ignored)."""

    target_num_replicas: int = Field(ge=0, description="The target number of replicas for the deployment.")


class ControllerOptions(BaseModel):
    """Ray 2.60's options of its controller actor (`runtime_env` with `env_vars` only):
    validated as Ray's; flotilla's controller takes its settings from `flotilla.init` and the
    environment, so `serve.start(controller_options=...)` warns that they are not used."""

    model_config = ConfigDict(extra="forbid")

    runtime_env: dict[str, Any] | None = None

    @field_validator("runtime_env")
    @classmethod
    def _env_vars_only(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v and set(v) - {"env_vars"}:
            raise ValueError(f"only runtime_env.env_vars is accepted, not {sorted(set(v) - {'env_vars'})}")
        return v


class TracingConfig(BaseModel):
    """Ray 2.60's OpenTelemetry tracing settings: validated as Ray's; flotilla traces every
    request itself (see README, "Latency breakdown and traces"), so they are not used."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    exporter_import_path: str = ""
    sampling_ratio: float = Field(0.01, ge=0.0, le=1.0)


class GangPlacementStrategy(str, Enum):
    """Where a gang's replicas go (Ray 2.60): PACK on few nodes, SPREAD across nodes."""

    PACK = "PACK"
    SPREAD = "SPREAD"


class GangRuntimeFailurePolicy(str, Enum):
    """What a replica failure does to its gang (Ray 2.60)."""

    RESTART_GANG = "RESTART_GANG"
    RESTART_REPLICA = "RESTART_REPLICA"


class GangSchedulingConfig(BaseModel):
    """Ray 2.60's gang scheduling of a deployment's replicas: validated as Ray's; the local
    backend places, starts and restarts replicas one at a time (a warning says so)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gang_size: int = Field(ge=1)
    gang_placement_strategy: GangPlacementStrategy = GangPlacementStrategy.PACK
    runtime_failure_policy: GangRuntimeFailurePolicy = GangRuntimeFailurePolicy.RESTART_GANG

    @field_validator("runtime_failure_policy")
    @classmethod
    def _policy(cls, v: GangRuntimeFailurePolicy) -> GangRuntimeFailurePolicy:
        if v == GangRuntimeFailurePolicy.RESTART_REPLICA:
            raise ValueError("RESTART_REPLICA is not implemented (nor in Ray 2.60); use RESTART_GANG")
        return v


class DeploymentActorConfig(BaseModel):
    """Ray 2.60's deployment-scoped actor: validated; not created here (a warning says so, and
    `serve.get_deployment_actor` raises)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    name: str = Field(min_length=1)
    actor_class: Any
    init_args: tuple[Any, ...] = ()
    init_kwargs: dict[str, Any] = Field(default_factory=dict)
    actor_options: dict[str, Any] = Field(default_factory=dict)


#: `request_router_class` values that mean the built-in router (Ray's default path included).
_BUILTIN_ROUTERS = ("", "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
                    "ray.serve._private.request_router.pow_2_router:PowerOfTwoChoicesRequestRouter")


class RequestRouterConfig(BaseModel):
    """A deployment's request router: the built-in one (power of two choices with
    multiplexing affinity) by default, or a `flotilla.serve.request_router.RequestRouter`
    subclass, given as a class or an import path ('module:Class' or 'module.Class'). The class
    is imported here and shipped by value to every router of the deployment's calls."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    _serialized: bytes = PrivateAttr(default=b"")

    request_router_class: Any = ""
    request_router_kwargs: dict[str, Any] = Field(default_factory=dict)
    request_routing_stats_period_s: float = Field(10.0, gt=0)
    request_routing_stats_timeout_s: float = Field(30.0, gt=0)
    initial_backoff_s: float = Field(0.025, gt=0)
    backoff_multiplier: float = Field(2.0, gt=0)
    max_backoff_s: float = Field(0.5, gt=0)

    @field_validator("request_router_class", mode="before")
    @classmethod
    def _router_class(cls, v: Any) -> Any:
        if v is None:
            return ""
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("ray.serve.experimental."):  # Ray's ready-made routers: flotilla's own
                v = "flotilla" + v[len("ray"):]
            return "" if v in _BUILTIN_ROUTERS else v
        if isinstance(v, type):
            return v
        raise ValueError(f"request_router_class must be a class or an import path ('module:Class'), not {v!r}")

    @field_validator("request_router_kwargs")
    @classmethod
    def _kwargs_json(cls, v: dict[str, Any]) -> dict[str, Any]:
        return json_only(v, "request_router_kwargs is not")

    @model_validator(mode="after")
    def _ship(self) -> RequestRouterConfig:
        if self.request_router_class:
            self._serialized = _ship_router_class(self.request_router_class)
        return self

    @field_serializer("request_router_class")
    def _router_path(self, v: Any) -> str:
        return v if isinstance(v, str) else f"{v.__module__}:{v.__qualname__}"

    @property
    def is_custom(self) -> bool:
        return bool(self.request_router_class)

    @property
    def serialized_class(self) -> bytes:
        """The router class pickled by value (b"" for the built-in router)."""
        return self._serialized


def _ship_router_class(spec: Any) -> bytes:
    """The router class of `spec` (a class or an import path), checked and pickled with its
    module by value, so that processes which cannot import that module can run it."""
    import cloudpickle

    from flotilla._private import codepickle
    from flotilla._private.appbuild import _import_attr
    from flotilla.serve.request_router import RequestRouter

    router_cls = _import_attr(spec) if isinstance(spec, str) else spec
    if not (isinstance(router_cls, type) and issubclass(router_cls, RequestRouter)):
        raise ValueError(
            f"request_router_class {spec!r} is not a subclass of "
            "flotilla.serve.request_router.RequestRouter (subclass it and implement choose_replicas)")
    module = sys.modules.get(router_cls.__module__)
    by_value = module is not None and module.__name__ != "__main__" and not module.__name__.startswith("flotilla.")
    if by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        return codepickle.dumps(router_cls)
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(module)


_PG_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
#: Ray's bound on max_replicas_per_node.
MAX_REPLICAS_PER_NODE = 100


class BackpressureConfig(BaseModel):
    """The HTTP answer to a request over `max_queued_requests` (Ray 2.60): `status_code` 503
    (the default) or 429, and `retry_after_s` for a `Retry-After` header (rounded up to whole
    seconds; None: with 429, computed from how fast the queue drains, else none)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status_code: Literal[503, 429] = 503
    retry_after_s: float | None = Field(None, ge=0, allow_inf_nan=False)


class DeploymentConfig(BaseModel):
    """Every option of a deployment, with Ray Serve's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    num_replicas: int | Literal["auto"] | None = Field(None, description="Fixed replica count, or 'auto'.")
    max_ongoing_requests: int = Field(5, gt=0, description="Most requests one replica runs at once.")
    max_queued_requests: int = Field(-1, description="Most requests queued per router; -1 means no limit.")
    user_config: Any = Field(None, description="JSON-serializable; passed to reconfigure().")
    autoscaling_config: AutoscalingConfig | None = None
    graceful_shutdown_wait_loop_s: float = Field(2.0, ge=0)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    max_constructor_retry_count: int = Field(
        20, gt=0,
        description="Failed starts in a row (constructor or first health check) after which a version "
        "that never served is DEPLOY_FAILED: this, or 3 per target replica if fewer (as Ray Serve).",
    )
    ray_actor_options: RayActorOptions = Field(default_factory=lambda: RayActorOptions.model_validate({}))
    max_batch_size: int | None = Field(None, ge=1, description="Deployment-level batching (seed form).")
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    batch_latency_target_s: float | None = Field(
        None, gt=0, description="flotilla extra: with max_batch_size, adapt the wait to this latency target "
                                "instead of the fixed batch_wait_timeout_s.")
    logging_config: LoggingConfig | None = Field(None, description="How the replicas log (see LoggingConfig).")
    max_replicas_per_node: int | None = Field(
        None, ge=1, le=MAX_REPLICAS_PER_NODE,
        description="Most replicas of this deployment on one node (on the local backend this "
        "machine is the one node); replicas beyond it stay pending (the status says why).",
    )
    placement_group_bundles: list[dict[str, float]] | None = Field(
        None,
        description="Resources reserved per replica, as Ray placement group bundles. The replica "
        "runs in the first bundle. On Ray each replica gets its own placement group (the tasks "
        "and actors it starts run in it); on the local backend the replica reserves the sum of "
        "all bundles (its GPUs are all in its CUDA_VISIBLE_DEVICES, for the processes it starts).",
    )
    placement_group_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = None
    request_router_config: RequestRouterConfig | None = Field(
        None, description="A custom request router (`flotilla.serve.request_router`); None: the built-in one."
    )
    fork_after_init: bool = Field(
        False, description="flotilla extra: run the constructor once in a template process and fork "
        "replicas from it (ready in milliseconds, CPU weights shared copy-on-write); see README.",
    )
    backpressure_config: BackpressureConfig | None = Field(
        None, description="The HTTP answer past max_queued_requests (None: the proxy's, 503 by default).")
    rolling_update_percentage: float = Field(
        1.0, gt=0.0, le=1.0, description="Ray's share of replicas updated at a time; validated, and the local "
        "rollout starts every replacement before stopping old ones (no capacity lost).")
    max_surge_percent: int = Field(
        0, ge=0, le=100, description="Ray's extra replicas during a rolling restart; validated (see "
        "rolling_update_percentage).")
    placement_group_bundle_label_selector: list[dict[str, str]] | None = Field(
        None, description="Ray's node label selector per bundle (one is used for every bundle); validated, "
        "and honoured by Ray on the Ray backend.")
    gang_scheduling_config: GangSchedulingConfig | None = Field(
        None, description="Ray 2.60's gang scheduling; validated (see GangSchedulingConfig).")
    deployment_actors: list[DeploymentActorConfig] | None = Field(
        None, exclude=True, description="Ray 2.60's deployment-scoped actors; validated, not created.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if "#" in v:  # Ray's words: '#' separates the parts of a replica's id
            raise ValueError(f"Deployment names must not contain the '#' character. Current name: {v}.")
        return v

    @field_validator("num_replicas")
    @classmethod
    def _num_replicas(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, bool):
            raise ValueError("must be an int >= 1 or 'auto'")
        if isinstance(v, int) and v < 0:
            raise ValueError(f"must be >= 1, got {v}")
        if v == 0:
            raise ValueError(
                "num_replicas is expected to larger than 0. To let the deployment scale to zero, "
                "set autoscaling_config={'min_replicas': 0, 'max_replicas': N} instead of num_replicas."
            )
        return v

    @field_validator("max_replicas_per_node", mode="before")
    @classmethod
    def _max_replicas_per_node(cls, v: Any) -> Any:
        if isinstance(v, bool) or (v is not None and not isinstance(v, int)):
            raise ValueError(
                f"Expected None or an integer in the range of [1, {MAX_REPLICAS_PER_NODE}], got {v!r}"
            )
        return v

    @field_validator("placement_group_bundles")
    @classmethod
    def _bundles(cls, v: list[dict[str, float]] | None) -> list[dict[str, float]] | None:
        if v is None:
            return v
        if not v:
            raise ValueError(
                "Bundles must be a non-empty list of resource dictionaries, e.g. "
                "[{'CPU': 1.0}, {'GPU': 1.0}]; got an empty list."
            )
        for i, bundle in enumerate(v):
            for key, amount in bundle.items():
                if amount < 0:
                    raise ValueError(f"placement_group_bundles[{i}][{key!r}] must be >= 0, got {amount}")
            if not bundle or all(amount == 0 for amount in bundle.values()):
                raise ValueError(f"Bundles cannot be an empty dictionary or resources with only 0 values. Bundles: {v}")
        return v

    @model_validator(mode="after")
    def _placement(self) -> DeploymentConfig:
        bundles = self.placement_group_bundles
        if self.placement_group_strategy is not None and bundles is None:
            raise ValueError(
                "placement_group_strategy needs placement_group_bundles: if placement_group_strategy "
                "is provided, placement_group_bundles must also be provided."
            )
        selector = self.placement_group_bundle_label_selector
        if selector is not None:
            if bundles is None:
                raise ValueError("If placement_group_bundle_label_selector is provided, placement_group_bundles "
                                 "must also be provided.")
            if len(selector) == 1 and len(bundles) > 1:  # one selector for every bundle, as Ray
                object.__setattr__(self, "placement_group_bundle_label_selector", [dict(selector[0]) for _ in bundles])
            elif len(selector) != len(bundles):
                raise ValueError(f"placement_group_bundle_label_selector has {len(selector)} selectors for "
                                 f"{len(bundles)} bundles: give one, or one per bundle.")
        if bundles is None:
            return self
        if self.max_replicas_per_node is not None:
            raise ValueError("Setting max_replicas_per_node is not allowed when placement_group_bundles is provided.")
        first = bundles[0]
        rao = self.ray_actor_options
        prefix = ("When using placement_group_bundles, the replica runs in the first bundle, so its "
                  "ray_actor_options must fit in the first bundle:")
        if first.get("CPU", 0) < rao.num_cpus:
            raise ValueError(f"{prefix} num_cpus for the replica is {rao.num_cpus:g} (1 unless set), "
                             f"but the bundle only has {first.get('CPU', 0):g} CPU.")
        if first.get("GPU", 0) < rao.num_gpus:
            raise ValueError(f"{prefix} num_gpus for the replica is {rao.num_gpus:g}, but the bundle only "
                             f"has {first.get('GPU', 0):g} GPU.")
        for key, amount in rao.resources.items():
            if first.get(key, 0) < amount:
                raise ValueError(f"{prefix} the replica needs {amount:g} {key}, but the bundle only has "
                                 f"{first.get(key, 0):g}.")
        return self

    @field_validator("max_queued_requests")
    @classmethod
    def _max_queued(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"must be -1 (no limit) or >= 1, got {v}")
        return v

    @field_validator("user_config")
    @classmethod
    def _user_config(cls, v: Any) -> Any:
        return v if v is None else json_only(v)

    @model_validator(mode="after")
    def _replicas_vs_autoscaling(self) -> DeploymentConfig:
        if self.num_replicas == "auto":  # Ray's auto defaults, with the fields given set on top
            given = self.autoscaling_config
            over = None if given is None else {k: getattr(given, k) for k in given.model_fields_set}
            object.__setattr__(self, "autoscaling_config", auto_autoscaling_config(over))
        elif self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError(
                "num_replicas and autoscaling_config are mutually exclusive: set num_replicas "
                "to None or 'auto' when autoscaling_config is given"
            )
        return self

    @model_validator(mode="after")
    def _gangs(self) -> DeploymentConfig:
        gang = self.gang_scheduling_config
        if gang is None:
            return self
        if self.autoscaling_config is None and isinstance(self.num_replicas, int) and self.num_replicas % gang.gang_size:
            raise ValueError(f"num_replicas ({self.num_replicas}) must be a multiple of gang_size ({gang.gang_size}).")
        if self.max_replicas_per_node is not None:
            raise ValueError("Setting max_replicas_per_node is not allowed when gang_scheduling_config is provided.")
        return self

    @model_validator(mode="after")
    def _batching_needs_room(self) -> DeploymentConfig:
        if self.max_batch_size and self.max_ongoing_requests < self.max_batch_size:
            if "max_ongoing_requests" not in self.model_fields_set:
                # Let a replica receive a whole batch at once.
                object.__setattr__(self, "max_ongoing_requests", self.max_batch_size)
            else:
                warn_small_limit(self.name, self.max_ongoing_requests, self.max_batch_size)
        return self

    def demand(self) -> dict[str, float]:
        """What one replica reserves: its ray_actor_options, or the sum of its placement group
        bundles (this machine is the only node, so every bundle is on it)."""
        if not self.placement_group_bundles:
            return self.ray_actor_options.required()
        total: dict[str, float] = {}
        for bundle in self.placement_group_bundles:
            for key, amount in bundle.items():
                if key != "object_store_memory":
                    total[key] = total.get(key, 0.0) + amount
        gpus = total.get("GPU", 0.0)
        if gpus > 1 and gpus != int(gpus):
            total["GPU"] = float(math.ceil(gpus))  # fractions adding up past one device: whole ones
        if self.ray_actor_options.accelerator_type:
            total[f"accelerator_type:{self.ray_actor_options.accelerator_type}"] = 0.001
        return {k: v for k, v in total.items() if v}

    def warn_unhonoured(self) -> None:
        """One warning per process for each option set here that the local backend ignores."""
        bundles = self.placement_group_bundles or []
        if self.deployment_actors:
            warn_not_honoured(
                "deployment_actors",
                "deployment-scoped actors are Ray actors, and flotilla does not create them (on either "
                "backend); serve.get_deployment_actor() raises. Start the actor yourself (ray.remote on "
                "the Ray backend) and pass its handle to the deployment.")
        if self.gang_scheduling_config is not None:
            warn_not_honoured(
                "gang_scheduling_config",
                "replicas are placed, started and restarted one at a time, not as gangs (num_replicas "
                "is still checked to be a multiple of gang_size).")
        if self.placement_group_bundle_label_selector is not None and not _on_ray():
            warn_not_honoured(
                "placement_group_bundle_label_selector",
                "the local backend's one node has no labels: the bundles are reserved on this machine.")
        if self.placement_group_strategy == "STRICT_SPREAD" and len(bundles) > 1 and not _on_ray():
            warn_not_honoured(
                "placement_group_strategy",
                "STRICT_SPREAD puts each bundle on a different node, but the local backend is one "
                "node: the replica's bundles are reserved together on this machine.",
            )

    @property
    def initial_replicas(self) -> int:
        if self.autoscaling_config is not None:
            from flotilla._private.autoscaling import initial_target

            return initial_target(self.autoscaling_config)
        return 1 if self.num_replicas is None else int(self.num_replicas)  # type: ignore[arg-type]


def _on_ray() -> bool:
    """This process uses the Ray backend (initialized so, or FLOTILLA_BACKEND=ray), where Ray
    places the bundles: options it honours are not warned about."""
    client = sys.modules.get("flotilla._private.client")
    rt = getattr(getattr(client, "Runtime", None), "_instance", None)
    if rt is not None:
        return bool(rt.backend == "ray")
    return os.environ.get("FLOTILLA_BACKEND", "").strip().lower() == "ray"


def warn_small_limit(name: str, max_ongoing: int, max_batch: int) -> None:
    warnings.warn(
        f"deployment '{name}': max_ongoing_requests={max_ongoing} is below max_batch_size="
        f"{max_batch}, so a replica never holds enough requests to fill a batch; set "
        f"max_ongoing_requests >= {max_batch}",
        UserWarning,
        stacklevel=4,
    )


class ProxyLocation(str, Enum):
    """Where HTTP proxies run (`serve.start(proxy_location=...)`, `HTTPOptions.location`)."""

    Disabled = "Disabled"
    HeadOnly = "HeadOnly"
    EveryNode = "EveryNode"


class HTTPOptions(BaseModel):
    """Options of the HTTP proxy (`serve.start(http_options=...)`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _keep_alive_from_env(cls, data: Any) -> Any:
        env = os.environ.get("RAY_SERVE_HTTP_KEEP_ALIVE_TIMEOUT_S")
        if env and isinstance(data, dict):
            data = {**data, "keep_alive_timeout_s": env}
        if isinstance(data, dict) and "host" in data and data["host"] is None:  # Ray's "no HTTP"
            data = {k: v for k, v in data.items() if k != "host"}
            data["location"] = "Disabled"
        return data

    host: str = "127.0.0.1"
    port: int = Field(
        default_factory=lambda: int(os.environ.get("RAY_SERVE_DEFAULT_HTTP_PORT", "8000")), ge=0, le=65535,
        description="Default 8000, or $RAY_SERVE_DEFAULT_HTTP_PORT (as Ray Serve's).",
    )
    root_path: str = Field(
        "",
        description="Mount every route under this path: '/serve' serves route '/api' at "
        "'/serve/api' (requests outside it are routed as they are), with the ASGI root_path "
        "set to it, as Ray Serve (uvicorn's root_path) does.",
    )
    request_timeout_s: float | None = Field(None, gt=0)
    keep_alive_timeout_s: float = Field(
        90.0, gt=0,
        description="How long an idle kept-alive connection stays open (90 s, Ray's default); "
        "$RAY_SERVE_HTTP_KEEP_ALIVE_TIMEOUT_S, when set, wins over it (as in Ray Serve).",
    )
    location: Literal["HeadOnly", "EveryNode", "Disabled", "NoServer"] | None = Field(
        "EveryNode",
        description="Where proxies run: EveryNode (on the Ray backend, a proxy on every node, "
        "all on the same port), HeadOnly (one, on the head's machine; on the local backend both "
        "mean that), Disabled (or NoServer): none, applications answer handles only.",
    )
    direct_ingress: bool = Field(
        False,
        description="Replicas of the HTTP app's ingress deployment accept HTTP themselves on the "
        "shared port (one listening socket held by the head), with no proxy process in between; "
        "one HTTP app at a time.",
    )
    max_request_body_bytes: int = Field(
        1 << 30,
        gt=0,
        description="Largest request body accepted; a larger one gets 413 without being read "
        "(a Content-Length over the limit is refused before any of the body arrives).",
    )
    num_proxies: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Proxy processes sharing the port (the local backend): each accepts on the "
        "same listening socket, so more cores serve more HTTP. Default: half the cores this "
        "machine gives the cluster (at most its num_cpus), at least 1 and at most 8; 1 on 2 cores.",
    )
    backpressure_status_code: Literal[503, 429] = Field(
        503,
        description="Status when max_queued_requests is exceeded; 429 adds a Retry-After "
        "header computed from how fast the deployment's queue drains.",
    )
    max_connections: int = Field(
        10_000,
        gt=0,
        description="Most open client connections; at the limit a new connection closes the one "
        "idle longest (no request in progress), or gets 503 when none is idle. Lowered to the "
        "descriptor limit (RLIMIT_NOFILE, raised to its hard limit) minus a reserve.",
    )
    max_request_header_bytes: int = Field(
        64 * 1024,
        gt=0,
        description="Largest request line plus headers; a larger request gets 431 and is closed "
        "without being read further.",
    )
    request_header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A request's line and headers must arrive within this long of the connection "
        "opening (or of the request's first byte on a kept-alive connection); then 408 and close.",
    )
    num_cpus: int = Field(0, description="Removed in Ray (a value other than 0 is refused, as there).")
    root_url: str = Field("", description="Ray's advertised root URL (e.g. a load balancer's); accepted, "
                          "not used: flotilla prints the proxy's own URL.")

    @field_validator("root_url")
    @classmethod
    def _root_url(cls, v: str) -> str:
        if v:
            warn_not_honoured("root_url", "flotilla prints and reports the proxy's own URL (put a load "
                              "balancer's address in your own client configuration).")
        return v

    @field_validator("num_cpus")
    @classmethod
    def _no_num_cpus(cls, v: int) -> int:
        if v:
            raise ValueError("`num_cpus` in HTTPOptions has been removed (as in Ray Serve): the proxy "
                             "reserves no CPU; remove the option.")
        return v

    ssl_certfile: str | None = Field(None, description="TLS: the server certificate (chain) file, PEM; serves https://.")
    ssl_keyfile: str | None = Field(None, description="TLS: the private key file (else it is in ssl_certfile).")
    ssl_keyfile_password: str | None = Field(None, description="TLS: the private key's password.", repr=False)
    ssl_ca_certs: str | None = Field(
        None, description="TLS: CA certificates; set, every client must present a certificate they signed.")
    api_keys: list[str] | None = Field(
        None, repr=False,
        description="Every request needs 'Authorization: Bearer <one of these>' (else 401), but /-/healthz; "
        "default: $FLOTILLA_API_KEYS, comma-separated.",
    )
    middlewares: list[Any] = Field(
        default_factory=list,
        description="starlette.middleware.Middleware objects wrapped around the proxy's ASGI app, "
        "first = outermost (inside the API key check).",
    )

    @field_validator("ssl_certfile", "ssl_keyfile", "ssl_ca_certs")
    @classmethod
    def _tls_file(cls, v: str | None) -> str | None:
        from flotilla._private.frontdoor import check_file

        return check_file(v)

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not k or k != k.strip() or "," in k for k in v):
            raise ValueError("API keys must be non-empty, without spaces at either end or commas")
        return v

    @field_validator("middlewares")
    @classmethod
    def _middlewares(cls, v: list[Any]) -> list[Any]:
        from flotilla._private.frontdoor import check_middlewares

        return check_middlewares(v)

    @field_validator("location", mode="before")
    @classmethod
    def _location(cls, v: Any) -> Any:
        return v.value if isinstance(v, ProxyLocation) else v

    @field_validator("root_path")
    @classmethod
    def _root_path(cls, v: str) -> str:
        if v and (not v.startswith("/") or v.endswith("/")):
            raise ValueError(f"must be empty or start with '/' and not end with '/', got {v!r}")
        return v

    @property
    def proxy_disabled(self) -> bool:
        return self.location in ("Disabled", "NoServer")


class gRPCOptions(BaseModel):
    """Options of the gRPC ingress (`serve.start(grpc_options=...)`), Ray Serve's fields.

    The server runs in the proxy, on `http_options.host`; it is off when `port` is 0 or
    `grpc_servicer_functions` is empty (as in Ray)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: int = Field(9000, ge=0, le=65535)
    grpc_servicer_functions: list[str] = Field(
        default_factory=list,
        description="Import paths of generated `add_XServicer_to_server` functions, e.g. "
        "'pkg.module_pb2_grpc.add_XServicer_to_server'.",
    )
    request_timeout_s: float | None = Field(None, gt=0)
    enable_reflection: bool = Field(
        True, description="Ray's (2.60) server reflection switch; accepted, and the gRPC ingress does not "
        "serve the reflection protocol: give grpcurl the .proto files (-proto).")

    @property
    def enabled(self) -> bool:
        return bool(self.port and self.grpc_servicer_functions)

    @property
    def grpc_servicer_func_callable(self) -> list[Callable[..., Any]]:
        """The `grpc_servicer_functions`, imported (Ray's property). Raises
        ModuleNotFoundError for one that cannot be imported, ValueError for one that is not a
        function."""
        out = []
        for path in self.grpc_servicer_functions:
            module, _, name = path.rpartition(".")
            if not module:
                raise ValueError(f"{path} is not an import path (module.function) of a generated servicer function.")
            try:
                fn = getattr(importlib.import_module(module), name, None)
            except ModuleNotFoundError as e:
                raise ModuleNotFoundError(
                    f"{path} can't be imported! Check it for typos, or rebuild the service definitions "
                    "if the .proto file changed.") from e
            if not callable(fn):
                raise ValueError(f"{path} is not a callable function! Make sure the function is imported correctly.")
            out.append(fn)
        return out


def validate(model: type[BaseModel], data: dict[str, Any], what: str, field_prefix: str = "") -> Any:
    """Build `model` from `data`, turning pydantic's errors into one readable ConfigError
    (each field named as `field_prefix` + its path)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            field = field_prefix + ".".join(str(p) for p in err["loc"]) or "(options)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden" and len(err["loc"]) == 1:
                allowed = ", ".join(sorted(model.model_fields))
                msg = f"unknown option; allowed: {allowed}"
            elif err["type"] == "extra_forbidden":
                msg = "unknown field"
            got = err.get("input")
            lines.append(f"  {field}: {msg} (got {got!r})")
        raise ConfigError(f"invalid {what}:\n" + "\n".join(lines)) from None
