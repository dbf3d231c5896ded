"""Seed 001, "Traffic Splitting for A/B Testing" and "Versioned Deployments", Ray 1.x style,
with only the imports changed (`import ray` -> `import flotilla`, `ray.init()` ->
`flotilla.init()`). The article leaves the models' bodies out; here each answers its name.

    python examples/seed_traffic_split.py

`set_route` is `serve.set_traffic` (see README, "Traffic splitting"); the port is 8000, or
$RAY_SERVE_DEFAULT_HTTP_PORT as with Ray Serve.
"""

import collections
import os

import requests

import flotilla
from flotilla import serve

flotilla.init()
client = serve.start()


@serve.deployment(name="OldModel")
class OldModel:
    def __call__(self, request):
        return "OldModel"


@serve.deployment(name="NewModel")
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

PORT = os.environ.get("RAY_SERVE_DEFAULT_HTTP_PORT", "8000")
with requests.Session() as s:
    counts = collections.Counter(s.get(f"http://localhost:{PORT}/predict").text for _ in range(1000))
print("predict", dict(sorted(counts.items())))

# The endpoint's handle splits the same way.
handle = client.get_handle("predict")
print("handle", sorted({handle.remote({"user": i}).result() for i in range(100)}))

# (Not in the article, whose sections are separate examples: free the CPUs these two
# replicas hold, one each by default, so the next two fit on a small machine.)
serve.delete_traffic("predict")
OldModel.delete()
NewModel.delete()


@serve.deployment(name="recommender_v1")
class RecommenderV1:
    def __call__(self, request):
        return "recommender_v1"


@serve.deployment(name="recommender_v2")
class RecommenderV2:
    def __call__(self, request):
        return "recommender_v2"


RecommenderV1.deploy()
RecommenderV2.deploy()

# Switch the endpoint to point to v2 after validation.
serve.get_deployment("recommender_v1").set_route(
    endpoint_name="recommend",
    traffic={"recommender_v2": 1.0},
)
with requests.Session() as s:
    counts = collections.Counter(s.get(f"http://localhost:{PORT}/recommend").text for _ in range(100))
print("recommend", dict(counts))
