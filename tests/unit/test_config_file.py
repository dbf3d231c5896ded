"""Config files (`flotilla deploy/build/status/config` building blocks): schema, errors,
overrides on an application graph, importing applications, and the CLI's output."""

from __future__ import annotations

import json
import sys
import textwrap
import uuid

import pytest
import yaml

from flotilla import serve
from flotilla._private.appbuild import (
    app_env,
    apply_overrides,
    deployment_names,
    import_application,
)
from flotilla._private.cliformat import (
    build_config,
    build_yaml,
    config_yaml,
    status_dict,
    status_yaml,
)
from flotilla.serve.deploy_schema import (
    ConfigFileError,
    DeploymentSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
    load_config_file,
    validate_config,
)
from flotilla.serve.deployments import Application
from flotilla.serve.exceptions import ConfigError
from flotilla.serve.schema import (
    ApplicationStatus,
    ApplicationStatusOverview,
    AutoscalingStatus,
    DeploymentStatus,
    DeploymentStatusOverview,
    DeploymentStatusTrigger,
    ProxyStatus,
    ReplicaState,
    ServeStatus,
    TrafficStatus,
)


@serve.deployment
class Leaf:
    def __init__(self, x: int = 0) -> None:
        self.x = x


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.5, "num_gpus": 0.25})
class Mid:
    def __init__(self, *children: object) -> None:
        self.children = children


@serve.deployment(autoscaling_config={"min_replicas": 1, "max_replicas": 4})
class Ingress:
    def __init__(self, *args: object, **kwargs: object) -> None:
        pass


def write(tmp_path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


# ---- the schema -----------------------------------------------------------------------------------


GOOD = """
proxy_location: HeadOnly
http_options:
  host: 0.0.0.0
  port: 8123
  root_path: /serve
grpc_options: {port: 9000}
logging_config: {encoding: JSON}
target_capacity: 50
applications:
  - name: a
    route_prefix: /a
    import_path: mod.sub:app
    args: {model: small}
    runtime_env: {env_vars: {MODEL: small}, working_dir: .}
    deployments:
      - name: A
        num_replicas: auto
        ray_actor_options: {num_cpus: 2}
        user_config: {threshold: 0.5}
      - name: B
        autoscaling_config: {min_replicas: 0, max_replicas: 3}
        max_ongoing_requests: 10
  - name: b
    route_prefix: null
    import_path: pkg.module.app
"""


def test_good_config_loads(tmp_path):
    cfg = load_config_file(write(tmp_path, GOOD))
    assert cfg.proxy_location == "HeadOnly"
    assert cfg.http_options.port == 8123 and cfg.http_options.root_path == "/serve"
    assert cfg.target_capacity == 50
    a, b = cfg.applications
    assert a.name == "a" and a.args == {"model": "small"}
    assert app_env(a) == {"MODEL": "small"}
    assert b.route_prefix is None and b.deployments == [] and app_env(b) == {}
    assert a.deployments[0].overrides() == {
        "num_replicas": "auto", "ray_actor_options": {"num_cpus": 2.0}, "user_config": {"threshold": 0.5},
    }
    assert a.deployments[1].overrides() == {
        "autoscaling_config": {"min_replicas": 0, "max_replicas": 3}, "max_ongoing_requests": 10,
    }


def test_defaults_and_to_dict_round_trip(tmp_path):
    cfg = validate_config({"applications": [{"import_path": "m:app"}]})
    assert cfg.proxy_location == "EveryNode" and cfg.http_options.port == 8000
    app = cfg.applications[0]
    assert (app.name, app.route_prefix, app.args, app.runtime_env) == ("default", "/", {}, {})
    assert cfg.to_dict() == {
        "proxy_location": "EveryNode",
        "http_options": {},
        "applications": [{"name": "default", "import_path": "m:app"}],  # what was given, as Ray's `serve config`
    }
    full = load_config_file(write(tmp_path, GOOD))
    data = full.to_dict()
    json.dumps(data)
    assert validate_config(data).to_dict() == data


def test_single_application_form(tmp_path):
    path = write(tmp_path, """
        import_path: m:app
        route_prefix: /x
        deployments: [{name: A, num_replicas: 3}]
    """)
    cfg = load_config_file(path)
    assert len(cfg.applications) == 1
    assert cfg.applications[0].route_prefix == "/x"
    assert cfg.applications[0].deployments[0].overrides() == {"num_replicas": 3}
    with pytest.raises(ConfigFileError, match=r"config.yaml: deployments\[0\].num_replicas"):
        load_config_file(write(tmp_path, "import_path: m:app\ndeployments: [{name: A, num_replicas: x}]\n"))


def test_json_file(tmp_path):
    path = write(tmp_path, json.dumps({"applications": [{"import_path": "m:app"}]}), "c.json")
    assert load_config_file(path).applications[0].import_path == "m:app"


BAD = [
    ("applications: [{import_path: m:a, deployments: [{name: A}, {name: B, num_replicas: two}]}]",
     r"applications\[0\]\.deployments\[1\]\.num_replicas: Input should be a valid integer.*'two'"),
    ("applications: [{import_path: m:a, deployments: [{name: A, num_replicas: -1}]}]",
     r"applications\[0\]\.deployments\[0\]\.num_replicas: .*>= 1"),
    ("applications: [{import_path: m:a, deployments: [{name: A, bogus: 1}]}]",
     r"deployments\[0\]\.bogus: unknown field; allowed: name, num_replicas"),
    ("applications: [{import_path: m:a, deployments: [{name: A, ray_actor_options: {num_cpu: 1}}]}]",
     r"ray_actor_options\.num_cpu: unknown field; allowed: num_cpus"),
    ("applications: [{import_path: m:a, deployments: [{name: A, max_ongoing_requests: 0}]}]",
     r"deployments\[0\]\.max_ongoing_requests: Input should be greater than 0"),
    ("applications: [{import_path: m:a, deployments: [{name: A, autoscaling_config: {min_replicas: 3, max_replicas: 2}}]}]",
     r"autoscaling_config: .*min_replicas"),
    ("applications: [{import_path: m:a, deployments: [{name: A, num_replicas: 2, autoscaling_config: {max_replicas: 2}}]}]",
     r"deployments\[0\]: num_replicas and autoscaling_config are mutually exclusive"),
    ("applications: [{import_path: m:a, deployments: [{name: A, logging_config: {encoding: XML}}]}]",
     r"logging_config\.encoding"),
    ("applications: [{import_path: m:a, deployments: [{name: A}, {name: A}]}]",
     r"applications\[0\]\.deployments: deployment names must be unique: deployments\[0\] and deployments\[1\]"),
    ("applications: [{import_path: m:a, deployments: [{num_replicas: 1}]}]",
     r"deployments\[0\]\.name: required field missing"),
    ("applications: [{route_prefix: /x}]", r"applications\[0\]\.import_path: required field missing"),
    ("applications: [{import_path: nodots}]", r"import_path: must be 'module:attribute'"),
    ("applications: [{import_path: m:a, route_prefix: x}]", r"route_prefix: must start with '/'"),
    ("applications: [{import_path: m:a, route_prefix: /x/}]", r"route_prefix: must not end with '/'"),
    ("applications: [{import_path: m:a, runtime_env: {pip: [numpy]}}]",
     r"runtime_env: .*'pip'.*only env_vars and working_dir are supported on this machine"),
    ("applications: [{import_path: m:a, runtime_env: {env_vars: {A: 1}}}]", r"env_vars must map strings"),
    ("applications: [{import_path: m:a, runtime_env: {working_dir: 's3://b/x.zip'}}]", r"local directory"),
    ("applications: [{import_path: m:a}, {import_path: m:b}]",
     r"applications: application names must be unique: applications\[0\] and applications\[1\] are both named 'default'"),
    ("applications: [{name: x, import_path: m:a}, {name: y, import_path: m:b, route_prefix: null}, {name: z, import_path: m:c}]",
     r"route prefixes must be unique: applications\[0\] \('x'\) and applications\[2\] \('z'\) both use '/'"),
    ("applications: [{import_path: m:a, external_scaler_enabled: true, deployments: "
     "[{name: d1, autoscaling_config: {max_replicas: 3}}]}]",
     r"external_scaler_enabled is set to True, but the following deployment\(s\) have autoscaling configured: 'd1'"),
    ("proxy_location: Somewhere", r"proxy_location: Input should be"),
    ("http_options: {port: 70000}", r"http_options\.port: Input should be less than or equal to 65535"),
    ("http_options: {root_path: serve/}", r"http_options\.root_path: must be empty or start with '/'"),
    ("http_options: {direct: true}", r"http_options\.direct: unknown field; allowed: host, port"),
    ("target_capacity: 101", r"target_capacity: Input should be less than or equal to 100"),
    ("applications: {}", r"applications: Input should be a valid list"),
    ("nonsense: 1", r"nonsense: unknown field; allowed: proxy_location"),
    ("- a\n- b", r"config.yaml: the top level must be a mapping"),
    ("applications: [\n  {import_path: m:a\n", r"config.yaml: invalid YAML at line \d+, column \d+"),
    ("", r"config.yaml: the file is empty"),
]


@pytest.mark.parametrize(("text", "pattern"), BAD)
def test_bad_configs_name_the_file_and_field(tmp_path, text, pattern):
    path = write(tmp_path, text)
    with pytest.raises(ConfigFileError, match=pattern) as info:
        load_config_file(path)
    assert str(info.value).startswith(path + ": ")
    assert "\n" not in str(info.value)


def test_several_errors_joined():
    with pytest.raises(ConfigFileError) as info:
        validate_config({"http_options": {"port": "x"}, "applications": [{"import_path": "m:a", "route_prefix": "x"}]},
                        "request body")
    message = str(info.value)
    assert message.startswith("request body: http_options.port: ")
    assert "; applications[0].route_prefix: must start with '/'" in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigFileError, match=r"nope\.yaml: no such file"):
        load_config_file(str(tmp_path / "nope.yaml"))
    assert issubclass(ConfigFileError, ConfigError)


def test_overrides_only_returns_set_fields():
    d = DeploymentSchema.model_validate({"name": "A", "max_batch_size": 8, "ray_actor_options": {"num_gpus": 1}})
    assert d.overrides() == {"max_batch_size": 8, "ray_actor_options": {"num_gpus": 1.0}}
    assert DeploymentSchema(name="A").overrides() == {}
    with pytest.raises(ValueError):
        DeploymentSchema.model_validate({"name": "A", "max_replicas_per_node": 2, "placement_group_bundles": [{"CPU": 1}]})


def test_lazy_exports_from_schema():
    from flotilla.serve import schema

    assert schema.ServeDeploySchema is ServeDeploySchema
    assert schema.DeploymentSchema is DeploymentSchema
    assert schema.ServeApplicationSchema.__name__ == "ServeApplicationSchema"


# ---- apply_overrides --------------------------------------------------------------------------------


def graph() -> Application:
    leaf = Leaf.bind(1)
    return Ingress.bind(Mid.bind(leaf, Leaf.bind(2)), extra={"k": [Leaf.bind(3)]}, same=leaf)


def entries(*items: dict) -> list[DeploymentSchema]:
    return [DeploymentSchema.model_validate(i) for i in items]


def test_names_follow_serve_run():
    assert deployment_names(graph()) == ["Ingress", "Mid", "Leaf", "Leaf_1", "Leaf_2"]


def test_apply_overrides_copies_and_renames():
    app = graph()
    new = apply_overrides(app, entries({"name": "Leaf_1", "user_config": {"v": 2}}, {"name": "Leaf_2", "max_ongoing_requests": 7}))
    assert new is not app
    mid = new._args[0]
    assert isinstance(mid, Application) and mid is not app._args[0]
    first, second = mid._args
    assert first.deployment.user_config is None
    assert second.deployment.user_config == {"v": 2}
    nested = new._kwargs["extra"]["k"][0]
    assert nested.deployment.max_ongoing_requests == 7
    assert new._kwargs["same"] is first  # one bound deployment stays one
    # the input is untouched
    assert app._args[0]._args[1].deployment.user_config is None
    assert app._kwargs["extra"]["k"][0].deployment.max_ongoing_requests == 5
    assert deployment_names(new) == deployment_names(app)


def test_apply_overrides_unknown_name():
    with pytest.raises(ConfigError, match=r"Deployment 'Nope' does not exist. Available: \['Ingress', 'Mid', 'Leaf', 'Leaf_1', 'Leaf_2'\]"):
        apply_overrides(graph(), entries({"name": "Nope", "num_replicas": 1}))


def test_ray_actor_options_merge_key_by_key():
    new = apply_overrides(graph(), entries({"name": "Mid", "ray_actor_options": {"num_gpus": 1}}))
    assert new._args[0].deployment.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 1.0}
    assert new._args[0].deployment.num_replicas == 2


def test_num_replicas_and_autoscaling_replace_each_other():
    new = apply_overrides(graph(), entries(
        {"name": "Ingress", "num_replicas": 3},
        {"name": "Mid", "autoscaling_config": {"min_replicas": 1, "max_replicas": 5}},
    ))
    assert new.deployment.num_replicas == 3 and new.deployment.autoscaling_config is None
    mid = new._args[0].deployment
    assert mid.num_replicas == 1 and mid.autoscaling_config.max_replicas == 5


def test_invalid_merged_options_raise():
    with pytest.raises(ConfigError, match="Mid"):
        apply_overrides(graph(), entries({"name": "Mid", "placement_group_bundles": [{"CPU": 0.1}]}))


# ---- import_application -----------------------------------------------------------------------------


MODULE = """
from pydantic import BaseModel
from flotilla import serve

@serve.deployment
class Model:
    def __init__(self, size="small"):
        self.size = size

app = Model.bind()
dep = Model

class Args(BaseModel):
    size: str
    replicas: int = 1

def typed_builder(args: Args):
    return Model.options(num_replicas=args.replicas).bind(args.size)

def dict_builder(args):
    return Model.bind(args.get("size", "none"))

def bad_builder(args):
    return 42

def no_param_builder():
    return Model.bind("fixed")

value = 3
"""


@pytest.fixture
def mod(tmp_path, monkeypatch):
    name = f"cfgmod_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_import_application_forms(mod):
    app = import_application(f"{mod}:app")
    assert isinstance(app, Application) and app.deployment.name == "Model"
    assert import_application(f"{mod}.app").deployment.name == "Model"
    bound = import_application(f"{mod}:dep")
    assert isinstance(bound, Application) and bound._args == ()
    built = import_application(f"{mod}:dict_builder", {"size": "big"})
    assert built._args == ("big",)
    typed = import_application(f"{mod}:typed_builder", {"size": "xl", "replicas": 3})
    assert typed._args == ("xl",) and typed.deployment.num_replicas == 3
    assert import_application(f"{mod}:no_param_builder")._args == ("fixed",)


@pytest.mark.parametrize(
    ("attr", "args", "pattern"),
    [
        ("app", {"x": 1}, "args need an application builder function"),
        ("typed_builder", {"replicas": "many"}, r"args of .*typed_builder.*\n.*size"),
        ("bad_builder", {}, "builder returned a int"),
        ("no_param_builder", {"a": 1}, "builder takes no parameter"),
        ("value", None, "names a int; expected an Application"),
        ("missing", None, "has no attribute 'missing'"),
    ],
)
def test_import_application_errors(mod, attr, args, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        import_application(f"{mod}:{attr}", args)
    assert f"{mod}" in str(info.value)


def test_import_missing_module():
    with pytest.raises(ConfigError, match="could not import module 'no_such_module_xyz'"):
        import_application("no_such_module_xyz:app")


def test_import_from_working_directory(tmp_path, monkeypatch):
    name = f"cwdmod_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        assert import_application(f"{name}:app").deployment.name == "Model"
    finally:
        sys.modules.pop(name, None)


# ---- what the CLI prints ----------------------------------------------------------------------------


def hand_built_status(with_extras: bool) -> ServeStatus:
    status = ServeStatus(
        proxies={"node-1": ProxyStatus.HEALTHY},
        applications={
            "default": ApplicationStatusOverview(
                status=ApplicationStatus.RUNNING,
                message="",
                last_deployed_time_s=1700000000.5,
                deployments={
                    "Model": DeploymentStatusOverview(
                        status=DeploymentStatus.HEALTHY,
                        status_trigger=DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED,
                        replica_states={ReplicaState.RUNNING: 2},
                        autoscaling=AutoscalingStatus(3, 2, "upscale: 4 ongoing", 1700000001.0),
                    ),
                    "Fixed": DeploymentStatusOverview(status=DeploymentStatus.UPDATING),
                },
            )
        },
    )
    if with_extras:
        status.traffic = {"split": TrafficStatus("/split", {"a": 0.9, "b": 0.1})}
    return status


def test_status_yaml_has_ray_shape():
    text = status_yaml(hand_built_status(False))
    assert "!!python" not in text
    assert text.startswith("proxies:\n  node-1: HEALTHY\napplications:\n")
    assert yaml.safe_load(text) == {
        "proxies": {"node-1": "HEALTHY"},
        "applications": {"default": {
            "status": "RUNNING", "message": "", "last_deployed_time_s": 1700000000.5,
            "deployments": {
                "Model": {
                    "status": "HEALTHY", "status_trigger": "CONFIG_UPDATE_COMPLETED",
                    "replica_states": {"RUNNING": 2}, "message": "",
                    "autoscaler": {"target_replicas": 3, "running_replicas": 2,
                                   "last_decision": "upscale: 4 ongoing",
                                   "last_decision_time_s": 1700000001.0},
                },
                "Fixed": {"status": "UPDATING", "status_trigger": "UNSPECIFIED",
                          "replica_states": {}, "message": ""},
            },
        }},
        "target_capacity": None,
    }


def test_status_extras_only_when_present():
    data = status_dict(hand_built_status(True))
    assert data["traffic"]["split"]["traffic"] == {"a": 0.9, "b": 0.1}
    assert "shadows" not in data
    assert status_yaml(ServeStatus()) == "proxies: {}\napplications: {}\ntarget_capacity: null\n"


def test_config_yaml(tmp_path):
    applied = load_config_file(write(tmp_path, GOOD)).to_dict()
    text = config_yaml(applied)
    docs = list(yaml.safe_load_all(text))
    assert [d["name"] for d in docs] == ["a", "b"]
    assert "\n---\n" in text
    assert docs[0] == applied["applications"][0]
    only_b = config_yaml(applied, "b")
    assert "---" not in only_b and yaml.safe_load(only_b)["import_path"] == "pkg.module.app"
    assert config_yaml(None) == "No configuration was found.\n"
    assert config_yaml(applied, "zzz") == 'No config has been deployed for application "zzz".\n'


def test_build_round_trip(tmp_path):
    from flotilla.serve.request_router import RequestRouter

    class FirstRouter(RequestRouter):
        async def choose_replicas(self, candidate_replicas, pending_request=None):
            return [candidate_replicas[:1]]

    @serve.deployment(
        num_replicas=2, user_config={"t": 1}, ray_actor_options={"num_cpus": 0.5},
        logging_config={"encoding": "JSON"},
    )
    class Scored:
        pass

    @serve.deployment(request_router_config={"request_router_class": FirstRouter})  # a class: not in a file
    class Routed:
        pass

    app = Ingress.bind(Scored.bind(), Leaf.bind(), Leaf.bind(), Routed.bind())
    config = build_config([("pkg.mod:app", app, None)])
    assert config["proxy_location"] == "EveryNode"
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
    (only,) = config["applications"]
    assert (only["name"], only["route_prefix"], only["runtime_env"]) == ("app1", "/", {})  # as `serve build` names it
    deps = {d["name"]: d for d in only["deployments"]}
    assert list(deps) == ["Ingress", "Scored", "Leaf", "Leaf_1", "Routed"]
    assert deps["Scored"] == {
        "name": "Scored", "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5},
        "user_config": {"t": 1}, "logging_config": {"encoding": "JSON"},
    }
    assert deps["Leaf"] == {"name": "Leaf"}
    assert deps["Routed"] == {"name": "Routed"}

    text = build_yaml([("pkg.mod:app", app, None)])
    assert "request_router_config" in text.split("\n\n")[0]  # the note says what was left out
    path = write(tmp_path, text, "built.yaml")
    loaded = load_config_file(path)
    again = loaded.to_dict()
    assert again["applications"][0]["deployments"] == only["deployments"]
    assert again["http_options"] == config["http_options"]
    # the built file applies cleanly to the graph it came from
    applied = apply_overrides(app, loaded.applications[0].deployments)
    assert applied._args[0].deployment.num_replicas == 2


def test_build_several_apps():
    config = build_config([("a:app", Leaf.bind(), None), ("b:app", Mid.bind(), None), ("c:app", Leaf.bind(), "named")])
    names = [(a["name"], a["route_prefix"]) for a in config["applications"]]
    assert names == [("app1", "/app1"), ("app2", "/app2"), ("named", "/named")]
    assert validate_config(config).applications[1].deployments[0].overrides() == {
        "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.25},
    }


def test_http_options_take_tls_files_and_grpc_options_are_kept() -> None:
    from flotilla.serve.deploy_schema import validate_config

    cfg = validate_config({"http_options": {"ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem"},
                           "grpc_options": {"port": 9001, "grpc_servicer_functions": ["m.add_X_to_server"]},
                           "applications": []}).to_dict()
    assert cfg["http_options"]["ssl_certfile"] == "/c.pem" and cfg["http_options"]["ssl_keyfile"] == "/k.pem"
    assert cfg["grpc_options"] == {"port": 9001, "grpc_servicer_functions": ["m.add_X_to_server"]}


def test_rays_application_host_port_and_policy_fields_are_accepted():
    from flotilla.serve.deploy_schema import ServeDeploySchema

    cfg = ServeDeploySchema.model_validate({"applications": [{
        "import_path": "m:app", "host": "0.0.0.0", "port": 8000,
        "autoscaling_policy": {"policy_function": "policies:coordinated", "policy_kwargs": {"k": 1}}}]})
    app = cfg.applications[0].to_dict()
    assert "host" not in app and "port" not in app  # ignored, as Ray does in a multi-application config
    assert app["autoscaling_policy"] == {"policy_function": "policies:coordinated", "policy_kwargs": {"k": 1}}
    with pytest.raises(ValueError, match="policy_function"):
        ServeDeploySchema.model_validate({"applications": [{"import_path": "m:app",
                                                           "autoscaling_policy": {"policy_function": "nocolon"}}]})


def test_a_parsed_config_can_be_changed_as_rays_can_and_is_validated():
    """Ray's tests edit parsed configs in place (`config.applications[0].import_path = ...`);
    the change shows in what is deployed, and a bad value is refused at once."""
    from pydantic import ValidationError

    cfg = validate_config({"applications": [{"name": "a", "import_path": "m:a", "route_prefix": "/a"}]})
    cfg.applications[0].import_path = "m:b"
    cfg.applications = [cfg.applications[0], ServeApplicationSchema(name="b", import_path="m:c", route_prefix="/b")]
    cfg.target_capacity = 50
    assert cfg.to_dict()["applications"] == [{"name": "a", "route_prefix": "/a", "import_path": "m:b"},
                                             {"name": "b", "route_prefix": "/b", "import_path": "m:c"}]
    assert cfg.to_dict()["target_capacity"] == 50
    with pytest.raises(ValidationError, match="must start with '/'"):
        cfg.applications[0].route_prefix = "nope"
