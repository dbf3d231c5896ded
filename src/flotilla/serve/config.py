"""Validated options: one pydantic model per concept, one source of truth.

`DeploymentConfig` holds everything `@serve.deployment(...)` and `.options(...)` accept;
`RayActorOptions` the per-replica resources; `HTTPOptions` the proxy's. Errors are raised
as `ConfigError` (a `ValueError` and a `TypeError`) whose message names each bad field.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flotilla._private.autoscaling import AutoscalingConfig, auto_autoscaling_config
from flotilla.serve.exceptions import ConfigError

__all__ = [
    "AutoscalingConfig",
    "DeploymentConfig",
    "HTTPOptions",
    "RayActorOptions",
    "validate",
]

_SUPPORTED_RUNTIME_ENV = {"env_vars"}
_IGNORED_RUNTIME_ENV = {"pip", "uv", "conda", "working_dir", "py_modules", "excludes", "container", "config", "image_uri", "py_executable", "nsight", "worker_process_setup_hook"}


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
    ray_actor_options: RayActorOptions = Field(default_factory=lambda: RayActorOptions.model_validate({}))
    max_batch_size: int | None = Field(None, ge=1, description="Deployment-level batching (seed form).")
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    logging_config: dict[str, Any] | None = None

    @field_validator("num_replicas")
    @classmethod
    def _num_replicas(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, bool):
            raise ValueError("must be an int >= 0 or 'auto'")
        if isinstance(v, int) and v < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return v

    @field_validator("max_queued_requests")
    @classmethod
    def _max_queued(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"must be -1 (no limit) or >= 1, got {v}")
        return v

    @field_validator("user_config")
    @classmethod
    def _user_config(cls, v: Any) -> Any:
        if v is not None:
            try:
                json.dumps(v)
            except (TypeError, ValueError) as e:
                raise ValueError(f"must be JSON-serializable: {e}") from None
        return v

    @model_validator(mode="after")
    def _replicas_vs_autoscaling(self) -> DeploymentConfig:
        if self.num_replicas == "auto":
            if self.autoscaling_config is None:
                object.__setattr__(self, "autoscaling_config", auto_autoscaling_config())
        elif self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError(
                "num_replicas and autoscaling_config are mutually exclusive: set num_replicas "
                "to None or 'auto' when autoscaling_config is given"
            )
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

    @property
    def initial_replicas(self) -> int:
        if self.autoscaling_config is not None:
            from flotilla._private.autoscaling import initial_target

            return initial_target(self.autoscaling_config)
        return 1 if self.num_replicas is None else int(self.num_replicas)  # type: ignore[arg-type]


def warn_small_limit(name: str, max_ongoing: int, max_batch: int) -> None:
    warnings.warn(
        f"deployment '{name}': max_ongoing_requests={max_ongoing} is below max_batch_size="
        f"{max_batch}, so a replica never holds enough requests to fill a batch; set "
        f"max_ongoing_requests >= {max_batch}",
        UserWarning,
        stacklevel=4,
    )


class HTTPOptions(BaseModel):
    """Options of the HTTP proxy (`serve.start(http_options=...)`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    root_path: str = ""
    request_timeout_s: float | None = Field(None, gt=0)
    keep_alive_timeout_s: float = Field(5.0, gt=0)
    location: str = "HeadOnly"
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


def validate(model: type[BaseModel], data: dict[str, Any], what: str) -> Any:
    """Build `model` from `data`, turning pydantic's errors into one readable ConfigError."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"]) or "(options)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(sorted(model.model_fields))
                msg = f"unknown option; allowed: {allowed}"
            got = err.get("input")
            lines.append(f"  {field}: {msg} (got {got!r})")
        raise ConfigError(f"invalid {what}:\n" + "\n".join(lines)) from None
