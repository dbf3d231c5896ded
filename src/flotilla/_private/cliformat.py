"""What `flotilla status`, `flotilla config` and `flotilla build` print, shaped as Ray Serve's
`serve status`, `serve config` and `serve build` output."""

from __future__ import annotations

import dataclasses
import json
from enum import Enum
from typing import TYPE_CHECKING, Any

import yaml  # type: ignore[import-untyped]

if TYPE_CHECKING:
    from flotilla.serve.deployments import Application
    from flotilla.serve.schema import DeploymentStatusOverview, ServeStatus

__all__ = ["build_config", "build_yaml", "config_yaml", "status_dict", "status_yaml"]

#: Deployment options kept with `Deployment._options` that are not deployment options.
_NOT_OPTIONS = ("name", "route_prefix", "_init")


def _plain(value: Any) -> Any:
    """Enums as their values, dataclasses and models as dicts, all the way down."""
    if isinstance(value, Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "model_dump"):
        return _plain(value.model_dump(mode="json", exclude_unset=True))
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _deployment(d: DeploymentStatusOverview) -> dict[str, Any]:
    out: dict[str, Any] = {
        "status": _plain(d.status),
        "status_trigger": _plain(d.status_trigger),
        "replica_states": _plain(d.replica_states),
        "message": d.message,
    }
    if d.autoscaling is not None:
        out["autoscaler"] = _plain(d.autoscaling)
    findings = getattr(d, "findings", None)
    if findings:
        out["findings"] = [{k: f[k] for k in ("code", "severity", "message", "fix")} for f in findings]
    return out


def status_dict(status: ServeStatus) -> dict[str, Any]:
    """`serve status`'s mapping: proxies, applications (with their deployments), target
    capacity; flotilla's traffic splits and shadows only when there are any."""
    out: dict[str, Any] = {
        "proxies": _plain(status.proxies),
        "applications": {
            name: {
                "status": _plain(app.status),
                "message": app.message,
                "last_deployed_time_s": app.last_deployed_time_s,
                "deployments": {dn: _deployment(d) for dn, d in app.deployments.items()},
            }
            for name, app in status.applications.items()
        },
        "target_capacity": status.target_capacity,
    }
    if status.traffic:
        out["traffic"] = _plain(status.traffic)
    if status.shadows:
        out["shadows"] = _plain(status.shadows)
    return out


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def status_yaml(status: ServeStatus) -> str:
    return _dump(status_dict(status))


def config_yaml(applied: dict[str, Any] | None, name: str | None = None) -> str:
    """The latest applied config (`ServeDeploySchema.to_dict()`), one YAML document per
    application separated by `---`, as `serve config` prints it; only `name`'s when given."""
    apps = list((applied or {}).get("applications") or [])
    if name is not None:
        apps = [a for a in apps if a.get("name") == name]
        if not apps:
            return f'No config has been deployed for application "{name}".\n'  # Ray's words
    if not apps:
        return "No configuration was found.\n"  # Ray's words
    return "---\n\n".join(_dump(a) + "\n" for a in apps).rstrip("\n") + "\n"


def _deployment_entry(name: str, options: dict[str, Any], where: str, notes: list[str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name}
    for key, value in options.items():
        if key in _NOT_OPTIONS:
            continue
        plain = _plain(value)
        try:
            json.dumps(plain)
        except (TypeError, ValueError):
            notes.append(f"{where}: deployment '{name}': option {key!r} cannot be written to a file and was left out")
            continue
        entry[key] = plain
    return entry


def _build(
    apps: list[tuple[str, Application, str | None]],
    host: str,
    port: int,
    proxy_location: str,
) -> tuple[dict[str, Any], list[str]]:
    from flotilla._private.appbuild import walk_deployments

    notes: list[str] = []
    applications = []
    several = len(apps) > 1
    for i, (import_path, app, app_name) in enumerate(apps, start=1):
        name = app_name or f"app{i}"  # as `serve build` names them, one application too
        deployments = [
            _deployment_entry(dn, node.deployment._options, import_path, notes)
            for dn, node in walk_deployments(app)
        ]
        applications.append({
            "name": name,
            "route_prefix": f"/{name}" if several else "/",
            "import_path": import_path,
            "runtime_env": {},
            "deployments": deployments,
        })
    config = {
        "proxy_location": proxy_location,
        "http_options": {"host": host, "port": port},
        "applications": applications,
    }
    return config, notes


def build_config(
    apps: list[tuple[str, Application, str | None]],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    proxy_location: str = "EveryNode",
) -> dict[str, Any]:
    """The config `flotilla build` writes for `apps` (import path, Application, name or None:
    app1, app2... as Ray names them; one application at `/`, several each at `/{name}`): each
    deployment with the options its code set."""
    return _build(apps, host, port, proxy_location)[0]


def build_yaml(
    apps: list[tuple[str, Application, str | None]],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    proxy_location: str = "EveryNode",
) -> str:
    """`build_config` as a YAML file, with a header and a comment per option left out."""
    config, notes = _build(apps, host, port, proxy_location)
    header = [
        "# This file was generated by `flotilla build`; deploy it with `flotilla deploy FILE`.",
        "# Options set here override those in the code.",
    ]
    header += [f"# NOTE: {n}" for n in notes]
    return "\n".join(header) + "\n\n" + _dump(config)
