"""The HTTP stack's limit: the same POST handler as a bare Starlette app on uvicorn.

    python bare_app.py CONFIG_JSON      # {"port": 18080}
Serves until stdin closes (or SIGTERM).
"""

from __future__ import annotations

import json
import sys
import threading

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


async def echo(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"ok": True})


async def size(request: Request) -> JSONResponse:
    """The payload scenario: the body's length."""
    return JSONResponse({"n": len(await request.body())})


async def echo_body(request: Request) -> Response:
    """The payload scenario: the body back."""
    return Response(await request.body(), media_type="application/octet-stream")


app = Starlette(
    routes=[
        Route("/", echo, methods=["POST"]),
        Route("/size", size, methods=["POST"]),
        Route("/echo", echo_body, methods=["POST"]),
    ]
)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=cfg["port"], log_level="warning", access_log=False
        )
    )

    def watch_stdin() -> None:
        sys.stdin.read()
        server.should_exit = True

    threading.Thread(target=watch_stdin, daemon=True).start()
    server.run()


if __name__ == "__main__":
    main()
