"""The HTTP answer to a refused call that a request's code lets out (`http_util.unavailable`),
and the handlers an ingress app gets for it."""

from __future__ import annotations

from flotilla._private.http_util import add_unavailable_handlers, unavailable
from flotilla.serve.exceptions import BackPressureError, DeploymentUnavailableError


def test_the_answer_of_each_error() -> None:
    status, headers, body = unavailable(BackPressureError(3, 2))
    assert status == 503 and body.startswith(b"Request dropped due to backpressure (num_queued_requests=3")
    assert b"retry-after" not in dict(headers)
    status, headers, _ = unavailable(BackPressureError(3, 2, 429, 1.2))
    assert status == 429 and dict(headers)[b"retry-after"] == b"2"
    assert unavailable(DeploymentUnavailableError("gone"))[:1] == (503,)
    assert unavailable(ValueError("x")) is None


def test_an_apps_own_handler_stays() -> None:
    from fastapi import FastAPI
    from starlette.responses import PlainTextResponse

    app = FastAPI()

    @app.exception_handler(BackPressureError)
    def mine(request, e):
        return PlainTextResponse("mine", 599)

    add_unavailable_handlers(app)
    assert app.exception_handlers[BackPressureError] is mine
    assert DeploymentUnavailableError in app.exception_handlers
    add_unavailable_handlers(object())  # not a Starlette app: nothing to do
