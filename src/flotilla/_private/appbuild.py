"""From a config file's application to an `Application`: import it, apply the overrides."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from flotilla.serve.config import validate
from flotilla.serve.deployments import Application, Deployment, map_nested, walk_deployments
from flotilla.serve.exceptions import ConfigError

if TYPE_CHECKING:
    from flotilla.serve.deploy_schema import DeploymentSchema, ServeApplicationSchema

__all__ = ["app_env", "apply_overrides", "deployment_names", "import_application", "walk_deployments"]


def _import_attr(import_path: str) -> Any:
    if ":" in import_path:
        module_name, _, attr = import_path.partition(":")
    else:
        module_name, _, attr = import_path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"import path {import_path!r} must be 'module:attribute' or 'module.attribute'")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"import path {import_path!r}: could not import module {module_name!r}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"import path {import_path!r}: module {module_name!r} has no attribute {attr!r}") from None
    return obj


def _args_model(builder: Callable[..., Any]) -> type[BaseModel] | None:
    """The pydantic model the builder's single parameter is annotated with, if any."""
    try:
        params = list(inspect.signature(builder).parameters.values())
    except (TypeError, ValueError):
        return None
    if not params:
        return None
    try:
        hints = typing.get_type_hints(builder)
    except Exception:
        hints = {}
    hint = hints.get(params[0].name, params[0].annotation)
    return hint if isinstance(hint, type) and issubclass(hint, BaseModel) else None


def import_application(import_path: str, args: dict[str, Any] | None = None) -> Application:
    """Import `import_path` ("module:attr" or "module.attr") and return its Application.

    The attribute may be an Application, a Deployment (bound with no arguments), or a builder
    function called with `args` (validated into its parameter's pydantic model when annotated
    with one). Raises ConfigError naming the import path."""
    obj = _import_attr(import_path)
    if isinstance(obj, (Application, Deployment)):
        if args:
            raise ConfigError(
                f"import path {import_path!r}: args were given, but {type(obj).__name__} "
                f"{obj!r} takes none; args need an application builder function"
            )
        return obj if isinstance(obj, Application) else obj.bind()
    if not callable(obj):
        raise ConfigError(
            f"import path {import_path!r} names a {type(obj).__name__}; expected an Application, "
            "a Deployment or an application builder function"
        )
    model = _args_model(obj)
    value: Any = dict(args or {})
    if model is not None:
        value = validate(model, value, f"args of {import_path!r}")
    try:
        n_params = len(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        n_params = 1
    if n_params == 0 and args:
        raise ConfigError(f"import path {import_path!r}: args were given, but the application builder takes no parameter")
    app = obj() if n_params == 0 else obj(value)
    if isinstance(app, Deployment):
        app = app.bind()
    if not isinstance(app, Application):
        raise ConfigError(
            f"import path {import_path!r}: the application builder returned a "
            f"{type(app).__name__}; it must return an Application (from Deployment.bind())"
        )
    return app


def deployment_names(app: Application) -> list[str]:
    """The names the graph's deployments are deployed under, ingress first."""
    return [name for name, _ in walk_deployments(app)]


def _merged(dep: Deployment, overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` with `ray_actor_options` merged key by key into the code's."""
    if "ray_actor_options" not in overrides:
        return overrides
    code = dep._options.get("ray_actor_options") or {}
    if isinstance(code, BaseModel):
        code = code.model_dump(exclude_unset=True)
    return {**overrides, "ray_actor_options": {**code, **(overrides["ray_actor_options"] or {})}}


def apply_overrides(app: Application, deployments: list[DeploymentSchema]) -> Application:
    """A copy of the graph with each named deployment's options overridden by its config
    entry; the input is not changed. Raises ConfigError for an entry naming no deployment,
    or when the merged options are invalid."""
    walked = walk_deployments(app)
    by_name = {name: node for name, node in walked}
    unknown = [d.name for d in deployments if d.name not in by_name]
    if unknown:  # Ray's words
        raise ConfigError(f"Deployment '{unknown[0]}' does not exist. Available: {list(by_name)}")
    new_deps: dict[int, Deployment] = {}
    for entry in deployments:
        node = by_name[entry.name]
        dep = node.deployment
        new_deps[id(node)] = dep.options(**_merged(dep, entry.overrides()))
    copies: dict[int, Application] = {}

    def copy(value: Any) -> Any:
        if not isinstance(value, Application):
            return value
        if id(value) not in copies:
            new = copies[id(value)] = Application(new_deps.get(id(value), value.deployment), (), {})
            new._args = tuple(map_nested(a, copy) for a in value._args)
            new._kwargs = {k: map_nested(v, copy) for k, v in value._kwargs.items()}
        return copies[id(value)]

    result: Application = copy(app)
    return result


def app_env(app_schema: ServeApplicationSchema) -> dict[str, str]:
    """The environment variables the application's runtime_env sets."""
    return dict(app_schema.runtime_env.get("env_vars") or {})
