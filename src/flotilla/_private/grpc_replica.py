"""The replica's side of the gRPC ingress (`grpc_proxy.py`).

The proxy calls method `grpc:<Method>` (unary) or `grpcs:<Method>` (server streaming). The
replica resolves those names here: the user's method `<Method>` is called with the request
message, plus `grpc_context=RayServegRPCContext` when it has that parameter; the context's
code, details and trailing metadata travel back with the result (`GrpcReply`) or as the
stream's last item (`GrpcTrailer`). Standard library only: grpcio is needed in the proxy.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

from flotilla._private import context
from flotilla.serve.grpc_util import RayServegRPCContext, gRPCStatusError

UNARY = "grpc:"
STREAM = "grpcs:"


class GrpcReply(NamedTuple):
    result: Any
    code: str
    details: str
    trailing: list[tuple[str, Any]]


class GrpcTrailer(NamedTuple):
    code: str
    details: str
    trailing: list[tuple[str, Any]]


def is_grpc(method: str) -> bool:
    return method.startswith(UNARY) or method.startswith(STREAM)


def _takes_context(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "grpc_context" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _new_context() -> RayServegRPCContext:
    g = (context.request_meta.get() or {}).get("grpc") or {}
    return RayServegRPCContext(g.get("metadata"), g.get("peer", ""))


def _wrap_error(e: BaseException, ctx: RayServegRPCContext) -> BaseException:
    code, details, trailing = ctx._state()
    if code == "OK":
        return e
    return gRPCStatusError(str(e), code, details or str(e), trailing)


def bind(replica: Any, method: str, async_mode: int, on_loop: int) -> tuple[Any, int]:
    """The callable and invocation mode for a `grpc:`/`grpcs:` method name (see module doc)."""
    streaming = method.startswith(STREAM)
    name = method[len(STREAM if streaming else UNARY):]
    fn, mode = replica._resolve(name)
    takes_ctx = _takes_context(fn)

    async def invoke(request: Any, ctx: RayServegRPCContext) -> Any:
        kwargs = {"grpc_context": ctx} if takes_ctx else {}
        if mode == async_mode:
            return await fn(request, **kwargs)
        if mode == on_loop:
            return fn(request, **kwargs)
        return await replica._invoke(fn, (request,), kwargs)

    async def unary(request: Any) -> GrpcReply:
        ctx = _new_context()
        try:
            result = await invoke(request, ctx)
        except Exception as e:
            raise _wrap_error(e, ctx) from e
        if inspect.isgenerator(result) or inspect.isasyncgen(result):
            raise TypeError(f"method '{name}' returned a generator, but its RPC is unary: declare it "
                            "'returns (stream ...)' in the .proto to stream")
        return GrpcReply(result, *ctx._state())

    async def stream(request: Any) -> Any:
        ctx = _new_context()
        try:
            result = await invoke(request, ctx)
            if inspect.isasyncgen(result) or hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            elif inspect.isgenerator(result):
                async for item in replica.sync_items(result):
                    yield item
            else:
                raise TypeError(f"method '{name}' serves a server-streaming RPC: it must be a generator")
        except Exception as e:
            raise _wrap_error(e, ctx) from e
        yield GrpcTrailer(*ctx._state())

    return (stream, on_loop) if streaming else (unary, async_mode)
