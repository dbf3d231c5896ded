"""Keyword arguments of the public entry points: refuse unknown ones, warn once about the Ray
names we accept but do not honour.

`check("serve.run", kwargs, known=..., ignored=...)` raises `TypeError` naming every unknown
keyword (with the closest known name, as Python's own message would be if it suggested), and
warns once per process for each accepted-but-ignored Ray argument, saying why.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

_warned: set[tuple[str, str]] = set()
_T = TypeVar("_T")


def warn_once(where: str, name: str, why: str, stacklevel: int = 3) -> None:
    """A `UserWarning` that `where` ignores argument `name` (once per process and name)."""
    if (where, name) in _warned:
        return
    _warned.add((where, name))
    warnings.warn(f"{where}(): {name!r} is accepted for Ray compatibility but ignored: {why}", UserWarning,
                  stacklevel=stacklevel)


def check(
    where: str,
    kwargs: Mapping[str, Any],
    known: Iterable[str],
    ignored: Mapping[str, str],
    refused: Mapping[str, str] | None = None,
) -> None:
    """Validate the extra keyword arguments `kwargs` of `where` (e.g. "serve.run").

    `known`: the function's own parameters (for suggestions); `ignored`: Ray arguments accepted
    with a warning, name -> why; `refused`: Ray arguments that no longer exist, name -> what to
    use instead. Anything else raises TypeError.
    """
    names = set(known) | set(ignored)
    bad = []
    for key in kwargs:
        if key in ignored:
            continue
        if refused and key in refused:
            bad.append(f"{key!r} ({refused[key]})")
            continue
        close = difflib.get_close_matches(key, sorted(names), n=1)
        bad.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if bad:
        what = "unexpected keyword arguments" if len(bad) > 1 else "an unexpected keyword argument"
        raise TypeError(f"{where}() got {what} {', '.join(bad)}")
    for key, value in kwargs.items():
        if value is not None:  # None: Ray's default, nothing to ignore
            warn_once(where, key, ignored[key], stacklevel=4)


def json_only(v: _T, what: str = "must be") -> _T:
    """`v` if it is JSON-serializable, else ValueError "<what> JSON-serializable: <why>" (a
    pydantic validator's body for options that travel as JSON)."""
    import json

    try:
        json.dumps(v)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} JSON-serializable: {e}") from None
    return v
