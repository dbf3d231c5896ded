"""How a worker process (replica or proxy) writes its log lines: a `LoggingConfig` applied.

`configure` sets the level of the root logger (so `ray.serve`, `flotilla` and the user's own
loggers follow it) and the format of its handlers, as Ray Serve writes them:

- TEXT: `LEVEL <time> <component> <id> [<request id>] [<extra attrs>] -- <message>`, e.g.
  `INFO 2026-12-05 18:52:57,200 app_Model xhav1n12 7f26...-- hello` for a replica;
- JSON: one object per line with Ray's keys in Ray's order (the record's own fields, its
  `extra=` fields and `ray_serve_extra_fields`, the request's route and id, the component's
  application, deployment (`<app>_<deployment>`), replica and name, `timestamp_ns`).

flotilla's own loggers (`flotilla.*`) keep flotilla's text format (`<time> LEVEL <component>
[<request id>] <logger>: <message>`) and their JSON lines carry `name`, so the driver's
terminal (`logtail`) can leave them out. The access log (`metrics.AccessLog`) is set up to
match by the caller. `enable_access_log: false` also drops the user's records logged with
`extra={"serve_access_log": True}`, as Ray's does.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flotilla.serve.config import LOGRECORD_STANDARD_ATTRS

__all__ = ["JsonFormatter", "TextFormatter", "configure"]

#: A LogRecord's own attributes and those flotilla sets or reads: any other came from `extra=`
#: (written in JSON lines).
_NOT_EXTRA = LOGRECORD_STANDARD_ATTRS | {"request_id", "route", "log_to_stderr", "serve_access_log",
                                         "ray_serve_extra_fields"}


def _flotillas(record: logging.LogRecord) -> bool:
    name = record.name
    return name == "flotilla" or name.startswith("flotilla.")


class TextFormatter(logging.Formatter):
    """Ray Serve's text line for the user's records, flotilla's for flotilla's own."""

    def __init__(self, component: str, component_id: str, legacy: str, extra_attrs: list[str],
                 request_id: bool = True) -> None:
        super().__init__()
        attrs = "".join(f"%({a})s " for a in extra_attrs)
        head = f"%(levelname)s %(asctime)s {component} {component_id} "
        self.plain = logging.Formatter(f"{head}{attrs}-- %(message)s")
        self.with_rid = logging.Formatter(f"{head}%(request_id)s {attrs}-- %(message)s") if request_id else self.plain
        rid = " [%(request_id)s]" if request_id else ""
        self.ours = logging.Formatter(f"%(asctime)s %(levelname)s {legacy}{rid} %(name)s: %(message)s")
        self.extra_attrs = extra_attrs

    def format(self, record: logging.LogRecord) -> str:
        if _flotillas(record):
            line = self.ours.format(record)
            if self.extra_attrs:
                line += "".join(f" {a}={getattr(record, a, None)}" for a in self.extra_attrs)
            return line
        rid = getattr(record, "request_id", None)
        return (self.with_rid if rid and rid != "-" else self.plain).format(record)


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
            "message": record.getMessage(),
            "filename": record.filename,
            "lineno": record.lineno,
            "process": record.process,
        }
        if _flotillas(record):
            out["name"] = record.name
        for attr in self.extra_attrs:
            out.setdefault(attr, getattr(record, attr, None))
        fields = record.__dict__
        for k, v in fields.items():
            if k not in _NOT_EXTRA:
                out.setdefault(k, v)
        more = fields.get("ray_serve_extra_fields")
        if isinstance(more, dict):
            for k, v in more.items():
                out.setdefault(str(k), v)
        request_id = fields.get("request_id")
        if request_id and request_id != "-":
            route = fields.get("route")
            if route:  # an HTTP request's route, as Ray Serve's JSON lines carry it
                out["route"] = route
            out["request_id"] = request_id
        out.update(self.context)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc_text"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        out["timestamp_ns"] = int(record.created * 1e9)
        return json.dumps(out, default=str)


def _not_access(record: logging.LogRecord) -> bool:
    return not getattr(record, "serve_access_log", False)


def configure(config: dict[str, Any] | None, component: str, component_id: str, legacy: str,
              context: dict[str, Any], request_id: bool = True) -> None:
    """Apply `config` (a `LoggingConfig` as a dict; None: TEXT at INFO) to the root logger.
    `component` and `component_id` begin Ray's text lines (`app_Model` and the replica id);
    `legacy` names the process in flotilla's own lines (`replica <id>`); `context` is added
    to JSON lines."""
    config = config or {}
    root = logging.getLogger()
    root.setLevel(config.get("log_level") or "INFO")
    logging.getLogger("ray.serve").setLevel(root.level)  # as in Ray's replicas: the serve logger has the level
    attrs = list(config.get("additional_log_standard_attrs") or ())
    fmt: logging.Formatter
    if config.get("encoding") == "JSON":
        fmt = JsonFormatter(context, attrs)
    else:
        fmt = TextFormatter(component, component_id, legacy, attrs, request_id)
    for handler in root.handlers:
        handler.setFormatter(fmt)
        handler.removeFilter(_not_access)
        if not config.get("enable_access_log", True):
            handler.addFilter(_not_access)
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
