"""The shipped examples work end to end over HTTP."""

from __future__ import annotations

import httpx
import pytest

from examples.demo import SAMPLE
from flotilla import serve
from tests.conftest import pooled_client

pytestmark = pytest.mark.slow


def test_sklearn_example_predicts_over_http(url):
    from examples.sklearn_app import app

    h = serve.run(app, name="cancer", route_prefix="/cancer")
    r = httpx.post(f"{url}/cancer", json={"features": SAMPLE}, timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["label"] == "malignant" and body["probability"] > 0.9 and body["model_accuracy"] > 0.9
    assert httpx.post(f"{url}/cancer", json={"features": [1, 2]}, timeout=30).status_code == 400
    assert httpx.post(f"{url}/cancer", content=b"not json", timeout=30).status_code == 400
    assert h.predict.remote(SAMPLE).result()["label"] == "malignant"


def test_composition_example(url):
    from examples.composition import app

    serve.run(app, name="comp", route_prefix="/comp")
    r = httpx.post(f"{url}/comp", json={"text": "Great fast models"}, timeout=30)
    assert r.json() == {"tokens": ["great", "fast", "models"], "score": 2 / 3}


def test_seed_batched_sklearn_example(url):
    import concurrent.futures

    from examples.sklearn_batched import app

    serve.run(app, name="churn", route_prefix="/churn")
    with pooled_client(url, 32, timeout=30) as c, concurrent.futures.ThreadPoolExecutor(32) as pool:
        out = list(pool.map(lambda i: c.post("/churn", json={"features": [i / 10] * 8}).json(), range(64)))
    assert all(0.0 <= o["churn_prob"] <= 1.0 for o in out)
    assert 1 < max(o["batch_size"] for o in out) <= 32
