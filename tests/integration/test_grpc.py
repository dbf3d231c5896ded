"""gRPC ingress (`serve.start(grpc_options=...)`) through a real grpc channel.

A small .proto is compiled with grpc_tools at test time into a temporary folder on sys.path
(the driver's sys.path reaches the replicas and the proxy).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

grpc = pytest.importorskip("grpc")
protoc = pytest.importorskip("grpc_tools.protoc")

import flotilla  # noqa: E402
from flotilla import serve  # noqa: E402
from flotilla.serve.generated.serve_pb2 import decode_strings  # noqa: E402
from tests.conftest import free_port, wait_for  # noqa: E402

pytestmark = pytest.mark.slow

PROTO = """
syntax = "proto3";
package flotillatest;
message Req { string name = 1; int32 n = 2; }
message Resp { string text = 1; int32 i = 2; }
service Greeter {
  rpc Hello(Req) returns (Resp);
  rpc Count(Req) returns (stream Resp);
  rpc Fail(Req) returns (Resp);
  rpc Coded(Req) returns (Resp);
  rpc Slow(Req) returns (Resp);
  rpc Model(Req) returns (Resp);
  rpc SyncCount(Req) returns (stream Resp);
}
"""
MODULE = "flotilla_greeter"


def _compile(folder: Path) -> None:
    (folder / f"{MODULE}.proto").write_text(PROTO)
    rc = protoc.main(["grpc_tools.protoc", f"-I{folder}", f"--python_out={folder}",
                      f"--grpc_python_out={folder}", str(folder / f"{MODULE}.proto")])
    assert rc == 0, "protoc failed"


@serve.deployment
class Greeter:
    def __init__(self, tag: str = "a"):
        self.tag = tag

    def Hello(self, req):
        from flotilla_greeter_pb2 import Resp

        return Resp(text=f"{self.tag}:hello {req.name}", i=req.n)

    async def Count(self, req):
        from flotilla_greeter_pb2 import Resp

        for i in range(req.n):
            yield Resp(text=f"{self.tag}:{req.name}", i=i)

    def Fail(self, req):
        raise ValueError(f"failing on purpose for {req.name}")

    async def Coded(self, req, grpc_context):
        import grpc as g
        from flotilla_greeter_pb2 import Resp

        grpc_context.set_trailing_metadata([("tag", self.tag)])
        if req.name == "missing":
            grpc_context.set_code(g.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"no such thing: {req.name}")
            return Resp()
        return Resp(text=f"metadata {dict(grpc_context.invocation_metadata()).get('x-custom', '')}")


    async def Slow(self, req):
        import asyncio

        await asyncio.sleep(req.n)

    def Model(self, req):
        from flotilla_greeter_pb2 import Resp

        return Resp(text=serve.get_multiplexed_model_id())

    def SyncCount(self, req):
        from flotilla_greeter_pb2 import Resp

        for i in range(req.n):
            yield Resp(text="sync", i=i)


@pytest.fixture(scope="module")
def grpc_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    folder = tmp_path_factory.mktemp("protos")
    _compile(folder)
    sys.path.insert(0, str(folder))
    port = free_port()
    if flotilla.is_initialized():
        flotilla.shutdown()
    flotilla.init(num_cpus=8)
    try:
        serve.start(http_options={"port": free_port()}, grpc_options={"port": port, "grpc_servicer_functions": [
            f"{MODULE}_pb2_grpc.add_GreeterServicer_to_server"]})
        yield port
    finally:
        flotilla.shutdown()
        sys.path.remove(str(folder))


@pytest.fixture
def stub(grpc_port: int) -> Iterator[Any]:
    pb2_grpc = importlib.import_module(f"{MODULE}_pb2_grpc")
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        yield pb2_grpc.GreeterStub(channel)
    for name in list(serve.status().applications):
        serve.delete(name)


def _req(**kw: Any) -> Any:
    return importlib.import_module(f"{MODULE}_pb2").Req(**kw)


def _raw(port: int, method: str) -> bytes:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        return call(b"", timeout=10)  # type: ignore[no-any-return]


def test_unary_streaming_and_one_app_default(stub):
    serve.run(Greeter.bind(), name="only", route_prefix="/only")
    r, call = stub.Hello.with_call(_req(name="bob", n=7), timeout=30)
    assert (r.text, r.i) == ("a:hello bob", 7)
    assert dict(call.trailing_metadata())["request_id"]
    # request_id metadata is kept
    _, call = stub.Hello.with_call(_req(name="x"), metadata=[("request_id", "my-rid")], timeout=30)
    assert dict(call.trailing_metadata())["request_id"] == "my-rid"
    items = list(stub.Count(_req(name="s", n=5), timeout=30))
    assert [(x.text, x.i) for x in items] == [("a:s", i) for i in range(5)]


def test_application_metadata_picks_app(stub, grpc_port):
    serve.run(Greeter.bind("a"), name="app_a", route_prefix="/a")
    serve.run(Greeter.bind("b"), name="app_b", route_prefix="/b")
    assert stub.Hello(_req(name="z"), metadata=[("application", "app_b")], timeout=30).text == "b:hello z"
    assert stub.Hello(_req(name="z"), metadata=[("application", "app_a")], timeout=30).text == "a:hello z"
    with pytest.raises(grpc.RpcError) as e:
        stub.Hello(_req(name="z"), metadata=[("application", "nope")], timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'nope' not found" in e.value.details() and "ListApplications" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Hello(_req(name="z"), timeout=30)  # two apps, no metadata
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # Ray Serve's built-in service, decoded by hand, and through its stub as Ray's guide calls it.
    assert decode_strings(_raw(grpc_port, "/ray.serve.RayServeAPIService/ListApplications")) == ["app_a", "app_b"]
    assert decode_strings(_raw(grpc_port, "/ray.serve.RayServeAPIService/Healthz")) == ["success"]
    from flotilla.serve.generated.serve_pb2 import HealthzRequest, ListApplicationsRequest
    from flotilla.serve.generated.serve_pb2_grpc import RayServeAPIServiceStub

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        api = RayServeAPIServiceStub(channel)
        assert api.ListApplications(ListApplicationsRequest(), timeout=30).application_names == ["app_a", "app_b"]
        assert api.Healthz(HealthzRequest(), timeout=30).message == "success"


def test_errors_and_grpc_context(stub):
    serve.run(Greeter.bind(), name="errs", route_prefix="/errs")
    with pytest.raises(grpc.RpcError) as e:
        stub.Fail(_req(name="q"), timeout=30)
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert "failing on purpose for q" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Coded(_req(name="missing"), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details() == "no such thing: missing"
    assert dict(e.value.trailing_metadata())["tag"] == "a"
    r, call = stub.Coded.with_call(_req(name="ok"), metadata=[("x-custom", "v1")], timeout=30)
    assert r.text == "metadata v1" and dict(call.trailing_metadata())["tag"] == "a"


def test_metrics(stub):
    serve.run(Greeter.bind(), name="met", route_prefix="/met")
    for _ in range(3):
        stub.Hello(_req(name="m"), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.Fail(_req(name="m"), timeout=30)

    def counts() -> bool:
        text = httpx.get(flotilla.metrics_url(), timeout=30).text
        ok = 'ray_serve_num_grpc_requests_total{application="met",method="/flotillatest.Greeter/Hello"' in text
        err = 'ray_serve_num_grpc_error_requests_total{application="met",error_code="INTERNAL"' in text
        by_dep = ('ray_serve_num_deployment_grpc_error_requests_total{application="met",deployment="Greeter",'
                  'error_code="INTERNAL"') in text
        return ok and err and by_dep and "ray_serve_grpc_request_latency_ms_bucket" in text

    wait_for(counts, timeout=20, interval=0.2, what="gRPC metrics in /metrics")


def test_deadline_multiplexed_model_and_sync_generator(stub):
    serve.run(Greeter.bind(), name="more", route_prefix="/more")
    with pytest.raises(grpc.RpcError) as e:
        stub.Slow(_req(n=30), timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    r = stub.Model(_req(), metadata=[("multiplexed_model_id", "m-7")], timeout=30)
    assert r.text == "m-7"
    assert [x.i for x in stub.SyncCount(_req(n=4), timeout=30)] == [0, 1, 2, 3]
