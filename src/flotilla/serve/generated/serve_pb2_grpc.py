"""Ray Serve's `serve_pb2_grpc`: the client stub of `RayServeAPIService` (ListApplications,
Healthz), which the gRPC ingress serves."""

from __future__ import annotations

from typing import Any

from flotilla.serve.generated import serve_pb2

__all__ = ["RayServeAPIServiceStub"]

_SERVICE = "/ray.serve.RayServeAPIService/"


class RayServeAPIServiceStub:
    """`stub.ListApplications(serve_pb2.ListApplicationsRequest())` and
    `stub.Healthz(serve_pb2.HealthzRequest())` on a `grpc.Channel`."""

    def __init__(self, channel: Any) -> None:
        self.ListApplications = channel.unary_unary(
            _SERVICE + "ListApplications",
            request_serializer=serve_pb2.ListApplicationsRequest.SerializeToString,
            response_deserializer=serve_pb2.ListApplicationsResponse.FromString,
        )
        self.Healthz = channel.unary_unary(
            _SERVICE + "Healthz",
            request_serializer=serve_pb2.HealthzRequest.SerializeToString,
            response_deserializer=serve_pb2.HealthzResponse.FromString,
        )
