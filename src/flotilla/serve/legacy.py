"""The Ray 1.x ("seed-era") API, as a thin layer over `serve.run` and applications.

Articles and notebooks written for Ray Serve 1.x still circulate; their code runs here with
only the import changed:

- `Deployment.deploy(*init_args, **init_kwargs)` runs the deployment as its own application,
  named after the deployment, at `route_prefix` (a deployment option here, as in Ray 1.x;
  default `/{name}`; None: handles only). It blocks until the application is RUNNING and
  raises `RuntimeError` on DEPLOY_FAILED, as `serve.run` does; deploying again updates it in
  place under `serve.run`'s rules. `Deployment.delete()` deletes that application.
- `serve.get_deployment(name)` and `serve.list_deployments()` read what runs from the
  controller: options, route, code and constructor arguments, so
  `serve.get_deployment("m").options(num_replicas=3).deploy()` redeploys it.
- `serve.start(...)` returns a `ServeControllerClient` (`get_handle`, `list_deployments`,
  `delete_deployment`, `shutdown`); code that ignores the value is unaffected.
- Handles from `client.get_handle(name)` (and `Deployment.get_handle()`) pass a single
  positional argument as a `HandleRequest`, whose `.json()` returns it, as Ray 1.x handle
  requests did; other calls go through unchanged.

Over HTTP a request's `.json()` already works without `await` for every deployment (the
replica's request object returns the parsed body, which is itself awaitable), so a seed's
`data = request.json()` and a modern `await request.json()` both work; nothing here changes
the HTTP path. Traffic splitting (`set_route`) is `serve.set_traffic`; `get_handle` of its
endpoint name gives a handle that splits calls the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import cloudpickle

from flotilla._private.awaitable import Ready, json_value
from flotilla.serve.exceptions import RayServeException

if TYPE_CHECKING:
    from flotilla.serve.deployments import Deployment
    from flotilla.serve.handle import (
        DeploymentHandle,
        DeploymentResponse,
        DeploymentResponseGenerator,
    )

__all__ = [
    "HandleRequest",
    "LegacyHandle",
    "ServeControllerClient",
    "get_deployment",
    "list_deployments",
]


def deploy(dep: Deployment, init_args: tuple[Any, ...], init_kwargs: dict[str, Any], blocking: bool = True) -> None:
    """`Deployment.deploy()`: `serve.run(dep.bind(...), name=dep.name, route_prefix=...)`.

    With no arguments, a deployment from `get_deployment` keeps the constructor arguments it
    runs with."""
    from flotilla.serve import api

    if not init_args and not init_kwargs and "_init" in dep._options:
        init_args, init_kwargs = dep._options["_init"]
    api.run(dep.bind(*init_args, **init_kwargs), name=dep.name, route_prefix=dep.route_prefix, _blocking=blocking)


def delete(dep: Deployment) -> None:
    """`Deployment.delete()`: delete the application named after it (nothing if none)."""
    from flotilla.serve import api

    api.delete(dep.name)


def _specs(name: str | None = None) -> list[dict[str, Any]]:
    from flotilla._private.client import Runtime

    rt = Runtime.existing()
    if rt is None:
        return []
    return list(rt.call_head("deployment_specs", name))


def _pick(specs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> spec. A name in several applications: the application named after it (what
    `.deploy()` made) is `name`, the others `app#name`."""
    out: dict[str, dict[str, Any]] = {}
    for s in sorted(specs, key=lambda s: s["app"] != s["name"]):
        key = s["name"] if s["name"] not in out else f"{s['app']}#{s['name']}"
        out[key] = s
    return out


def _from_spec(s: dict[str, Any]) -> Deployment:
    from flotilla.serve.deployments import Deployment

    options = {k: v for k, v in s["config"].items() if v is not None}
    if options.get("ray_actor_options"):  # stored whole: read back what differs from the defaults
        from flotilla.serve.config import RayActorOptions

        options["ray_actor_options"] = RayActorOptions.model_validate(options["ray_actor_options"]).model_dump(
            exclude_defaults=True)
    if options.get("num_replicas") is None and options.get("autoscaling_config") is None:
        options["num_replicas"] = s["target"]
    options["route_prefix"] = s["route_prefix"]
    try:
        target = cloudpickle.loads(s["def_bytes"])
        options["_init"] = cloudpickle.loads(s["args_bytes"])
    except Exception as e:  # code this process cannot import: the options are still useful
        target = _unavailable(s["name"], e)
    return Deployment(target, options)


def _unavailable(name: str, error: Exception) -> Any:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise RayServeException(f"the code of deployment {name!r} could not be loaded in this process: {error}")

    unavailable.__name__ = name
    return unavailable


def _missing(name: str, known: dict[str, Any]) -> KeyError:
    names = ", ".join(sorted(known)) or "none"
    return KeyError(f"Deployment {name!r} does not exist; deployments: {names}")


def get_deployment(name: str) -> Deployment:
    """The deployment `name` as it runs (options, route, code, constructor arguments).

    Raises:
        KeyError: no deployment has that name (the message lists those that exist).
    """
    found = _pick(_specs())
    if name not in found:
        raise _missing(name, found)
    return _from_spec(found[name])


def list_deployments() -> dict[str, Deployment]:
    """Every running deployment, by name (see `get_deployment`)."""
    return {k: _from_spec(s) for k, s in _pick(_specs()).items()}


def get_handle(name: str) -> LegacyHandle:
    """A Ray 1.x handle to deployment `name` (of whichever application runs it)."""
    from flotilla.serve.handle import DeploymentHandle

    found = _pick(_specs())
    if name not in found:
        split = _split_handle(name)
        if split is not None:
            return LegacyHandle(split)
        raise _missing(name, found)
    s = found[name]
    return LegacyHandle(DeploymentHandle(s["name"], s["app"]))


def _split_handle(name: str) -> DeploymentHandle | None:
    """A handle to the traffic split `name` (`set_route`'s endpoint), or None if there is none."""
    from flotilla._private.client import Runtime
    from flotilla.serve.handle import SplitHandle

    rt = Runtime.existing()
    info = rt.call_head("app_info", name) if rt is not None else None
    return SplitHandle(name) if info is not None and "split" in info else None


class HandleRequest:
    """A handle call's single argument dressed as a request (Ray 1.x handle requests).

    `.json()` returns the argument (with or without `await`), `.body()` its bytes when it is
    bytes or str, `.data` the argument itself; `.query_params` and `.headers` are empty.
    """

    __slots__ = ("data",)

    method = "POST"
    path = "/"

    def __init__(self, data: Any) -> None:
        self.data = data

    @property
    def query_params(self) -> dict[str, str]:
        return {}

    @property
    def headers(self) -> dict[str, str]:
        return {}

    def json(self) -> Any:
        value = self.data
        if isinstance(value, (bytes, str)):
            import json

            value = json.loads(value)
        return json_value(value)

    def body(self) -> Any:
        value = self.data
        return Ready(value.encode() if isinstance(value, str) else value)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (HandleRequest, (self.data,))

    def __repr__(self) -> str:
        return f"HandleRequest({self.data!r})"


class LegacyHandle:
    """A `DeploymentHandle` whose single positional argument arrives as a `HandleRequest`.

    `.remote()` returns the usual `DeploymentResponse` (`.result()`, `await`); `.options()`
    and method attributes (`handle.other_method.remote(...)`) keep the wrapping.
    """

    __slots__ = ("_handle",)

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    @property
    def deployment_name(self) -> str:
        return self._handle.deployment_name

    @property
    def app_name(self) -> str:
        return self._handle.app_name

    def options(self, **kwargs: Any) -> LegacyHandle:
        return LegacyHandle(self._handle.options(**kwargs))

    def __getattr__(self, name: str) -> LegacyHandle:
        if name.startswith("_"):
            raise AttributeError(name)
        return LegacyHandle(self._handle.options(method_name=name))

    def remote(self, *args: Any, **kwargs: Any) -> DeploymentResponse | DeploymentResponseGenerator:
        if len(args) == 1 and not kwargs:
            from flotilla.serve.handle import DeploymentResponse

            if not isinstance(args[0], DeploymentResponse):
                args = (HandleRequest(args[0]),)
        return self._handle.remote(*args, **kwargs)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (LegacyHandle, (self._handle,))

    def __repr__(self) -> str:
        return f"LegacyHandle(deployment='{self.deployment_name}', app='{self.app_name}')"


class ServeControllerClient:
    """What `serve.start()` returns (Ray 1.x's client). Every method acts on the cluster this
    driver is connected to."""

    def get_handle(self, name: str, **_ray_compat: Any) -> LegacyHandle:
        """A handle to deployment `name`; see `LegacyHandle`.

        Raises:
            KeyError: no deployment has that name (the message lists those that exist).
        """
        return get_handle(name)

    def list_deployments(self) -> dict[str, Deployment]:
        return list_deployments()

    def delete_deployment(self, name: str) -> None:
        """Delete the application that runs deployment `name` (made by `.deploy()`)."""
        from flotilla.serve import api

        found = _pick(_specs())
        if name not in found:
            raise _missing(name, found)
        s = found[name]
        if s["app"] != s["name"]:
            raise RayServeException(
                f"deployment {name!r} is part of application {s['app']!r}; delete the application "
                f"with serve.delete({s['app']!r})"
            )
        api.delete(s["app"])

    def delete_deployments(self, names: list[str]) -> None:
        for name in names:
            self.delete_deployment(name)

    def shutdown(self) -> None:
        """`serve.shutdown()`: delete every application and stop the proxy."""
        from flotilla.serve import api

        api.shutdown()

    def __repr__(self) -> str:
        return "ServeControllerClient()"
