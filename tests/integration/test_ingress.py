"""@serve.ingress(FastAPI()): typed routes, validation, dependencies, docs, handles too."""

from __future__ import annotations

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from flotilla import serve
from flotilla.serve.exceptions import RayServeException

pytestmark = pytest.mark.slow

api = FastAPI(title="items")


class Item(BaseModel):
    name: str
    price: float


class Oops(Exception):
    pass


@api.exception_handler(Oops)
async def oops_handler(request, exc):
    return JSONResponse({"handled": str(exc)}, status_code=418)


def common(q: str | None = None) -> dict:
    return {"q": q}


@serve.deployment
@serve.ingress(api)
class Shop:
    def __init__(self, currency: str):
        self.currency = currency
        self.items: dict[int, Item] = {}

    @api.get("/items/{item_id}")
    def get_item(self, item_id: int, params: dict = Depends(common)):
        if item_id not in self.items:
            raise HTTPException(status_code=404, detail="no such item")
        return {"item": self.items[item_id], "currency": self.currency, **params}

    @api.put("/items/{item_id}")
    async def put_item(self, item_id: int, item: Item):
        self.items[item_id] = item
        return {"stored": item_id}

    @api.get("/oops")
    def oops(self):
        raise Oops("teapot")

    def count(self):
        return len(self.items)


def test_fastapi_ingress_routes_validation_and_docs(url):
    h = serve.run(Shop.bind("EUR"), name="shop", route_prefix="/shop")
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.put("/shop/items/1", json={"name": "pen", "price": 1.5}).json() == {"stored": 1}
        r = c.get("/shop/items/1?q=x")
        assert r.status_code == 200
        assert r.json() == {"item": {"name": "pen", "price": 1.5}, "currency": "EUR", "q": "x"}
        assert c.get("/shop/items/2").status_code == 404
        assert c.get("/shop/items/abc").status_code == 422
        assert c.put("/shop/items/3", json={"name": "no price"}).status_code == 422
        assert c.get("/shop/oops").status_code == 418
        spec = c.get("/shop/openapi.json").json()
        assert "/items/{item_id}" in spec["paths"]
        assert c.get("/shop/docs").status_code == 200
    # Handle calls still reach the class's methods.
    assert h.count.remote().result() == 1


plain_api = FastAPI()


@plain_api.get("/hi")
def say_hi() -> str:
    return "Hello world!"


def build_api() -> FastAPI:
    """A builder (Ray's form): called in each replica to make the app."""
    built = FastAPI()

    @built.get("/hi")
    def hi() -> str:
        return "built"

    return built


@serve.ingress()
class LateBound:
    def __init__(self, word: str) -> None:
        self.word = word

    def __serve_build_asgi_app__(self) -> FastAPI:
        late = FastAPI()

        @late.get("/hi")
        def hi() -> str:
            return self.word

        return late


def test_ingress_without_a_class_with_a_builder_and_late_bound(url):
    """Ray's other ingress forms: `serve.deployment(serve.ingress(app)())`, a builder function
    called in the replica, and `serve.ingress()` whose class builds the app after its
    constructor."""
    serve.run(serve.deployment(serve.ingress(plain_api)()).bind(), name="noclass", route_prefix="/noclass")
    serve.run(serve.deployment(serve.ingress(build_api)()).bind(), name="builder", route_prefix="/builder")
    serve.run(serve.deployment(LateBound).bind("late"), name="late", route_prefix="/late")
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/noclass/hi").json() == "Hello world!"
        assert c.get("/builder/hi").json() == "built"
        assert c.get("/late/hi").json() == "late"
    assert "ASGIIngressDeployment" in serve.status().applications["noclass"].deployments
    with pytest.raises(ValueError, match="__serve_build_asgi_app__"):
        serve.ingress()(type("NoBuilder", (), {}))


def _routed_api() -> FastAPI:
    from fastapi import APIRouter

    app = FastAPI()
    router = APIRouter(prefix="/prefix")

    @router.get("/sub")
    def sub() -> str:
        return "routed"

    app.include_router(router)
    return app


routed_api = _routed_api()


@serve.deployment
@serve.ingress(routed_api)
class Routed:
    pass


def test_an_app_with_an_included_router(url):
    """FastAPI 0.165 keeps a lock in the routes `include_router` adds: the app failed to deploy
    ("cannot pickle '_thread.lock' object")."""
    serve.run(Routed.bind(), name="routed", route_prefix="/routed")
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/routed/prefix/sub").json() == "routed"


def test_one_fastapi_app_shared_by_two_ingress_classes(url):
    """Each class serves its own methods' routes: the other class's route for the same path
    is not its (it answered 422 "self: field required")."""
    app = FastAPI()

    @serve.deployment
    @serve.ingress(app)
    class First:
        @app.get("/")
        def v1(self):
            return "first"

    @serve.deployment
    @serve.ingress(app)
    class Second:
        @app.get("/")
        def v2(self):
            return "second"

    serve.run(First.bind(), name="first", route_prefix="/api/v1")
    serve.run(Second.bind(), name="second", route_prefix="/api/v2")
    with httpx.Client(base_url=url, timeout=30, follow_redirects=True) as c:
        assert c.get("/api/v1").json() == "first"
        assert c.get("/api/v2").json() == "second"


def test_a_method_name_defined_twice_serves_both_routes(url):
    """The second `method` hides the first from the class, not from the app: both are bound
    (the GET answered 422)."""
    app = FastAPI()

    @serve.deployment
    @serve.ingress(app)
    class Twice:
        @app.get("/")
        def method(self):
            return "hi get"

        @app.post("/")
        def method(self):  # noqa: F811
            return "hi post"

    serve.run(Twice.bind(), name="twice", route_prefix="/twice")
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/twice/").json() == "hi get"
        assert c.post("/twice/").json() == "hi post"


def test_two_ingress_deployments_in_one_application_are_refused(url):
    front, back = FastAPI(), FastAPI()

    @serve.deployment
    @serve.ingress(back)
    class Back:
        @back.get("/")
        def get(self):
            return 1

    @serve.deployment
    @serve.ingress(front)
    class Front:
        def __init__(self, back):
            self.back = back

    with pytest.raises(RayServeException, match='Found multiple FastAPI deployments in application "two"'):
        serve.run(Front.bind(Back.bind()), name="two", route_prefix="/two")
    assert "two" not in serve.status().applications
