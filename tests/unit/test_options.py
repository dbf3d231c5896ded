"""Ray options that used to be accepted and dropped: validated, passed on, or warned about once.

Warnings are checked in a fresh interpreter, since "once per process" depends on what the
process has already warned about.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from flotilla import serve
from flotilla.serve.exceptions import ConfigError


def f(x):
    return x


def run_python(code: str) -> str:
    """Run `code` in a fresh interpreter (warnings always shown); returns its stdout."""
    proc = subprocess.run(
        [sys.executable, "-W", "always", "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ---- max_replicas_per_node ---------------------------------------------------------------

def test_max_replicas_per_node_reaches_the_config():
    d = serve.deployment(max_replicas_per_node=2)(f)
    assert d.config.max_replicas_per_node == 2
    assert d.options(max_replicas_per_node=1).config.max_replicas_per_node == 1
    assert d.options(num_replicas=3).config.max_replicas_per_node == 2
    assert serve.deployment(f).config.max_replicas_per_node is None
    assert d.config.model_dump(mode="json")["max_replicas_per_node"] == 2


@pytest.mark.parametrize("bad", [0, -1, 101, "two", 1.5, True])
def test_max_replicas_per_node_must_be_1_to_100(bad):
    with pytest.raises(ConfigError, match="max_replicas_per_node"):
        serve.deployment(max_replicas_per_node=bad)(f)
    with pytest.raises(ConfigError, match="max_replicas_per_node"):
        serve.deployment(f).options(max_replicas_per_node=bad)


def test_max_replicas_per_node_refused_with_placement_group_bundles():
    with pytest.raises(ConfigError, match="max_replicas_per_node is not allowed when placement_group_bundles"):
        serve.deployment(max_replicas_per_node=1, placement_group_bundles=[{"CPU": 1}])(f)


def test_max_ongoing_requests_none_is_refused_as_ray_does():
    for make in (lambda: serve.deployment(max_ongoing_requests=None)(f),
                 lambda: serve.deployment(f).options(max_ongoing_requests=None)):
        with pytest.raises(ValueError, match="`max_ongoing_requests` must be non-null, got None"):
            make()
    assert serve.deployment(f).max_ongoing_requests == 5  # left out: the default


# ---- num_replicas=0 ----------------------------------------------------------------------

def test_num_replicas_zero_is_refused_with_the_fix():
    for make in (lambda: serve.deployment(num_replicas=0)(f), lambda: serve.deployment(f).options(num_replicas=0)):
        with pytest.raises(ConfigError) as info:
            make()
        msg = str(info.value)
        assert "num_replicas" in msg and "larger than 0" in msg
        assert "min_replicas" in msg and "autoscaling_config" in msg
    # Scale to zero the Ray way is fine.
    d = serve.deployment(autoscaling_config={"min_replicas": 0, "max_replicas": 2})(f)
    assert d.autoscaling_config.min_replicas == 0


# ---- logging_config ----------------------------------------------------------------------

def test_logging_config_as_dict_or_object():
    from flotilla.serve.schema import LoggingConfig

    d = serve.deployment(logging_config={"encoding": "JSON", "log_level": "DEBUG", "enable_access_log": False})(f)
    lc = d.config.logging_config
    assert isinstance(lc, LoggingConfig)
    assert (lc.encoding, lc.log_level, lc.enable_access_log, lc.logs_dir) == ("JSON", "DEBUG", False, None)
    d2 = serve.deployment(logging_config=LoggingConfig(log_level=10))(f)
    assert d2.config.logging_config.log_level == "DEBUG"  # ints become names, as in Ray
    assert d2.config.logging_config.encoding == "TEXT"
    assert d.options(logging_config=LoggingConfig()).config.logging_config.encoding == "TEXT"
    dumped = d.config.model_dump(mode="json")["logging_config"]
    assert dumped["encoding"] == "JSON" and dumped["log_level"] == "DEBUG"
    assert LoggingConfig(additional_log_standard_attrs=["filename"]).additional_log_standard_attrs == ["filename"]


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"encoding": "XML"}, "logging_config.encoding"),
        ({"encoding": "json"}, "logging_config.encoding"),
        ({"log_level": "LOUD"}, "logging_config.log_level"),
        ({"log_level": 7}, "logging_config.log_level"),
        ({"enable_access_log": "maybe"}, "logging_config.enable_access_log"),
        ({"additional_log_standard_attrs": ["nope"]}, "logging_config.additional_log_standard_attrs"),
        ({"colour": True}, "logging_config.colour"),
    ],
)
def test_bad_logging_config_names_the_field(bad, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        serve.deployment(logging_config=bad)(f)


def test_logging_config_object_validates_too():
    from flotilla.serve.schema import LoggingConfig

    with pytest.raises(ValueError, match="encoding"):
        LoggingConfig(encoding="YAML")


def test_run_validates_its_logging_config_before_starting_anything():
    import flotilla

    with pytest.raises(ConfigError, match=r"logging_config\.log_level"):
        serve.run(serve.deployment(f).bind(), logging_config={"log_level": "LOUD"})
    assert not flotilla.is_initialized()


# ---- placement groups ----------------------------------------------------------------------

def test_placement_group_bundles_reserve_their_sum():
    d = serve.deployment(
        placement_group_bundles=[{"CPU": 1, "GPU": 1}, {"GPU": 1, "custom_res": 0.5}],
        placement_group_strategy="PACK",
    )(f)
    assert d.config.demand() == {"CPU": 1, "GPU": 2, "custom_res": 0.5}
    plain = serve.deployment(ray_actor_options={"num_cpus": 2})(f)
    assert plain.config.demand() == plain.config.ray_actor_options.required()
    # Fractional GPUs adding up to more than one device are rounded up to whole devices.
    d = serve.deployment(placement_group_bundles=[{"CPU": 1, "GPU": 0.5}, {"GPU": 1}])(f)
    assert d.config.demand()["GPU"] == 2


@pytest.mark.parametrize(
    ("opts", "words"),
    [
        ({"placement_group_bundles": []}, "non-empty"),
        ({"placement_group_bundles": [{}]}, "empty"),
        ({"placement_group_bundles": [{"CPU": 0}]}, "only 0"),
        ({"placement_group_bundles": [{"CPU": -1}]}, ">= 0"),
        ({"placement_group_bundles": {"CPU": 1}}, "placement_group_bundles"),
        ({"placement_group_strategy": "PACK"}, "placement_group_bundles must also be provided"),
        ({"placement_group_bundles": [{"CPU": 1}], "placement_group_strategy": "TIGHT"}, "placement_group_strategy"),
        # The replica itself runs in the first bundle (num_cpus defaults to 1, as in Ray).
        ({"placement_group_bundles": [{"GPU": 1}]}, "first bundle"),
        ({"placement_group_bundles": [{"CPU": 1}], "ray_actor_options": {"num_gpus": 1}}, "first bundle"),
    ],
)
def test_bad_placement_groups_are_refused(opts, words):
    with pytest.raises(ConfigError, match=words):
        serve.deployment(**opts)(f)


def test_request_router_config_is_validated():
    with pytest.raises(ConfigError, match="request_router_config"):
        serve.deployment(request_router_config={"no_such_field": 1})(f)
    with pytest.raises(ConfigError, match="request_router_config"):
        serve.deployment(request_router_config=42)(f)


def test_unknown_options_stay_errors():
    with pytest.raises(ConfigError, match="placement_group_bundel"):
        serve.deployment(placement_group_bundel=[{"CPU": 1}])(f)


# ---- HTTP options ----------------------------------------------------------------------------

def test_http_options_root_path_and_location_are_validated():
    from flotilla.serve.config import HTTPOptions, validate

    assert validate(HTTPOptions, {"root_path": "/serve"}, "http_options").root_path == "/serve"
    for bad in ("serve", "/serve/"):
        with pytest.raises(ConfigError, match="root_path"):
            validate(HTTPOptions, {"root_path": bad}, "http_options")
    for loc in ("HeadOnly", "EveryNode", "Disabled", "NoServer"):
        validate(HTTPOptions, {"location": loc}, "http_options")
    with pytest.raises(ConfigError, match="location"):
        validate(HTTPOptions, {"location": "Everywhere"}, "http_options")


def test_http_options_host_none_means_no_http_server_as_rays() -> None:
    from flotilla.serve.config import HTTPOptions, validate

    opts = validate(HTTPOptions, {"host": None, "port": 9100}, "http_options")  # was a ConfigError
    assert opts.location == "Disabled" and opts.port == 9100
    assert HTTPOptions(host=None).location == "Disabled"


def test_proxy_location_enum_is_taken_where_its_names_are():
    from flotilla.serve.api import _http_options
    from flotilla.serve.config import HTTPOptions, ProxyLocation, validate

    assert [p.value for p in ProxyLocation] == ["Disabled", "HeadOnly", "EveryNode"]
    assert ProxyLocation.EveryNode == "EveryNode"
    opts = validate(HTTPOptions, {"location": ProxyLocation.HeadOnly}, "http_options")
    assert opts.location == "HeadOnly" and type(opts.location) is str
    assert _http_options(None, ProxyLocation.Disabled).proxy_disabled
    assert _http_options({"port": 1}, ProxyLocation.HeadOnly).location == "HeadOnly"


# ---- warnings ----------------------------------------------------------------------------------

def test_options_not_honoured_warn_once_per_process_naming_the_option():
    out = run_python(
        """
        import json, logging, warnings
        from flotilla import serve

        logged = []
        logging.getLogger("flotilla").addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: logged.append(r.getMessage())})())

        def f(x):
            return x

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                d = serve.deployment(placement_group_bundles=[{"CPU": 1}], placement_group_strategy="PACK")(f)
                d.options(num_replicas=2)
                serve.deployment(placement_group_bundles=[{"CPU": 1}, {"CPU": 1}], placement_group_strategy="STRICT_SPREAD")(f)
                serve.deployment(placement_group_bundles=[{"CPU": 1}], placement_group_strategy="STRICT_SPREAD")(f)
                serve.deployment(placement_group_bundles=[{"CPU": 1}, {"GPU": 1}], placement_group_strategy="PACK")(f)
        print(json.dumps({"warnings": [[w.category.__name__, str(w.message), w.filename] for w in caught], "logged": logged}))
        """
    )
    got = json.loads(out)
    warned = got["warnings"]
    assert all(cat == "UserWarning" for cat, _, _ in warned), warned
    # Attributed to the caller's code, not to flotilla's.
    assert all(filename == "<string>" for _, _, filename in warned), warned
    texts = [text for _, text, _ in warned]
    assert len(texts) == 1, texts
    spread = [t for t in texts if t.startswith("placement_group_strategy")]
    assert len(spread) == 1 and "STRICT_SPREAD" in spread[0] and "one node" in spread[0]
    assert sorted(got["logged"]) == sorted(texts)


def test_serve_submodules_are_attributes_after_from_flotilla_import_serve():
    out = run_python(
        """
        from flotilla import serve

        c = serve.metrics.Counter("my_counter", "doc", tag_keys=("k",))
        c.inc(tags={"k": "v"})
        print(type(c).__name__, serve.schema.LoggingConfig().encoding, serve.exceptions.ConfigError.__name__)
        print(serve.config.HTTPOptions().port, serve.handle.DeploymentHandle.__name__)
        """
    )
    assert out.split() == ["Counter", "TEXT", "ConfigError", "8000", "DeploymentHandle"]


def test_unknown_serve_attribute_still_raises():
    with pytest.raises(AttributeError):
        serve.no_such_thing  # noqa: B018


def test_strict_spread_is_not_warned_about_on_the_ray_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    from flotilla.serve import config

    monkeypatch.setattr(config, "_warned", set())
    monkeypatch.setenv("FLOTILLA_BACKEND", "ray")
    serve.deployment(placement_group_bundles=[{"CPU": 1}, {"CPU": 1}], placement_group_strategy="STRICT_SPREAD")(f)
    assert not config._warned  # Ray honours it (and filterwarnings=error would have raised)
    monkeypatch.setenv("FLOTILLA_BACKEND", "local")
    with pytest.warns(UserWarning, match="STRICT_SPREAD"):
        serve.deployment(placement_group_bundles=[{"CPU": 1}, {"CPU": 1}], placement_group_strategy="STRICT_SPREAD")(f)


def test_ray_2_60_deployment_options_are_validated_as_rays():
    d = serve.deployment(rolling_update_percentage=0.5, max_surge_percent=25,
                         backpressure_config={"status_code": 429, "retry_after_s": 5})(f)
    assert d._config.rolling_update_percentage == 0.5 and d._config.max_surge_percent == 25
    assert d._config.backpressure_config.status_code == 429
    for bad in ({"rolling_update_percentage": 0}, {"rolling_update_percentage": 1.5}, {"max_surge_percent": 101},
                {"backpressure_config": {"status_code": 500}}, {"backpressure_config": {"retry_after": 1}}):
        with pytest.raises(ConfigError):
            serve.deployment(**bad)(f)


def test_ray_built_grpc_options_with_reflection_are_accepted():
    from flotilla.serve.config import gRPCOptions

    assert gRPCOptions(port=9000, grpc_servicer_functions=[], enable_reflection=True).enable_reflection


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ray_260_gang_label_and_actor_options_are_validated_as_rays():
    serve.deployment(num_replicas=4, gang_scheduling_config={"gang_size": 2})(f)
    serve.deployment(autoscaling_config={"min_replicas": 1, "max_replicas": 3}, gang_scheduling_config={"gang_size": 2})(f)
    with pytest.raises(ConfigError, match=r"num_replicas \(3\) must be a multiple of gang_size \(2\)"):
        serve.deployment(num_replicas=3, gang_scheduling_config={"gang_size": 2})(f)
    with pytest.raises(ConfigError, match="RESTART_REPLICA"):
        serve.deployment(gang_scheduling_config={"gang_size": 1, "runtime_failure_policy": "RESTART_REPLICA"})(f)
    with pytest.raises(ConfigError, match="max_replicas_per_node"):
        serve.deployment(gang_scheduling_config={"gang_size": 1}, max_replicas_per_node=2)(f)
    with pytest.raises(ConfigError, match="gang_size"):
        serve.deployment(gang_scheduling_config={"gang_size": 0})(f)
    d = serve.deployment(placement_group_bundles=[{"CPU": 1}, {"CPU": 1}],
                         placement_group_bundle_label_selector=[{"zone": "a"}])(f)
    assert d.config.placement_group_bundle_label_selector == [{"zone": "a"}, {"zone": "a"}]  # one for every bundle
    with pytest.raises(ConfigError, match="placement_group_bundles must also be provided"):
        serve.deployment(placement_group_bundle_label_selector=[{"zone": "a"}])(f)
    with pytest.raises(ConfigError, match="2 selectors for 3 bundles"):
        serve.deployment(placement_group_bundles=[{"CPU": 1}] * 3, placement_group_bundle_label_selector=[{"a": "b"}] * 2)(f)
    d = serve.deployment(deployment_actors=[{"name": "counter", "actor_class": dict, "init_kwargs": {"start": 1}}])(f)
    assert d.config.deployment_actors[0].name == "counter"
    with pytest.raises(ConfigError, match="deployment_actors"):
        serve.deployment(deployment_actors=[{"actor_class": dict}])(f)
    with pytest.raises(ValueError, match="does not create"):
        serve.get_deployment_actor("counter")
    with pytest.raises(serve.exceptions.RayServeException, match="deployment-scoped actor"):
        serve.get_deployment_actor_context()


def test_serve_gang_has_rays_gang_context():
    ctx = serve.gang.GangContext(gang_id="g", rank=1, world_size=2, member_replica_ids=["a", "b"])
    assert (ctx.gang_id, ctx.rank, ctx.world_size, ctx.member_replica_ids, ctx.pg_name) == ("g", 1, 2, ["a", "b"], "")


def test_rays_deprecated_http_options_are_handled_as_rays():
    from flotilla.serve.config import HTTPOptions

    with pytest.warns(UserWarning, match="root_url"):
        assert HTTPOptions(root_url="http://lb.example").root_url == "http://lb.example"
    assert HTTPOptions(num_cpus=0).num_cpus == 0
    with pytest.raises(ValueError, match=r"num_cpus.*removed"):
        HTTPOptions(num_cpus=1)


def test_none_resources_in_ray_actor_options_mean_the_defaults() -> None:
    """As Ray takes `{"num_cpus": None}`: the default (one CPU, no GPU); it was refused."""
    def f():
        return 1

    d = serve.deployment(ray_actor_options={"num_cpus": None, "num_gpus": None})(f)
    assert d.config.demand() == {"CPU": 1.0}


def test_a_deployment_name_with_a_hash_is_refused_as_rays() -> None:
    """'#' separates the parts of a replica's id: Ray 2.60 refuses it in a name, in the
    decorator and in .options() (it was accepted)."""
    def f():
        return 1

    with pytest.raises(ValueError, match=r"Deployment names must not contain the '#' character\. Current name: a#b\."):
        serve.deployment(name="a#b")(f)
    with pytest.raises(ValueError, match="must not contain the '#' character"):
        serve.deployment(f).options(name="x#y")
