"""A builder: the short-lived driver that deploys one application of a config file.

`python -m flotilla._private.builder '{"app": {...}, "logging_config": ...}'`, started by the
head's `Deployer` in the application's working directory, with its `runtime_env.env_vars` and
`FLOTILLA_ADDRESS` naming the session. It attaches to the head, imports `import_path` (calling
an application builder with `args`), applies the file's deployment options over the code's,
and sends the application to the head without waiting for it to run. Its last stdout line is
`{"ok": true}` or `{"error": "..."}`; user code's own output goes to the build log.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import traceback
from typing import Any


def code_version(app_cfg: dict[str, Any], root: str | None = None) -> str:
    """What the application's code is: its import path, args and runtime_env, and the content
    of every module imported from its working directory. The same inputs give the same version
    in any process (pickles by value do not: they carry per-process ids), so deploying an
    unchanged application again changes nothing, and editing one of its files rolls it out."""
    from flotilla.serve.api import file_digest

    root = os.path.realpath(root or os.getcwd()) + os.sep
    h = hashlib.sha256(json.dumps([app_cfg.get("import_path"), app_cfg.get("args") or {},
                                   app_cfg.get("runtime_env") or {}], sort_keys=True, default=str).encode())
    files = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and os.path.realpath(path).startswith(root) and os.sep + "site-packages" + os.sep not in path:
            files.add(os.path.realpath(path))
    for path in sorted(files):
        h.update(path.encode() + b"\0" + file_digest(path))
    return h.hexdigest()[:16]


def build(payload: dict[str, Any]) -> list[str]:
    """Import, override and deploy one application; returns the config doctor's findings."""
    import flotilla
    from flotilla._private.appbuild import apply_overrides, import_application
    from flotilla._private.client import Runtime
    from flotilla.serve.api import _logging_config, app_spec, doctor_warnings
    from flotilla.serve.deploy_schema import DeploymentSchema

    app_cfg = payload["app"]
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    app = import_application(app_cfg["import_path"], app_cfg.get("args") or {})
    deployments = [DeploymentSchema.model_validate(d) for d in app_cfg.get("deployments") or []]
    app = apply_overrides(app, deployments)
    logging_config = _logging_config(app_cfg.get("logging_config") or payload.get("logging_config"))
    env = dict((app_cfg.get("runtime_env") or {}).get("env_vars") or {})
    spec = app_spec(app, app_cfg["name"], app_cfg.get("route_prefix", "/"), logging_config, env,
                    code_version(app_cfg))
    spec["external_scaler_enabled"] = bool(app_cfg.get("external_scaler_enabled", False))
    spec["declarative"] = True  # its replica counts follow the config's target_capacity
    if app_cfg.get("autoscaling_policy"):
        spec["autoscaling_policy"] = app_cfg["autoscaling_policy"]
    flotilla.init(address=os.environ.get("FLOTILLA_ADDRESS"))
    try:
        found = doctor_warnings(Runtime.current(), app, spec, env)
        Runtime.current().call_head("deploy_app", spec, timeout=60)
    finally:
        flotilla.shutdown()
    return [f.line() for f in found]


def main() -> None:
    from flotilla._private.proctitle import set_title

    set_title("flotilla::builder")
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what user code prints goes to the build log, not the result line
    payload = json.loads(sys.argv[1])
    try:
        findings = build(payload)
    except BaseException:
        tb = traceback.format_exc()
        sys.stderr.write(tb)
        # as Ray's status says it, the traceback included (a syntax error's line, say)
        msg = f"Deploying app '{payload['app']['name']}' failed with exception:\n{tb.rstrip()}"
        out.write(json.dumps({"error": msg}) + "\n")
        out.flush()
        sys.exit(1)
    out.write(json.dumps({"ok": True, "findings": findings}) + "\n")
    out.flush()


if __name__ == "__main__":
    main()
