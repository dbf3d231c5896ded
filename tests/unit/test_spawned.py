"""The handle calls a request made are kept with it and cancelled with it (context.spawned)."""

from __future__ import annotations

from typing import Any

from flotilla._private import context


class Call:
    def __init__(self, over: bool = False) -> None:
        self.over, self.cancelled = over, False

    def _over(self) -> bool:
        return self.over

    def _cancel_call(self) -> None:
        self.cancelled = True


def test_calls_over_are_forgotten_every_64_and_live_ones_cancelled() -> None:
    meta: dict[str, Any] = {}
    done = [Call(over=True) for _ in range(63)]
    live = Call()
    for c in [live, *done]:
        context.spawned(meta, c)
    assert len(meta[context.SPAWNED]) == 64
    late = Call()
    context.spawned(meta, late)  # the 65th: the 63 over are dropped first
    assert meta[context.SPAWNED] == [live, late]
    late.over = True
    context.cancel_spawned(meta)
    assert live.cancelled and not late.cancelled
    assert context.SPAWNED not in meta


def test_new_request_ids_are_uuid_shaped_unique_and_new_in_a_forked_child() -> None:
    import os
    import uuid

    from flotilla._private.context import new_request_id

    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(str(uuid.UUID(i)) == i for i in ids[:100])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a replica forked from the zygote makes ids of its own
        os.write(w, new_request_id().encode())
        os._exit(0)
    os.close(w)
    child = os.read(r, 100).decode()
    os.waitpid(pid, 0)
    os.close(r)
    assert child[:14] != new_request_id()[:14]  # another random prefix
