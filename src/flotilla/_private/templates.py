"""The controller's `fork_after_init` templates: one per deployment version that asks for it.

A template (template.py) is opened when the first replica of its version starts, and stays
while that version is its deployment's current one and the option is on, even at zero
replicas, so that scaling from zero waits for a fork, not a load. It holds no resources and
takes no traffic. It is closed when its version is retired (a rollout finished, the
deployment deleted or the option turned off). A template that cannot be used (a replica needs
GPUs, the constructor failed or left it unsafe to fork, or the backend is Ray) turns the
option off for that version: one warning in the head's log and a `fork-fallback` finding in
the status, and replicas construct their own objects as usual. A template that dies is
opened again at the next start.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
from collections.abc import Iterable
from typing import Any

from flotilla._private.doctor import Finding
from flotilla._private.supervisor import Supervisor, Template, TemplateUnusable

logger = logging.getLogger("flotilla.templates")

#: (application, deployment, version)
Key = tuple[str, str, str]

FALLBACK_FIX = ("start threads and open sockets in __post_fork__() instead of __init__(); load GPU models "
                "without fork_after_init (each replica loads its own copy)")


def wants_gpu(demand: dict[str, float]) -> bool:
    return demand.get("GPU", 0.0) > 0


class Templates:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self._open: dict[Key, asyncio.Task[Template | None]] = {}
        self.findings: dict[Key, Finding] = {}

    def log_path(self, logs_dir: str, key: Key) -> str:
        return os.path.join(logs_dir, f"template_{key[0]}_{key[1]}_{key[2]}.log")

    async def get(self, key: Key, log_path: str, args: dict[str, Any], spec: dict[str, Any]) -> Template | None:
        """The ready template of `key`, opened now if needed; None: start the replica as usual."""
        task = self._open.get(key)
        if task is not None and task.done() and not task.cancelled() and task.exception() is None:
            t = task.result()
            if t is not None and not t.usable:
                logger.warning("the fork_after_init template of %s/%s (pid %s) is gone; starting a new one",
                               key[0], key[1], t.pid)
                task = None
        if task is None:
            task = self._open[key] = asyncio.get_running_loop().create_task(self._start(key, log_path, args, spec))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if task.cancelled() and (me is None or not me.cancelling()):
                return None  # retired while it was starting: the caller decides what to do
            raise

    async def _start(self, key: Key, log_path: str, args: dict[str, Any], spec: dict[str, Any]) -> Template | None:
        if wants_gpu(spec["demand"]):
            self._fallback(key, "its replicas ask for GPUs, and a CUDA context does not survive a fork")
            return None
        try:
            t = await self.supervisor.start_template(log_path, {**args, "version": key[2]}, {
                "config": spec["config"],
                "def_bytes": base64.b64encode(spec["def_bytes"]).decode(),
                "args_bytes": base64.b64encode(spec["args_bytes"]).decode(),
            })
        except TemplateUnusable as e:
            self._fallback(key, str(e))
            return None
        except Exception as e:
            self._fallback(key, f"the template could not start: {e}")
            return None
        try:
            await t.ready()
        except TemplateUnusable as e:
            await t.close()
            self._fallback(key, f"{e} (see {log_path})")
            return None
        except BaseException:
            await t.close()
            raise
        logger.info("fork_after_init template of %s/%s ready (pid %s)", key[0], key[1], t.pid)
        return t

    def _fallback(self, key: Key, why: str) -> None:
        first = why.splitlines()[0] if why else why
        logger.warning("deployment %s/%s: fork_after_init is off for this version: %s; each replica runs "
                       "the constructor itself", key[0], key[1], first)
        self.findings[key] = Finding(
            "fork-fallback", "warning", key[1],
            f"fork_after_init is off for this version: {first}; each replica runs the constructor itself.",
            FALLBACK_FIX,
        )

    def opened(self, key: Key) -> bool:
        """A template of `key` was asked for and is not gone: starting, ready, or fallen back."""
        task = self._open.get(key)
        if task is None:
            return False
        if not task.done() or task.cancelled() or task.exception() is not None:
            return True
        t = task.result()
        return t is None or t.usable

    def finding(self, app: str, deployment: str, version: str) -> Finding | None:
        return self.findings.get((app, deployment, version))

    def pid(self, app: str, deployment: str, version: str) -> int | None:
        """The pid of the ready template of that version, if there is one."""
        task = self._open.get((app, deployment, version))
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return None
        t = task.result()
        return t.pid if t is not None and t.usable else None

    def pids(self) -> dict[Key, int]:
        """The pid of every ready template."""
        return {key: pid for key in self._open if (pid := self.pid(*key)) is not None}

    def retire(self, keep: Iterable[Key]) -> None:
        """Close every template (and forget every fallback) whose key is not in `keep`."""
        keep = set(keep)
        for key in [k for k in self._open if k not in keep]:
            task = self._open.pop(key)
            task.add_done_callback(_close_result)
            task.cancel()
        for key in [k for k in self.findings if k not in keep]:
            del self.findings[key]

    async def close(self) -> None:
        tasks = list(self._open.values())
        self._open.clear()
        for task in tasks:
            task.add_done_callback(_close_result)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _close_result(task: asyncio.Task[Template | None]) -> None:
    """Close the template a finished task opened (a cancelled one closed its own)."""
    if task.cancelled() or task.exception() is not None:
        return
    t = task.result()
    if t is not None:
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().create_task(t.close())
