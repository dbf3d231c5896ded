"""Batching end to end: @serve.batch and the deployment-level form, over HTTP and handles."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import httpx
import pytest

from flotilla import serve
from tests.conftest import pooled_client

pytestmark = pytest.mark.slow


@serve.deployment(max_ongoing_requests=16)
class Batched:
    def __init__(self):
        self.sizes = []

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def handle(self, xs):
        self.sizes.append(len(xs))
        await asyncio.sleep(0.01)
        return [x * 2 for x in xs]

    async def __call__(self, request):
        return {"y": await self.handle((await request.json())["x"])}

    def batch_sizes(self):
        return self.sizes

    def reconfigure(self, cfg):
        self.handle.set_max_batch_size(cfg["max_batch_size"])


def test_serve_batch_over_http_forms_batches_within_the_maximum(url):
    h = serve.run(Batched.bind(), name="b", route_prefix="/b")
    with pooled_client(url, 32, timeout=30) as c, concurrent.futures.ThreadPoolExecutor(32) as pool:
        ys = list(pool.map(lambda i: c.post("/b", json={"x": i}).json()["y"], range(64)))
    assert ys == [2 * i for i in range(64)]
    sizes = h.batch_sizes.remote().result()
    assert sum(sizes) == 64
    assert max(sizes) > 1 and max(sizes) <= 8


def test_lone_request_waits_about_the_timeout(url):
    h = serve.run(Batched.bind(), name="b", route_prefix=None)
    h.handle.remote(0).result()  # warm up
    t0 = time.perf_counter()
    assert h.handle.remote(21).result() == 42
    elapsed = time.perf_counter() - t0
    assert 0.05 <= elapsed < 0.5


def test_reconfigure_tunes_the_batch_size_live(url):
    h = serve.run(Batched.options(user_config={"max_batch_size": 2}).bind(), name="b", route_prefix=None)
    rs = [h.handle.remote(i) for i in range(16)]
    assert [r.result() for r in rs] == [2 * i for i in range(16)]
    assert max(h.batch_sizes.remote().result()) <= 2


@serve.deployment(max_batch_size=8, batch_wait_timeout_s=0.05)
class SeedStyle:
    """The deployment-level form from the seed articles: __call__ gets a list of requests."""

    async def __call__(self, batch):
        # The seed writes req.json() without await; it works here.
        return [{"x": req.json()["x"], "batch": len(batch)} for req in batch]


def test_deployment_level_batching_over_http(url):
    serve.run(SeedStyle.bind(), name="seed", route_prefix="/seed")
    with pooled_client(url, 32, timeout=30) as c, concurrent.futures.ThreadPoolExecutor(32) as pool:
        out = list(pool.map(lambda i: c.post("/seed", json={"x": i}).json(), range(48)))
    assert [o["x"] for o in out] == list(range(48))
    sizes = [o["batch"] for o in out]
    assert max(sizes) > 1 and max(sizes) <= 8


def test_deployment_level_batching_over_handles(url):
    @serve.deployment(max_batch_size=4, batch_wait_timeout_s=0.05)
    def total(items):
        return [sum(items)] * len(items)

    h = serve.run(total.bind(), name="fnb", route_prefix=None)
    results = [h.remote(i) for i in range(4)]
    assert {r.result() for r in results} == {6}


def test_small_max_ongoing_requests_warns():
    with pytest.warns(UserWarning, match="max_ongoing_requests=2 is below max_batch_size=8"):
        Batched.options(max_ongoing_requests=2)
    # Deployment-level batching raises the default limit to the batch size by itself.
    assert SeedStyle.max_ongoing_requests == 8


def test_torch_cnn_example_batches_over_http(url):
    pytest.importorskip("torch")
    from examples.torch_cnn import batched_app, sample_body, unbatched_app

    serve.run(batched_app, name="cnn", route_prefix="/cnn")
    serve.run(unbatched_app, name="cnn1", route_prefix="/cnn1")
    body = sample_body()
    with pooled_client(url, 32, timeout=60) as c, concurrent.futures.ThreadPoolExecutor(32) as pool:
        out = list(pool.map(lambda _: c.post("/cnn", json=body).json(), range(64)))
        single = c.post("/cnn1", json=body).json()
    assert {o["class"] for o in out} == {single["class"]}
    assert 1 < max(o["batch_size"] for o in out) <= 16
    assert single["batch_size"] == 1


@serve.deployment(max_batch_size=8, batch_wait_timeout_s=1.0, batch_latency_target_s=0.2)
class Adaptive:
    async def __call__(self, batch):
        await asyncio.sleep(0.005)
        return [{"x": req.json()["x"], "batch": len(batch)} for req in batch]


def test_latency_target_batching_skips_the_wait_alone_and_batches_under_load(url):
    import flotilla

    serve.run(Adaptive.bind(), name="adaptive", route_prefix="/adaptive")
    with pooled_client(url, 32, timeout=30) as c:
        for i in range(3):  # one at a time: no 1 s wait (the fixed timeout it replaces)
            t0 = time.perf_counter()
            assert c.post("/adaptive", json={"x": i}).json() == {"x": i, "batch": 1}
            assert time.perf_counter() - t0 < 0.15
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            out = list(pool.map(lambda i: c.post("/adaptive", json={"x": i}).json(), range(96)))
    assert [o["x"] for o in out] == list(range(96))
    assert max(o["batch"] for o in out) > 1

    def fill() -> float | None:
        text = httpx.get(flotilla.metrics_url(), timeout=10).text
        line = next((ln for ln in text.splitlines() if ln.startswith("flotilla_batch_fill_ratio{")
                     and 'application="adaptive"' in ln), None)
        return float(line.rsplit(" ", 1)[1]) if line else None

    from tests.conftest import wait_for

    ratio = wait_for(fill, timeout=10, what="flotilla_batch_fill_ratio in /metrics")
    assert 0 < ratio <= 1


@serve.deployment(max_ongoing_requests=32)
class Tokens:
    def __init__(self):
        self.sizes = []

    @serve.batch(max_batch_size=12, batch_wait_timeout_s=0.05, batch_size_fn=lambda texts: sum(len(t.split()) for t in texts))
    async def handle(self, texts):
        self.sizes.append(sum(len(t.split()) for t in texts))
        return [len(t.split()) for t in texts]

    def token_sizes(self):
        return self.sizes


def test_batch_size_fn_bounds_each_batch_by_its_items_in_a_replica(url):
    h = serve.run(Tokens.bind(), name="tokens", route_prefix=None)
    texts = ["a b c", "d e", "f g h i", "j", "k l m n o", "p q"] * 4
    assert [r.result(timeout_s=30) for r in [h.handle.remote(t) for t in texts]] == [len(t.split()) for t in texts]
    sizes = h.token_sizes.remote().result(timeout_s=30)
    assert sum(sizes) == sum(len(t.split()) for t in texts) and max(sizes) <= 12
    with pytest.raises(RuntimeError, match="greater than max_batch_size"):
        h.handle.remote("w " * 13).result(timeout_s=30)
