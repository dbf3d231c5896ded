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
        before = len(self.loads)
        model = await self.get_model(model_id)
        return {"model": model.model_id, "pid": os.getpid(), "fresh": len(self.loads) > before}

    def history(self):
        return self.loads, self.evictions, os.getpid()


def test_requests_for_a_model_stick_to_the_replica_that_loaded_it(url):
    h = serve.run(Models.bind(), name="mx", route_prefix="/mx")
    first = h.options(multiplexed_model_id="a").remote().result()
    assert first["model"] == "a" and first["fresh"]
    # Once the controller has told routers where "a" lives, requests go to a replica holding it.
    wait_for(lambda: not any(h.options(multiplexed_model_id="a").remote().result()["fresh"] for _ in range(10)),
             what="model-aware routing")
    with httpx.Client(base_url=url, timeout=30) as c:
        out = [c.get("/mx", headers={"serve_multiplexed_model_id": "a"}).json() for _ in range(10)]
        # A proxy in front (nginx, API gateways) may turn the underscores into dashes: Ray takes both.
        out += [c.get("/mx", headers={"serve-multiplexed-model-id": "a"}).json() for _ in range(5)]
    assert all(o["model"] == "a" and not o["fresh"] for o in out)


def test_least_recently_used_model_is_evicted_and_cleaned_up(url):
    h = serve.run(Models.options(num_replicas=1).bind(), name="lru", route_prefix=None)
    for model_id in ["a", "b", "a", "c", "a", "d"]:
        assert h.options(multiplexed_model_id=model_id).remote().result()["model"] == model_id
    loads, evictions, _ = h.history.remote().result()
    assert loads == ["a", "b", "c", "d"]  # "a" stayed loaded: it was always recently used
    assert evictions == ["b", "c"]
    # Ray Serve's multiplexing metrics, per replica.
    from prometheus_client.parser import text_string_to_metric_families

    import flotilla

    def series() -> dict[str, float]:
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(httpx.get(flotilla.metrics_url(), timeout=10).text):
            for smp in fam.samples:
                if smp.labels.get("application") == "lru":
                    key = smp.name + (f"[{smp.labels['model_id']}]" if "model_id" in smp.labels else "")
                    out[key] = out.get(key, 0.0) + smp.value
        return out

    want = {"ray_serve_multiplexed_models_load_counter_total": 4.0,
            "ray_serve_multiplexed_models_unload_counter_total": 2.0,
            "ray_serve_multiplexed_get_model_requests_counter_total": 6.0,
            "ray_serve_num_multiplexed_models": 2.0,
            "ray_serve_multiplexed_model_load_latency_ms_count": 4.0,
            "ray_serve_multiplexed_model_unload_latency_ms_count": 2.0,
            "ray_serve_registered_multiplexed_model_id[a]": 1.0,
            "ray_serve_registered_multiplexed_model_id[b]": 0.0,
            "ray_serve_registered_multiplexed_model_id[d]": 1.0}
    got = wait_for(lambda: (m := series()) and all(m.get(k) == v for k, v in want.items()) and m,
                   timeout=15, what=lambda: f"the multiplexing metrics: {series()}")
    assert got


def test_bad_multiplex_options():
    with pytest.raises(ConfigError):
        serve.multiplexed(max_num_models_per_replica=0)
    with pytest.raises(TypeError, match="async"):
        @serve.multiplexed
        def sync_loader(self, model_id):
            return model_id
    assert serve.get_multiplexed_model_id() == ""


@serve.deployment(num_replicas=2, max_ongoing_requests=1)
class HotModels:
    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str):
        return model_id

    async def __call__(self, *args):
        import asyncio

        await self.get_model(serve.get_multiplexed_model_id())
        await asyncio.sleep(0.2)
        return os.getpid()


def test_a_hot_model_is_loaded_on_a_second_replica(url):
    h = serve.run(HotModels.bind(), name="hot", route_prefix=None)
    hot = h.options(multiplexed_model_id="hot")
    pids = {r.result() for r in [hot.remote() for _ in range(6)]}
    # One replica cannot take them all at once (max_ongoing_requests=1): both load the model.
    assert len(pids) == 2


@serve.deployment(max_ongoing_requests=16)
class BatchedModels:
    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_model(self, model_id: str) -> str:
        return model_id

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.2)
    async def predict(self, xs: list[int]) -> list[tuple[str, str, int]]:
        model = await self.get_model(serve.get_multiplexed_model_id())
        return [(model, serve.get_multiplexed_model_id(), len(xs))] * len(xs)


def test_a_batch_holds_one_model_and_sees_its_id(url):
    """Ray Serve splits a batch by multiplexed model id, and `get_multiplexed_model_id()` in
    the batch function names the batch's model."""
    h = serve.run(BatchedModels.bind(), name="batchmodels", route_prefix=None).options(method_name="predict")
    calls = [(m, h.options(multiplexed_model_id=m).remote(i)) for i, m in enumerate("abababab")]
    got = [(m, c.result(timeout_s=30)) for m, c in calls]
    assert all(model == seen == m for m, (model, seen, _) in got), got
    assert sum(n for _, (_, _, n) in got) == 32  # two batches of 4, each call counted with its batch


@serve.deployment(num_replicas=2)
class OneEach:
    def __init__(self):
        self.loaded = 0

    @serve.multiplexed(max_num_models_per_replica=1)
    async def get_model(self, model_id: str):
        self.loaded += 1
        return {"id": model_id, "at": self.loaded}

    async def __call__(self):
        before = self.loaded
        model = await self.get_model(serve.get_multiplexed_model_id())
        return {"model": model["id"], "fresh": self.loaded != before, "pid": os.getpid()}


def _routers_know(app: str, name: str, model: str) -> bool:
    from flotilla._private.client import Runtime
    from flotilla.serve.schema import DeploymentID

    lead = Runtime.current().routers.get(DeploymentID(name, app))
    routers = [lead, *lead.followers] if lead is not None else []
    return bool(routers) and all(any(model in c.models for c in r.replicas.values()) for r in routers)


def test_a_model_no_replica_holds_goes_to_the_one_holding_fewest(url):
    """As Ray: with 2 replicas of one model each, models a and b each settle on a replica of
    their own instead of evicting each other on the first replica."""
    h = serve.run(OneEach.bind(), name="spread", route_prefix=None)
    for m in "ab":
        hm = h.options(multiplexed_model_id=m)
        hm.remote().result(timeout_s=30)
        wait_for(lambda hm=hm: not hm.remote().result(timeout_s=30)["fresh"], what=f"model {m} settled")
        # and every router of this driver has heard (from the head) which replica holds it:
        # until then a model no replica holds may be sent to that one
        wait_for(lambda m=m: _routers_know("spread", "OneEach", m), what=f"the routers told where {m} is")
    got = [h.options(multiplexed_model_id=m).remote().result(timeout_s=30) for m in "abababab"]
    assert not any(g["fresh"] for g in got), got
    assert len({g["pid"] for g in got}) == 2
