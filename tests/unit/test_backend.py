"""Choosing the backend (`flotilla.init(backend=...)`, FLOTILLA_BACKEND), without starting one."""

from __future__ import annotations

import importlib.util

import pytest

import flotilla
from flotilla._private import backend


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOTILLA_BACKEND", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_select(monkeypatch: pytest.MonkeyPatch) -> None:
    assert backend.select(None, None) == "local"
    assert backend.select(None, "auto") == "local"
    assert backend.select(None, "local") == "local"
    assert backend.select("ray", None) == "ray"
    assert backend.select(None, "10.0.0.1:6379") == "ray"
    assert backend.select(None, "ray://head:10001") == "ray"
    assert backend.select("local", "10.0.0.1:6379") == "local"
    monkeypatch.setenv("FLOTILLA_BACKEND", "Ray")
    assert backend.select(None, None) == "ray"
    assert backend.select("local", None) == "local"
    with pytest.raises(ValueError, match="unknown flotilla backend 'k8s'"):
        backend.select("k8s", None)


def test_ray_options() -> None:
    assert backend.ray_options(None, 4, None, {"zone_a": 1}, {"namespace": "x"}) == {
        "address": None, "num_cpus": 4, "num_gpus": None, "resources": {"zone_a": 1}, "namespace": "x"}
    with pytest.raises(ValueError, match="joining an existing Ray cluster"):
        backend.ray_options("auto", 4, None, None, {})


def test_detached_controller_only_when_joining_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("FLOTILLA_RAY_DETACHED", raising=False)
    assert not backend.detached(None) and not backend.detached("local")
    assert backend.detached("auto") and backend.detached("10.0.0.1:6379")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert backend.detached(None) and not backend.detached("local")
    monkeypatch.setenv("FLOTILLA_RAY_DETACHED", "0")
    assert not backend.detached("10.0.0.1:6379")


def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ImportError, match=r'pip install "flotilla\[ray\]"'):
        flotilla.init(backend="ray")
    monkeypatch.setenv("FLOTILLA_BACKEND", "ray")
    with pytest.raises(ImportError, match=r'pip install "flotilla\[ray\]"'):
        flotilla.init()
    assert not flotilla.is_initialized()


def test_local_backend_refuses_a_ray_address() -> None:
    with pytest.raises(ValueError, match='backend="ray"'):
        flotilla.init("10.0.0.1:6379", backend="local")
