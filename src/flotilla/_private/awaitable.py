"""Values that are also already-finished awaitables: `await request.json()` and the
synchronous `request.json()` the seed articles write both work on one result.

Used by the replica's HTTP request (`replica.ServeRequest`) and by Ray 1.x handle requests
(`serve.legacy.HandleRequest`). Pickled, each is its plain value (a dict, list or bytes)."""

from __future__ import annotations

from typing import Any


class _Awaitable:
    __slots__ = ()

    def __await__(self):  # type: ignore[no-untyped-def]
        yield from ()
        return self


class Ready:
    """Any value, awaitable (`await Ready(v)` is `v`)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self):  # type: ignore[no-untyped-def]
        yield from ()
        return self.value


class AwaitableDict(_Awaitable, dict):  # type: ignore[type-arg]
    __slots__ = ()

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (dict, (dict(self),))


class AwaitableList(_Awaitable, list):  # type: ignore[type-arg]
    __slots__ = ()

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (list, (list(self),))


class AwaitableBytes(_Awaitable, bytes):
    __slots__ = ()

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (bytes, (bytes(self),))


def json_value(value: Any) -> Any:
    """A parsed JSON value as `request.json()` returns it: itself for a dict or list (also
    awaitable), else something that awaits to it."""
    if isinstance(value, dict):
        return AwaitableDict(value)
    if isinstance(value, list):
        return AwaitableList(value)
    return Ready(value)
