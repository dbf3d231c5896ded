"""Which backend runs the cluster: "local" (this machine, the default) or "ray" (replicas as Ray
actors). Chosen by `flotilla.init(backend=...)`, else `FLOTILLA_BACKEND`; standard library only,
so the local backend never imports Ray."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

BACKENDS = ("local", "ray")
RAY_EXTRA = 'pip install "flotilla[ray]"'
#: `flotilla.init` arguments that the Ray backend hands to `ray.init` (the local backend
#: ignores them, with a warning).
RAY_INIT_OPTIONS = ("runtime_env", "namespace", "object_store_memory", "_system_config", "include_dashboard",
                    "dashboard_host", "dashboard_port",
                    "_temp_dir", "labels", "logging_level", "_node_ip_address")


def select(backend: str | None, address: str | None) -> str:
    """The backend to use: `backend`, else FLOTILLA_BACKEND, else "ray" for an address that
    names a Ray cluster ("ray://...", "host:port"), else "local"."""
    chosen = backend or os.environ.get("FLOTILLA_BACKEND") or ""
    if not chosen:
        ray_address = address is not None and address not in ("local", "auto")
        chosen = "ray" if ray_address else "local"
    chosen = chosen.strip().lower()
    if chosen not in BACKENDS:
        raise ValueError(f"unknown flotilla backend {chosen!r}; use one of {', '.join(BACKENDS)}")
    return chosen


def require_ray() -> None:
    """Raise ImportError naming the extra when Ray is not installed (without importing it)."""
    if importlib.util.find_spec("ray") is None:
        raise ImportError(f'the Ray backend (backend="ray" or FLOTILLA_BACKEND=ray) needs Ray: {RAY_EXTRA}')


def detached(address: str | None) -> bool:
    """Whether the Ray backend runs the controller as a detached Ray actor: when joining an
    existing cluster (an address, or RAY_ADDRESS), unless FLOTILLA_RAY_DETACHED=0. A private
    local Ray instance keeps the keeper and head processes (nothing outlives that Ray)."""
    if os.environ.get("FLOTILLA_RAY_DETACHED", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return address not in (None, "local") or (address is None and bool(os.environ.get("RAY_ADDRESS")))


def ray_options(address: str | None, num_cpus: float | None, num_gpus: float | None,
                resources: dict[str, float] | None, passed: dict[str, Any]) -> dict[str, Any]:
    """What the head gives `ray.init` (JSON: it travels on the head's command line, so nothing
    secret goes in here)."""
    joining = address not in (None, "local") or (address is None and bool(os.environ.get("RAY_ADDRESS")))
    if joining and (num_cpus is not None or num_gpus is not None or resources):
        raise ValueError(
            "num_cpus, num_gpus and resources describe a new local Ray instance; when joining an "
            f"existing Ray cluster (address={address or os.environ.get('RAY_ADDRESS')!r}) they are set "
            "where its nodes start (ray start --num-cpus ...)"
        )
    return {"address": address, "num_cpus": num_cpus, "num_gpus": num_gpus, "resources": resources, **passed}
