"""How a worker process (replica or proxy) writes its log lines: a `LoggingConfig` applied.

`configure` sets the level of the root logger (so `ray.serve`, `flotilla` and the user's own
loggers follow it) and the format of its handlers: TEXT (the classic one-line format) or JSON
(one object per line, with the component's context: application, deployment, replica, and the
request id of the request being served). The access log (`metrics.AccessLog`) is set up to
match by the caller.
"""

from __future__ import annotations

import json
import logging
from typing import Any

__all__ = ["JsonFormatter", "TextFormatter", "configure"]


class TextFormatter(logging.Formatter):
    """`<time> <LEVEL> <component> [<request id>] <logger>: <message>` plus `attr=value` pairs."""

    def __init__(self, component: str, extra_attrs: list[str], request_id: bool = True) -> None:
        rid = " [%(request_id)s]" if request_id else ""
        super().__init__(f"%(asctime)s %(levelname)s {component}{rid} %(name)s: %(message)s")
        self.extra_attrs = extra_attrs

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if self.extra_attrs:
            line += "".join(f" {a}={getattr(record, a, None)}" for a in self.extra_attrs)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record: Ray Serve's fields for a component's structured logs."""

    def __init__(self, context: dict[str, Any], extra_attrs: list[str]) -> None:
        super().__init__()
        self.context = context
        self.extra_attrs = extra_attrs

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "asctime": self.formatTime(record),
            "levelname": record.levelname,
            "name": record.name,
            "message": record.getMessage(),
            "filename": record.filename,
            "lineno": record.lineno,
            "process": record.process,
            **self.context,
        }
        request_id = getattr(record, "request_id", None)
        if request_id and request_id != "-":
            out["request_id"] = request_id
            route = getattr(record, "route", None)
            if route:  # an HTTP request's route prefix, as Ray Serve's JSON lines carry it
                out["route"] = route
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc_text"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        for attr in self.extra_attrs:
            out.setdefault(attr, getattr(record, attr, None))
        return json.dumps(out, default=str)


def configure(config: dict[str, Any] | None, component: str, context: dict[str, Any], request_id: bool = True) -> None:
    """Apply `config` (a `LoggingConfig` as a dict; None: TEXT at INFO) to the root logger."""
    config = config or {}
    root = logging.getLogger()
    root.setLevel(config.get("log_level") or "INFO")
    attrs = list(config.get("additional_log_standard_attrs") or ())
    fmt: logging.Formatter
    if config.get("encoding") == "JSON":
        fmt = JsonFormatter(context, attrs)
    else:
        fmt = TextFormatter(component, attrs, request_id)
    for handler in root.handlers:
        handler.setFormatter(fmt)
    _to_root("ray.serve", root)


def _to_root(name: str, root: logging.Logger) -> None:
    """Inside a Ray worker Ray's "ray" logger does not propagate: point `name` (Ray Serve's
    logger, which user code logs to) at the root's handlers and level, as it is elsewhere."""
    logger = logging.getLogger(name)
    node: logging.Logger | None = logger
    while node is not None and node is not root:
        if not node.propagate:
            break
        node = node.parent
    else:
        return
    logger.propagate = False
    logger.setLevel(root.level)
    logger.handlers = list(root.handlers)
