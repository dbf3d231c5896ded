"""Traffic splitting (issue #13): one route, several applications, by weight.

`serve.set_traffic` over HTTP (weights, stickiness, weight changes under load with zero failed
requests, the path passed on, per-variant metrics), split handles, errors, `delete_traffic`,
and the seed-era `Deployment.set_route`.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import flotilla
from flotilla import serve
from flotilla.serve import legacy
from flotilla.serve.exceptions import ConfigError, RayServeException
from tests.conftest import running_cluster, wait_for
from tests.load import Load

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with running_cluster(num_cpus=8) as url:
        yield url


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class Named:
    """Answers "<name> <path> <root_path>" over HTTP, "<name>" over a handle."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def __call__(self, request: Any = None) -> str:
        if request is None:
            return self.name
        return f"{self.name} {request.url.path} {request.scope.get('root_path')}"


@pytest.fixture(scope="module")
def apps(cluster: str) -> Iterator[str]:
    """Applications "a" and "b" at /a and /b, for the whole module."""
    for name in ("a", "b"):
        serve.run(Named.bind(name), name=name, route_prefix=f"/{name}")
    yield cluster


@pytest.fixture
def url(apps: str) -> Iterator[str]:
    yield apps
    for name in list(serve.status().traffic):
        serve.delete_traffic(name)


def send(url: str, path: str, n: int, threads: int = 8, headers: list[dict[str, str]] | None = None) -> list[str]:
    """`n` GETs of `path` from `threads` keep-alive clients; the apps that answered, in order
    of `headers` when given (one dict per request)."""
    out: list[str] = [""] * n
    errors: list[str] = []
    nxt = iter(range(n))
    lock = threading.Lock()

    def run() -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                r = c.get(path, headers=headers[i] if headers else None)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                else:
                    out[i] = r.text.split(" ")[0]

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert errors == [], errors[:5]
    return out


def test_weighted_split_over_http(url: str) -> None:
    serve.set_traffic("ab", {"a": 0.8, "b": 0.2})
    t0 = time.monotonic()
    got = collections.Counter(send(url, "/ab", 2000))
    elapsed = time.monotonic() - t0
    share_b = got["b"] / 2000
    print(f"split 0.8/0.2: {dict(got)} (b {share_b:.3f}) in {elapsed:.1f}s")
    assert set(got) == {"a", "b"}
    assert abs(share_b - 0.2) <= 0.04, got
    # The applications keep their own routes; the split is in the status and in /-/routes.
    assert httpx.get(f"{url}/b").text.startswith("b ")
    st = serve.status().traffic["ab"]
    assert (st.route_prefix, st.traffic, st.message) == ("/ab", {"a": 0.8, "b": 0.2}, "")
    assert httpx.get(f"{url}/-/routes").json()["/ab"] == "ab"


def test_path_below_the_prefix_reaches_the_app_under_its_own_prefix(url: str) -> None:
    serve.set_traffic("to-a", {"a": 1.0}, route_prefix="/v1/model")
    assert httpx.get(f"{url}/v1/model").text == "a /a /a"
    assert httpx.get(f"{url}/v1/model/x/y?q=1").text == "a /a/x/y /a"
    assert httpx.get(f"{url}/v1/modelx").status_code == 404


def test_sticky_header(url: str) -> None:
    serve.set_traffic("ab", {"a": 0.8, "b": 0.2}, sticky_header="X-User")
    users = [f"user-{i}" for i in range(200)]
    headers = [{"x-user": u} for u in users for _ in range(5)]
    got = send(url, "/ab", len(headers), headers=headers)
    per_user: dict[str, set[str]] = collections.defaultdict(set)
    for h, app in zip(headers, got, strict=True):
        per_user[h["x-user"]].add(app)
    assert all(len(v) == 1 for v in per_user.values()), {u: v for u, v in per_user.items() if len(v) > 1}
    share_b = sum(v == {"b"} for v in per_user.values()) / len(users)
    print(f"sticky 0.8/0.2: {share_b:.3f} of 200 users on b")
    assert abs(share_b - 0.2) <= 0.06
    # Without the header: random by weight.
    assert set(send(url, "/ab", 200)) == {"a", "b"}


def test_sticky_cookie(url: str) -> None:
    serve.set_traffic("ab", {"a": 0.5, "b": 0.5}, sticky_cookie="uid")
    with httpx.Client(base_url=url, timeout=30) as c:
        for uid in ("1", "2", "3", "4", "5"):
            seen = {c.get("/ab", headers={"cookie": f"theme=dark; uid={uid}"}).text.split(" ")[0] for _ in range(5)}
            assert len(seen) == 1, (uid, seen)


def test_weight_changes_under_load_drop_nothing(url: str) -> None:
    serve.set_traffic("ab", {"a": 0.8, "b": 0.2})
    first = lambda v: v.split(" ")[0]  # noqa: E731
    with Load.http(url, "/ab", threads=6, max_s=60) as load:
        load.wait_ok(100)
        serve.set_traffic("ab", {"a": 0.5, "b": 0.5})
        load.wait_ok(100)
        serve.set_traffic("ab", {"a": 0.0, "b": 1.0})
        load.wait_answers(lambda v: first(v) == "b", n=50)
        n = load.ok
        load.wait_ok(100)
        assert all(first(v) == "b" for v in load.recent(load.ok - n)), load.report()
        serve.set_traffic("ab", {"a": 1.0, "b": 0.0})
        load.wait_answers(lambda v: first(v) == "a", n=50)
    print(f"weight changes under load: {load.report()}")
    assert load.failures == {} and load.stuck == 0, load.report()
    assert load.ok >= 350


def test_bad_weights_and_unknown_apps(url: str) -> None:
    with pytest.raises(ValueError, match="add up to 1"):
        serve.set_traffic("ab", {"a": 0.8, "b": 0.3})
    with pytest.raises(ValueError, match="weight of 'b' must be a non-negative"):
        serve.set_traffic("ab", {"a": 1.5, "b": -0.5})
    with pytest.raises(ConfigError, match=r"unknown application.*'nope'"):
        serve.set_traffic("ab", {"a": 0.5, "nope": 0.5})
    with pytest.raises(ConfigError, match="is being used by application \"a\""):
        serve.set_traffic("ab", {"a": 0.5, "b": 0.5}, route_prefix="/a")
    with pytest.raises(ConfigError, match="is the name of an application"):
        serve.set_traffic("a", {"a": 0.5, "b": 0.5}, route_prefix="/other")
    assert "ab" not in serve.status().traffic
    serve.set_traffic("ab", {"a": 0.5, "b": 0.5})
    with pytest.raises(ConfigError, match="traffic split \"ab\""):
        serve.run(Named.bind("c"), name="c", route_prefix="/ab")


def test_delete_traffic_makes_the_route_404(url: str) -> None:
    serve.set_traffic("ab", {"a": 0.5, "b": 0.5})
    assert httpx.get(f"{url}/ab").status_code == 200
    serve.delete_traffic("ab")
    wait_for(lambda: httpx.get(f"{url}/ab").status_code == 404, timeout=10, what="the route gone")
    assert "ab" not in serve.status().traffic
    assert httpx.get(f"{url}/a").status_code == 200  # the apps stay
    with pytest.raises(RayServeException, match="does not exist"):
        serve.delete_traffic("ab")


def test_a_deleted_application_leaves_the_split_to_the_others(url: str) -> None:
    serve.run(Named.bind("c"), name="c", route_prefix="/c")
    serve.set_traffic("ac", {"a": 0.5, "c": 0.5})
    assert set(send(url, "/ac", 100, threads=4)) == {"a", "c"}
    serve.delete("c")
    assert set(send(url, "/ac", 50, threads=4)) == {"a"}
    assert "'c'" in serve.status().traffic["ac"].message
    serve.delete("a")
    try:
        r = httpx.get(f"{url}/ac")
        assert r.status_code == 503 and "no application to send to" in r.text
    finally:
        serve.run(Named.bind("a"), name="a", route_prefix="/a")
    assert set(send(url, "/ac", 20, threads=2)) == {"a"}  # back when the app is


def test_split_handle(url: str) -> None:
    serve.set_traffic("ab", {"a": 0.8, "b": 0.2})
    h = serve.get_app_handle("ab")
    got = collections.Counter(r.result(timeout_s=30) for r in [h.remote() for _ in range(500)])
    print(f"split handle 0.8/0.2: {dict(got)}")
    assert abs(got["b"] / 500 - 0.2) <= 0.07, got
    serve.set_traffic("ab", {"a": 0.0, "b": 1.0})  # the handle follows the new weights
    wait_for(lambda: all(h.remote().result(timeout_s=30) == "b" for _ in range(20)), timeout=10, what="all b")
    serve.delete_traffic("ab")
    with pytest.raises(RayServeException, match="does not exist"):
        serve.get_app_handle("ab")


def _scrape() -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for fam in text_string_to_metric_families(httpx.get(flotilla.metrics_url(), timeout=30).text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def test_requests_are_counted_under_the_chosen_app(url: str) -> None:
    serve.set_traffic("metered", {"a": 0.5, "b": 0.5})
    got = collections.Counter(send(url, "/metered", 100, threads=4))

    def counted() -> dict[str, float] | None:
        m = _scrape()
        per = {app: sum(s.value for s in m.get("ray_serve_num_http_requests_total", [])
                        if s.labels.get("route") == "/metered" and s.labels.get("application") == app)
               for app in ("a", "b")}
        return per if per == {k: float(v) for k, v in got.items()} else None

    wait_for(counted, timeout=20, what=f"per-variant counts {dict(got)}")


def test_seed_set_route(url: str) -> None:
    """Seed 001's split, on two applications named after their deployments (as `.deploy()` makes them)."""

    @serve.deployment(name="OldModel", ray_actor_options={"num_cpus": 0.25})
    def old_model(request: Any) -> str:
        return "OldModel"

    @serve.deployment(name="NewModel", ray_actor_options={"num_cpus": 0.25})
    def new_model(request: Any) -> str:
        return "NewModel"

    for dep in (old_model, new_model):
        serve.run(dep.bind(), name=dep.name, route_prefix=f"/{dep.name}")
    try:
        old_model.set_route(endpoint_name="predict", traffic={"OldModel": 0.8, "NewModel": 0.2})
        got = collections.Counter(send(url, "/predict", 1000))
        print(f"seed set_route 0.8/0.2: {dict(got)}")
        assert abs(got["NewModel"] / 1000 - 0.2) <= 0.05, got  # 4 standard deviations
        client_handle = legacy.get_handle("predict")  # client.get_handle(endpoint) splits too
        assert {client_handle.remote({"n": i}).result(timeout_s=30) for i in range(60)} == {"OldModel", "NewModel"}
        old_model.set_route(endpoint_name="predict", traffic={"NewModel": 1.0})  # the version switch
        assert set(send(url, "/predict", 100)) == {"NewModel"}
    finally:
        serve.delete_traffic("predict")
        serve.delete("OldModel")
        serve.delete("NewModel")
