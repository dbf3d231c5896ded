"""Large payloads through handles (issue 19): numpy arrays and bytes objects go out of band, in
both directions, into a composed deployment and back, as arguments, keyword arguments, results
and streamed items; each arrives as what was sent (bytes as plain `bytes`, arrays writable)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

from flotilla import serve
from tests.integration.test_heap import minor_faults

pytestmark = pytest.mark.slow

MB = 1 << 20


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Inner:
    def describe(self, data: Any, *, extra: Any = None) -> dict[str, Any]:
        out: dict[str, Any] = {"type": type(data).__name__, "len": len(data)}
        if isinstance(data, np.ndarray):
            out["writeable"] = bool(data.flags.writeable)
            out["sum"] = float(data.sum())
        if extra is not None:
            out["extra"] = (type(extra).__name__, len(extra))
        return out

    def same(self, data: Any) -> Any:
        return data

    def pieces(self, data: bytes, n: int) -> Any:
        step = len(data) // n
        for i in range(n):
            yield data[i * step : (i + 1) * step]

    def pid(self) -> int:
        return os.getpid()


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Outer:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def relay(self, data: Any) -> Any:
        """The payload to the inner deployment and back again, then back to the caller."""
        back = await self.inner.same.remote(data)
        return type(back).__name__, back


def test_bytes_and_arrays_arrive_as_sent_in_both_directions() -> None:
    h = serve.run(Inner.bind(), name="payloads", route_prefix=None)
    blob = os.urandom(3 * MB)
    arr = np.random.default_rng(0).random(400_000)  # 3.2 MB
    assert h.describe.remote(blob).result(timeout_s=30) == {"type": "bytes", "len": len(blob)}
    assert h.describe.remote(blob, extra=blob[:MB]).result(timeout_s=30) == {
        "type": "bytes", "len": len(blob), "extra": ("bytes", MB)}
    got = h.describe.remote(arr).result(timeout_s=30)
    assert got == {"type": "ndarray", "len": len(arr), "writeable": True, "sum": float(arr.sum())}
    back = h.same.remote(blob).result(timeout_s=30)
    assert type(back) is bytes and back == blob
    back_arr = h.same.remote(arr).result(timeout_s=30)
    assert (back_arr == arr).all() and back_arr.flags.writeable
    small = b"x" * 100
    assert h.same.remote(small).result(timeout_s=30) == small
    nested = {"a": [blob[:200_000]], "b": (blob[:70_000],)}
    assert h.same.remote(nested).result(timeout_s=30) == nested
    items = list(h.options(stream=True).pieces.remote(blob, 3))
    assert [type(i) for i in items] == [bytes] * 3 and b"".join(items) == blob


def test_a_composed_deployment_relays_bytes_as_bytes() -> None:
    h = serve.run(Outer.bind(Inner.bind()), name="relay", route_prefix=None)
    blob = os.urandom(2 * MB)
    kind, back = h.relay.remote(blob).result(timeout_s=30)
    assert kind == "bytes" and type(back) is bytes and back == blob


def test_a_bytes_argument_is_read_straight_into_the_bytes_the_method_gets() -> None:
    """Beyond the replica's kept memory a bytes argument needs fresh memory: it is the bytes
    object itself that is filled (before: the pickle's frame buffer, then the bytes object
    unpickled from it)."""
    size = 40 * MB
    pages = size // 4096
    h = serve.run(Inner.bind(), name="straight-bytes", route_prefix=None)
    replica = h.pid.remote().result(timeout_s=30)
    blob = os.urandom(size)
    h.describe.remote(blob).result(timeout_s=60)
    before = minor_faults(replica)
    for _ in range(3):
        assert h.describe.remote(blob).result(timeout_s=60)["len"] == size
    per_call = (minor_faults(replica) - before) / 3
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        huge = "[never]" not in f.read()
    # one fresh buffer faults once per 4 KiB page, or per 2 MiB where huge pages are allowed
    bound = pages / 4 if huge else 1.5 * pages
    assert per_call < bound, f"{per_call:.0f} page faults a call for an argument of {pages} pages"
