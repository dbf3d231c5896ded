"""Pickling user code by value with its source file names kept.

cloudpickle (3.1+) writes every code object it ships by value with the file name
`<dynamic-code>`, so a replica's traceback of a class defined in `__main__`, a notebook or a
function says `File "<dynamic-code>"` with no source line. `dumps` keeps the real file name:
a traceback names the file and line the code was written in, and shows the line where the
file exists on the replica's machine (as Ray Serve's do). A lock in what is shipped arrives
as a new, unlocked lock.
"""

from __future__ import annotations

import io
import threading
import types
from collections import ChainMap
from typing import Any

import cloudpickle
from cloudpickle import cloudpickle as _cp

_PLACEHOLDER = "<dynamic-code>"


_REDUCE = getattr(_cp, "_code_reduce", None)  # cloudpickle's own, whose file name we replace


def _code_reduce(code: types.CodeType) -> Any:
    assert _REDUCE is not None
    rebuild, args = _REDUCE(code)
    return rebuild, tuple(code.co_filename if a.__class__ is str and a == _PLACEHOLDER else a for a in args)


def _lock_reduce(lock: Any) -> Any:
    return threading.Lock, ()


def _rlock_reduce(lock: Any) -> Any:
    return threading.RLock, ()


#: A lock in what is shipped (FastAPI 0.165's routes keep one per included router) arrives as
#: a new, unlocked lock: it guards state in the process that has it, never across processes.
_TABLE: dict[Any, Any] = {type(threading.Lock()): _lock_reduce, type(threading.RLock()): _rlock_reduce}
if _REDUCE is not None:
    _TABLE[types.CodeType] = _code_reduce


class _Pickler(cloudpickle.Pickler):
    dispatch_table = ChainMap(_TABLE, cloudpickle.Pickler.dispatch_table)


def dumps(obj: Any) -> bytes:
    """`cloudpickle.dumps(obj)`, code shipped by value keeping its file names (as it is, where
    a cloudpickle without `_code_reduce` is installed), locks as new locks."""
    with io.BytesIO() as f:
        _Pickler(f, protocol=5).dump(obj)
        return f.getvalue()
