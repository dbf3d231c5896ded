"""A replica's exception as the caller sees it (`flotilla.exceptions.as_local_error`)."""

from __future__ import annotations

from flotilla.exceptions import RayTaskError, as_local_error


class Custom(ValueError):
    def __init__(self, msg: str, code: int) -> None:
        super().__init__(msg, code)
        self.code = code


def test_a_remote_error_is_its_own_type_and_a_ray_task_error() -> None:
    cause = Custom("bad input", 7)
    e = as_local_error(cause, "Traceback (most recent call last):\n  ...\nCustom: bad input")
    assert isinstance(e, Custom) and isinstance(e, ValueError) and isinstance(e, RayTaskError)
    assert e.cause is cause and e.code == 7 and e.args == ("bad input", 7)  # type: ignore[attr-defined]
    assert "Custom: bad input" in str(e)
    assert e.traceback_str == str(e)  # type: ignore[attr-defined]  # Ray's name for the text


def test_as_instanceof_cause_as_in_ray() -> None:
    e = as_local_error(KeyError("k"), "tb")
    assert isinstance(e, RayTaskError)
    assert e.as_instanceof_cause() is e  # already an instance of the cause's class
    plain = as_local_error(None, "tb", "Unpicklable")
    assert isinstance(plain, RayTaskError) and plain.as_instanceof_cause() is plain
