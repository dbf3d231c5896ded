"""The seed article's batched scikit-learn predictor, served over HTTP.

Deployment-level batching as the article writes it: `__call__` receives a list of requests
(up to `max_batch_size`, or whatever arrived within `batch_wait_timeout_s`) and returns one
result per request, in order. `req.json()` works with or without `await`.

    flotilla run examples.sklearn_batched:app
    curl -X POST localhost:8000/ -d '{"features": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}'
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flotilla import serve

N_FEATURES = 8


def train() -> Any:
    """A churn-like classifier on synthetic data (scikit-learn ships the generator)."""
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression

    x, y = make_classification(n_samples=2000, n_features=N_FEATURES, random_state=0)
    return LogisticRegression(max_iter=500).fit(x, y)


@serve.deployment(
    name="churn_predictor",
    num_replicas=2,
    ray_actor_options={"num_cpus": 0.5},
    max_batch_size=32,
    batch_wait_timeout_s=0.05,
)
class ChurnPredictor:
    def __init__(self) -> None:
        self.model = train()

    async def __call__(self, batch: list[Any]) -> list[dict[str, float]]:
        inputs = np.array([req.json()["features"] for req in batch])
        preds = self.model.predict_proba(inputs)[:, 1]
        return [{"churn_prob": float(p), "batch_size": len(batch)} for p in preds]


app = ChurnPredictor.bind()
