"""Deployment options are validated at definition time, with messages naming the field."""

from __future__ import annotations

import json
import warnings

import pytest

from flotilla import serve
from flotilla.serve.exceptions import ConfigError


def f(x):
    return x


def test_defaults_match_ray_serve():
    d = serve.deployment(f)
    assert d.name == "f"
    assert d.max_ongoing_requests == 5
    assert d.max_queued_requests == -1
    cfg = d.config
    assert cfg.num_replicas is None and cfg.initial_replicas == 1
    assert cfg.health_check_period_s == 10.0
    assert cfg.health_check_timeout_s == 30.0
    assert cfg.graceful_shutdown_wait_loop_s == 2.0
    assert cfg.graceful_shutdown_timeout_s == 20.0
    assert cfg.ray_actor_options.num_cpus == 1.0
    assert cfg.ray_actor_options.num_gpus == 0.0


def test_decorator_with_and_without_arguments():
    @serve.deployment
    class A:
        pass

    @serve.deployment(name="b", num_replicas=3, ray_actor_options={"num_cpus": 0.5, "num_gpus": 0.25})
    class B:
        pass

    assert A.name == "A"
    assert B.name == "b" and B.num_replicas == 3
    assert B.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0.25}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_replicas": -1}, "num_replicas"),
        ({"num_replicas": "many"}, "num_replicas"),
        ({"max_ongoing_requests": 0}, "max_ongoing_requests"),
        ({"max_ongoing_requests": "x"}, "max_ongoing_requests"),
        ({"max_queued_requests": 0}, "max_queued_requests"),
        ({"ray_actor_options": {"num_cpus": -1}}, "ray_actor_options.num_cpus"),
        ({"ray_actor_options": {"num_gpus": 1.5}}, "ray_actor_options.num_gpus"),
        ({"ray_actor_options": {"nmu_cpus": 1}}, "ray_actor_options.nmu_cpus"),
        ({"ray_actor_options": {"resources": {"x": -2}}}, "ray_actor_options.resources"),
        ({"ray_actor_options": {"runtime_env": {"env_vars": {"A": 1}}}}, "ray_actor_options.runtime_env"),
        ({"health_check_period_s": 0}, "health_check_period_s"),
        ({"graceful_shutdown_timeout_s": -1}, "graceful_shutdown_timeout_s"),
        ({"user_config": {"f": object()}}, "user_config"),
        ({"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling_config"),
        ({"autoscaling_config": {"bogus": 1}}, "autoscaling_config.bogus"),
        ({"num_replicas": 2, "autoscaling_config": {"max_replicas": 3}}, "autoscaling_config"),
        ({"max_batch_size": 0}, "max_batch_size"),
    ],
)
def test_bad_options_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        serve.deployment(**kwargs)(f)
    msg = str(info.value)
    assert field.split(".")[0] in msg
    # ConfigError is both a ValueError and a TypeError, whichever a port's code catches.
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_unknown_option_is_rejected():
    with pytest.raises(ConfigError, match="not_an_option"):
        serve.deployment(not_an_option=1)(f)
    with pytest.raises(ConfigError, match="bogus"):
        serve.deployment(f).options(bogus=2)


def test_options_returns_a_changed_copy():
    d = serve.deployment(num_replicas=2)(f)
    d2 = d.options(num_replicas=3, name="g")
    assert (d.num_replicas, d.name) == (2, "f")
    assert (d2.num_replicas, d2.name) == (3, "g")
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        d.options(max_ongoing_requests=-5)


def test_num_replicas_auto_gives_ray_defaults():
    d = serve.deployment(num_replicas="auto")(f)
    ac = d.autoscaling_config
    assert ac is not None
    assert (ac.min_replicas, ac.max_replicas, ac.target_ongoing_requests) == (1, 100, 2.0)


@pytest.mark.parametrize(("given", "expected"), [
    # the fields given go on top of the auto defaults (they replaced them: max_replicas stayed 1)
    ({"metrics_interval_s": 1, "upscale_delay_s": 1}, (1, 100, 2.0, 1.0, 1.0)),
    ({"max_replicas": 7, "target_ongoing_requests": 3}, (1, 7, 3.0, 10.0, 30.0)),
    ({"min_replicas": 0}, (0, 100, 2.0, 10.0, 30.0)),
])
def test_num_replicas_auto_with_a_partial_autoscaling_config(given: dict, expected: tuple) -> None:
    ac = serve.deployment(num_replicas="auto", autoscaling_config=given)(f).autoscaling_config
    assert (ac.min_replicas, ac.max_replicas, ac.target_ongoing_requests, ac.metrics_interval_s,
            ac.upscale_delay_s) == expected


def test_deployment_properties_read_back_as_ray_serves_do():
    d = serve.deployment(f)
    assert (d.num_replicas, d.version, d.logging_config, d.init_args, d.init_kwargs) == (1, None, None, (), {})
    assert serve.deployment(num_replicas="auto")(f).num_replicas == 1  # Ray 2.60 reads 1 back
    assert serve.deployment(autoscaling_config={"max_replicas": 3})(f).num_replicas == 1
    given = serve.deployment(ray_actor_options={"num_cpus": 1}, logging_config={"log_level": "DEBUG"})(f)
    assert given.ray_actor_options == {"num_cpus": 1}  # as given, defaults included
    # as Ray's: the 1 CPU a replica reserves by default shows in what is read back
    assert d.ray_actor_options == {"num_cpus": 1}
    assert d.options(ray_actor_options={"num_gpus": 1}).ray_actor_options == {"num_gpus": 1, "num_cpus": 1}
    assert d.options(ray_actor_options={"num_cpus": 0}).ray_actor_options == {"num_cpus": 0}
    assert given.logging_config["log_level"] == "DEBUG"  # a dict, as Ray's


def test_max_concurrent_queries_is_the_old_name_and_warns(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="flotilla"):
        d = serve.deployment(max_concurrent_queries=7)(f)
        assert d.max_ongoing_requests == 7
        assert d.options(max_concurrent_queries=3).max_ongoing_requests == 3
    assert caplog.text.count("max_concurrent_queries is deprecated") == 2


def test_deployment_cannot_be_called_directly():
    d = serve.deployment(f)
    with pytest.raises(RuntimeError, match="bind"):
        d()


def test_run_rejects_unbound_and_bad_prefix():
    d = serve.deployment(f)
    with pytest.raises(TypeError, match="bind"):
        serve.run(d)
    for bad in ("api", "/api/", "/a/{x}"):
        with pytest.raises(ConfigError, match="route_prefix"):
            serve.run(d.bind(), route_prefix=bad)


def test_required_resources():
    d = serve.deployment(ray_actor_options={"num_cpus": 2, "num_gpus": 0.5, "resources": {"r": 1}, "accelerator_type": "A100"})(f)
    req = d.config.ray_actor_options.required()
    assert req["CPU"] == 2 and req["GPU"] == 0.5 and req["r"] == 1
    assert "accelerator_type:A100" in req


def test_http_keep_alive_from_ray_env_wins(monkeypatch) -> None:
    from flotilla.serve.config import HTTPOptions

    assert HTTPOptions().keep_alive_timeout_s == 90.0  # Ray 2.60's default
    assert HTTPOptions(keep_alive_timeout_s=0.5).keep_alive_timeout_s == 0.5
    monkeypatch.setenv("RAY_SERVE_HTTP_KEEP_ALIVE_TIMEOUT_S", "7")
    assert HTTPOptions(keep_alive_timeout_s=0.5).keep_alive_timeout_s == 7.0
    assert HTTPOptions().keep_alive_timeout_s == 7.0


def test_version_is_said_to_be_unused_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray 1.x's `version` option was dropped without a word (Ray 2.60 refuses it)."""
    from flotilla.serve import config

    monkeypatch.setattr(config, "_warned", set())
    with pytest.warns(UserWarning, match="version: flotilla versions a deployment by its code"):
        d = serve.deployment(version="v2")(f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d.options(version="v3")  # once per process
    assert d.version is None


def test_grpc_options_import_their_servicer_functions_as_rays():
    from flotilla.serve.config import gRPCOptions

    assert gRPCOptions(grpc_servicer_functions=["json.dumps"]).grpc_servicer_func_callable == [json.dumps]
    with pytest.raises(ModuleNotFoundError, match=r"no_such_module\.add_X can't be imported"):
        _ = gRPCOptions(grpc_servicer_functions=["no_such_module.add_X"]).grpc_servicer_func_callable
    with pytest.raises(ValueError, match=r"json\.decoder is not a callable function"):
        _ = gRPCOptions(grpc_servicer_functions=["json.decoder"]).grpc_servicer_func_callable
