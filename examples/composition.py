"""Two deployments composed with handles: a preprocessor feeding a model.

    flotilla run examples.composition:app
    curl -X POST localhost:8000/ -d '{"text": "Flotilla serves models"}'
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from flotilla import serve
from flotilla.serve.handle import DeploymentHandle


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class Tokenizer:
    def __call__(self, text: str) -> list[str]:
        return text.lower().split()


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class Sentiment:
    def __init__(self, tokenizer: DeploymentHandle) -> None:
        self.tokenizer = tokenizer
        self.positive = {"good", "great", "fast", "serves", "love"}

    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        tokens = await self.tokenizer.remote(body["text"])
        score = sum(t in self.positive for t in tokens) / max(1, len(tokens))
        return {"tokens": tokens, "score": score}


app = Sentiment.bind(Tokenizer.bind())
