"""Seed 001, "Testing Locally Before Going Live": the Ray 1.x client API, with only the
import changed (`from ray import serve` -> `from flotilla import serve`).

    python examples/seed_echo_client.py

`serve.start()` returns a client; `client.get_handle(name)` passes a single argument as a
request whose `.json()` returns it, as Ray 1.x handles did. The HTTP proxy listens on 8000
(or $RAY_SERVE_DEFAULT_HTTP_PORT).
"""

from flotilla import serve

client = serve.start(detached=False)

@serve.deployment
class Echo:
    def __call__(self, request):
        return request.json()

Echo.deploy()

# Direct call without HTTP
result = client.get_handle("Echo").remote({"msg": "hello"}).result()
print(result)  # {'msg': 'hello'}
