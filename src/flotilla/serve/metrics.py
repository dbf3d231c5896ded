"""Custom metrics from inside deployments, with Ray Serve's API (`ray.serve.metrics`).

    from flotilla.serve.metrics import Counter, Histogram

    requests = Counter("my_model_requests_total", "Total requests", tag_keys=("model",))
    latency = Histogram("my_model_latency_seconds", "Request latency")

    requests.inc(tags={"model": "a"})
    with latency.time():
        ...

Inside a replica every metric also gets `deployment`, `replica` and `application` labels,
so the same metric from many replicas is told apart, never overwritten; a `route` tag key
left out of a call made while serving a request gets that request's route, as in Ray Serve. The head exposes
all of them at its Prometheus endpoint (see `flotilla.metrics_url()`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from flotilla._private import context
from flotilla._private.metrics import STORE

__all__ = ["Counter", "Gauge", "Histogram"]

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_TAG = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_AUTO_TAGS = ("deployment", "replica", "application")
DEFAULT_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class _Metric:
    _kind = ""

    def __init__(self, name: str, description: str = "", tag_keys: Sequence[str] | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("a metric needs a non-empty name")
        if not _NAME.match(name):
            raise ValueError(f"metric name {name!r} is not valid: use letters, digits, '_' and ':', not starting with a digit")
        if tag_keys is None:
            tag_keys = ()
        if isinstance(tag_keys, str) or not all(isinstance(k, str) for k in tag_keys):
            raise TypeError(f"tag_keys must be a tuple of strings, got {tag_keys!r}")
        for k in tag_keys:
            if not _TAG.match(k):
                raise ValueError(f"tag key {k!r} of metric {name!r} is not valid")
            if k in _AUTO_TAGS:
                raise ValueError(f"tag key {k!r} is added automatically inside replicas; pick another name")
        self._name = name
        self._description = description
        self._tag_keys = tuple(tag_keys)
        self._default_tags: dict[str, str] = {}
        self._declared_as: tuple[str, ...] | None = None

    @property
    def info(self) -> dict[str, Any]:
        return {"name": self._name, "description": self._description, "tag_keys": self._tag_keys,
                "default_tags": dict(self._default_tags)}

    def set_default_tags(self, default_tags: dict[str, str]) -> None:
        """Tags used when a call does not give them."""
        for k, v in default_tags.items():
            if k not in self._tag_keys:
                raise ValueError(f"unknown tag key {k!r} for metric {self._name!r}; its tag_keys are {self._tag_keys}")
            if not isinstance(v, str):
                raise TypeError(f"tag values must be strings, got {v!r} for {k!r}")
        self._default_tags = dict(default_tags)

    def _labels(self, tags: dict[str, str] | None) -> tuple[str, ...]:
        merged = dict(self._default_tags)
        if tags:
            for k, v in tags.items():
                if k not in self._tag_keys:
                    raise ValueError(f"unknown tag key {k!r} for metric {self._name!r}; its tag_keys are {self._tag_keys}")
                if not isinstance(v, str):
                    raise TypeError(f"tag values must be strings, got {v!r} for {k!r}")
            merged.update(tags)
        if "route" in self._tag_keys and "route" not in merged:  # as Ray Serve: the request's route
            meta = context.request_meta.get()
            if meta is not None:
                merged["route"] = meta.get("route", "")
        missing = [k for k in self._tag_keys if k not in merged]
        if missing:
            raise ValueError(f"missing value for tag key(s) {missing} of metric {self._name!r}")
        values = tuple(merged[k] for k in self._tag_keys)
        mine = context.replica_labels()
        if mine is not None:
            values += mine
        names = self._tag_keys + (_AUTO_TAGS if mine is not None else ())
        if self._declared_as != names:
            STORE.declare(self._kind, self._name, self._description, names, getattr(self, "_boundaries", ()))
            self._declared_as = names
        return values

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_declared_as"] = None  # declare again in the process that unpickles it
        return state


class Counter(_Metric):
    """A value that only goes up."""

    _kind = "counter"

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        if not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"Counter.inc() needs a value > 0, got {value!r}")
        STORE.inc(self._name, self._labels(tags), float(value))


class Gauge(_Metric):
    """A value that is set."""

    _kind = "gauge"

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        if not isinstance(value, (int, float)):
            raise TypeError(f"Gauge.set() needs a number, got {value!r}")
        STORE.set(self._name, self._labels(tags), float(value))


class Histogram(_Metric):
    """Observed values counted in buckets (`boundaries`; seconds-style defaults if omitted)."""

    _kind = "histogram"

    def __init__(
        self,
        name: str,
        description: str = "",
        boundaries: Sequence[float] | None = None,
        tag_keys: Sequence[str] | None = None,
    ) -> None:
        super().__init__(name, description, tag_keys)
        if boundaries is None:
            boundaries = DEFAULT_SECONDS_BUCKETS
        if not boundaries or any(not isinstance(b, (int, float)) or b <= 0 for b in boundaries):
            raise ValueError(f"boundaries must be positive numbers, got {boundaries!r}")
        if list(boundaries) != sorted(set(boundaries)):
            raise ValueError(f"boundaries must be strictly increasing, got {boundaries!r}")
        self._boundaries = tuple(float(b) for b in boundaries)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        if not isinstance(value, (int, float)):
            raise TypeError(f"Histogram.observe() needs a number, got {value!r}")
        STORE.observe(self._name, self._labels(tags), float(value))

    @contextmanager
    def time(self, tags: dict[str, str] | None = None) -> Iterator[None]:
        """Observe the seconds the block took (as prometheus_client's `Histogram.time()`)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.observe(time.perf_counter() - t0, tags)
