"""`@serve.ingress`: what it takes and what it refuses, as Ray Serve does (ValueError)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI

from flotilla import serve


def test_a_class_is_marked_with_its_app() -> None:
    app = FastAPI()

    @serve.ingress(app)
    class Model:
        @app.get("/")
        def root(self) -> str:
            return "ok"

    from flotilla.serve.asgi import ASGI_ATTR

    assert getattr(Model, ASGI_ATTR) is app


def test_a_class_with_call_is_refused_naming_it() -> None:
    class Model:
        def __call__(self) -> str:
            return "never reached"

    with pytest.raises(ValueError, match=r"Model.*__call__") as e:
        serve.ingress(FastAPI())(Model)
    assert "Classes passed to @serve.ingress may not have __call__ method." in str(e.value)  # Ray's words

    class Child(Model):
        pass

    with pytest.raises(ValueError, match="__call__"):
        serve.ingress(FastAPI())(Child)


def test_a_function_is_refused_with_a_value_error() -> None:
    def handler() -> str:
        return "x"

    with pytest.raises(ValueError, match="class"):
        serve.ingress(FastAPI())(handler)
