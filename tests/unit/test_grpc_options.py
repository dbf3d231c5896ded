"""gRPC options, the hand-encoded RayServeAPIService messages, and servicer capture."""

from __future__ import annotations

import sys

import pytest

from flotilla.serve import api
from flotilla.serve.config import gRPCOptions
from flotilla.serve.exceptions import ConfigError
from flotilla.serve.grpc_util import RayServegRPCContext, gRPCStatusError


def test_defaults_are_rays() -> None:
    o = gRPCOptions()
    assert (o.port, o.grpc_servicer_functions, o.request_timeout_s) == (9000, [], None)
    assert not o.enabled  # no servicer functions: off, as in Ray


def test_disabled_options_start_nothing() -> None:
    assert api._grpc_options(None) is None
    assert api._grpc_options({"port": 9000}) is None
    assert api._grpc_options({"port": 0, "grpc_servicer_functions": ["m.add_X_to_server"]}) is None
    with pytest.raises(ConfigError, match=r"grpc_options\.prot"):
        api._grpc_options({"prot": 1})


def test_enabled_options_carry_the_drivers_sys_path() -> None:
    pytest.importorskip("grpc")
    out = api._grpc_options(gRPCOptions(port=9001, grpc_servicer_functions=["m.add_X_to_server"], request_timeout_s=2))
    assert out is not None
    assert out["port"] == 9001 and out["request_timeout_s"] == 2 and out["sys_path"]


def test_missing_grpcio_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "grpc", None)  # import grpc raises ImportError
    with pytest.raises(ImportError, match=r"flotilla\[grpc\]"):
        api._grpc_options({"grpc_servicer_functions": ["m.add_X_to_server"]})


def test_serve_api_messages_round_trip() -> None:
    pytest.importorskip("grpc")
    from flotilla._private import grpc_proxy as gp
    from flotilla.serve.generated import serve_pb2 as pb

    assert pb.encode_healthz("success") == b"\x0a\x07success"
    names = ["a", "app_b", "x" * 300]  # a length over 127 takes a two-byte varint
    assert pb.decode_strings(pb.encode_list_applications(names)) == names
    assert pb.encode_list_applications([]) == b""
    # The message classes Ray's generated serve_pb2 has, as its gRPC guide uses them.
    assert pb.ListApplicationsResponse.FromString(pb.ListApplicationsResponse(names).SerializeToString()) == \
        pb.ListApplicationsResponse(application_names=names)
    assert pb.HealthzResponse.FromString(b"\x0a\x07success").message == "success"
    assert gp.LIST_APPLICATIONS == "/ray.serve.RayServeAPIService/ListApplications"
    assert gp.HEALTHZ == "/ray.serve.RayServeAPIService/Healthz"


def test_capture_collects_generated_handlers() -> None:
    grpc = pytest.importorskip("grpc")
    from flotilla._private import grpc_proxy as gp

    def add_servicer(servicer, server):  # what generated code does
        handlers = {
            "Hi": grpc.unary_unary_rpc_method_handler(servicer.Hi, request_deserializer=bytes, response_serializer=bytes),
            "Many": grpc.unary_stream_rpc_method_handler(servicer.Many),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("p.S", handlers),))
        server.add_registered_method_handlers("p.S", handlers)

    sys.modules[__name__].add_servicer = add_servicer  # type: ignore[attr-defined]
    handlers = gp.capture([f"{__name__}.add_servicer"])
    assert len(handlers) == 2
    h = handlers[0].service(gp._Details("/p.S/Many"))
    assert h.response_streaming and not h.request_streaming
    assert handlers[0].service(gp._Details("/p.S/Nope")) is None
    with pytest.raises(ValueError, match="import path"):
        gp.capture(["nodots"])


def test_context_records_what_the_method_sets() -> None:
    grpc = pytest.importorskip("grpc")
    ctx = RayServegRPCContext([("k", "v")], "peer")
    assert ctx.code() is grpc.StatusCode.OK
    ctx.set_code(grpc.StatusCode.NOT_FOUND)
    ctx.set_details("gone")
    ctx.set_trailing_metadata([("a", "1")])
    assert ctx._state() == ("NOT_FOUND", "gone", [("a", "1")])
    assert ctx.invocation_metadata() == [("k", "v")] and ctx.peer() == "peer"
    import pickle

    e = pickle.loads(pickle.dumps(gRPCStatusError("boom", "NOT_FOUND", "gone", [("a", "1")])))
    assert (e.code, e.details, e.trailing, str(e)) == ("NOT_FOUND", "gone", [("a", "1")], "gone")


def test_status_mapping() -> None:
    grpc = pytest.importorskip("grpc")
    from flotilla._private import grpc_proxy as gp
    from flotilla.serve.exceptions import BackPressureError, DeploymentUnavailableError

    class P:
        routes: list = []
        request_timeout_s = None
        node_label = "head"

    ing = gp.GrpcIngress(P(), {})
    assert ing._error(TimeoutError(), 2.0)[:2] == (grpc.StatusCode.DEADLINE_EXCEEDED, "Request timed out after 2.0s.")
    bp = BackPressureError(num_queued_requests=3, max_queued_requests=2)
    assert ing._error(bp, None)[0] is grpc.StatusCode.UNAVAILABLE
    assert ing._error(DeploymentUnavailableError("gone"), None)[0] is grpc.StatusCode.UNAVAILABLE
    assert ing._error(ValueError("bad input"), None)[:2] == (grpc.StatusCode.INTERNAL, "bad input")
    assert ing._error(gRPCStatusError("boom", "PERMISSION_DENIED", "nope"), None)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "nope")
    assert ing._target({}) == ing._target({"application": ""}) and "metadata not set" in str(ing._target({}))
