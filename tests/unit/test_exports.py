"""The public surface is exactly what __all__ says."""

from __future__ import annotations

import flotilla
from flotilla import serve


def test_serve_all_is_importable_and_public():
    for name in serve.__all__:
        assert not name.startswith("_")
        assert getattr(serve, name) is not None


def test_ray_serve_names_are_present():
    for name in ("deployment", "run", "start", "delete", "status", "shutdown", "batch",
                 "get_app_handle", "get_deployment_handle", "get_replica_context",
                 "DeploymentHandle", "DeploymentResponse", "Application", "Deployment"):
        assert name in serve.__all__


def test_top_level_api():
    assert set(flotilla.__all__) >= {"init", "shutdown", "is_initialized", "__version__"}
    assert not flotilla.is_initialized()


def test_request_cancelled_error_is_ray_serves_and_the_older_name() -> None:
    import pickle

    from flotilla.exceptions import TaskCancelledError
    from flotilla.serve.exceptions import RayServeException, RequestCancelledError

    e = RequestCancelledError("abc")
    assert isinstance(e, RayServeException) and isinstance(e, TaskCancelledError)
    assert str(e) == "Request abc was cancelled." and e.request_id == "abc"
    back = pickle.loads(pickle.dumps(e))
    assert back.__class__ is RequestCancelledError and str(back) == str(e)
    assert str(RequestCancelledError()) == "Request was cancelled."  # as Ray Serve words it


def test_backpressure_error_takes_ray_serves_arguments_and_has_its_message() -> None:
    import pickle

    from flotilla.serve.exceptions import BackPressureError

    e = BackPressureError(5, 10)
    assert (e.num_queued_requests, e.max_queued_requests) == (5, 10)
    assert "num_queued_requests=5" in e.message and str(e) == e.message
    back = pickle.loads(pickle.dumps(BackPressureError(num_queued_requests=1, max_queued_requests=2)))
    assert back.__class__ is BackPressureError and back.max_queued_requests == 2 and str(back) == back.message


def test_proxy_location_is_in_serve_config() -> None:
    from flotilla.serve.config import ProxyLocation

    assert ProxyLocation("EveryNode") is ProxyLocation.EveryNode


def test_starlette_requests_is_reachable_as_after_from_ray_import_serve():
    """Ray's key-concepts example annotates `starlette.requests.Request` after a bare
    `import starlette`: `from ray import serve` has imported the submodule by then."""
    import subprocess
    import sys

    code = ("import starlette\nfrom flotilla import serve\n\n@serve.deployment\nclass A:\n"
            "    async def __call__(self, request: starlette.requests.Request) -> str:\n        return 'ok'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_ray_import_paths_of_policy_helpers():
    from flotilla.serve.config import (
        AutoscalingContext,
        AutoscalingPolicy,
        BackpressureConfig,
        DeploymentID,
    )

    assert DeploymentID("d", "a").app_name == "a" and AutoscalingContext and BackpressureConfig
    assert AutoscalingPolicy(policy_function="m:f", policy_kwargs={"k": 1}).policy_kwargs == {"k": 1}
