"""Several proxy processes on one port (`http_options["num_proxies"]`): all accept, each is
restarted when it dies while the others serve on, none is left after shutdown."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import flotilla
from flotilla import serve
from flotilla._private.head import default_num_proxies
from flotilla.serve.config import HTTPOptions
from tests.conftest import descendants, local_only, running_cluster, title, wait_for

pytestmark = [pytest.mark.slow, local_only("several proxy processes on one port are a local-backend feature")]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with running_cluster(http_options={"num_proxies": 2}) as url:
        yield url


@serve.deployment
def hello(*args: Any) -> str:
    return "hello"


def proxies() -> list[int]:
    return sorted(p for p in descendants(os.getpid()) if title(p) == "flotilla::proxy")


def proxy_logs() -> list[str]:
    from flotilla._private.client import Runtime

    logs = os.path.join(Runtime.current().session_dir, "logs")
    return sorted(f for f in os.listdir(logs) if f.startswith("proxy"))


def test_two_proxies_share_the_port_and_both_serve(url: str) -> None:
    serve.run(hello.bind(), name="hello", route_prefix="/hello")
    wait_for(lambda: len(proxies()) == 2 and serve.status().proxies == {"head": "HEALTHY"},
             timeout=20, what="two healthy proxies")
    assert proxy_logs() == ["proxy-1.log", "proxy.log"]
    for _ in range(300):  # a new connection each: the kernel hands them to either process
        assert httpx.get(f"{url}/hello", timeout=10).text == "hello"
    wait_for(lambda: all(_served(log) for log in proxy_logs()), timeout=10,
             what="access lines of /hello in both proxies' logs")


def test_a_killed_proxy_is_replaced_while_the_other_serves(url: str) -> None:
    serve.run(hello.bind(), name="hello", route_prefix="/hello")
    wait_for(lambda: len(proxies()) == 2, timeout=20, what="two proxies")
    victim = proxies()[-1]
    os.kill(victim, signal.SIGKILL)
    ok = 0
    for _ in range(100):  # while it is gone, the other one answers every new connection
        r = httpx.get(f"{url}/hello", timeout=10)
        ok += r.status_code == 200
    assert ok == 100
    wait_for(lambda: len(proxies()) == 2 and victim not in proxies()
             and serve.status().proxies == {"head": "HEALTHY"}, timeout=20, what="a replacement proxy")


def test_a_restarted_head_keeps_both_proxies(url: str) -> None:
    serve.run(hello.bind(), name="hello", route_prefix="/hello")
    wait_for(lambda: len(proxies()) == 2 and serve.status().proxies == {"head": "HEALTHY"},
             timeout=20, what="two healthy proxies")
    before = proxies()
    (head,) = [p for p in descendants(os.getpid()) if title(p) == "flotilla::head"]
    os.kill(head, signal.SIGKILL)
    wait_for(lambda: [p for p in descendants(os.getpid()) if title(p) == "flotilla::head" and p != head],
             timeout=20, what="a new head")
    wait_for(lambda: serve.status().proxies == {"head": "HEALTHY"}, timeout=20,
             what="both proxies reconnected")
    assert proxies() == before  # re-adopted, not replaced
    assert httpx.get(f"{url}/hello", timeout=10).text == "hello"


def test_num_proxies_is_validated() -> None:
    with pytest.raises(ValueError, match="num_proxies"):
        HTTPOptions(num_proxies=0)
    assert HTTPOptions(num_proxies=3).num_proxies == 3


@pytest.mark.parametrize(("cores", "proxies"), [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (16, 8), (64, 8)])
def test_the_default_is_half_the_cores(cores: int, proxies: int) -> None:
    assert default_num_proxies(cores) == proxies


def test_shutdown_leaves_no_proxy(url: str) -> None:
    assert len(proxies()) == 2
    flotilla.shutdown()
    wait_for(lambda: proxies() == [], timeout=20, what="no proxy process")


def _served(log: str) -> int:
    from flotilla._private.client import Runtime

    with open(os.path.join(Runtime.current().session_dir, "logs", log)) as f:
        return sum(" GET /hello 200 " in line for line in f)
