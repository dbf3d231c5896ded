"""Seed 001's remaining blocks in their Ray 1.x form (`.deploy()`), with only the imports
changed (`from ray import serve` -> `from flotilla import serve`, `ray.serve.metrics` ->
`flotilla.serve.metrics`): the batched scikit-learn churn predictor, the autoscaled
predictor and the monitored model. The article loads `model.joblib`; here the model is saved
and loaded the same way, after training it on synthetic data.

    python examples/seed_features.py

Each deployment answers at `/{name}`; each block's deployment is asked once, then deleted
(`Deployment.delete()`) so the next fits on a 2-core machine (the article's replicas reserve
a CPU each). The HTTP proxy listens on 8000 (or $RAY_SERVE_DEFAULT_HTTP_PORT). Needs
scikit-learn and joblib (scikit-learn brings joblib).
"""

import os
import tempfile

import httpx
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

# The article's "model.joblib", trained and saved here so the block below runs as written.
x, y = make_classification(n_samples=500, n_features=4, random_state=0)
os.chdir(tempfile.mkdtemp())
import joblib  # noqa: E402

joblib.dump(LogisticRegression().fit(x, y), "model.joblib")

# ---- "Serving a Scikit-Learn Model at Scale" ----
import numpy as np  # noqa: E402

from flotilla import serve  # noqa: E402

# Assume you have a trained model saved as model.joblib
model = joblib.load("model.joblib")

@serve.deployment(
    name="churn_predictor",
    num_replicas=4,
    ray_actor_options={"num_cpus": 0.25},  # the article asks 1 CPU each; this box may have 2
    # Process up to 32 requests together.
    max_batch_size=32,
    batch_wait_timeout_s=0.05,
)
class ChurnPredictor:
    def __init__(self):
        self.model = model

    async def __call__(self, batch):
        # batch is a list of FastAPI Request objects.
        inputs = np.array([req.json()["features"] for req in batch])
        preds = self.model.predict_proba(inputs)[:, 1]
        # Return a list of dicts matching the order of requests.
        return [{"churn_prob": float(p)} for p in preds]

ChurnPredictor.deploy()

url = f"http://127.0.0.1:{os.environ.get('RAY_SERVE_DEFAULT_HTTP_PORT', '8000')}"
print(httpx.post(f"{url}/churn_predictor", json={"features": x[0].tolist()}, timeout=30).json().keys())
ChurnPredictor.delete()

# ---- "Autoscaling in Action" ----
autoscale_cfg = {
    "min_replicas": 2,
    "max_replicas": 10,
    "target_num_ongoing_requests_per_replica": 5,
    "metrics_interval_s": 5,
}

@serve.deployment(
    name="autoscaled_predictor",
    autoscaling_config=autoscale_cfg,
    ray_actor_options={"num_cpus": 0.25},  # the article asks 0.5
)
class AutoscaledPredictor:
    def __call__(self, request):
        # Simulate work
        import time; time.sleep(0.02)  # noqa: E702, I001  (as the article writes it)
        return {"msg": "handled"}

AutoscaledPredictor.deploy()

print(httpx.get(f"{url}/autoscaled_predictor", timeout=30).json())
print(serve.status().applications["autoscaled_predictor"].deployments["autoscaled_predictor"].target_num_replicas)
AutoscaledPredictor.delete()

# ---- "Monitoring, Observability, and Logging" ----
from flotilla.serve.metrics import Counter, Histogram  # noqa: E402

request_counter = Counter("my_model_requests_total", "Total requests")
latency_hist = Histogram("my_model_latency_seconds", "Request latency")

@serve.deployment
class MonitoredModel:
    def __call__(self, request):
        request_counter.inc()
        with latency_hist.time():
            # Model inference logic here
            return {"ok": True}

MonitoredModel.deploy()

print(httpx.get(f"{url}/MonitoredModel", timeout=30).json())
