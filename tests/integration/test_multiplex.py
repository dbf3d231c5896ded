"""Model multiplexing: per-replica LRU cache, model-aware routing, header and handle ids."""

from __future__ import annotations

import os

import httpx
import pytest

from flotilla import serve
from flotilla.serve.exceptions import ConfigError
from tests.conftest import wait_for

pytestmark = pytest.mark.slow


class FakeModel:
    evicted: list[str] = []

    def __init__(self, model_id: str):
        self.model_id = model_id


@serve.deployment(num_replicas=2)
class Models:
    def __init__(self):
        self.loads: list[str] = []
        self.evictions: list[str] = []

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str):
        self.loads.append(model_id)
        model = FakeModel(model_id)
        owner = self

        def cleanup():
            owner.evictions.append(model_id)

        model.__del__ = cleanup
        return model

    async def __call__(self, *args):
        model_id = serve.get_multiplexed_model_id()
        model = await self.get_model(model_id)
        return {"model": model.model_id, "pid": os.getpid()}

    def history(self):
        return self.loads, self.evictions, os.getpid()


def test_requests_for_a_model_stick_to_the_replica_that_loaded_it(url):
    h = serve.run(Models.bind(), name="mx", route_prefix="/mx")
    first = h.options(multiplexed_model_id="a").remote().result()
    assert first["model"] == "a"
    # Once the controller has told routers where "a" lives, every request goes there.
    wait_for(lambda: all(h.options(multiplexed_model_id="a").remote().result()["pid"] == first["pid"] for _ in range(10)),
             what="model-aware routing")
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.get("/mx", headers={"serve_multiplexed_model_id": "a"})
        assert r.json() == {"model": "a", "pid": first["pid"]}


def test_least_recently_used_model_is_evicted_and_cleaned_up(url):
    h = serve.run(Models.options(num_replicas=1).bind(), name="lru", route_prefix=None)
    for model_id in ["a", "b", "a", "c", "a", "d"]:
        assert h.options(multiplexed_model_id=model_id).remote().result()["model"] == model_id
    loads, evictions, _ = h.history.remote().result()
    assert loads == ["a", "b", "c", "d"]  # "a" stayed loaded: it was always recently used
    assert evictions == ["b", "c"]


def test_bad_multiplex_options():
    with pytest.raises(ConfigError):
        serve.multiplexed(max_num_models_per_replica=0)
    with pytest.raises(TypeError, match="async"):
        @serve.multiplexed
        def sync_loader(self, model_id):
            return model_id
    assert serve.get_multiplexed_model_id() == ""
