"""Shipping a user's exception from a replica to its caller, whatever the exception is.

The exception travels pickled inside the `Err` message, and is decoded by the caller on its
own: if the instance cannot be pickled or rebuilt (an `__init__` with other arguments than
`args`, an unpicklable attribute), its class travels instead; if the caller cannot load that
either, the caller still gets the type name, the message and the remote traceback.
"""

from __future__ import annotations

import pickle
import traceback

from flotilla._private.protocol import Err, dumps
from flotilla.exceptions import RaySystemError, as_local_error


def error_reply(e: BaseException, tb: str | None = None) -> Err:
    """The `Err` message for exception `e` raised in this process."""
    if tb is None:
        tb = "".join(traceback.format_exception(e))
    try:
        message = str(e)
    except Exception:
        message = f"<{type(e).__name__}: str() failed>"
    data: bytes | None = None
    cls_data: bytes | None = None
    try:
        data = dumps(e)
        pickle.loads(data)
    except Exception:
        data = None
        try:
            cls_data = dumps((type(e), _picklable_attrs(e)))
        except Exception:
            cls_data = None
    return Err(type(e).__qualname__, message, tb, data, cls_data)


def _picklable_attrs(e: BaseException) -> dict[str, object]:
    out = {}
    for k, v in getattr(e, "__dict__", {}).items():
        try:
            pickle.loads(dumps(v))
        except Exception:
            continue
        out[k] = v
    return out


def _rebuild(cls: type, attrs: dict[str, object], message: str) -> BaseException | None:
    """An instance of `cls` carrying `message` and `attrs`, made without its `__init__`."""
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        return None
    try:
        exc = cls.__new__(cls)
        exc.args = (message,)
        exc.__dict__.update(attrs)
        return exc
    except Exception:
        return None


def local_error(err: Err) -> BaseException:
    """The exception to raise in the caller for a reply `err`."""
    exc: BaseException | None = None
    if err.error is not None:
        try:
            exc = pickle.loads(err.error)
        except Exception:
            exc = None
    if exc is None and err.error_type is not None:
        try:
            cls, attrs = pickle.loads(err.error_type)
            exc = _rebuild(cls, attrs, err.message)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = None
    return as_local_error(exc, err.traceback or f"{err.type_name}: {err.message}", err.type_name)


def undecodable_reply(what: str, e: BaseException) -> RaySystemError:
    """The error for a reply frame this process could not decode."""
    return RaySystemError(
        f"The {what} could not be decoded in the caller: {type(e).__name__}: {e}. "
        "Make the returned value (or raised exception) importable and picklable here, "
        "e.g. by defining its class in a module both processes can import."
    )
