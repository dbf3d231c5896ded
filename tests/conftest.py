"""Shared fixtures: one real flotilla cluster per test module, on a free port."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

import flotilla
from flotilla import serve

#: The whole suite runs on either backend: `FLOTILLA_BACKEND=ray` runs it with replicas as Ray
#: actors (scripts/test does, in .venv-ray, after the local run).
RAY_BACKEND = os.environ.get("FLOTILLA_BACKEND", "").strip().lower() == "ray"


def local_only(reason: str) -> pytest.MarkDecorator:
    """Skip on the Ray backend: the test checks something only the local backend has."""
    return pytest.mark.skipif(RAY_BACKEND, reason=f"local backend only: {reason}")


def skip_direct_on_ray(mode: str) -> None:
    """Direct ingress (replicas serving HTTP on the proxy's port) is local-backend only."""
    if RAY_BACKEND and mode == "direct":
        pytest.skip("local backend only: direct ingress shares this machine's listening socket")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pooled_client(url: str, threads: int, timeout: float = 30.0) -> httpx.Client:
    """One httpx client for `threads` threads at once, keeping as many idle connections as it
    may open. httpcore 1.0's pool counts every connection, not just the idle ones, against
    `max_keepalive_connections` (20 by default): past 20 it closes "surplus" idle connections,
    among them one just handed to another thread, whose read then fails with EBADF."""
    n = max(threads, 1)
    return httpx.Client(base_url=url, timeout=timeout,
                        limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))


def metric_total(name: str, **labels: str) -> float:
    """The sum of the samples named `name` (a counter's `_total`, a histogram's `_count`...)
    with these `labels` on the cluster's /metrics now."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(flotilla.metrics_url(), timeout=30).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def wait_for(pred: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02,
             what: str | Callable[[], str] = "") -> Any:
    """Poll `pred` until it returns something truthy, or fail after `timeout` seconds.
    `what` names the awaited state in the failure; a callable is asked at the failure, so
    it can report the state then (e.g. a load's counts), not when the wait began."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    if callable(what):
        what = what()
    raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}: last={last!r}")


def title(pid: int) -> str:
    """A process's title as `ps` shows it (e.g. `flotilla::head`), or "" if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def descendants(root: int) -> set[int]:
    """PIDs of every live process below `root` (children, grandchildren, ...)."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parent[int(name)] = int(fields[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.add(pid)
        except OSError:
            pass
    return out


@contextlib.contextmanager
def running_cluster(http_options: dict[str, Any] | None = None, **init_kwargs: Any) -> Iterator[str]:
    """A fresh cluster with its HTTP proxy on a free port; yields the base URL."""
    if flotilla.is_initialized():
        flotilla.shutdown()
    flotilla.init(**init_kwargs)
    try:
        port = free_port()
        # One proxy process unless a test asks for more: tests find "the" proxy by its title.
        serve.start(http_options={"num_proxies": 1, **(http_options or {}), "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        flotilla.shutdown()


@contextlib.contextmanager
def env_vars(**env: str) -> Iterator[None]:
    """Set environment variables for the block (clusters started in it read them), then put
    back what was there."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def sampling_cluster(**init_kwargs: Any) -> Iterator[str]:
    """`running_cluster` whose head samples replicas' CPU and memory every 0.2 s
    (FLOTILLA_CPU_SAMPLE_S), so that findings and memory figures show within a moment."""
    with env_vars(FLOTILLA_CPU_SAMPLE_S="0.2"), running_cluster(**init_kwargs) as url:
        yield url


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A running cluster with 8 CPUs and 2 (declared) GPUs; yields the HTTP base URL.

    Modules that need other options override this fixture with `running_cluster(...)`.
    """
    with running_cluster(num_cpus=8, num_gpus=2, resources={"custom_res": 2, "accelerator_type:A100": 1}) as url:
        yield url


@pytest.fixture
def url(cluster: str) -> Iterator[str]:
    """The cluster's URL; every app is deleted after the test."""
    yield cluster
    for name in list(serve.status().applications):
        serve.delete(name)
