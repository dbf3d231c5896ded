"""A real scikit-learn model served over HTTP.

A gradient-boosting classifier is trained at start-up on the breast-cancer data set that
ships with scikit-learn (no download), then serves predictions:

    flotilla run examples.sklearn_app:app
    curl -X POST localhost:8000/ -H 'content-type: application/json' \
         -d '{"features": [17.99, 10.38, 122.8, 1001, 0.1184, 0.2776, 0.3001, 0.1471, 0.2419, 0.07871, 1.095, 0.9053, 8.589, 153.4, 0.006399, 0.04904, 0.05373, 0.01587, 0.03003, 0.006193, 25.38, 17.33, 184.6, 2019, 0.1622, 0.6656, 0.7119, 0.2654, 0.4601, 0.1189]}'
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from flotilla import serve


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.5})
class CancerClassifier:
    def __init__(self) -> None:
        from sklearn.datasets import load_breast_cancer
        from sklearn.ensemble import GradientBoostingClassifier
        from sklearn.model_selection import train_test_split

        data = load_breast_cancer()
        x_train, x_test, y_train, y_test = train_test_split(data.data, data.target, random_state=0)
        self.model = GradientBoostingClassifier(random_state=0).fit(x_train, y_train)
        self.accuracy = float(self.model.score(x_test, y_test))
        self.labels = [str(n) for n in data.target_names]
        self.n_features = data.data.shape[1]

    def predict(self, features: list[float]) -> dict[str, Any]:
        proba = self.model.predict_proba([features])[0]
        best = int(proba.argmax())
        return {"label": self.labels[best], "probability": float(proba[best]), "model_accuracy": self.accuracy}

    async def __call__(self, request: Request) -> Any:
        try:
            body = await request.json()
            features = [float(v) for v in body["features"]]
        except (ValueError, KeyError, TypeError):
            return JSONResponse(
                {"error": f"send JSON {{\"features\": [{self.n_features} numbers]}}"}, status_code=400
            )
        if len(features) != self.n_features:
            return JSONResponse({"error": f"expected {self.n_features} features, got {len(features)}"}, status_code=400)
        return self.predict(features)


app = CancerClassifier.bind()
