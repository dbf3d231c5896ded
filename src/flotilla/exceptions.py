"""Errors raised by the flotilla runtime, named as in `ray.exceptions`.

```
RayError
 ├── RayTaskError          user code raised; also a subclass of the user's exception type
 ├── RayActorError         a replica process died
 │    └── ActorDiedError
 ├── GetTimeoutError       also a TimeoutError: `.result(timeout_s=...)` ran out
 ├── TaskCancelledError    the request was cancelled
 └── RaySystemError        the runtime could not carry a request or its reply (e.g. a reply
                           that cannot be unpickled in the caller)
```
"""

from __future__ import annotations

from typing import Any


class RayError(Exception):
    """Base of the runtime's errors."""


class RayActorError(RayError):
    """The process serving the call died before it answered."""


class ActorDiedError(RayActorError):
    """A replica process exited or was killed while requests were in flight on it."""


class GetTimeoutError(RayError, TimeoutError):
    """Waiting for a result took longer than the given timeout."""


class TaskCancelledError(RayError):
    """The request was cancelled before it finished."""


class RaySystemError(RayError):
    """The runtime failed to carry a request or reply; the message says what and why."""


class RayTaskError(RayError):
    """User code raised an exception in a replica.

    Instances are built by `as_local_error`: a subclass of both this class and the user's
    exception type, so `except ValueError` still catches a remote `ValueError`. `str()` gives
    the remote traceback; `.cause` holds the original exception object.
    """

    cause: BaseException | None = None
    remote_traceback: str = ""

    def __str__(self) -> str:
        return self.remote_traceback

    @property
    def traceback_str(self) -> str:
        """The replica's traceback (Ray's name for it)."""
        return self.remote_traceback

    def as_instanceof_cause(self) -> BaseException:
        """Ray's conversion to an instance of the cause's class: this error already is one
        (or, when the cause could not be rebuilt here, stays a plain RayTaskError)."""
        return self


_subclass_cache: dict[type, type] = {}


def as_local_error(exc: BaseException | None, tb: str, type_name: str = "") -> BaseException:
    """Turn an exception shipped from a replica into one raised locally.

    The result is an instance of the remote exception's own type (via a dynamic subclass
    that also derives from `RayTaskError`) whose message is the remote traceback.
    """
    if exc is None:
        plain = RayTaskError(tb)
        plain.remote_traceback = tb or type_name
        return plain
    cls = type(exc)
    if isinstance(exc, RayError) and not isinstance(exc, RayTaskError):
        return exc  # runtime errors (e.g. BackPressureError from a nested call) pass as they are
    if issubclass(cls, RayTaskError):
        return exc
    sub = _subclass_cache.get(cls)
    if sub is None:
        try:
            sub = type(cls.__name__, (RayTaskError, cls), {"__module__": cls.__module__})
        except TypeError:  # final classes, incompatible layouts
            sub = RayTaskError
        _subclass_cache[cls] = sub
    try:
        err: Any = sub.__new__(sub)  # type: ignore[call-overload]
        err.__dict__.update(getattr(exc, "__dict__", {}))
        err.args = exc.args
    except Exception:
        err = RayTaskError()
    err.cause = exc
    err.remote_traceback = tb
    return err
