"""Seed 001, "Traffic Splitting for A/B Testing" and "Versioned Deployments": the Ray 1.x
`set_route` API, with only the import changed (`from ray import serve` -> `from flotilla
import serve`). The article leaves the models out (`OldModel`, `NewModel`, `...`): here each
returns its name, and 1,000 requests show where traffic goes.

    python examples/seed_traffic.py

`/predict` splits 80/20 between the two deployments (each keeps its own route, `/OldModel`
and `/NewModel`); `/recommend` then sends everything to `recommender_v2`. Between the two
sections the first two deployments are deleted, so all four fit on a 2-core machine. The HTTP proxy
listens on 8000 (or $RAY_SERVE_DEFAULT_HTTP_PORT).
"""

import collections
import os

import httpx

from flotilla import serve

serve.start()

@serve.deployment
class OldModel:
    def __call__(self, request):
        return "OldModel"

@serve.deployment
class NewModel:
    def __call__(self, request):
        return "NewModel"

# Deploy two versions of the same model.
OldModel.deploy()
NewModel.deploy()

# Create an endpoint that splits traffic 80/20.
serve.get_deployment("OldModel").set_route(
    endpoint_name="predict",
    traffic={"OldModel": 0.8, "NewModel": 0.2},
)

url = f"http://127.0.0.1:{os.environ.get('RAY_SERVE_DEFAULT_HTTP_PORT', '8000')}"


def where(endpoint):
    """Where 1,000 requests to `endpoint` went."""
    with httpx.Client(timeout=30) as http:
        counts = collections.Counter(http.get(url + endpoint).text for _ in range(1000))
    print(endpoint, dict(sorted(counts.items())))


where("/predict")

# (Not in the article, whose sections are separate examples: free the CPU each of these
# replicas holds by default, so the next two deployments fit on a 2-core machine.)
serve.delete_traffic("predict")
OldModel.delete()
NewModel.delete()

@serve.deployment(name="recommender_v1")
class RecommenderV1:
    def __call__(self, request):
        return "v1"

@serve.deployment(name="recommender_v2")
class RecommenderV2:
    def __call__(self, request):
        return "v2"

RecommenderV1.deploy()
RecommenderV2.deploy()

# Switch the endpoint to point to v2 after validation.
serve.get_deployment("recommender_v1").set_route(
    endpoint_name="recommend",
    traffic={"recommender_v2": 1.0},
)

where("/recommend")
