"""Seed 001, "Getting Started": the square model, Ray 1.x style (`SquareModel.deploy()`),
with only the imports changed (`import ray` -> `import flotilla`, `ray.init()` ->
`flotilla.init()`).

    python examples/seed_square.py

`.deploy()` serves a deployment at `/{name}`: here `/square` (the article posts to
`/SquareModel`; that 404s, and the 404 lists the routes that exist, `/square` among them).
The request block below uses the right route; the port is 8000, or
$RAY_SERVE_DEFAULT_HTTP_PORT as with Ray Serve.
"""

import os

import flotilla
from flotilla import serve

flotilla.init()
serve.start()

@serve.deployment(name="square", num_replicas=2)
class SquareModel:
    def __call__(self, request):
        # FastAPI automatically parses JSON bodies.
        data = request.json()
        number = data["num"]
        return {"result": number ** 2}

# Register the deployment with the Serve runtime.
SquareModel.deploy()

PORT = os.environ.get("RAY_SERVE_DEFAULT_HTTP_PORT", "8000")

import requests  # noqa: E402, I001  (where the article imports it)
resp = requests.post(f"http://localhost:{PORT}/square", json={"num": 7})
print(resp.json())  # {"result": 49}

# The article's URL: the answer names the route that exists.
resp = requests.post(f"http://localhost:{PORT}/SquareModel", json={"num": 7})
print(resp.status_code, resp.text)
