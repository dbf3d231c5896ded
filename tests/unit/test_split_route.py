"""Split routes in the proxy (pure parts): weights, stickiness, the path passed on."""

from __future__ import annotations

import collections

import pytest

from flotilla._private.proxy import Proxy, SplitRoute
from flotilla.serve.api import _check_traffic


def spec(weights: dict[str, float], **kw: object) -> dict[str, object]:
    variants = [(app, "Ingress", f"/{app}", w) for app, w in weights.items()]
    return {"split": "ab", "variants": variants, **kw}


def scope(path: str, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, object]:
    return {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "headers": headers or []}


def test_random_choice_follows_weights() -> None:
    r = SplitRoute("/ab", spec({"a": 0.8, "b": 0.2, "c": 0.0}))
    counts = collections.Counter(r.pick(scope("/ab"), "/ab", "")[2].app_name for _ in range(20000))  # type: ignore[index]
    assert set(counts) == {"a", "b"}  # weight 0: never chosen
    assert abs(counts["b"] / 20000 - 0.2) < 0.015


def test_sticky_header_is_stable_and_spread_by_weight() -> None:
    r = SplitRoute("/ab", spec({"a": 0.5, "b": 0.5}, sticky_header="X-User"))
    apps = {}
    for u in range(2000):
        got = {r.pick(scope("/ab", [(b"x-user", str(u).encode())]), "/ab", "")[2].app_name for _ in range(3)}  # type: ignore[index]
        assert len(got) == 1
        apps[u] = got.pop()
    share = sum(a == "b" for a in apps.values()) / len(apps)
    assert abs(share - 0.5) < 0.04
    # Another proxy (a new table, same weights) agrees.
    r2 = SplitRoute("/ab", spec({"a": 0.5, "b": 0.5}, sticky_header="x-user"))
    assert all(r2.pick(scope("/ab", [(b"x-user", str(u).encode())]), "/ab", "")[2].app_name == apps[u] for u in range(200))  # type: ignore[index]


def test_sticky_cookie() -> None:
    r = SplitRoute("/ab", spec({"a": 0.5, "b": 0.5}, sticky_cookie="uid"))
    assert r.sticky_value(scope("/ab", [(b"cookie", b"x=1; uid=42; y=2")])) == b"42"
    assert r.sticky_value(scope("/ab", [(b"cookie", b"x=1")])) is None
    first = r.pick(scope("/ab", [(b"cookie", b"uid=7")]), "/ab", "")
    assert all(r.pick(scope("/ab", [(b"cookie", b"a=1; uid=7")]), "/ab", "")[2] == first[2] for _ in range(50))  # type: ignore[index]


@pytest.mark.parametrize(("split", "app", "path", "want"), [
    ("/ab", "/a", "/ab", "/a"),
    ("/ab", "/a", "/ab/", "/a/"),
    ("/ab", "/a", "/ab/x/y", "/a/x/y"),
    ("/ab", "/", "/ab", "/"),
    ("/ab", "/", "/ab/x", "/x"),
    ("/", "/a", "/", "/a"),
    ("/", "/a", "/x", "/a/x"),
])
def test_path_below_the_prefix_is_passed_on(split: str, app: str, path: str, want: str) -> None:
    r = SplitRoute(split, {"split": "s", "variants": [("a", "I", app, 1.0)]})
    fscope, prefix, dep = r.pick(scope(path), path, "")  # type: ignore[misc]
    assert (fscope["path"], fscope["raw_path"], prefix, dep.app_name) == (want, want.encode(), app, "a")


def test_handles_only_app_is_served_under_the_split_prefix() -> None:
    r = SplitRoute("/ab", {"split": "s", "variants": [("a", "I", None, 1.0)]})
    s = scope("/ab/x")
    assert r.pick(s, "/ab/x", "") == (s, "/ab", r.targets[0][1])


def test_no_variant() -> None:
    assert SplitRoute("/ab", {"split": "s", "variants": []}).pick(scope("/ab"), "/ab", "") is None


def test_proxy_route_table_mixes_plain_and_split_routes() -> None:
    p = Proxy({})
    p.set_routes({"/a": ("a", "A"), "/ab": {"split": "ab", "variants": [("a", "A", "/a", 1.0)],
                                           "sticky_header": None, "sticky_cookie": None}})
    m = p.match("/ab/x")
    assert m is not None and isinstance(m[1], SplitRoute)
    assert p.match("/a")[1].app_name == "a"  # type: ignore[index, union-attr]
    assert p.routes_json == b'{"/a": "a", "/ab": "ab"}'


@pytest.mark.parametrize(("traffic", "match"), [
    ({"a": 0.8, "b": 0.3}, "add up to 1"),
    ({"a": 1.2, "b": -0.2}, "weight of 'b' must be a non-negative"),
    ({"a": "half", "b": 0.5}, "weight of 'a' must be a number"),
    ({"a": float("nan"), "b": 1.0}, "weight of 'a'"),
    ({}, "non-empty dict"),
])
def test_bad_weights(traffic: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _check_traffic("ab", traffic)


def test_weights_within_tolerance() -> None:
    assert _check_traffic("ab", {"a": 0.1, "b": 0.2, "c": 0.7}) == {"a": 0.1, "b": 0.2, "c": 0.7}
    assert _check_traffic("ab", {"a": 1}) == {"a": 1.0}
