"""The head's seam to the OS: starting and killing processes through the zygote."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("flotilla.head")


class Spawner:
    """Forks replica and proxy processes from the preloaded zygote."""

    def __init__(self, on_exit: Callable[[int, int], None]) -> None:
        self._on_exit = on_exit
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdout: asyncio.StreamReader | None = None
        self._waiting: deque[asyncio.Future[int]] = deque()
        self._ready: asyncio.Future[int] | None = None
        self._lock = asyncio.Lock()
        self.exited: dict[int, int] = {}

    async def start(self, proc: subprocess.Popen[bytes]) -> None:
        """Adopt the zygote process (started by `headboot` before the head's imports)."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._proc = proc
        assert self._proc.stdout is not None and self._proc.stdin is not None
        self._stdout = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(self._stdout)
        await loop.connect_read_pipe(lambda: protocol, self._proc.stdout)
        transport, _ = await loop.connect_write_pipe(asyncio.Protocol, self._proc.stdin)
        self._stdin_transport = transport
        self._reader = loop.create_task(self._read())

    async def _read(self) -> None:
        assert self._stdout is not None
        while True:
            line = await self._stdout.readline()
            if not line:
                break
            msg = json.loads(line)
            if "ready" in msg:
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(msg["ready"])
            elif "pid" in msg:
                fut = self._waiting.popleft()
                if not fut.done():
                    fut.set_result(msg["pid"])
            elif "exit" in msg:
                self.exited[msg["exit"]] = msg["code"]
                self._on_exit(msg["exit"], msg["code"])
        err = RuntimeError("the zygote process exited")
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_exception(err)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(err)

    async def spawn(self, kind: str, log_path: str, args: dict[str, Any]) -> int:
        assert self._ready is not None
        await self._ready
        async with self._lock:
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._waiting.append(fut)
            self._stdin_transport.write((json.dumps({"kind": kind, "log": log_path, "args": args}) + "\n").encode())
        return await fut

    @staticmethod
    def kill(pid: int, sig: int = signal.SIGKILL) -> None:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    async def stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._stdin_transport.close()
        deadline = time.monotonic() + 5
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
