"""Keyword-argument checks of serve.run, serve.start and flotilla.init (no cluster needed)."""

from __future__ import annotations

import pytest

import flotilla
from flotilla import serve
from flotilla._private import args
from flotilla._private.client import Runtime


def test_unknown_names_raise_with_a_suggestion() -> None:
    with pytest.raises(TypeError, match=r"^f\(\) got an unexpected keyword argument 'colour' \(did you mean 'color'\?\)$"):
        args.check("f", {"colour": 1}, ("color", "size"), {})
    with pytest.raises(TypeError, match=r"unexpected keyword arguments 'a', 'zzz'"):
        args.check("f", {"a": 1, "zzz": 2}, ("b",), {})


def test_refused_names_say_what_to_use() -> None:
    with pytest.raises(TypeError, match=r"'port' \(use http_options\)"):
        args.check("f", {"port": 1}, (), {}, {"port": "use http_options"})


def test_ignored_names_warn_once() -> None:
    with pytest.warns(UserWarning, match=r"g\(\): 'old' is accepted for Ray compatibility but ignored: gone"):
        args.check("g", {"old": 1}, (), {"old": "gone"})
    args.check("g", {"old": 1}, (), {"old": "gone"})  # no second warning (warnings are errors here)


def test_entry_points_refuse_typos_before_starting_anything() -> None:
    started = Runtime._instance

    @serve.deployment
    def f() -> str:
        return "x"

    with pytest.raises(TypeError, match="route_prefx"):
        serve.run(f.bind(), route_prefx="/typo")
    with pytest.raises(TypeError, match="http_option"):
        serve.start(http_option={})
    with pytest.raises(TypeError, match="num_cpu"):
        flotilla.init(num_cpu=1)
    assert Runtime._instance is started  # nothing was started


def test_handle_options_refuse_typos_and_warn_on_ray_private_names() -> None:
    h = serve.DeploymentHandle("D", "app")
    with pytest.raises(TypeError, match=r"'multiplex_model_id' \(did you mean 'multiplexed_model_id'\?\)"):
        h.options(multiplex_model_id="m")
    with pytest.warns(UserWarning, match="_prefer_local_routing"):
        assert h.options(_prefer_local_routing=True, method_name="m")._opts.method_name == "m"
    assert h.options(use_new_handle_api=True)._opts == h._opts


def test_get_deployment_handle_takes_rays_keywords_and_no_others() -> None:
    assert serve.get_deployment_handle("D", "app", _check_exists=False, _record_telemetry=False).app_name == "app"
    with pytest.raises(TypeError, match="check_exist"):
        serve.get_deployment_handle("D", "app", check_exist=False)  # type: ignore[call-arg]
