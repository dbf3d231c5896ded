"""Detached clusters: where a running cluster is found, by namespace.

`flotilla start` starts a session whose keeper does not watch the starting shell, and records
it in `<tmp>/flotilla-clusters-<uid>/<namespace>.json` (mode 0600 in a 0700 folder): the
session folder, the head's control socket, the keeper's pid and start time, the URLs and the
REST API's token. Drivers (`flotilla.init(address="auto")`) and the CLI find the cluster there;
a record whose keeper is gone is stale and removed when read. The keeper removes its record
when the session ends.

Addresses: "auto" (the namespace's record), a REST URL ("http://127.0.0.1:8265", asked
for the session folder; same machine only, since the control socket is a Unix socket), or a
session folder path.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import urllib.error
import urllib.request
from typing import Any

from flotilla._private.procfs import start_ticks

DEFAULT_NAMESPACE = "default"
NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
DEFAULT_DASHBOARD_PORT = 8265
#: Environment variables: the address drivers and the CLI use, and their namespace.
ADDRESS_ENV = "FLOTILLA_ADDRESS"
NAMESPACE_ENV = "FLOTILLA_NAMESPACE"
#: The REST API's bearer token, for a head bound beyond 127.0.0.1.
TOKEN_ENV = "FLOTILLA_TOKEN"


class NoClusterError(ConnectionError):
    """No running cluster at the address asked for."""


def check_namespace(namespace: str | None) -> str:
    ns = namespace or os.environ.get(NAMESPACE_ENV) or DEFAULT_NAMESPACE
    if not NAMESPACE_RE.fullmatch(ns):  # not .match: "$" also matches before a final newline
        raise ValueError(
            f"namespace {ns!r} is not valid: use letters, digits, '_', '.' or '-' (at most 63, "
            "starting with a letter or digit)"
        )
    return ns


def registry_dir(tmp: str | None = None) -> str:
    path = os.path.join(tmp or tempfile.gettempdir(), f"flotilla-clusters-{os.getuid()}")
    os.makedirs(path, 0o700, exist_ok=True)
    return path


def record_path(namespace: str, tmp: str | None = None) -> str:
    return os.path.join(registry_dir(tmp), f"{namespace}.json")


def write_record(info: dict[str, Any]) -> str:
    path = record_path(info["namespace"])
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)
    return path


def alive(info: dict[str, Any]) -> bool:
    """Whether the record's keeper (the session) still runs."""
    pid, ticks = info.get("keeper_pid") or 0, info.get("keeper_ticks")
    return bool(pid) and start_ticks(int(pid)) == ticks and os.path.exists(info.get("sock", ""))


def find(namespace: str) -> dict[str, Any] | None:
    """The running cluster of `namespace`, or None (a stale record is removed)."""
    path = record_path(namespace)
    try:
        with open(path) as f:
            info: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        return None
    if not alive(info):
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None
    return info


def running() -> list[dict[str, Any]]:
    """Every running cluster of this user, by namespace."""
    out = []
    for name in sorted(os.listdir(registry_dir())):
        if name.endswith(".json"):
            info = find(name[: -len(".json")])
            if info is not None:
                out.append(info)
    return out


def not_running(namespace: str) -> str:
    others = [c["namespace"] for c in running() if c["namespace"] != namespace]
    hint = f" (running: namespace {', '.join(map(repr, others))}; pass --namespace)" if others else ""
    flag = "" if namespace == DEFAULT_NAMESPACE else f" --namespace {namespace}"
    return f"no flotilla cluster is running in namespace {namespace!r}{hint}; start one with `flotilla start{flag}`"


def is_local_address(address: str | None) -> bool:
    """Whether `address` names a flotilla cluster (a REST URL or a session folder), not a Ray one."""
    return address is not None and (address.startswith(("http://", "https://")) or os.path.isdir(str(address)))


def rest_get(url: str, path: str, token: str | None = None, timeout: float = 10.0) -> Any:
    req = urllib.request.Request(url.rstrip("/") + path)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def resolve(address: str | None, namespace: str | None) -> dict[str, Any]:
    """The record of the cluster at `address` ("auto", a REST URL or a session folder).

    Raises NoClusterError saying how to start one."""
    ns = check_namespace(namespace)
    addr = address or os.environ.get(ADDRESS_ENV) or "auto"
    if addr == "auto":
        info = find(ns)
        if info is None:
            raise NoClusterError(not_running(ns))
        return info
    if addr.startswith(("http://", "https://")):
        try:
            info = rest_get(addr, "/api/flotilla/cluster", os.environ.get(TOKEN_ENV))
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise NoClusterError(f"no flotilla cluster answers at {addr} ({getattr(e, 'reason', e)}); "
                                 "start one with `flotilla start`") from None
        if namespace is not None and info.get("namespace") != ns:
            raise NoClusterError(f"the cluster at {addr} is namespace {info.get('namespace')!r}, not {ns!r}")
        if not alive(info):
            raise NoClusterError(
                f"the cluster at {addr} runs on another machine or as another user (its control "
                f"socket {info.get('sock')} is not reachable here); drivers attach on the cluster's machine")
        return info
    if os.path.isdir(addr):
        try:
            with open(os.path.join(addr, "cluster.json")) as f:
                info = json.load(f)
        except (OSError, ValueError):
            raise NoClusterError(f"{addr} is not the session folder of a running flotilla cluster") from None
        if not alive(info):
            raise NoClusterError(f"the cluster of session folder {addr} is no longer running")
        return info
    raise NoClusterError(
        f"address {addr!r} is not understood: use 'auto', a REST URL such as "
        f"http://127.0.0.1:{DEFAULT_DASHBOARD_PORT}, or a session folder")
