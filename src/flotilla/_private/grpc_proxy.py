"""gRPC ingress: a `grpc.aio` server in the proxy process, beside uvicorn, on its event loop.

`serve.start(grpc_options={"port": 9000, "grpc_servicer_functions": [...]})`: each servicer
function (generated `add_XServicer_to_server`) is imported and called with a capturing
stand-in server, which keeps the generic handlers it registers. Those give, per full method
name (`/pkg.Service/Method`), the request deserializer, the response serializer and the
kind (unary or server streaming). A request picks its application by the `application`
metadata key (default: the only one), and goes through the same `Router` as HTTP to the
application's ingress deployment, method `<Method>` (see `grpc_replica.py`). Ray Serve's
`/ray.serve.RayServeAPIService/ListApplications` and `/Healthz` are served here, their
small messages encoded by hand.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any

try:
    import grpc
    from grpc import aio
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gRPC ingress (serve.start(grpc_options=...)) needs grpcio: pip install 'flotilla[grpc]'"
    ) from e

from flotilla._private import grpc_replica
from flotilla._private.grpc_replica import GrpcTrailer
from flotilla._private.metrics import LATENCY_MS_BUCKETS, STORE
from flotilla.exceptions import RayActorError
from flotilla.serve.exceptions import BackPressureError, DeploymentUnavailableError
from flotilla.serve.generated.serve_pb2 import (
    encode_healthz,
    encode_list_applications,
)
from flotilla.serve.grpc_util import gRPCStatusError
from flotilla.serve.schema import DeploymentID

logger = logging.getLogger("flotilla.grpc")

SERVE_API = "ray.serve.RayServeAPIService"
LIST_APPLICATIONS = f"/{SERVE_API}/ListApplications"
HEALTHZ = f"/{SERVE_API}/Healthz"
_LIST_HINT = f"Please ping {LIST_APPLICATIONS} for available applications."


def declare(store: Any) -> None:
    """The gRPC metrics, Ray Serve's names and labels."""
    labels = ("route", "method", "application", "status_code")
    store.declare("counter", "ray_serve_num_grpc_requests", "gRPC requests handled by the proxy.", labels)
    store.declare("counter", "ray_serve_num_grpc_error_requests", "gRPC requests answered with a status other than OK.",
                  ("route", "error_code", "method", "application"))
    store.declare("counter", "ray_serve_num_deployment_grpc_error_requests",
                  "gRPC requests answered with a status other than OK, by deployment.",
                  ("deployment", "error_code", "method", "route", "application"))
    store.declare("histogram", "ray_serve_grpc_request_latency_ms", "End-to-end latency of gRPC requests at the proxy, ms.",
                  labels, LATENCY_MS_BUCKETS)
    store.declare("gauge", "ray_serve_num_ongoing_grpc_requests", "gRPC requests in progress at the proxy.", ("node_id",))


# RayServeAPIService's messages are hand-encoded in serve.generated.serve_pb2 (no protobuf needed).


# ---- servicer functions ------------------------------------------------------------------

class _AnyServicer:
    """Stands in for the user's servicer: every attribute is a callable that is never called."""

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


class _Capture:
    """Stands in for a `grpc.Server`: keeps the handlers a servicer function registers."""

    def __init__(self) -> None:
        self.handlers: list[Any] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, method_handlers: dict[str, Any]) -> None:
        self.handlers.append(grpc.method_handlers_generic_handler(service, method_handlers))


def capture(paths: list[str]) -> list[Any]:
    """The generic RPC handlers the servicer functions at `paths` register."""
    from flotilla.serve.config import gRPCOptions

    cap = _Capture()
    for fn in gRPCOptions.model_validate({"grpc_servicer_functions": paths}).grpc_servicer_func_callable:
        fn(_AnyServicer(), cap)
    return cap.handlers


class _Details:
    """What `HandlerCallDetails` carries: the method and the metadata."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata: tuple[Any, ...] = ()


# ---- the server ---------------------------------------------------------------------------

class GrpcIngress(grpc.GenericRpcHandler):
    """Routes every RPC of the captured services to an application's ingress deployment."""

    def __init__(self, proxy: Any, options: dict[str, Any]) -> None:
        self.proxy = proxy
        self.user = capture(list(options.get("grpc_servicer_functions") or []))
        self.timeout_s: float | None = options.get("request_timeout_s") or proxy.request_timeout_s
        self.cache: dict[str, Any] = {}
        self.ongoing = 0
        self._apps: tuple[Any, dict[str, DeploymentID]] = (None, {})
        declare(STORE)

    def _ongoing(self, delta: int) -> None:
        self.ongoing += delta
        STORE.set("ray_serve_num_ongoing_grpc_requests", (self.proxy.node_label,), float(self.ongoing))

    def apps(self) -> dict[str, DeploymentID]:
        """Application name -> ingress deployment, from the proxy's route table."""
        routes = self.proxy.routes
        if self._apps[0] is not routes:
            self._apps = (routes, {d.app_name: d for _, d in routes if isinstance(d, DeploymentID)})
        return self._apps[1]

    def service(self, handler_call_details: Any) -> Any:
        method = handler_call_details.method
        h = self.cache.get(method)
        if h is None:
            h = self.cache[method] = self._handler(method)
        return h

    def _handler(self, method: str) -> Any:
        if method == LIST_APPLICATIONS:
            return grpc.unary_unary_rpc_method_handler(
                self._list_applications, request_deserializer=bytes, response_serializer=encode_list_applications)
        if method == HEALTHZ:
            return grpc.unary_unary_rpc_method_handler(
                self._healthz, request_deserializer=bytes, response_serializer=encode_healthz)
        for g in self.user:
            mh = g.service(_Details(method))
            if mh is None:
                continue
            des, ser = mh.request_deserializer, mh.response_serializer
            if mh.request_streaming:
                return (grpc.stream_stream_rpc_method_handler if mh.response_streaming else grpc.stream_unary_rpc_method_handler)(
                    self._client_streaming, request_deserializer=des, response_serializer=ser)
            if mh.response_streaming:
                return grpc.unary_stream_rpc_method_handler(self._stream_for(method), request_deserializer=des, response_serializer=ser)
            return grpc.unary_unary_rpc_method_handler(self._unary_for(method), request_deserializer=des, response_serializer=ser)
        return None  # grpc answers UNIMPLEMENTED

    async def _list_applications(self, request: bytes, context: Any) -> list[str]:
        return sorted(self.apps())

    async def _healthz(self, request: bytes, context: Any) -> str:
        return "success"

    async def _client_streaming(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "client-streaming RPCs are not supported by flotilla's gRPC ingress")

    # ---- the request path ----

    def _target(self, md: dict[str, str]) -> tuple[str, DeploymentID] | str:
        """(application, ingress), or the NOT_FOUND message."""
        apps = self.apps()
        name = md.get("application")
        if not name:
            if len(apps) == 1:
                return next(iter(apps.items()))
            return f"Application metadata not set. {_LIST_HINT}"
        dep = apps.get(name)
        if dep is None:
            return f"Application '{name}' not found. {_LIST_HINT}"
        return name, dep

    def _prepare(self, context: Any) -> tuple[str, DeploymentID | None, dict[str, Any], str]:
        pairs = [(k, v) for k, v in (context.invocation_metadata() or ())]
        md = {k: v for k, v in pairs if isinstance(v, str)}
        rid = md.get("request_id") or self.proxy.ids.next().decode("latin-1")
        meta: dict[str, Any] = {"request_id": rid, "grpc": {"metadata": pairs, "peer": context.peer()}}
        if md.get("multiplexed_model_id"):
            meta["multiplexed_model_id"] = md["multiplexed_model_id"]
        target = self._target(md)
        if isinstance(target, str):
            meta["route"] = ""
            return md.get("application", ""), None, meta, target
        meta["route"] = target[0]
        return target[0], target[1], meta, ""

    def _timeout(self, context: Any) -> float | None:
        left = context.time_remaining()
        if self.timeout_s is None:
            return left
        return self.timeout_s if left is None else min(left, self.timeout_s)

    def _record(self, app: str, dep: Any, method: str, code: Any, t0: float, rid: str) -> None:
        ms = (time.perf_counter() - t0) * 1000.0
        name = code.name
        STORE.inc("ray_serve_num_grpc_requests", (app, method, app, name))
        STORE.observe("ray_serve_grpc_request_latency_ms", (app, method, app, name), ms)
        if code is not grpc.StatusCode.OK:
            STORE.inc("ray_serve_num_grpc_error_requests", (app, name, method, app))
            STORE.inc("ray_serve_num_deployment_grpc_error_requests",
                      ("" if dep is None else dep.name, name, method, app, app))
        self.proxy.access.add(rid, method, name, ms)

    def _error(self, e: BaseException, timeout: float | None) -> tuple[Any, str, list[tuple[str, Any]]]:
        """The status code, details and trailing metadata for a failed request (Ray's mapping)."""
        if isinstance(e, gRPCStatusError):
            return grpc.StatusCode[e.code], e.details or e.message, list(e.trailing)
        if isinstance(e, TimeoutError):
            return grpc.StatusCode.DEADLINE_EXCEEDED, f"Request timed out after {timeout}s.", []
        if isinstance(e, (BackPressureError, DeploymentUnavailableError)):
            return grpc.StatusCode.UNAVAILABLE, str(e), []
        if not isinstance(e, RayActorError):
            logger.warning("gRPC request failed: %r", e)
        return grpc.StatusCode.INTERNAL, str(e) or type(e).__name__, []

    @staticmethod
    def _apply(context: Any, code: str, details: str, trailing: list[tuple[str, Any]], rid: str) -> Any:
        context.set_trailing_metadata((("request_id", rid), *trailing))
        status = grpc.StatusCode[code]
        if status is not grpc.StatusCode.OK:
            context.set_code(status)
            if details:
                context.set_details(details)
        return status

    async def _begin(self, context: Any) -> tuple[str, DeploymentID, dict[str, Any], float | None]:
        """(application, ingress, meta, timeout); aborts with NOT_FOUND for an unknown app."""
        app, dep, meta, missing = self._prepare(context)
        if dep is None:
            context.set_trailing_metadata((("request_id", meta["request_id"]),))
            raise _Abort(grpc.StatusCode.NOT_FOUND, missing, app, meta["request_id"])
        return app, dep, meta, self._timeout(context)

    def _unary_for(self, method: str) -> Any:
        rpc = grpc_replica.UNARY + method.rsplit("/", 1)[-1]

        async def unary(request: Any, context: Any) -> Any:
            t0 = time.perf_counter()
            code, app, rid = grpc.StatusCode.INTERNAL, "", ""
            dep: DeploymentID | None = None
            timeout: float | None = None
            self._ongoing(1)
            try:
                try:
                    app, dep, meta, timeout = await self._begin(context)
                    rid = meta["request_id"]
                    async with asyncio.timeout(timeout):
                        reply = await self.proxy.rt.router(dep).call(rpc, (request,), {}, meta)
                except _Abort as a:
                    code, app, rid = a.code, a.app, a.rid
                    await context.abort(a.code, a.details)
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except Exception as e:
                    code, details, trailing = self._error(e, timeout)
                    context.set_trailing_metadata((("request_id", rid), *trailing))
                    await context.abort(code, details)
                code = self._apply(context, reply.code, reply.details, reply.trailing, rid)
                return reply.result
            finally:
                self._ongoing(-1)
                self._record(app, dep, method, code, t0, rid)

        return unary

    def _stream_for(self, method: str) -> Any:
        rpc = grpc_replica.STREAM + method.rsplit("/", 1)[-1]

        async def stream(request: Any, context: Any) -> Any:
            t0 = time.perf_counter()
            code, app, rid = grpc.StatusCode.INTERNAL, "", ""
            dep: DeploymentID | None = None
            timeout: float | None = None
            self._ongoing(1)
            trailer = None
            try:
                try:
                    app, dep, meta, timeout = await self._begin(context)
                    rid = meta["request_id"]
                    async with asyncio.timeout(timeout):
                        async for item in self.proxy.rt.router(dep).stream(rpc, (request,), {}, meta):
                            if item.__class__ is GrpcTrailer:
                                trailer = item
                            else:
                                yield item
                except _Abort as a:
                    code, app, rid = a.code, a.app, a.rid
                    await context.abort(a.code, a.details)
                except (asyncio.CancelledError, GeneratorExit):
                    code = grpc.StatusCode.CANCELLED
                    raise
                except Exception as e:
                    code, details, trailing = self._error(e, timeout)
                    context.set_trailing_metadata((("request_id", rid), *trailing))
                    await context.abort(code, details)
                code = self._apply(context, *(trailer or ("OK", "", [])), rid)
            finally:
                self._ongoing(-1)
                self._record(app, dep, method, code, t0, rid)

        return stream


class _Abort(Exception):
    def __init__(self, code: Any, details: str, app: str, rid: str) -> None:
        super().__init__(details)
        self.code, self.details, self.app, self.rid = code, details, app, rid


async def start(proxy: Any, args: dict[str, Any]) -> Any:
    """Start the gRPC server for `args["grpc_options"]` (None when it is disabled: port 0 or
    no servicer functions, as in Ray)."""
    options = args.get("grpc_options") or {}
    port = int(options.get("port", 0) or 0)
    if not port or not options.get("grpc_servicer_functions"):
        return None
    for p in reversed(options.get("sys_path") or []):  # the driver's, for the servicer modules
        if p not in sys.path and os.path.isdir(p):
            sys.path.insert(0, p)
    ingress = GrpcIngress(proxy, options)
    server = aio.server()
    server.add_generic_rpc_handlers((ingress,))
    host = args.get("host", "127.0.0.1")
    bound = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    await server.start()
    server.flotilla_ingress = ingress  # type: ignore[attr-defined]
    logger.info("gRPC ingress listening on %s:%d", host, bound)
    return server
