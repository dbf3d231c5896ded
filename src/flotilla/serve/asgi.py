"""`@serve.ingress(app)`: run a whole FastAPI (or any ASGI) app inside each replica.

Route functions written as methods (`def get(self, item_id: int)`) are bound to the
replica's instance when it is constructed, so `self` is the deployment object; FastAPI
still sees the other parameters, types and dependencies exactly as written.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import typing
from typing import Any

__all__ = ["bind_routes", "ingress", "resolve_app"]

ASGI_ATTR = "__flotilla_asgi_app__"
#: The method a class given to `serve.ingress()` without an app defines to build it (Ray's).
BUILD_METHOD = "__serve_build_asgi_app__"


class LateApp:
    """The app of `serve.ingress()` given none: the class's `__serve_build_asgi_app__` builds it."""


class ASGIIngressDeployment:
    """The class of `serve.deployment(serve.ingress(app)())` (Ray's default): the app alone."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs


def resolve_app(app: Any, obj: Any) -> Any:
    """The ASGI app of a constructed replica object `obj`: `app` itself, or, for a builder
    function, what it returns, or for `LateApp`, what `obj.__serve_build_asgi_app__()`
    returns (either may be awaitable: the caller awaits it)."""
    if app is LateApp:
        return getattr(obj, BUILD_METHOD)()
    if inspect.isfunction(app):  # a builder, as in Ray (an ASGI callable is an object)
        return app()
    return app


def ingress(app: Any = None) -> Any:
    """Serve `app` (FastAPI, Starlette or any ASGI callable) as this deployment's HTTP ingress.

    Use on a class, under `@serve.deployment`::

        api = FastAPI()

        @serve.deployment
        @serve.ingress(api)
        class Model:
            @api.get("/predict/{x}")
            def predict(self, x: int) -> dict: ...

    As in Ray: `serve.deployment(serve.ingress(api)())` serves the app with no class of
    yours; a function instead of an app is a builder, called in each replica to make it; and
    `serve.ingress()` with no app lets the class's `__serve_build_asgi_app__()` build it after
    the constructor ran.
    """
    if app is not None and not callable(app):
        raise TypeError(f"@serve.ingress needs an ASGI app such as FastAPI(), got {app!r}")
    _make_state_picklable()

    def decorator(cls: Any = None) -> Any:
        from flotilla.serve.exceptions import ConfigError

        if cls is None:
            cls = type("ASGIIngressDeployment", (ASGIIngressDeployment,), {})
        if app is None and not hasattr(cls, BUILD_METHOD):
            raise ConfigError(f"serve.ingress() called without an app needs {getattr(cls, '__name__', cls)} "
                              f"to define `{BUILD_METHOD}` (returning the ASGI app)")
        if not inspect.isclass(cls):
            raise ConfigError("@serve.ingress must decorate a class (put it under @serve.deployment)")
        if any("__call__" in vars(base) for base in cls.__mro__[:-1]):
            raise ConfigError(
                f"Classes passed to @serve.ingress may not have __call__ method. {cls.__name__} defines "
                "__call__, which the ASGI app would hide (requests go to the app's routes): remove "
                "__call__ or drop @serve.ingress."
            )
        # Resolve string annotations here, where the module's globals exist: the class may
        # travel by value, and its functions then keep only the globals their code uses.
        for value in vars(cls).values():
            if inspect.isfunction(value):
                try:
                    value.__annotations__ = typing.get_type_hints(value, include_extras=True)
                except Exception:
                    pass
        if app is not None:
            _mark_endpoints(app, cls)
        setattr(cls, ASGI_ATTR, LateApp if app is None else app)
        return cls

    return decorator


def _rebuild_state(state: dict[str, Any]) -> Any:
    from starlette.datastructures import State

    return State(state)


def _make_state_picklable() -> None:
    """Starlette's `State` recurses in `__getattr__` when unpickled; pickle it as its dict.

    The app travels to each replica with the class (cloudpickle), like the rest of the code.
    """
    import copyreg

    try:
        from starlette.datastructures import State
    except ImportError:  # pragma: no cover
        return
    copyreg.pickle(State, lambda s: (_rebuild_state, (dict(s._state),)))


#: A route endpoint's attribute: the ingress class whose method it is, (module, qualname) as
#: at `@serve.ingress`; the class (and so its subclasses) holds its own under the same name (a
#: class shipped by value may come back with another qualname).
OWNER_ATTR = "__flotilla_ingress_of__"


def _method_of(fn: Any, cls: type) -> bool:
    """`fn` was defined in the body of `cls` or of a base class, even if a later definition of
    the same name hides it there (FastAPI keeps both routes)."""
    qualname = getattr(fn, "__qualname__", "")
    return inspect.isfunction(fn) and any(
        qualname.startswith(base.__qualname__ + ".") and "<locals>" not in qualname[len(base.__qualname__):]
        for base in cls.__mro__[:-1])


def _api_routes(routes: list[Any]) -> Any:
    """(route, the list holding it) of every route with an endpoint, included routers' too."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None and getattr(route, "include_context", None) is not None:
            yield from _api_routes(inner.routes)
        elif hasattr(route, "endpoint"):
            yield route, routes


def _mark_endpoints(app: Any, cls: type) -> None:
    """Mark the app's routes that are `cls`'s methods (hidden ones included) as `cls`'s: its
    replicas bind them all, and a replica of another ingress class sharing the app leaves
    them out (as Ray's class-based views do)."""
    owner = (cls.__module__, cls.__qualname__)
    setattr(cls, OWNER_ATTR, owner)
    router = getattr(app, "router", None)
    for route, _ in _api_routes(list(getattr(router, "routes", None) or [])):
        if _method_of(route.endpoint, cls):
            with contextlib.suppress(AttributeError, TypeError):
                setattr(route.endpoint, OWNER_ATTR, owner)


def _class_functions(cls: type) -> dict[int, str]:
    found: dict[int, str] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if inspect.isfunction(value):
                found[id(value)] = name
    return found


def _bound_endpoint(fn: Any, obj: Any) -> Any:
    """`fn` with `self` fixed to `obj`, keeping the rest of its signature and resolved hints."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:
        hints = {}
    params = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in list(sig.parameters.values())[1:]
    ]
    new_sig = sig.replace(parameters=params, return_annotation=hints.get("return", sig.return_annotation))
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def endpoint(*args: Any, **kwargs: Any) -> Any:
            return await fn(obj, *args, **kwargs)
    else:

        @functools.wraps(fn)
        def endpoint(*args: Any, **kwargs: Any) -> Any:
            return fn(obj, *args, **kwargs)

    endpoint.__signature__ = new_sig  # type: ignore[attr-defined]
    del endpoint.__wrapped__  # FastAPI must see the new signature, not the method's
    endpoint.__annotations__ = {p.name: p.annotation for p in params}
    return endpoint


def bind_routes(app: Any, cls: type, obj: Any) -> None:
    """Rebuild the app's method routes so their endpoints are bound to `obj`."""
    try:
        from fastapi.routing import APIRoute, APIWebSocketRoute
    except ImportError:  # plain Starlette/ASGI app: nothing to bind
        return
    router = getattr(app, "router", None)
    if router is None:
        return
    methods = _class_functions(cls)
    mine = getattr(cls, OWNER_ATTR, None)
    init_params = [p for p in inspect.signature(APIRoute.__init__).parameters if p not in ("self", "path", "endpoint")]
    ws_params = [p for p in inspect.signature(APIWebSocketRoute.__init__).parameters if p not in ("self", "path", "endpoint")]
    for route, holder in list(_api_routes(router.routes)):
        fn = route.endpoint
        owner = getattr(fn, OWNER_ATTR, None)
        if id(fn) not in methods and (owner is None or owner != mine):
            if owner is not None:  # another ingress class's method
                holder.remove(route)
            continue
        i = holder.index(route)
        if isinstance(route, APIWebSocketRoute):  # @app.websocket
            kwargs = {name: getattr(route, name) for name in ws_params if hasattr(route, name)}
            holder[i] = APIWebSocketRoute(route.path, _bound_endpoint(fn, obj), **kwargs)
        elif isinstance(route, APIRoute):
            kwargs = {name: getattr(route, name) for name in init_params if hasattr(route, name)}
            holder[i] = APIRoute(route.path, _bound_endpoint(fn, obj), **kwargs)
    if hasattr(app, "openapi_schema"):
        app.openapi_schema = None
