"""`@serve.deployment`, `Deployment` and `Application` (what `.bind()` returns)."""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

# As `from ray import serve` does (transitively): Ray's examples annotate with
# `starlette.requests.Request` after a bare `import starlette`.
import starlette.requests  # noqa: F401

from flotilla.serve.config import DeploymentConfig, validate, warn_not_honoured, warn_small_limit
from flotilla.serve.exceptions import ConfigError

logger = logging.getLogger("flotilla")


def _renamed_limit() -> None:
    logger.warning("max_concurrent_queries is deprecated (as in Ray Serve): it was renamed max_ongoing_requests, "
                   "which it sets here")

__all__ = ["Application", "Deployment", "deployment"]

_OPTION_NAMES = tuple(f for f in DeploymentConfig.model_fields if f != "name")
# Kept with the options for the Ray 1.x API (`Deployment.deploy()`, flotilla.serve.legacy)
# only: `route_prefix`, and the constructor arguments of a deployment from get_deployment.
_LEGACY_KEYS = ("route_prefix", "_init")


class Deployment:
    """A class or function plus validated options. Call `.bind(...)` to build an app."""

    def __init__(self, func_or_class: Callable[..., Any], options: dict[str, Any]) -> None:
        self._target = func_or_class
        self._options = options
        if "route_prefix" in options or "_init" in options:
            options = {k: v for k, v in options.items() if k not in _LEGACY_KEYS}
        self._config: DeploymentConfig = validate(DeploymentConfig, options, f"options of deployment '{options.get('name')}'")
        self._config.warn_unhonoured()
        if inspect.isclass(func_or_class):
            for value in vars(func_or_class).values():
                size = getattr(value, "_opts", {}).get("max_batch_size") if hasattr(value, "_opts") else None
                if isinstance(size, int) and self._config.max_ongoing_requests < size:
                    warn_small_limit(self._config.name, self._config.max_ongoing_requests, size)

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def func_or_class(self) -> Callable[..., Any]:
        return self._target

    @property
    def config(self) -> DeploymentConfig:
        return self._config

    @property
    def num_replicas(self) -> int:
        """The fixed replica count: 1 unless set, and 1 when the deployment autoscales (as Ray
        Serve's; `autoscaling_config` says how it scales)."""
        n = self._config.num_replicas
        return n if isinstance(n, int) and self._config.autoscaling_config is None else 1

    @property
    def version(self) -> str | None:
        """Ray 1.x's deployment version: never set here (code changes roll out by themselves)."""
        return None

    @property
    def logging_config(self) -> dict[str, Any] | None:
        lc = self._config.logging_config
        return None if lc is None else lc.model_dump()

    @property
    def init_args(self) -> tuple[Any, ...]:
        """Constructor arguments: given to `.bind()`, which keeps them on the application."""
        return ()

    @property
    def init_kwargs(self) -> dict[str, Any]:
        return {}

    @property
    def max_ongoing_requests(self) -> int:
        return self._config.max_ongoing_requests

    @property
    def max_queued_requests(self) -> int:
        return self._config.max_queued_requests

    @property
    def user_config(self) -> Any:
        return self._config.user_config

    @property
    def ray_actor_options(self) -> dict[str, Any]:
        """The options given, with the CPU a replica reserves by default (1), as Ray's."""
        opts = self._config.ray_actor_options
        return {**opts.model_dump(exclude_unset=True), "num_cpus": opts.num_cpus}

    @property
    def autoscaling_config(self) -> Any:
        return self._config.autoscaling_config

    def options(self, **kwargs: Any) -> Deployment:
        """A copy with some options changed; unknown names raise TypeError."""
        kwargs.pop("_internal", None)
        if "max_concurrent_queries" in kwargs:  # Ray's old name
            _renamed_limit()
            kwargs.setdefault("max_ongoing_requests", kwargs.pop("max_concurrent_queries"))
        if "max_ongoing_requests" in kwargs and kwargs["max_ongoing_requests"] is None:
            raise ConfigError(_NULL_LIMIT)
        for key in kwargs:
            if key not in ("name", "route_prefix") and key not in _OPTION_NAMES and key not in _COMPAT_IGNORED:
                raise ConfigError(f"unknown deployment option {key!r}; allowed: name, " + ", ".join(_OPTION_NAMES))
        _ignored_options(kwargs)
        merged = dict(self._options)
        for key, value in kwargs.items():
            if key in _COMPAT_IGNORED:
                continue
            merged[key] = value
        if "num_replicas" in kwargs and kwargs["num_replicas"] not in (None, "auto") and "autoscaling_config" not in kwargs:
            merged.pop("autoscaling_config", None)
        if "autoscaling_config" in kwargs and kwargs["autoscaling_config"] is not None and "num_replicas" not in kwargs:
            merged.pop("num_replicas", None)
        return Deployment(self._target, merged)

    def bind(self, *args: Any, **kwargs: Any) -> Application:
        """Bind constructor arguments; other bound deployments may be among them."""
        return Application(self, args, kwargs)

    @property
    def route_prefix(self) -> str | None:
        """Where `.deploy()` serves it (Ray 1.x): the `route_prefix` option, else `/{name}`."""
        return self._options.get("route_prefix", f"/{self.name}")

    def deploy(self, *init_args: Any, _blocking: bool = True, **init_kwargs: Any) -> None:
        """Ray 1.x: deploy as its own application, named after the deployment, at
        `route_prefix`; see `flotilla.serve.legacy`."""
        from flotilla.serve import legacy

        legacy.deploy(self, init_args, init_kwargs, _blocking)

    def delete(self) -> None:
        """Ray 1.x: delete the application `.deploy()` made."""
        from flotilla.serve import legacy

        legacy.delete(self)

    def get_handle(self) -> Any:
        """Ray 1.x: a handle to the deployment `.deploy()` made (see `flotilla.serve.legacy`)."""
        from flotilla.serve import legacy

        return legacy.get_handle(self.name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "Deployments cannot be constructed directly. Use `deployment.bind()` and "
            "`serve.run()` instead."
        )

    def set_route(self, endpoint_name: str, traffic: dict[str, float]) -> None:
        """Ray 1.x's traffic split: the route `/{endpoint_name}` sends requests to the named
        deployments (each deployed with `.deploy()`, an application of its own name) by
        weight. The same as `serve.set_traffic(endpoint_name, traffic)`."""
        from flotilla.serve.api import set_traffic

        set_traffic(endpoint_name, traffic)

    def __repr__(self) -> str:
        return f"Deployment(name={self.name})"


class Application:
    """A deployment bound to its constructor arguments: the unit `serve.run` deploys."""

    def __init__(self, dep: Deployment, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._deployment = dep
        self._args = args
        self._kwargs = kwargs

    @property
    def deployment(self) -> Deployment:
        return self._deployment

    def __repr__(self) -> str:
        return f"Application({self._deployment.name})"


def map_nested(value: Any, leaf: Callable[[Any], Any], _seen: set[int] | None = None) -> Any:
    """`value` with `leaf` applied to everything inside it: the items of lists, tuples and
    dicts, and the attributes of objects of other classes (as Ray finds bound applications in
    any object). What nothing changed in is returned as it is; an object something changed in
    is a shallow copy with the new attributes (the caller's object is left alone)."""
    if isinstance(value, (list, tuple)):
        items = [map_nested(v, leaf, _seen) for v in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        changed = {k: map_nested(v, leaf, _seen) for k, v in value.items()}
        return value if all(changed[k] is v for k, v in value.items()) else changed
    out = leaf(value)
    if out is not value or not _has_state(value):
        return out
    seen = set() if _seen is None else _seen
    if id(value) in seen:  # a cycle
        return value
    seen.add(id(value))
    state = vars(value)
    changed = {k: map_nested(v, leaf, seen) for k, v in state.items()}
    if all(changed[k] is v for k, v in state.items()):
        return value
    clone = copy.copy(value)
    vars(clone).update(changed)
    return clone


def _has_state(value: Any) -> bool:
    """An instance of a class of the user's (or a library's) with attributes in a `__dict__`:
    not a class, function, module, builtin value or one of flotilla's (a handle)."""
    module = type(value).__module__ or ""  # "builtins" for classes, functions and modules too
    return (module != "builtins" and not module.startswith("flotilla")
            and isinstance(getattr(value, "__dict__", None), dict) and not isinstance(value, functools.partial))


def walk_deployments(app: Application) -> list[tuple[str, Application]]:
    """Each distinct bound deployment of the graph, ingress first, with the name it is deployed
    under: the first of a name keeps it, later ones get `_1`, `_2`..."""
    seen: set[int] = set()
    counts: dict[str, int] = {}
    out: list[tuple[str, Application]] = []

    def visit(node: Any) -> Any:
        if not isinstance(node, Application) or id(node) in seen:
            return node
        seen.add(id(node))
        name = node.deployment.name
        if name in counts:
            counts[name] += 1
            name = f"{name}_{counts[name]}"
        else:
            counts[name] = 0
        out.append((name, node))
        for arg in (*node._args, *node._kwargs.values()):
            map_nested(arg, visit)
        return node

    visit(app)
    return out


# Options Ray accepts that have no meaning here; taken and ignored.
_UNSET: Any = object()  # an option left out, where None itself is refused
_NULL_LIMIT = "`max_ongoing_requests` must be non-null, got None."

_COMPAT_IGNORED = {
    "version",
}


def _ignored_options(given: Any) -> None:
    """Say once that `version` (Ray 1.x's) is not used, instead of dropping it silently."""
    if "version" in given:
        warn_not_honoured(
            "version", "flotilla versions a deployment by its code, arguments and options (a change "
            "rolls out by itself, unchanged ones keep their replicas); the value is not used (Ray Serve "
            "2.60 refuses the option). Name versions in the deployment or application name instead.")


def deployment(
    _func_or_class: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    num_replicas: int | str | None = None,
    ray_actor_options: dict[str, Any] | None = None,
    user_config: Any = None,
    max_ongoing_requests: Any = _UNSET,
    max_queued_requests: int | None = None,
    autoscaling_config: dict[str, Any] | Any | None = None,
    graceful_shutdown_wait_loop_s: float | None = None,
    graceful_shutdown_timeout_s: float | None = None,
    health_check_period_s: float | None = None,
    health_check_timeout_s: float | None = None,
    logging_config: dict[str, Any] | Any | None = None,
    max_constructor_retry_count: int | None = None,
    max_batch_size: int | None = None,
    batch_wait_timeout_s: float | None = None,
    batch_latency_target_s: float | None = None,
    max_replicas_per_node: int | None = None,
    placement_group_bundles: list[dict[str, float]] | None = None,
    placement_group_strategy: str | None = None,
    request_router_config: dict[str, Any] | Any | None = None,
    fork_after_init: bool | None = None,
    backpressure_config: dict[str, Any] | Any | None = None,
    rolling_update_percentage: float | None = None,
    max_surge_percent: int | None = None,
    placement_group_bundle_label_selector: list[dict[str, str]] | None = None,
    gang_scheduling_config: dict[str, Any] | Any | None = None,
    deployment_actors: list[Any] | None = None,
    **ray_only: Any,
) -> Any:
    """Turn a class or function into a `Deployment`, with or without options.

    Options are validated here, at definition time: a bad type, a negative count or an
    unknown option raises `ConfigError` (a ValueError and TypeError) naming the field.
    """
    if "max_concurrent_queries" in ray_only:  # Ray's old name
        _renamed_limit()
        value = ray_only.pop("max_concurrent_queries")
        if max_ongoing_requests is _UNSET:
            max_ongoing_requests = value
    if max_ongoing_requests is None:
        raise ConfigError(_NULL_LIMIT)
    if max_ongoing_requests is _UNSET:
        max_ongoing_requests = None
    _ignored_options(ray_only)
    unknown = set(ray_only) - _COMPAT_IGNORED - {"route_prefix"}
    if unknown:
        raise ConfigError(
            f"unknown deployment option(s) {sorted(unknown)}; allowed: name, " + ", ".join(_OPTION_NAMES)
        )
    given = {
        "num_replicas": num_replicas,
        "ray_actor_options": ray_actor_options,
        "user_config": user_config,
        "max_ongoing_requests": max_ongoing_requests,
        "max_queued_requests": max_queued_requests,
        "autoscaling_config": autoscaling_config,
        "graceful_shutdown_wait_loop_s": graceful_shutdown_wait_loop_s,
        "graceful_shutdown_timeout_s": graceful_shutdown_timeout_s,
        "health_check_period_s": health_check_period_s,
        "health_check_timeout_s": health_check_timeout_s,
        "logging_config": logging_config,
        "max_constructor_retry_count": max_constructor_retry_count,
        "max_batch_size": max_batch_size,
        "batch_wait_timeout_s": batch_wait_timeout_s,
        "batch_latency_target_s": batch_latency_target_s,
        "max_replicas_per_node": max_replicas_per_node,
        "placement_group_bundles": placement_group_bundles,
        "placement_group_strategy": placement_group_strategy,
        "request_router_config": request_router_config,
        "fork_after_init": fork_after_init,
        "backpressure_config": backpressure_config,
        "rolling_update_percentage": rolling_update_percentage,
        "max_surge_percent": max_surge_percent,
        "placement_group_bundle_label_selector": placement_group_bundle_label_selector,
        "gang_scheduling_config": gang_scheduling_config,
        "deployment_actors": deployment_actors,
    }
    options = {k: v for k, v in given.items() if v is not None}
    if "route_prefix" in ray_only:  # Ray 1.x: used by `.deploy()` only, not by serve.run
        options["route_prefix"] = ray_only["route_prefix"]

    def decorate(target: Callable[..., Any]) -> Deployment:
        if not (inspect.isclass(target) or callable(target)):
            raise ConfigError(f"@serve.deployment needs a class or a function, got {target!r}")
        opts = dict(options, name=name or target.__name__)
        return Deployment(target, opts)

    if isinstance(_func_or_class, str):  # Ray 1.x's positional name; Ray 2 ignores it too
        warn_not_honoured(
            "a positional deployment name",
            f"@serve.deployment({_func_or_class!r}) does not name the deployment (as in Ray Serve 2, "
            f"it is named after the class or function); write @serve.deployment(name={_func_or_class!r})")
        return decorate
    if _func_or_class is not None:
        return decorate(_func_or_class)
    return decorate
