"""`map_nested`: how bound applications are found in, and swapped out of, constructor
arguments: containers, and objects of any other class, copied only where something changed."""

from __future__ import annotations

import collections

from flotilla.serve.deployments import map_nested


class Box:
    def __init__(self, inner):
        self.inner = inner


def swap(v):
    return "handle" if v == "app" else v


def test_containers_and_objects_are_rebuilt_only_where_something_changed():
    ordered = collections.OrderedDict(a=1)
    value = [1, (2, {"k": "app"}), ordered, Box(Box("app"))]
    out = map_nested(value, swap)
    assert out[1] == (2, {"k": "handle"}) and out[2] is ordered  # unchanged: the same object
    assert out[3].inner.inner == "handle" and value[3].inner.inner == "app"  # a copy; the caller's is kept
    assert map_nested(value[2], swap) is ordered


def test_an_object_holding_nothing_to_swap_is_returned_as_is():
    box = Box([1, 2])
    assert map_nested(box, swap) is box


def test_cycles_end():
    box = Box(None)
    box.inner = box
    assert map_nested(box, swap) is box


def test_functions_classes_and_modules_are_not_entered():
    import json

    def fn():
        return "app"

    fn.attr = "app"
    for v in (fn, Box, json):
        assert map_nested(v, swap) is v
