"""Ray Serve's generated gRPC modules for `RayServeAPIService` (`serve_pb2`, `serve_pb2_grpc`)."""
