"""The whole-machine memory monitor (as Ray's): over the usage threshold, the replica using the
most memory is killed and replaced, and the status says why.

The threshold is set just above what the machine uses when the test starts, so only the
replica that then allocates 2 GiB crosses it.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator

import pytest

from flotilla import serve
from flotilla._private.procfs import machine_memory
from tests.conftest import env_vars, local_only, running_cluster, wait_for
from tests.integration.test_bounds import deployment_message, metric

pytestmark = [pytest.mark.slow, local_only("Ray's own memory monitor watches its workers")]

GiB = 1 << 30
MARGIN = 1 * GiB  # the threshold sits this far above the usage at start
HOG = 2 * GiB


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    used, total = machine_memory()
    if total - used < 3 * HOG:
        pytest.skip(f"needs {3 * HOG / GiB:.0f} GiB of free memory; {(total - used) / GiB:.1f} GiB free")
    threshold = (used + MARGIN) / total
    env = {"FLOTILLA_MEMORY_USAGE_THRESHOLD": f"{threshold:.6f}", "FLOTILLA_MEMORY_MONITOR_REFRESH_MS": "100"}
    with env_vars(**env), running_cluster(num_cpus=4) as url:
        yield url


@serve.deployment
class Hog:
    def __init__(self) -> None:
        self.hoard: list[bytes] = []

        def grow() -> None:
            time.sleep(0.3)
            for _ in range(HOG // (64 << 20)):
                self.hoard.append(b"\x01" * (64 << 20))
                time.sleep(0.01)

        threading.Thread(target=grow, daemon=True).start()

    def pid(self) -> int:
        return os.getpid()


@serve.deployment
class Small:
    def pid(self) -> int:
        return os.getpid()


def test_machine_over_threshold_kills_the_biggest_replica(url: str) -> None:
    small = serve.run(Small.bind(), name="small", route_prefix=None)
    small_pid = small.pid.remote().result()
    serve.run(Hog.bind(), name="hog", route_prefix=None)
    msg = wait_for(lambda: (m := deployment_message("hog", "Hog")) and "threshold" in m and m, timeout=30,
                   what="a status message naming the memory threshold")
    assert re.search(r"machine.*memory usage threshold", msg), msg
    assert re.search(r"RSS [\d.]+ [GM]iB", msg), msg
    assert metric("flotilla_replica_memory_kills_total", application="hog", reason="machine_threshold") >= 1
    assert small.pid.remote().result() == small_pid, "the small replica was killed instead"
    assert metric("flotilla_replica_memory_kills_total", application="small") == 0
    serve.delete("hog")
    serve.delete("small")
