"""Bounded load for acceptance tests: client threads that count every outcome until stopped.

```python
with Load.http(url, "/app") as load:
    load.wait_ok(50)                     # the load is flowing
    serve.run(...)                       # the change under test
assert load.failures == {}, load.report()
```

Each thread calls its request function in a loop until `stop()` (or leaving the `with`
block) or until `max_s` has passed, whichever comes first; every request has its own timeout,
so a stuck server fails a request instead of hanging a thread.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import httpx

#: A per-thread request function: returns the answer (hashable) or raises.
Call = Callable[[], Hashable]


class Failed(Exception):
    """A request that got an answer, but not a successful one (e.g. an HTTP error status)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind, detail)
        self.kind = kind
        self.detail = detail


class Load:
    """`threads` client threads, each running a request function made by `make_call`.

    Outcomes: `ok` (successes), `failures` (count per kind: "HTTP 503", "ActorDiedError", ...),
    `values` (count per answer), `recent(n)` (the last answers, across threads) and
    `samples` (the first few failure details, for assertion messages).
    """

    def __init__(self, make_call: Callable[[], tuple[Call, Callable[[], None]]], threads: int = 8, max_s: float = 60.0) -> None:
        self._make_call = make_call
        self._n = threads
        self.max_s = max_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.ok = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.values: collections.Counter[Hashable] = collections.Counter()
        self.samples: list[str] = []
        self.stuck = 0
        self._recent: collections.deque[Hashable] = collections.deque(maxlen=200)

    @classmethod
    def http(
        cls, base_url: str, path: str = "/", *, threads: int = 8, fresh_connections: bool = False,
        timeout_s: float = 10.0, max_s: float = 60.0,
    ) -> Load:
        """GET `path` in a loop; a 200's body text is the answer, any other status a failure.

        With `fresh_connections`, every request opens its own connection (so connections are
        spread anew across direct-ingress replicas); else each thread keeps one alive.
        """

        def make() -> tuple[Call, Callable[[], None]]:
            headers = {"connection": "close"} if fresh_connections else {}
            client = httpx.Client(base_url=base_url, timeout=timeout_s, headers=headers)

            def call() -> Hashable:
                r = client.get(path)
                if r.status_code != 200:
                    raise Failed(f"HTTP {r.status_code}", r.text[:300])
                return r.text

            return call, client.close

        return cls(make, threads, max_s)

    @classmethod
    def handle(cls, handle: Any, *, threads: int = 2, timeout_s: float = 10.0, max_s: float = 60.0) -> Load:
        """`handle.remote().result()` in a loop; the result is the answer."""

        def make() -> tuple[Call, Callable[[], None]]:
            return (lambda: handle.remote().result(timeout_s=timeout_s)), (lambda: None)

        return cls(make, threads, max_s)

    # --- running -------------------------------------------------------------------------

    def start(self) -> Load:
        deadline = time.monotonic() + self.max_s
        for i in range(self._n):
            t = threading.Thread(target=self._run, args=(deadline,), name=f"load-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, join_s: float = 30.0) -> None:
        """Stop every thread and wait (bounded) for them; a thread still in a request after
        `join_s` is counted in `stuck`."""
        self._stop.set()
        deadline = time.monotonic() + join_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.stuck = sum(t.is_alive() for t in self._threads)

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, deadline: float) -> None:
        try:
            call, close = self._make_call()
        except BaseException as e:
            self._record_failure(type(e).__name__, repr(e))
            return
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    value = call()
                except Failed as e:
                    self._record_failure(e.kind, e.detail)
                except BaseException as e:
                    self._record_failure(type(e).__name__, str(e)[:300])
                else:
                    with self._lock:
                        self.ok += 1
                        self.values[value] += 1
                        self._recent.append(value)
        finally:
            close()

    def _record_failure(self, kind: str, detail: str) -> None:
        with self._lock:
            self.failures[kind] += 1
            if len(self.samples) < 5:
                self.samples.append(f"{kind}: {detail}")

    # --- observing -----------------------------------------------------------------------

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def recent(self, n: int) -> list[Hashable]:
        """The last `n` answers (all threads together), oldest first."""
        with self._lock:
            return list(self._recent)[-n:]

    def wait_ok(self, more: int, timeout: float = 20.0) -> None:
        """Wait until `more` further requests have succeeded."""
        target = self.ok + more
        self._poll(lambda: self.ok >= target, timeout, f"{more} more successful requests")

    def wait_answers(self, accept: Callable[[Hashable], bool], n: int = 30, timeout: float = 20.0) -> None:
        """Wait until the last `n` answers (at least `n` new ones) all satisfy `accept`."""
        target = self.ok + n

        def settled() -> bool:
            last = self.recent(n)
            return self.ok >= target and len(last) == n and all(accept(v) for v in last)

        self._poll(settled, timeout, f"the last {n} answers to settle")

    def _poll(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}: {self.report()}")
            time.sleep(0.02)

    def report(self) -> str:
        with self._lock:
            return (
                f"ok={self.ok} failures={dict(self.failures)} stuck={self.stuck} "
                f"values={dict(self.values.most_common(8))} samples={self.samples}"
            )


@contextlib.contextmanager
def running(*loads: Load) -> Iterator[tuple[Load, ...]]:
    """Start several loads together and stop them all on the way out."""
    for ld in loads:
        ld.start()
    try:
        yield loads
    finally:
        for ld in loads:
            ld.stop()


def combined(*loads: Load) -> str:
    return " | ".join(ld.report() for ld in loads)
