"""The front-door benchmark's server, one process per system under test.

    python frontdoor_app.py SYSTEM CONFIG_JSON

SYSTEM is "flotilla" or "ray" (the same code, `serve` imported from one or the other).
CONFIG_JSON: {"port", "grpc_port", "tls": {"certfile", "keyfile"} | null, "grpc_dir"}. It
deploys a no-op at /noop, a FastAPI WebSocket echo at /ws (its app at prefix /), and (with a grpc_port) a gRPC echo
service (bench_pb2 from grpc_dir), prints {"event": "ready"} and serves until stdin closes.
"""


import json  # (no `from __future__ import annotations`: FastAPI reads the WebSocket annotation)
import sys

from fastapi import FastAPI, WebSocket, WebSocketDisconnect


def main() -> None:
    system, cfg = sys.argv[1], json.loads(sys.argv[2])
    if system == "ray":
        import ray as runtime
        from ray import serve
    else:
        import flotilla as runtime
        from flotilla import serve
    if cfg.get("grpc_dir"):
        sys.path.insert(0, cfg["grpc_dir"])

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=100, ray_actor_options={"num_cpus": 0})
    class Noop:
        async def __call__(self, request: object) -> str:
            return "ok"

    @serve.deployment(max_ongoing_requests=100, ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class Echo:
        @api.websocket("/ws")
        async def ws(self, websocket: WebSocket) -> None:
            await websocket.accept()
            try:
                while True:
                    await websocket.send_text(await websocket.receive_text())
            except WebSocketDisconnect:
                pass

    @serve.deployment(max_ongoing_requests=100, ray_actor_options={"num_cpus": 0})
    class Grpc:
        def Echo(self, request):  # the RPC's name
            import bench_pb2

            return bench_pb2.EchoReply(text=request.text)

    runtime.init(num_cpus=2)
    http: dict = {"host": "127.0.0.1", "port": cfg["port"]}
    if cfg.get("tls"):
        http.update(ssl_certfile=cfg["tls"]["certfile"], ssl_keyfile=cfg["tls"]["keyfile"])
    grpc = None
    if cfg.get("grpc_port"):
        grpc = {"port": cfg["grpc_port"], "grpc_servicer_functions": ["bench_pb2_grpc.add_BenchServicer_to_server"]}
    serve.start(http_options=http, **({"grpc_options": grpc} if grpc else {}))
    serve.run(Noop.bind(), name="noop", route_prefix="/noop")
    serve.run(Echo.bind(), name="ws", route_prefix="/")  # its route /ws: the same path on both systems
    if grpc:
        serve.run(Grpc.bind(), name="grpc", route_prefix="/grpc")
    print(json.dumps({"event": "ready"}), flush=True)
    sys.stdin.read()
    serve.shutdown()
    runtime.shutdown()


if __name__ == "__main__":
    main()
