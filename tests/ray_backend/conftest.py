"""The Ray backend's tests: replicas as Ray actors, on a private local Ray instance and on a
multi-node `ray.cluster_utils.Cluster` on this machine.

Each module skips itself (with the reason) when Ray is not installed; `scripts/test` runs this
folder in a second virtual environment that has `flotilla[ray]` (`.venv-ray`).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any

import pytest

NO_RAY = 'the Ray backend tests need Ray: pip install "flotilla[ray]" (scripts/test runs them in .venv-ray)'


@pytest.fixture(autouse=True)
def _no_ray_backend_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests pick the backend themselves."""
    monkeypatch.delenv("FLOTILLA_BACKEND", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def send_unauthenticated_pickle(addr: str, marker: str, timeout: float = 10.0) -> bytes:
    """Connect to a data-plane address ("tcp://host:port") without the handshake, send a frame
    whose pickle would create `marker` when loaded, and return what the server sent back before
    it closed the connection."""

    class Payload:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    import pickle

    body = pickle.dumps(Payload())
    host, _, port = addr[len("tcp://"):].rpartition(":")
    got = b""
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as s:
        s.sendall(struct.pack("<QI", len(body), 1) + body)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        else:
            raise AssertionError(f"{addr} kept the unauthenticated connection open for {timeout}s")
    return got
