"""The Ray 1.x layer's pure parts: route_prefix as a deployment option, handle requests,
name collisions in list_deployments, and the proxy's 404 text."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from flotilla._private.proxy import Proxy
from flotilla.serve import deployment
from flotilla.serve.exceptions import ConfigError
from flotilla.serve.legacy import HandleRequest, _pick


def test_route_prefix_is_a_deployment_option_for_deploy_only() -> None:
    @deployment(name="m", route_prefix="/x")
    class M:
        pass

    assert M.route_prefix == "/x"
    assert M.options(name="n").route_prefix == "/x"
    assert M.options(route_prefix=None).route_prefix is None
    assert "route_prefix" not in M.config.model_dump()  # serve.run never sees it
    assert deployment(M.func_or_class).route_prefix == "/M"  # default: /{name}
    assert deployment(name="k")(M.func_or_class).options(name="j").route_prefix == "/j"
    with pytest.raises(ConfigError, match="route_prefx"):
        M.options(route_prefx="/y")


def test_handle_request_json_sync_awaited_and_plain_when_returned() -> None:
    r = HandleRequest({"msg": "hello"})
    assert r.json() == {"msg": "hello"}
    assert asyncio.run(_awaited(r)) == {"msg": "hello"}
    assert type(pickle.loads(pickle.dumps(r.json()))) is dict
    assert type(pickle.loads(pickle.dumps(HandleRequest([1]).json()))) is list
    assert HandleRequest('{"a": 1}').json() == {"a": 1}
    assert asyncio.run(_awaited(HandleRequest(3))) == 3
    assert pickle.loads(pickle.dumps(r)).data == {"msg": "hello"}


async def _awaited(r: HandleRequest) -> object:
    return await r.json()


def test_a_name_in_several_applications() -> None:
    specs = [{"app": "modern", "name": "m"}, {"app": "m", "name": "m"}, {"app": "other", "name": "x"}]
    found = _pick(specs)
    assert found["m"]["app"] == "m" and found["modern#m"]["app"] == "modern" and found["x"]["app"] == "other"


def test_404_lists_the_routes() -> None:
    p = Proxy({})
    assert p._not_found("/a").endswith(" No application has a route yet.")
    p.set_routes({"/square": ("square", "square"), "/": ("root", "Ingress")})
    assert p._not_found("/SquareModel") == (
        "Path '/SquareModel' not found. Ping http://.../-/routes for available routes. "
        "Routes: / (application 'root'), /square (application 'square')."
    )
    p.set_routes({f"/r{i:02d}": (f"a{i}", "D") for i in range(25)})
    assert p._not_found("/x").count("(application") == 20 and "and 5 more" in p._not_found("/x")
