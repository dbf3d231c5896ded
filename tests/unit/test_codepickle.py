"""codepickle: code shipped by value keeps its file name (tracebacks name the user's file)."""

from __future__ import annotations

import pickle
import traceback

from flotilla._private import codepickle


def test_code_shipped_by_value_keeps_its_file_name_and_line():
    def local(x: int) -> int:
        raise ValueError(f"bad {x}")

    copy = pickle.loads(codepickle.dumps(local))  # a local function travels by value
    assert copy.__code__.co_filename == __file__
    try:
        copy(3)
    except ValueError as e:
        text = "".join(traceback.format_exception(e))
    assert f'File "{__file__}", line' in text and 'raise ValueError(f"bad {x}")' in text


def test_the_same_code_pickles_to_the_same_bytes():
    def f() -> int:
        return 1

    assert codepickle.dumps(f) == codepickle.dumps(f)


def test_locks_travel_as_new_unlocked_locks():
    """FastAPI 0.165 keeps a lock in each route of an included router: an app with
    `include_router` failed to deploy ("cannot pickle '_thread.lock' object")."""
    import threading

    held = threading.Lock()
    held.acquire()
    state = {"lock": held, "rlock": threading.RLock(), "n": 1}
    copy = pickle.loads(codepickle.dumps(state))
    assert copy["n"] == 1 and copy["lock"].acquire(blocking=False) and copy["rlock"].acquire(blocking=False)

