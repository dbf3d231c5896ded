"""The config file of `flotilla deploy` (Ray Serve's `serve deploy` schema).

`ServeDeploySchema` holds the applications to run, each a `ServeApplicationSchema` (an import
path plus per-deployment overrides, `DeploymentSchema`). `load_config_file` and
`validate_config` build one and turn every error into a `ConfigFileError` whose message names
the file (or source), the field path and what is wrong.
"""

from __future__ import annotations

import json
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flotilla._private.autoscaling import PICKLED_POLICY
from flotilla.serve.config import DeploymentConfig, HTTPOptions, LoggingConfig, RequestRouterConfig
from flotilla.serve.exceptions import ConfigError

__all__ = [
    "ConfigFileError",
    "DeploymentSchema",
    "HTTPOptionsSchema",
    "ServeApplicationSchema",
    "ServeDeploySchema",
    "load_config_file",
    "validate_config",
]

#: The runtime_env keys a config application may set on this machine.
SUPPORTED_RUNTIME_ENV = ("env_vars", "working_dir")


class ConfigFileError(ConfigError):
    """A config file (or request body) that cannot be read or does not fit the schema."""


def _plain(value: Any) -> Any:
    """A set field's value as plain data: models become the dict of what was given."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True)
    return value


class DeploymentSchema(DeploymentConfig):
    """Overrides of one deployment's options, by name. Each field is validated as
    `@serve.deployment` validates it; checks that need the code's other options run when the
    overrides are applied. Only the fields the file set count (`overrides()`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    request_router_config: RequestRouterConfig | None = None

    @model_validator(mode="after")
    def _placement(self) -> DeploymentSchema:
        if self.max_replicas_per_node is not None and self.placement_group_bundles is not None:
            raise ValueError("Setting max_replicas_per_node is not allowed when placement_group_bundles is provided.")
        return self

    @model_validator(mode="after")
    def _replicas_vs_autoscaling(self) -> DeploymentSchema:
        if self.num_replicas not in (None, "auto") and self.autoscaling_config is not None:
            raise ValueError(
                "num_replicas and autoscaling_config are mutually exclusive: set num_replicas "
                "to None or 'auto' when autoscaling_config is given"
            )
        policy = self.autoscaling_config.policy if self.autoscaling_config is not None else None
        if policy is not None and not (isinstance(policy.policy_function, str) and ":" in policy.policy_function
                                       and not policy.policy_function.startswith(PICKLED_POLICY)):
            raise ValueError("autoscaling_config.policy.policy_function: a config file names it as 'module:function'")
        return self

    @model_validator(mode="after")
    def _batching_needs_room(self) -> DeploymentSchema:
        return self

    def overrides(self) -> dict[str, Any]:
        """The options the file set (all but `name`), as `Deployment.options` takes them."""
        return {f: _plain(getattr(self, f)) for f in self.model_fields_set if f != "name"}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.overrides()}


def _check_route_prefix(v: str | None) -> str | None:
    if v is None:
        return v
    if not v.startswith("/"):
        raise ValueError(f"must start with '/', got {v!r}")
    if v != "/" and v.endswith("/"):
        raise ValueError(f"must not end with '/' (except '/' itself), got {v!r}")
    if "{" in v or "}" in v:
        raise ValueError(f"may not contain wildcards, got {v!r}")
    return v


def _first_duplicate(values: list[Any]) -> tuple[int, int] | None:
    seen: dict[Any, int] = {}
    for i, v in enumerate(values):
        if v in seen:
            return seen[v], i
        seen[v] = i
    return None


class ServeApplicationSchema(BaseModel):
    """One application of a config file: where its code is and what the file changes."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field("default", min_length=1)
    route_prefix: str | None = "/"
    import_path: str
    args: dict[str, Any] = Field(default_factory=dict)
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    deployments: list[DeploymentSchema] = Field(default_factory=list)
    logging_config: LoggingConfig | None = None
    external_scaler_enabled: bool = False
    #: Ray 2.60's application-level policy: one call decides every autoscaling deployment of
    #: the application (`{"policy_function": "module:function", "policy_kwargs": {...}}`).
    autoscaling_policy: dict[str, Any] | None = None
    #: Ray's per-application `host`/`port` (of its old single-application format): accepted,
    #: and ignored as Ray ignores them in a multi-application config (use `http_options`).
    host: str | None = None
    port: int | None = Field(None, ge=0, le=65535)

    @field_validator("autoscaling_policy", mode="before")
    @classmethod
    def _app_policy(cls, v: Any) -> Any:
        if v is None:
            return v
        from flotilla._private.autoscaling import AutoscalingPolicy

        policy = v if isinstance(v, AutoscalingPolicy) else AutoscalingPolicy.model_validate(v)
        return policy.model_dump(mode="json")

    @field_validator("route_prefix")
    @classmethod
    def _route_prefix(cls, v: str | None) -> str | None:
        return _check_route_prefix(v)

    @field_validator("import_path")
    @classmethod
    def _import_path(cls, v: str) -> str:
        if any(c.isspace() for c in v):
            raise ValueError(f"must not contain whitespace, got {v!r}")
        module, sep, attr = v.partition(":") if ":" in v else v.rpartition(".")
        if not sep or not module or not attr or ":" in attr:
            raise ValueError(f"must be 'module:attribute' or 'module.attribute', got {v!r}")
        return v

    @field_validator("runtime_env")
    @classmethod
    def _runtime_env(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(SUPPORTED_RUNTIME_ENV))
        if unknown:
            raise ValueError(
                f"runtime_env field(s) {', '.join(map(repr, unknown))} are not supported: only "
                "env_vars and working_dir are supported on this machine (install dependencies "
                "in the environment flotilla runs in)"
            )
        env = v.get("env_vars", {})
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in env.items()):
            raise ValueError("runtime_env.env_vars must map strings to strings")
        wd = v.get("working_dir")
        if wd is not None and (not isinstance(wd, str) or not wd or "://" in wd):
            raise ValueError(f"runtime_env.working_dir must be a local directory path, got {wd!r}")
        return v

    @field_validator("deployments")
    @classmethod
    def _unique_deployments(cls, v: list[DeploymentSchema]) -> list[DeploymentSchema]:
        dup = _first_duplicate([d.name for d in v])
        if dup:
            raise ValueError(
                f"deployment names must be unique: deployments[{dup[0]}] and deployments[{dup[1]}] "
                f"are both named {v[dup[1]].name!r}"
            )
        return v

    @model_validator(mode="after")
    def _external_scaler_alone(self) -> ServeApplicationSchema:
        """An external scaler and Serve's autoscaler would both set the replica counts (as Ray
        refuses it)."""
        if self.external_scaler_enabled:
            autoscaled = [d.name for d in self.deployments
                          if ("autoscaling_config" in d.model_fields_set and d.autoscaling_config is not None)
                          or ("num_replicas" in d.model_fields_set and d.num_replicas == "auto")]
            if autoscaled:
                raise ValueError(
                    "external_scaler_enabled is set to True, but the following deployment(s) have autoscaling "
                    f"configured: {', '.join(f'{n!r}' for n in autoscaled)}. When using an external autoscaler, "
                    "Serve's built-in autoscaling must be disabled for all deployments in the application.")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The fields given (as Ray's `serve config` shows them), and always name and import_path."""
        given = self.model_fields_set
        out: dict[str, Any] = {"name": self.name}
        if "route_prefix" in given:
            out["route_prefix"] = self.route_prefix
        out["import_path"] = self.import_path
        for key in ("args", "runtime_env"):
            if key in given:
                out[key] = getattr(self, key)
        if self.logging_config is not None:
            out["logging_config"] = _plain(self.logging_config)
        if "external_scaler_enabled" in given:
            out["external_scaler_enabled"] = self.external_scaler_enabled
        if self.autoscaling_policy is not None:
            out["autoscaling_policy"] = self.autoscaling_policy
        if "deployments" in given:
            out["deployments"] = [d.to_dict() for d in self.deployments]
        return out


_HTTP = HTTPOptions.model_fields


class HTTPOptionsSchema(BaseModel):
    """The proxy options a config file may set; validated as `serve.start` validates them."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    host: str = "127.0.0.1"
    port: int = Field(default_factory=_HTTP["port"].default_factory, ge=0, le=65535)  # type: ignore[arg-type]
    root_path: str = ""
    request_timeout_s: float | None = Field(None, gt=0)
    keep_alive_timeout_s: float = Field(90.0, gt=0)
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_keyfile_password: str | None = None
    ssl_ca_certs: str | None = None

    @field_validator("root_path")
    @classmethod
    def _root_path(cls, v: str) -> str:
        return HTTPOptions._root_path(v)  # type: ignore[no-any-return]


class ServeDeploySchema(BaseModel):
    """A whole config file: the proxy's options and every application."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    proxy_location: Literal["Disabled", "HeadOnly", "EveryNode"] = "EveryNode"
    http_options: HTTPOptionsSchema = Field(default_factory=lambda: HTTPOptionsSchema.model_validate({}))
    grpc_options: dict[str, Any] = Field(
        default_factory=dict,
        description="gRPC ingress (port, grpc_servicer_functions, request_timeout_s), as serve.start's; "
        "applied when the proxy starts (flotilla run config.yaml); a running proxy keeps its own.")
    logging_config: LoggingConfig | None = None
    controller_options: dict[str, Any] | None = Field(
        None, description="Ray's controller settings; accepted, and the head takes its own from flotilla.init "
        "and the environment.")
    tracing_config: dict[str, Any] | None = Field(
        None, description="Ray's tracing exporter settings; accepted, not used (flotilla's request traces "
        "are always on: flotilla trace).")
    target_capacity: float | None = Field(None, ge=0, le=100)
    applications: list[ServeApplicationSchema] = Field(default_factory=list)

    @field_validator("applications")
    @classmethod
    def _unique(cls, v: list[ServeApplicationSchema]) -> list[ServeApplicationSchema]:
        dup = _first_duplicate([a.name for a in v])
        if dup:
            raise ValueError(
                f"application names must be unique: applications[{dup[0]}] and "
                f"applications[{dup[1]}] are both named {v[dup[1]].name!r}"
            )
        routed = [(i, a.route_prefix) for i, a in enumerate(v) if a.route_prefix is not None]
        dup = _first_duplicate([p for _, p in routed])
        if dup:
            i, j = routed[dup[0]][0], routed[dup[1]][0]
            raise ValueError(
                f"route prefixes must be unique: applications[{i}] ({v[i].name!r}) and "
                f"applications[{j}] ({v[j].name!r}) both use {v[j].route_prefix!r}"
            )
        return v

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: what was given, plus each application's defaults."""
        out: dict[str, Any] = {
            "proxy_location": self.proxy_location,
            "http_options": _plain(self.http_options),
        }
        if self.grpc_options:
            out["grpc_options"] = self.grpc_options
        if self.logging_config is not None:
            out["logging_config"] = _plain(self.logging_config)
        if self.target_capacity is not None:
            out["target_capacity"] = self.target_capacity
        out["applications"] = [a.to_dict() for a in self.applications]
        return out


# ---- loading and error messages -----------------------------------------------------------------


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _is_union_tag(part: Any) -> bool:
    """pydantic names the alternative of a union that failed ('int', "literal['auto']")."""
    return isinstance(part, str) and (
        part in ("int", "str", "float", "bool", "none", "dict", "list") or "[" in part
    )


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that holds the field at `loc` (for listing its allowed fields)."""
    current: Any = root
    for part in loc:
        if isinstance(part, int):
            args = typing.get_args(current)
            current = args[0] if args else None
        elif isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[part].annotation
        else:
            return None
        current = _unwrap_optional(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap_optional(tp: Any) -> Any:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _format(e: ValidationError, source: str, root: type[BaseModel]) -> str:
    messages: list[str] = []
    seen: set[tuple[Any, ...]] = set()
    for err in e.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
        if loc in seen:
            continue  # another alternative of the same union
        seen.add(loc)
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        if err["type"] == "extra_forbidden":
            holder = _model_at(root, loc[:-1])
            msg = "unknown field" + (f"; allowed: {', '.join(holder.model_fields)}" if holder else "")
        elif err["type"] == "missing":
            msg = "required field missing"
        elif not isinstance(got, (dict, list)) and repr(got) not in msg:
            msg += f" (got {got!r})"
        field = _field_path(loc)
        messages.append(f"{field}: {msg}" if field else msg)
    return f"{source}: " + "; ".join(messages)


def validate_config(data: Any, source: str = "config") -> ServeDeploySchema:
    """A `ServeDeploySchema` from parsed data; a mapping with a top-level `import_path` is
    Ray's single-application form. Raises ConfigFileError naming `source` and the fields."""
    if not isinstance(data, Mapping):
        raise ConfigFileError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        if "import_path" in data:
            app = ServeApplicationSchema.model_validate(data)
            return ServeDeploySchema.model_validate({"applications": [app]})
        return ServeDeploySchema.model_validate(data)
    except ValidationError as e:
        root = ServeApplicationSchema if "import_path" in data else ServeDeploySchema
        raise ConfigFileError(_format(e, source, root)) from None


def load_config_file(path: str) -> ServeDeploySchema:
    """Read and validate a YAML (or JSON) config file. Raises ConfigFileError naming the file."""
    import yaml  # type: ignore[import-untyped]

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigFileError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigFileError(f"{path}: cannot be read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text) if not path.endswith(".json") else json.loads(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigFileError(f"{path}: invalid YAML{where}: {problem}") from None
    except json.JSONDecodeError as e:
        raise ConfigFileError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if data is None:
        raise ConfigFileError(f"{path}: the file is empty")
    return validate_config(data, os.fspath(path))
