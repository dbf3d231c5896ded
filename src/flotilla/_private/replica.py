"""The replica process: runs one copy of a deployment's user code.

Started by the zygote (a fork). It listens on its own Unix socket for data-plane frames
from routers, and keeps one control connection to the head: the head hands it the
deployment's code on `replica_register`, asks for health checks and `reconfigure`, and
tells it to drain and stop. When the control connection drops (head gone), it exits.

Concurrency: at most `max_ongoing_requests` requests run at once, whatever the number of
routers sending; the rest wait here, in arrival order. Sync user code runs in a thread
pool so it never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import json
import logging
import os
import sys
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cloudpickle

from flotilla._private import context, http_util, metrics
from flotilla._private.metrics import STORE
from flotilla._private.protocol import (
    CANCEL,
    CHUNK,
    END,
    ERR,
    HFULL,
    HSTART,
    HTTP,
    OK,
    STREAM,
    YIELD,
)
from flotilla._private.transport import FrameProtocol, RpcPeer, connect_unix, frame
from flotilla.serve.schema import DeploymentID, ReplicaContext, ReplicaID

logger = logging.getLogger("flotilla.replica")

_SYNC, _ASYNC, _ON_LOOP = 0, 1, 2  # how a user method is invoked


class _Awaitable:
    """A value that is also an already-finished awaitable (`await request.json()` works on a
    body that has arrived, and so does the synchronous `request.json()` the seeds write)."""

    __slots__ = ()

    def __await__(self):  # type: ignore[no-untyped-def]
        yield from ()
        return self


class _Ready(_Awaitable):
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self):  # type: ignore[no-untyped-def]
        yield from ()
        return self.value


class _AwaitableDict(_Awaitable, dict):  # type: ignore[type-arg]
    __slots__ = ()


class _AwaitableList(_Awaitable, list):  # type: ignore[type-arg]
    __slots__ = ()


class _AwaitableBytes(_Awaitable, bytes):
    __slots__ = ()


def _make_request_class() -> type:
    from starlette.requests import Request

    class ServeRequest(Request):
        """A Starlette Request whose body has already arrived.

        `await request.json()` works as usual; so does the synchronous `request.json()` that
        the seed articles (and many Ray Serve examples) write: for a JSON object or array the
        result is the parsed value itself, which is also awaitable.
        """

        def body(self):  # type: ignore[override]
            return _AwaitableBytes(self._body)

        def json(self):  # type: ignore[override]
            if not hasattr(self, "_json"):
                self._json = json.loads(self._body)
            value = self._json
            if isinstance(value, dict):
                return _AwaitableDict(value)
            if isinstance(value, list):
                return _AwaitableList(value)
            return _Ready(value)

    return ServeRequest


_request_class: Any = None


class Replica:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args
        self.replica_id: str = args["replica_id"]
        self.loop = asyncio.get_running_loop()
        self.obj: Any = None
        self.is_function = False
        self.max_ongoing = 5
        self.ongoing = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.tasks: dict[tuple[int, int], asyncio.Task[None]] = {}
        self.methods: dict[str, tuple[Any, int]] = {}
        self.pool: ThreadPoolExecutor | None = None
        self.stopped = asyncio.Event()
        self.head: RpcPeer | None = None
        self.http_entry: Any = None
        self.dep_name: str = args["deployment"]
        self.app_name: str = args["app"]
        self.metrics = metrics.enabled()
        self.access = metrics.AccessLog(f"replica {self.replica_id}")
        metrics.declare_builtins(STORE)
        STORE.declare("gauge", "ray_serve_replica_processing_queries", "Requests running in a replica.", ("deployment", "replica", "application"))
        STORE.declare("gauge", "flotilla_replica_queued_requests", "Requests waiting inside a replica for a slot (max_ongoing_requests).", ("deployment", "replica", "application"))
        self.asgi_app: Any = None
        self.lifespan: Any = None
        self.num_requests = 0

    # ---- start-up -------------------------------------------------------------------
    async def run(self) -> None:
        args = self.args
        server = await self.loop.create_unix_server(self._make_conn, args["sock_path"])
        self.head = RpcPeer(self._control, name="head")
        await connect_unix(args["head_sock"], self.head)
        self.head.on_close(self.stopped.set)
        from flotilla._private import client

        client.Runtime.attach(self.loop, self.head)
        spec = await self.head.call("replica_register", self.replica_id, os.getpid())
        try:
            await self._construct(spec)
        except BaseException as e:
            tb = "".join(traceback.format_exception(e))
            logger.error("constructor failed:\n%s", tb)
            await self.head.call("replica_failed", self.replica_id, tb)
            return
        direct_server = None
        if args.get("direct"):
            from flotilla._private.direct import DirectIngress

            try:
                direct_server = await DirectIngress(self, args["direct"]).start()
            except OSError as e:
                msg = f"direct ingress could not listen on {args['direct']['host']}:{args['direct']['port']}: {e}"
                logger.error(msg)
                await self.head.call("replica_failed", self.replica_id, msg)
                return
        logger.info("replica %s ready (pid %d)", self.replica_id, os.getpid())
        await self.head.call("replica_ready", self.replica_id)
        await self.stopped.wait()
        if direct_server is not None:
            direct_server.should_exit = True
        server.close()

    async def _construct(self, spec: dict[str, Any]) -> None:
        cfg = spec["config"]
        self.max_ongoing = cfg["max_ongoing_requests"]
        self.pool = ThreadPoolExecutor(max(2, self.max_ongoing), thread_name_prefix="replica")
        self.loop.set_default_executor(self.pool)
        target = cloudpickle.loads(spec["def_bytes"])
        init_args, init_kwargs = cloudpickle.loads(spec["args_bytes"])
        dep = DeploymentID(self.args["deployment"], self.args["app"])
        context.on_models_changed = self._models_changed
        context.replica_context = ReplicaContext(
            app_name=dep.app_name,
            deployment=dep.name,
            replica_tag=self.replica_id,
            replica_id=ReplicaID(self.replica_id, dep),
        )
        if inspect.isclass(target):
            obj = target(*init_args, **init_kwargs)
            asgi = getattr(target, "__flotilla_asgi_app__", None)
            if asgi is not None:
                from flotilla.serve.asgi import bind_routes

                bind_routes(asgi, target, obj)
                self.asgi_app = asgi
                lifespan = getattr(getattr(asgi, "router", None), "lifespan_context", None)
                if lifespan is not None:
                    self.lifespan = lifespan(asgi)
                    await self.lifespan.__aenter__()
        else:
            self.is_function = True
            obj = target
        context.replica_context.servable_object = obj
        self.obj = obj
        user_config = cfg.get("user_config")
        if user_config is not None:
            await self._reconfigure(user_config)
        self.http_entry = self._ingress_callable(cfg)

    def _ingress_callable(self, cfg: dict[str, Any]) -> Any:
        fn = self.obj if self.is_function else getattr(self.obj, "__call__", None)  # noqa: B004
        if fn is None:
            return None
        if cfg.get("max_batch_size"):
            from flotilla.serve.batching import batched_caller

            fn = batched_caller(fn, cfg["max_batch_size"], cfg.get("batch_wait_timeout_s", 0.0))
            self.methods["__call__"] = (fn, _ASYNC)
        return fn

    def _models_changed(self, model_ids: list[str]) -> None:
        if self.head is not None:
            self.head.notify("replica_models", self.replica_id, model_ids)

    async def _reconfigure(self, user_config: Any) -> None:
        fn = getattr(self.obj, "reconfigure", None)
        if fn is None:
            raise RuntimeError(
                "user_config was given but the deployment class defines no reconfigure(self, config)"
            )
        await self._invoke(fn, (user_config,), {})

    async def _invoke(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if inspect.iscoroutinefunction(fn):
            return await fn(*args, **kwargs)
        ctx = contextvars.copy_context()
        result = await self.loop.run_in_executor(self.pool, functools.partial(ctx.run, fn, *args, **kwargs))
        if inspect.isawaitable(result):
            result = await result
        return result

    # ---- control plane ----------------------------------------------------------------
    async def _control(self, peer: RpcPeer, op: str, args: tuple[Any, ...]) -> Any:
        if op == "update":
            from flotilla._private import client

            client.Runtime.current().on_update(*args)
            return None
        if op == "health":
            fn = getattr(self.obj, "check_health", None)
            if fn is not None:
                await self._invoke(fn, (), {})
            return self.ongoing
        if op == "update_config":
            light = args[0]
            self.max_ongoing = light["max_ongoing_requests"]
            while self.waiters and self.ongoing < self.max_ongoing:
                self.ongoing += 1
                fut = self.waiters.popleft()
                if not fut.done():
                    fut.set_result(None)
                else:
                    self.ongoing -= 1
            if light.get("user_config") is not None:
                await self._reconfigure(light["user_config"])
            return None
        if op == "metrics":
            labels = (self.dep_name, self.replica_id, self.app_name)
            STORE.set("ray_serve_replica_processing_queries", labels, float(self.ongoing))
            STORE.set("flotilla_replica_queued_requests", labels, float(len(self.waiters)))
            return STORE.snapshot()
        if op == "stats":
            return {"ongoing": self.ongoing, "queued": len(self.waiters), "requests": self.num_requests}
        if op == "stop":
            await self._drain(*args)
            self.loop.call_later(0.01, self.stopped.set)
            return None
        raise ValueError(f"unknown control op {op!r}")

    async def _drain(self, wait_loop_s: float, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.ongoing or self.waiters:
            left = deadline - time.monotonic()
            if left <= 0:
                logger.warning("graceful shutdown timed out with %d requests ongoing", self.ongoing)
                break
            await asyncio.sleep(min(max(wait_loop_s, 0.01), left))
        for t in list(self.tasks.values()):
            t.cancel()
        if self.lifespan is not None:
            try:
                await self.lifespan.__aexit__(None, None, None)
            except Exception:
                logger.exception("ASGI lifespan shutdown failed")
        fn = getattr(type(self.obj), "__del__", None) if self.obj is not None else None
        if fn is not None:
            try:
                result = fn(self.obj)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("__del__ raised")

    # ---- data plane -------------------------------------------------------------------
    def _make_conn(self) -> FrameProtocol:
        proto = FrameProtocol(lambda m: None)
        proto._on_message = functools.partial(self._on_request, proto)  # type: ignore[method-assign]
        return proto

    def _on_request(self, proto: FrameProtocol, msg: tuple[Any, ...]) -> None:
        key = (id(proto), msg[0])
        if msg[1] == CANCEL:
            task = self.tasks.get(key)
            if task is not None:
                task.cancel()
            return
        self.tasks[key] = self.loop.create_task(self._handle(proto, msg, key))

    async def _acquire(self) -> None:
        if self.ongoing < self.max_ongoing and not self.waiters:
            self.ongoing += 1
            return
        fut = self.loop.create_future()
        self.waiters.append(fut)
        try:
            await fut  # the slot is handed over by _release
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()
            else:
                self.waiters.remove(fut)
            raise

    def _release(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.ongoing -= 1

    async def _handle(self, proto: FrameProtocol, msg: tuple[Any, ...], key: tuple[int, int]) -> None:
        rid = msg[0]
        try:
            await self._acquire()
        except asyncio.CancelledError:
            self.tasks.pop(key, None)
            return
        self.num_requests += 1
        t0 = time.perf_counter()
        status: Any = "OK"
        kind = msg[1]
        meta = msg[4] if kind == HTTP else msg[5]
        if meta is not None:
            context.request_meta.set(meta)
        try:
            if kind == HTTP:
                status = await self._handle_http(proto, rid, msg[2], msg[3])
                return
            _, _, method, args, kwargs, _ = msg
            fn, mode = self.methods.get(method) or self._resolve(method)
            if mode == _ASYNC:
                result = await fn(*args, **kwargs)
            elif mode == _ON_LOOP:
                result = fn(*args, **kwargs)
            else:
                result = await self._invoke(fn, args, kwargs)
            if kind == STREAM:
                await self._stream(proto, rid, result)
                return
            if inspect.isgenerator(result) or inspect.isasyncgen(result) or hasattr(result, "__aiter__"):
                raise TypeError(
                    f"Method '{method}' returned a generator. Call it with "
                    "handle.options(stream=True) to receive its items."
                )
            try:
                data = frame((rid, OK, result))
            except Exception as e:
                raise TypeError(f"the return value of '{method}' could not be pickled: {e}") from e
            proto.send_raw(data)
        except asyncio.CancelledError:
            status = "CANCELLED"
        except BaseException as e:
            status = "ERROR"
            self._send_error(proto, rid, e)
        finally:
            self.tasks.pop(key, None)
            self._release()
            if self.metrics:
                self._record(msg, meta, status, t0)

    def _record(self, msg: tuple[Any, ...], meta: Any, status: Any, t0: float) -> None:
        ms = (time.perf_counter() - t0) * 1000.0
        route = (meta or {}).get("route", "") if msg[1] == HTTP else msg[2]
        labels = (self.dep_name, self.replica_id, route, self.app_name)
        STORE.inc("ray_serve_deployment_request_counter", labels)
        STORE.observe("ray_serve_deployment_processing_latency_ms", labels, ms)
        if status == "ERROR" or (isinstance(status, int) and status >= 500):
            STORE.inc("ray_serve_deployment_error_counter", labels)
        self.access.add((meta or {}).get("request_id", "-"), route, status, ms)

    def _resolve(self, method: str) -> tuple[Any, int]:
        if self.is_function:
            if method != "__call__":
                raise AttributeError(f"function deployments only have __call__, not {method!r}")
            fn = self.obj
        else:
            fn = getattr(self.obj, method, None)
            if fn is None or not callable(fn):
                raise AttributeError(
                    f"deployment '{self.args['deployment']}' has no method {method!r}"
                )
        if inspect.iscoroutinefunction(fn):
            mode = _ASYNC
        elif inspect.isasyncgenfunction(fn) or hasattr(fn, "batch_queue"):
            mode = _ON_LOOP  # returns an async iterator; must be created on the loop
        else:
            mode = _SYNC
        entry = (fn, mode)
        self.methods[method] = entry
        return entry

    async def _stream(self, proto: FrameProtocol, rid: int, result: Any) -> None:
        if inspect.isasyncgen(result) or hasattr(result, "__aiter__"):
            async for item in result:
                proto.send_raw(frame((rid, YIELD, item)))
        elif inspect.isgenerator(result):
            sentinel = object()
            while True:
                item = await self.loop.run_in_executor(self.pool, next, result, sentinel)
                if item is sentinel:
                    break
                proto.send_raw(frame((rid, YIELD, item)))
        else:
            raise TypeError("handle.options(stream=True) needs a method that returns a generator")
        proto.send((rid, END))

    def _send_error(self, proto: FrameProtocol, rid: int, e: BaseException) -> None:
        tb = "".join(traceback.format_exception(e))
        try:
            data = frame((rid, ERR, e, tb, type(e).__name__))
        except Exception:
            data = frame((rid, ERR, None, tb, type(e).__name__))
        proto.send_raw(data)

    async def _handle_http(self, proto: FrameProtocol, rid: int, scope: dict[str, Any], body: bytes) -> int:
        """Run the HTTP ingress for one request; returns the status code sent."""
        from starlette.responses import Response

        global _request_class
        if _request_class is None:
            _request_class = _make_request_class()
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # until the request is cancelled
            return {"type": "http.disconnect"}

        if self.asgi_app is not None:
            return await self._send_asgi_response(proto, rid, self.asgi_app, scope, receive)
        fn = self.http_entry
        try:
            if fn is None:
                raise TypeError(
                    f"deployment '{self.args['deployment']}' has no __call__ to handle HTTP requests"
                )
            request = _request_class(scope, receive)
            request._body = body
            if inspect.iscoroutinefunction(fn):
                result = await fn(request)
            elif inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
                result = fn(request)  # a generator: streamed below
            else:
                result = await self._invoke(fn, (request,), {})
            if inspect.isasyncgen(result) or inspect.isgenerator(result):
                from starlette.responses import StreamingResponse

                result = StreamingResponse(result)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("request %s %s failed", scope.get("method"), scope.get("path"))
            proto.send((rid, HFULL, *http_util.plain(500, "Internal Server Error")))
            return 500
        if isinstance(result, Response) or (callable(result) and hasattr(result, "body_iterator")):
            return await self._send_asgi_response(proto, rid, result, scope, receive)
        try:
            status, headers, payload = http_util.encode_result(result)
        except Exception:
            logger.exception("could not encode the return value as JSON")
            proto.send((rid, HFULL, *http_util.plain(500, "Internal Server Error")))
            return 500
        proto.send((rid, HFULL, status, headers, payload))
        return status

    async def _send_asgi_response(
        self, proto: FrameProtocol, rid: int, response: Any, scope: dict[str, Any], receive: Any
    ) -> int:
        """Run an ASGI callable (a Response, or the user's app) and forward what it sends."""
        state: dict[str, Any] = {"streaming": False, "status": 500, "headers": []}

        async def send(message: dict[str, Any]) -> None:
            t = message["type"]
            if t == "http.response.start":
                state["status"] = message["status"]
                state["headers"] = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
            elif t == "http.response.body":
                chunk = message.get("body", b"")
                more = message.get("more_body", False)
                if not state["streaming"]:
                    if not more:
                        proto.send((rid, HFULL, state["status"], state["headers"], chunk))
                        return
                    state["streaming"] = True
                    proto.send((rid, HSTART, state["status"], state["headers"]))
                if chunk:
                    proto.send((rid, CHUNK, chunk))
                if not more:
                    proto.send((rid, END))

        try:
            await response(scope, receive, send)
        except Exception:
            logger.exception("response failed")
            if not state["streaming"]:
                proto.send((rid, HFULL, *http_util.plain(500, "Internal Server Error")))
                return 500
            proto.send((rid, END))
        return int(state["status"])


def _add_request_id(record: logging.LogRecord) -> bool:
    meta = context.request_meta.get()
    record.request_id = (meta or {}).get("request_id", "-")
    return True


def main(args: dict[str, Any]) -> None:
    """Entry point in the forked child."""
    os.environ.update(args.get("env", {}))
    sys.path[:] = args.get("sys_path", sys.path)
    cwd = args.get("cwd")
    if cwd:
        try:
            os.chdir(cwd)
        except OSError:
            pass
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s replica {args['replica_id']} [%(request_id)s] %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_add_request_id)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run

    async def amain() -> None:
        await Replica(args).run()

    runner(amain())
