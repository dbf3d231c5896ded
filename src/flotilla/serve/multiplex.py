"""Model multiplexing: many models per deployment, loaded on demand, least recently used out.

    @serve.deployment
    class Models:
        @serve.multiplexed(max_num_models_per_replica=3)
        async def get_model(self, model_id: str):
            return load(model_id)

        async def __call__(self, request):
            model = await self.get_model(serve.get_multiplexed_model_id())

The model id comes from the `serve_multiplexed_model_id` HTTP header or
`handle.options(multiplexed_model_id=...)`. Each replica tells the controller which models it
holds, and routers send a request to a replica that already has its model when one has room.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flotilla._private import context
from flotilla._private.metrics import LATENCY_MS_BUCKETS, STORE
from flotilla.serve.exceptions import ConfigError

__all__ = ["RequestContext", "get_multiplexed_model_id", "get_request_context", "multiplexed"]

logger = logging.getLogger("flotilla.multiplex")

MODEL_ID_HEADER = "serve_multiplexed_model_id"


@dataclass(frozen=True)
class RequestContext:
    """What is known about the request being handled (see `get_request_context`)."""

    request_id: str = ""
    route: str = ""
    app_name: str = ""
    multiplexed_model_id: str = ""


def get_request_context() -> RequestContext:
    """The current request's id (the `X-Request-ID` the client sent or the proxy made, also
    returned as a response header and kept across handle calls), route and model id."""
    meta = context.request_meta.get() or {}
    ctx = context.replica_context
    return RequestContext(
        request_id=meta.get("request_id", ""),
        route=meta.get("route", ""),
        app_name=ctx.app_name if ctx is not None else "",
        multiplexed_model_id=meta.get("multiplexed_model_id", "") or "",
    )


def get_multiplexed_model_id() -> str:
    """The model id of the request being handled ('' when none was given)."""
    meta = context.request_meta.get()
    return (meta or {}).get("multiplexed_model_id", "") or ""


# Ray Serve's multiplexing metrics, per replica.
_REPLICA = ("deployment", "replica", "application")
STORE.declare("histogram", "ray_serve_multiplexed_model_load_latency_ms", "Time to load a multiplexed model, ms.",
              _REPLICA, LATENCY_MS_BUCKETS)
STORE.declare("histogram", "ray_serve_multiplexed_model_unload_latency_ms", "Time to unload a multiplexed model, ms.",
              _REPLICA, LATENCY_MS_BUCKETS)
STORE.declare("gauge", "ray_serve_num_multiplexed_models", "Multiplexed models a replica holds.", _REPLICA)
STORE.declare("counter", "ray_serve_multiplexed_models_load_counter", "Multiplexed models loaded.", _REPLICA)
STORE.declare("counter", "ray_serve_multiplexed_models_unload_counter", "Multiplexed models unloaded.", _REPLICA)
STORE.declare("gauge", "ray_serve_registered_multiplexed_model_id", "1 for each multiplexed model a replica holds.",
              (*_REPLICA, "model_id"))
STORE.declare("counter", "ray_serve_multiplexed_get_model_requests_counter",
              "Calls of a replica's @serve.multiplexed loader (cached or not).", _REPLICA)


class _ModelCache:
    def __init__(self, loader: Callable[..., Any], owner: Any, limit: int) -> None:
        self.loader = loader
        self.owner = owner
        self.limit = limit
        self.models: OrderedDict[str, Any] = OrderedDict()
        self.loading: dict[str, asyncio.Future[Any]] = {}

    async def get(self, model_id: str) -> Any:
        if not isinstance(model_id, str) or not model_id:
            raise ValueError(f"a multiplexed model id must be a non-empty string, got {model_id!r}")
        labels = context.replica_labels()
        if labels is not None:
            STORE.inc("ray_serve_multiplexed_get_model_requests_counter", labels)
        if model_id in self.models:
            self.models.move_to_end(model_id)
            return self.models[model_id]
        pending = self.loading.get(model_id)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.loading[model_id] = fut
        try:
            while self.limit > 0 and len(self.models) >= self.limit:
                await self._evict()
            args = (self.owner, model_id) if self.owner is not None else (model_id,)
            t0 = time.perf_counter()
            model = await self.loader(*args)
            self.models[model_id] = model
            fut.set_result(model)
            _report(list(self.models))
            if labels is not None:
                STORE.observe("ray_serve_multiplexed_model_load_latency_ms", labels, (time.perf_counter() - t0) * 1000.0)
                STORE.inc("ray_serve_multiplexed_models_load_counter", labels)
                STORE.set("ray_serve_registered_multiplexed_model_id", (*labels, model_id), 1.0)
                STORE.set("ray_serve_num_multiplexed_models", labels, float(len(self.models)))
            return model
        except BaseException as e:
            if not fut.done():
                fut.set_exception(e)
                fut.exception()  # retrieved: waiters get it; nobody else must see a warning
            raise
        finally:
            self.loading.pop(model_id, None)

    async def _evict(self) -> None:
        old_id, model = self.models.popitem(last=False)
        logger.info("evicting model %r (least recently used)", old_id)
        _report(list(self.models))
        t0 = time.perf_counter()
        cleanup = getattr(model, "__del__", None)
        if cleanup is not None:
            try:
                result = cleanup()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("cleanup of model %r failed", old_id)
        labels = context.replica_labels()
        if labels is not None:
            STORE.observe("ray_serve_multiplexed_model_unload_latency_ms", labels, (time.perf_counter() - t0) * 1000.0)
            STORE.inc("ray_serve_multiplexed_models_unload_counter", labels)
            STORE.set("ray_serve_registered_multiplexed_model_id", (*labels, old_id), 0.0)
            STORE.set("ray_serve_num_multiplexed_models", labels, float(len(self.models)))


def _report(model_ids: list[str]) -> None:
    hook = context.on_models_changed
    if hook is not None:
        hook(model_ids)


def multiplexed(func: Callable[..., Any] | None = None, *, max_num_models_per_replica: int = 3) -> Any:
    """Cache the models an async loader returns, per replica, evicting the least recently used.

    Args:
        max_num_models_per_replica: models kept per replica; -1 means no limit.
    """
    if isinstance(max_num_models_per_replica, bool) or not isinstance(max_num_models_per_replica, int) or (
        max_num_models_per_replica < 1 and max_num_models_per_replica != -1
    ):
        raise ConfigError(
            f"max_num_models_per_replica must be a positive int or -1, got {max_num_models_per_replica!r}"
        )

    def decorate(fn: Callable[..., Any]) -> Any:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@serve.multiplexed needs an 'async def' loader; {fn.__qualname__} is not")
        params = list(inspect.signature(fn).parameters)
        is_method = bool(params) and params[0] == "self"
        attr = f"__flotilla_models_{fn.__name__}"

        if is_method:

            @functools.wraps(fn)
            async def method(self: Any, model_id: str) -> Any:
                cache = self.__dict__.get(attr)
                if cache is None:
                    cache = self.__dict__[attr] = _ModelCache(fn, self, max_num_models_per_replica)
                return await cache.get(model_id)

            return method
        holder: dict[str, _ModelCache] = {}

        @functools.wraps(fn)
        async def function(model_id: str) -> Any:
            cache = holder.get("c")
            if cache is None:
                cache = holder["c"] = _ModelCache(fn, None, max_num_models_per_replica)
            return await cache.get(model_id)

        return function

    return decorate(func) if func is not None else decorate
