"""The `flotilla` command (also `python -m flotilla`), mirroring Ray Serve's `serve` CLI.

- `flotilla start`: a detached cluster (head, proxy, dashboard and REST API) that outlives the shell;
- `flotilla deploy CONFIG.yaml`, `status`, `config`, `shutdown`: talk to it over its REST API;
- `flotilla build module:app -o config.yaml`: write a config file for an application;
- `flotilla run module:app | CONFIG.yaml`: a private cluster in the foreground, until Ctrl-C;
- `flotilla doctor [module:app | CONFIG.yaml]`: check options against the machine (or cluster).

Every command that reaches a cluster takes `--address` (default FLOTILLA_ADDRESS, else "auto":
the running cluster of the namespace) and `--namespace` (FLOTILLA_NAMESPACE, else "default").
Errors print one line and exit non-zero.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import click

from flotilla._private import cluster

START_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 90.0
#: `module:attr` or, as Ray also takes, `package.module.attr`
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*|\.[A-Za-z_]\w*)$")


class _Group(click.Group):
    """Any error ends the command with one readable line and exit code 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as e:
            msg = " ".join(str(e).split()) or type(e).__name__
            raise click.ClickException(msg if _plain(e) else f"{type(e).__name__}: {msg}") from None


def _plain(e: Exception) -> bool:
    return isinstance(e, (ConnectionError, ValueError, RuntimeError, OSError))


def _load(import_path: str, args: dict[str, str] | None = None) -> Any:
    from flotilla._private.appbuild import import_application

    if ":" not in import_path and "." not in import_path:
        raise click.BadParameter("expected MODULE:ATTRIBUTE, e.g. examples.sklearn_app:app", param_hint="IMPORT_PATH")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return import_application(import_path, args)


def _builder_args(arguments: tuple[str, ...], target: str) -> dict[str, str]:
    """`key=value` words (as `serve run` takes them) as the application builder's args;
    refused after a config file, which has each application's `args:`."""
    if arguments and _is_config(target):
        raise click.BadParameter("key=value arguments go with a module:builder target; a config file "
                                 "gives an application's args under `args:`", param_hint="ARGUMENTS")
    out: dict[str, str] = {}
    for word in arguments:
        key, eq, value = word.partition("=")
        if not eq or not value:  # Ray's check and words (an empty key is Ray's too)
            raise click.ClickException(f"Invalid application argument '{word}', must be of the form '<key>=<val>'.")
        out[key] = value
    return out


def _is_config(target: str) -> bool:
    return target.endswith((".yaml", ".yml", ".json")) or os.path.isfile(target)


address_option = click.option(
    "--address", "-a", default=None, envvar=cluster.ADDRESS_ENV, show_envvar=True,
    help='The cluster: "auto" (the running cluster of the namespace; default), or its REST URL, e.g. http://127.0.0.1:8265.')
namespace_option = click.option(
    "--namespace", default=None, envvar=cluster.NAMESPACE_ENV, show_envvar=True,
    help='The cluster\'s namespace (default: "default"); each namespace is its own cluster.')


def _rest(address: str | None, namespace: str | None) -> tuple[str, str | None, dict[str, Any] | None]:
    """(REST URL, token, the local record or None) of the cluster addressed."""
    addr = address or "auto"
    if addr.startswith(("http://", "https://")):
        return addr.rstrip("/"), os.environ.get(cluster.TOKEN_ENV), None
    info = cluster.resolve(addr, namespace)
    url = info.get("dashboard_url")
    if not url:
        raise click.ClickException(f"the cluster of namespace {info['namespace']!r} has no REST API")
    return url, os.environ.get(cluster.TOKEN_ENV) or info.get("token"), info


def _request(url: str, token: str | None, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None, timeout: float = 60.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace").strip()
        raise click.ClickException(text or f"{method} {path}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise click.ClickException(
            f"no flotilla cluster answers at {url} ({getattr(e, 'reason', e)}); start one with `flotilla start`") from None
    return json.loads(raw) if raw else None


@click.group(cls=_Group, context_settings={"help_option_names": ["--help", "-h"]})  # -h as Ray's
@click.version_option(package_name="flotilla")
def main() -> None:
    """flotilla: Ray Serve's API, served fast from one machine."""


# ---- start ---------------------------------------------------------------------------------
def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _pick_port(host: str, port: int | None, default: int, flag: str, notes: list[str]) -> int:
    if port is not None:
        if port and not _port_free(host, port):
            raise click.ClickException(f"port {port} on {host} is in use; pass another {flag}")
        return port
    if _port_free(host, default):
        return default
    chosen = _free_port(host)
    notes.append(f"port {default} is in use (another cluster?): {flag.lstrip('-').replace('-', ' ')} is {chosen}")
    return chosen


@main.command()
@click.option("--http-host", default="127.0.0.1", show_default=True, help="Interface the HTTP proxy binds.")
@click.option("--http-port", type=int, default=None, help="HTTP port (default 8000, or a free port if 8000 is taken).")
@click.option("--proxy-location", type=click.Choice(["EveryNode", "HeadOnly", "Disabled"]), default="EveryNode", show_default=True)
@click.option("--num-proxies", type=click.IntRange(1, 64), default=None,
              help="Proxy processes sharing the HTTP port (default: half the cores, at most 8).")
@namespace_option
@click.option("--num-cpus", type=float, default=None, help="CPUs to offer replicas (default: detected).")
@click.option("--num-gpus", type=float, default=None, help="GPUs to offer replicas (default: detected).")
@click.option("--resources", default=None, help='Custom resources as JSON, e.g. \'{"accelerator": 2}\'.')
@click.option("--dashboard-host", default="127.0.0.1", show_default=True, help="Interface of the REST API.")
@click.option("--dashboard-port", type=int, default=None, help="REST API port (default 8265, or a free port if taken).")
@click.option("--metrics-port", type=int, default=0, help="Prometheus endpoint port (default: a free port).")
@click.option("--grpc-port", type=int, default=None, help="gRPC ingress port (default 9000, with servicer functions).")
@click.option("--grpc-servicer-functions", multiple=True,
              help="Servicer adders for the gRPC ingress, e.g. pkg.mod_pb2_grpc.add_XServicer_to_server (repeatable).")
def start(http_host: str, http_port: int | None, proxy_location: str, num_proxies: int | None, namespace: str | None, num_cpus: float | None,
          num_gpus: float | None, resources: str | None, dashboard_host: str, dashboard_port: int | None,
          metrics_port: int, grpc_port: int | None, grpc_servicer_functions: tuple[str, ...]) -> None:
    """Start a cluster in the background that outlives this shell.

    Drivers attach with flotilla.init(address="auto"); `flotilla deploy` applies config files;
    `flotilla shutdown` stops it.
    """
    import flotilla
    from flotilla._private import session
    from flotilla._private.client import HEAD_START_TIMEOUT_S

    ns = cluster.check_namespace(namespace)
    running = cluster.find(ns)
    if running is not None:
        raise click.ClickException(
            f"a flotilla cluster is already running in namespace {ns!r} (REST API {running.get('dashboard_url')}, "
            f"keeper pid {running.get('keeper_pid')}); stop it with `flotilla shutdown{_ns_flag(ns)}`, or pick "
            "another --namespace")
    total: dict[str, float] = {
        "CPU": float(os.cpu_count() or 1) if num_cpus is None else num_cpus,
        "GPU": float(flotilla._detect_gpus()) if num_gpus is None else num_gpus,
        "memory": flotilla._detect_memory(),
    }
    if resources:
        try:
            extra = json.loads(resources)
            assert isinstance(extra, dict)
            total.update({str(k): float(v) for k, v in extra.items()})
        except (ValueError, AssertionError, TypeError):
            raise click.BadParameter(f"expected a JSON object of name: amount, got {resources!r}",
                                     param_hint="--resources") from None
    for k, v in total.items():
        if v < 0:
            raise click.ClickException(f"resource {k!r} must be >= 0, got {v}")
    notes: list[str] = []
    if proxy_location != "Disabled":
        http_port = _pick_port(http_host, http_port, 8000, "--http-port", notes)
    dashboard_port = _pick_port(dashboard_host, dashboard_port, cluster.DEFAULT_DASHBOARD_PORT, "--dashboard-port", notes)
    token = None
    if dashboard_host not in ("127.0.0.1", "localhost", "::1"):
        token = os.environ.get(cluster.TOKEN_ENV) or secrets.token_urlsafe(24)
    from flotilla._private import frontdoor
    from flotilla.serve.config import HTTPOptions, gRPCOptions, validate

    http = frontdoor.driver_options(validate(
        HTTPOptions, {"host": http_host, "port": http_port or 8000, "location": proxy_location, "num_proxies": num_proxies},
        "http_options").model_dump())  # API keys from FLOTILLA_API_KEYS, as serve.start
    if grpc_servicer_functions:
        grpc = validate(gRPCOptions, {"grpc_servicer_functions": list(grpc_servicer_functions),
                                      **({"port": grpc_port} if grpc_port is not None else {})}, "grpc_options")
        if grpc.enabled:
            if grpc.port and not _port_free(http_host, grpc.port):
                raise click.ClickException(f"port {grpc.port} on {http_host} is in use; pass another --grpc-port")
            http["grpc_options"] = {**grpc.model_dump(), "sys_path": [os.getcwd(), *sys.path]}
    session_dir = session.create()
    cfg = {
        "session_dir": session_dir, "resources": total, "metrics_port": metrics_port, "detached": True,
        "namespace": ns, "http": http, "dashboard": {"host": dashboard_host, "port": dashboard_port},
        "token": token, "record": cluster.record_path(ns),
    }
    env = {k: v for k, v in os.environ.items() if k not in (cluster.ADDRESS_ENV, "FLOTILLA_BACKEND")}
    with open(os.path.join(session_dir, "logs", "head.log"), "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flotilla._private.keeper", json.dumps(cfg)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
            close_fds=True, env=env, cwd=os.getcwd(),
        )
    session.record_head(session_dir, proc.pid)
    assert proc.stdout is not None
    import select

    ready, _, _ = select.select([proc.stdout], [], [], max(START_TIMEOUT_S, HEAD_START_TIMEOUT_S))
    line = proc.stdout.readline() if ready else b""
    proc.stdout.close()
    info = json.loads(line) if line.strip() else {"error": f"the cluster did not start; see {session_dir}/logs/head.log"}
    if "error" in info:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        session.finish(session_dir)
        raise click.ClickException(info["error"])
    proc.returncode = 0  # detached on purpose: no "still running" warning
    rec = cluster.find(ns) or {}
    click.echo(f"Started flotilla cluster {ns!r} (keeper pid {proc.pid}).")
    for note in notes:
        click.echo(f"  note: {note}")
    click.echo(f"  HTTP:       {info.get('http_url') or 'disabled (proxy_location=Disabled)'}")
    if "grpc_options" in http:
        click.echo(f"  gRPC:       {http_host}:{http['grpc_options']['port']}")
    click.echo(f"  dashboard:  {info.get('rest_url')}   (also the REST API)")
    click.echo(f"  metrics:    http://127.0.0.1:{info.get('metrics_port')}/metrics")
    click.echo(f"  logs:       {os.path.join(session_dir, 'logs')}")
    if token and not os.environ.get(cluster.TOKEN_ENV):
        click.echo(f"  token:      {token}   (the REST API is bound beyond 127.0.0.1: send 'Authorization: Bearer <token>';"
                   f" in a browser open {info.get('rest_url')}/?token=<token> once)")
    ns_arg = "" if ns == cluster.DEFAULT_NAMESPACE else f', namespace="{ns}"'
    ns_env = "" if ns == cluster.DEFAULT_NAMESPACE else f" {cluster.NAMESPACE_ENV}={ns}"
    click.echo(f'Attach a driver:  flotilla.init(address="auto"{ns_arg})  (or {cluster.ADDRESS_ENV}=auto{ns_env})')
    click.echo(f"Deploy a config:  flotilla deploy config.yaml{_ns_flag(ns)}")
    click.echo(f"Check it:         flotilla status{_ns_flag(ns)}")
    click.echo(f"Stop it:          flotilla shutdown{_ns_flag(ns)}")
    if not rec:
        click.echo("  warning: the cluster's record was not written; attach with its REST URL", err=True)


def _ns_flag(ns: str) -> str:
    return "" if ns == cluster.DEFAULT_NAMESPACE else f" --namespace {ns}"


# ---- deploy / status / config / shutdown -----------------------------------------------------
@main.command()
@click.argument("config_or_import_path")
@click.argument("arguments", nargs=-1)
@click.option("--runtime-env", "runtime_env_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="runtime_env of an import path's application, from a YAML file (env_vars, working_dir). "
                   "Ignored when deploying a config file.")
@click.option("--runtime-env-json", default=None,
              help="runtime_env of an import path's application, as JSON. Ignored when deploying a config file.")
@click.option("--working-dir", default=None,
              help="Working directory of an import path's application (overrides --runtime-env's). "
                   "Ignored when deploying a config file.")
@click.option("--name", default=None,
              help='Name of an import path\'s application (default "default"). Ignored when deploying a config file.')
@address_option
@namespace_option
def deploy(config_or_import_path: str, arguments: tuple[str, ...], runtime_env_file: str | None,
           runtime_env_json: str | None, working_dir: str | None, name: str | None, address: str | None,
           namespace: str | None) -> None:
    """Apply a config file (Ray Serve's config schema) to the running cluster, or deploy
    MODULE:APP as its one application ("default" or --name, at "/"; ARGUMENTS `key=value` go
    to an application builder), as `serve deploy` does.

    Applications deployed from a config that are not in this one are removed (those a driver
    deployed with serve.run stay); unchanged ones are left alone; a changed user_config is
    applied in place; changed code or resources roll out.
    """
    from flotilla.serve.deploy_schema import load_config_file, validate_config

    args = _builder_args(arguments, config_or_import_path)
    if _is_config(config_or_import_path):
        config = load_config_file(config_or_import_path).to_dict()
    else:
        if config_or_import_path.endswith((".yaml", ".yml", ".json")) or not _IMPORT_PATH.match(config_or_import_path):
            raise click.BadParameter(f"{config_or_import_path}: no such file, and not an import path "
                                     "(MODULE:APP or MODULE.APP)", param_hint="CONFIG_OR_IMPORT_PATH")
        app: dict[str, Any] = {"name": name or "default", "route_prefix": "/", "import_path": config_or_import_path}
        if args:
            app["args"] = args
        runtime_env = _runtime_env_option(runtime_env_json, runtime_env_file, working_dir)
        if runtime_env:
            app["runtime_env"] = runtime_env
        config = validate_config({"applications": [app]}, config_or_import_path).to_dict()
    url, token, _ = _rest(address, namespace)
    headers = {"X-Flotilla-Cwd": os.getcwd()}
    if os.environ.get("PYTHONPATH"):
        headers["X-Flotilla-Pythonpath"] = os.pathsep.join(os.path.abspath(p) for p in os.environ["PYTHONPATH"].split(os.pathsep) if p)
    _request(url, token, "PUT", "/api/serve/applications/", config, headers=headers)
    names = ", ".join(a["name"] for a in config.get("applications", [])) or "(none)"
    ns = _ns_flag(cluster.check_namespace(namespace))
    click.echo("Sent deploy request successfully.")  # Ray's words, then what and where
    click.echo(f" * Application(s) {names}, to {url}.")
    click.echo(f" * Use `flotilla status{ns}` to check applications' statuses.")
    click.echo(f" * Use `flotilla config{ns}` to see the current application config(s).")


@main.command()
@address_option
@namespace_option
@click.option("--name", "-n", default=None, help="Only this application.")
def status(address: str | None, namespace: str | None, name: str | None) -> None:
    """Print the status of the proxies, applications and deployments (YAML, like `serve status`)."""
    import yaml

    url, token, _ = _rest(address, namespace)
    data = _request(url, token, "GET", "/api/flotilla/status/")
    if name is not None:
        apps = data.get("applications") or {}
        if name not in apps:
            raise click.ClickException(f"no application {name!r}; applications: {', '.join(apps) or '(none)'}")
        data = {"applications": {name: apps[name]}}
    click.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


@main.command()
@address_option
@namespace_option
@click.option("--name", "-n", default=None, help="Only this application's config.")
def config(address: str | None, namespace: str | None, name: str | None) -> None:
    """Print the latest applied config (each application's, as YAML documents)."""
    from flotilla._private.cliformat import config_yaml

    url, token, _ = _rest(address, namespace)
    applied = _request(url, token, "GET", "/api/flotilla/config/")
    click.echo(config_yaml(applied, name).rstrip())


@main.command()
@click.argument("request_id")
@address_option
@namespace_option
@click.option("--json", "as_json", is_flag=True, help="Print the trace as JSON.")
def trace(request_id: str, address: str | None, namespace: str | None, as_json: bool) -> None:
    """Print one request's latency breakdown (its x-request-id): stages, nested calls."""
    import urllib.parse

    from flotilla._private.trace import format_trace

    url, token, _ = _rest(address, namespace)
    got = _request(url, token, "GET", "/api/flotilla/trace/?id=" + urllib.parse.quote(request_id, safe=""))
    click.echo(json.dumps(got, indent=2) if as_json else format_trace(got).rstrip())


@main.command()
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@address_option
@namespace_option
def shutdown(yes: bool, address: str | None, namespace: str | None) -> None:
    """Drain every replica and stop the cluster, leaving no process behind. With no cluster
    running it says so and succeeds, as `serve shutdown` does."""
    try:
        url, token, info = _rest(address, namespace)
    except cluster.NoClusterError as e:
        click.echo(f"No flotilla cluster found running: nothing to shut down ({e}).", err=True)
        return
    ns = info["namespace"] if info else cluster.check_namespace(namespace)
    if not yes:
        click.confirm(f"This stops the flotilla cluster {ns!r} at {url} and every application on it. Continue?",
                      abort=True)
    reply = _request(url, token, "POST", "/api/flotilla/shutdown/") or {}
    pid = int(reply.get("keeper_pid") or (info or {}).get("keeper_pid") or 0)
    ticks = (info or {}).get("keeper_ticks")
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
    from flotilla._private.procfs import start_ticks

    while pid and time.monotonic() < deadline:
        now = start_ticks(pid)
        if now is None or (ticks is not None and now != ticks):
            break
        time.sleep(0.05)
    else:
        if pid:
            raise click.ClickException(f"the cluster (keeper pid {pid}) did not stop within {SHUTDOWN_TIMEOUT_S:g}s")
    click.echo(f"Cluster {ns!r} shut down.")


# ---- build -----------------------------------------------------------------------------------
@main.command()
@click.argument("import_paths", nargs=-1, required=True)
@click.option("--output-path", "-o", default=None, type=click.Path(dir_okay=False),
              help="Write the config here (default: print it).")
@click.option("--app-dir", "-d", default=".", show_default=True, help="Directory to import the applications from.")
@address_option
@namespace_option
def build(import_paths: tuple[str, ...], output_path: str | None, app_dir: str, address: str | None,
          namespace: str | None) -> None:
    """Write a config file for the applications at IMPORT_PATHS (module:app), to edit and
    `flotilla deploy`. (--address and --namespace are accepted like everywhere, and unused:
    this reads only the code.)"""
    from flotilla._private.cliformat import build_yaml

    sys.path.insert(0, os.path.abspath(app_dir))
    apps: list[tuple[str, Any, str | None]] = [(path, _load(path), None) for path in import_paths]
    text = build_yaml(apps)
    if output_path:
        with open(output_path, "w") as f:
            f.write(text)
        click.echo(f"Wrote the config of {len(apps)} application(s) to {output_path}.")
    else:
        click.echo(text.rstrip())


# ---- doctor ----------------------------------------------------------------------------------
@main.command()
@click.argument("target", required=False)
@click.option("--latency-budget-ms", type=float, default=None, help="Warn about batch waits longer than this.")
@click.option("--measure", is_flag=True, help="Construct each deployment once (in a child process) and time it.")
@click.option("--measure-timeout", type=float, default=60.0, show_default=True, help="Longest a constructor may run when measured.")
@click.option("--num-cpus", type=float, default=None, help="Check against this many CPUs (default: this machine's).")
@click.option("--num-gpus", type=float, default=None, help="Check against this many GPUs (default: detected).")
@click.option("--strict", is_flag=True, help="Exit with code 1 when there is any warning.")
@address_option
@namespace_option
def doctor(target: str | None, latency_budget_ms: float | None, measure: bool, measure_timeout: float,
           num_cpus: float | None, num_gpus: float | None, strict: bool, address: str | None,
           namespace: str | None) -> None:
    """Check deployment options against the machine and print each finding with its fix.

    TARGET is module:app or a config file, checked against this machine; without it, the
    applications running on the cluster are checked against its resources, with the live
    findings it measured. Exit code 0 unless --strict and a warning was found.
    """
    from flotilla._private import doctor as doc

    if target is not None:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        found = doc.check_target(target, doc.machine_totals(num_cpus, num_gpus), latency_budget_ms=latency_budget_ms,
                                 measure=measure, measure_timeout=measure_timeout)
    else:
        url, token, _ = _rest(address, namespace)
        details = _request(url, token, "GET", "/api/serve/applications/")
        totals = dict((_request(url, token, "GET", "/api/flotilla/dashboard/") or {}).get("resources", {}).get("total") or {})
        if num_cpus is not None:
            totals["CPU"] = num_cpus
        if num_gpus is not None:
            totals["GPU"] = num_gpus
        status_data = _request(url, token, "GET", "/api/flotilla/status/")
        found = doc.check_cluster(details or {}, totals, status_data, latency_budget_ms=latency_budget_ms)
    click.echo(doc.report(found))
    if strict and any(f.severity == doc.WARNING for fs in found.values() for f in fs):
        sys.exit(1)
# ---- tune ------------------------------------------------------------------------------------
@main.command()
@click.argument("import_path")
@click.option("--slo-p95-ms", type=float, required=True, help="Latency objective: p95 in milliseconds.")
@click.option("--body", "body_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="POST this file's bytes as the request body (default: GET).")
@click.option("--route", default=None, help="Path to request (default: the route prefix, /).")
@click.option("--budget-s", type=float, default=120.0, show_default=True, help="Time for the whole search.")
@click.option("--output-path", "-o", default="tuned.yaml", show_default=True, type=click.Path(dir_okay=False),
              help="Write the chosen config here.")
@click.option("--app-dir", "-d", default=".", show_default=True, help="Directory to import the application from.")
def tune(import_path: str, slo_p95_ms: float, body_file: str | None, route: str | None, budget_s: float,
         output_path: str, app_dir: str) -> None:
    """Load-test IMPORT_PATH (module:app) in a private cluster over a small search of
    num_replicas, num_cpus and max_ongoing_requests; print a table, and write the setting with
    the most req/s within the SLO (p95 <= --slo-p95-ms, no errors) as a config file."""
    from flotilla._private.tune import format_table, within_slo
    from flotilla._private.tuner import run_tune, tuned_yaml, write_progress

    if slo_p95_ms <= 0 or budget_s <= 0:
        raise click.BadParameter("--slo-p95-ms and --budget-s must be > 0")
    sys.path.insert(0, os.path.abspath(app_dir))
    body = None
    if body_file:
        with open(body_file, "rb") as f:
            body = f.read()
    report = run_tune(import_path, _load(import_path), slo_p95_ms, body=body, route=route, budget_s=budget_s,
                      progress=write_progress)
    click.echo(format_table(report.trials, slo_p95_ms, report.chosen))
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo(f"{len(report.trials)} setting(s) tried in {report.elapsed_s:.0f}s (budget {budget_s:g}s).")
    if report.chosen is None or report.chosen.result is None:
        raise click.ClickException(f"no setting met the SLO (p95 <= {slo_p95_ms:g} ms, no errors); nothing written")
    c = report.chosen.result
    click.echo(f"Chosen: {report.chosen.setting.label()}: {c.rps:.0f} req/s, p95 {c.p95_ms:.1f} ms.")
    refs = [("the code's options", report.default)]
    if report.plain_defaults is not report.default:
        refs.append(("the plain defaults", report.plain_defaults))
    for what, ref in refs:
        if ref is not None and ref.result is not None and within_slo(ref.result, slo_p95_ms):
            click.echo(f"  {c.rps / max(ref.result.rps, 1e-9):.2f}x {what} ({ref.setting.label()}: "
                       f"{ref.result.rps:.0f} req/s)")
        elif ref is not None:
            click.echo(f"  {what} ({ref.setting.label()}) missed the SLO")
    with open(output_path, "w") as f:
        f.write(tuned_yaml(report, "flotilla tune " + " ".join(sys.argv[2:]), slo_p95_ms))
    click.echo(f"Wrote {output_path}. Deploy it with:  flotilla start && flotilla deploy {output_path}")


# ---- run -------------------------------------------------------------------------------------
@main.command()
@click.argument("target")
@click.argument("arguments", nargs=-1)
@click.option("--host", default=None, envvar="FLOTILLA_HOST", help="Interface the HTTP proxy binds (default 127.0.0.1).")
@click.option("--port", default=None, type=int, envvar="FLOTILLA_PORT", help="HTTP port (default 8000).")
@click.option("--name", default="default", show_default=True, help="Application name (module:app only).")
@click.option("--route-prefix", default="/", show_default=True, help="Route prefix (module:app only).")
@click.option("--num-cpus", type=float, default=None, help="CPUs to offer replicas (default: detected).")
@click.option("--num-gpus", type=float, default=None, help="GPUs to offer replicas (default: detected).")
@click.option("--address", "-a", default=None,
              help='Run on this running cluster ("auto", or its REST URL) instead of a private one.')
@click.option("--app-dir", "-d", default=".", show_default=True,
              help="Directory to import TARGET's module (and a config's import paths) from.")
@click.option("--working-dir", default=None,
              help="The applications' working directory (runtime_env working_dir): imported from, "
                   "and a config application's builder runs there.")
@click.option("--runtime-env-json", default=None, help="runtime_env for the applications, as JSON (env_vars, working_dir).")
@click.option("--runtime-env", "runtime_env_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="runtime_env for the applications, from a YAML file.")
@click.option("--blocking/--non-blocking", default=True, show_default=True,
              help="Serve until Ctrl-C (and then stop), or deploy and return.")
@click.option("--reload", "-r", is_flag=True,
              help="Redeploy when a .py file under --app-dir (or --working-dir) changes (module:app targets).")
@namespace_option
def run(target: str, arguments: tuple[str, ...], host: str | None, port: int | None, name: str, route_prefix: str,
        num_cpus: float | None, num_gpus: float | None, address: str | None, app_dir: str, working_dir: str | None,
        runtime_env_json: str | None, runtime_env_file: str | None, blocking: bool, reload: bool,
        namespace: str | None) -> None:
    """Serve TARGET (module:application, or a config file) until Ctrl-C, in a private cluster.

    ARGUMENTS (`key=value` ...) go to TARGET when it is an application builder function, as
    its args (as in `serve run module:builder key=value`).

    Blocks in the foreground; Ctrl-C or SIGTERM drains and stops every process it started.
    With --address (or --namespace), it deploys to that running cluster instead and, at
    Ctrl-C, deletes what it deployed there; the cluster stays. --non-blocking deploys and
    returns (on a running cluster the applications stay; a private one stops with it).
    """
    import flotilla
    from flotilla import serve

    if reload and _is_config(target):
        raise click.BadParameter("--reload redeploys a module:app target; a config file is redeployed "
                                 "with `flotilla deploy`", param_hint="--reload")
    if reload and not blocking:
        raise click.BadParameter("--reload watches files while serving: it needs --blocking", param_hint="--reload")
    runtime_env = _runtime_env_option(runtime_env_json, runtime_env_file, working_dir)
    code_dirs = [os.path.abspath(d) for d in (working_dir, app_dir) if d]
    for d in reversed(code_dirs):
        if not os.path.isdir(d):
            raise click.BadParameter(f"{d!r} is not a directory", param_hint="--app-dir/--working-dir")
        if d not in sys.path:
            sys.path.insert(0, d)
    config: dict[str, Any] | None = None
    app = None
    args = _builder_args(arguments, target)
    if _is_config(target):
        from flotilla.serve.deploy_schema import load_config_file

        config = load_config_file(target).to_dict()
        http = dict(config.get("http_options") or {})
        if host is not None:
            http["host"] = host
        if port is not None:
            http["port"] = port
        config["http_options"] = http
        if runtime_env:
            for a in config.get("applications", []):
                a["runtime_env"] = {**runtime_env, **(a.get("runtime_env") or {})}
    else:
        app = _load(target, args)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    attach = address is not None or namespace is not None
    if attach:
        if num_cpus is not None or num_gpus is not None or host is not None or port is not None:
            raise click.ClickException("--num-cpus, --num-gpus, --host and --port are the cluster's own "
                                       "(flotilla start); they cannot be set when running on it")
        flotilla.init(address=address or "auto", namespace=namespace)
    else:
        flotilla.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus)
    deployed: list[str] = []
    try:
        from flotilla._private.client import Runtime

        rt = Runtime.current()
        if config is not None:
            deployed = [a["name"] for a in config.get("applications", [])]
            pythonpath = os.pathsep.join([*code_dirs, *filter(None, [os.environ.get("PYTHONPATH")])])
            rt.call_head("apply_config", config, os.getcwd(), "flotilla run", pythonpath, timeout=60)
            failed = _wait_config_running(rt, deployed)
            for n, why in failed.items():  # the others serve, as with `serve run`
                click.echo(f"Application '{n}' failed to deploy: {' '.join(why.split())}", err=True)
            url = rt.call_head("http_url")
            for a in config.get("applications", []):
                if a["name"] in failed:
                    continue
                prefix = a.get("route_prefix", "/")
                where = "handles only" if prefix is None or not url else f"{url}{'' if prefix == '/' else prefix}"
                click.echo(f"Application '{a['name']}' is serving at {where}")
        else:
            if not attach or host is not None or port is not None:  # a running cluster's proxy keeps its own
                serve.start(http_options={"host": host or "127.0.0.1", "port": 8000 if port is None else port})
            assert app is not None
            deployed = [name]
            _serve(app, name, route_prefix, runtime_env)
            url = rt.call_head("http_url")
            suffix = "" if route_prefix == "/" else route_prefix
            click.echo(f"Application '{name}' is serving at {url}{suffix}")
        if flotilla.dashboard_url():
            click.echo(f"Dashboard: {flotilla.dashboard_url()}")
        if not blocking:
            deployed = []  # they stay on a running cluster
            return
        click.echo("(Ctrl-C to stop)")
        sys.stdout.flush()
        watch = _CodeWatch(code_dirs) if reload else None
        try:
            while not stop.wait(0.5):
                if watch is not None and watch.changed():
                    click.echo(f"Files changed under {', '.join(code_dirs)}: redeploying '{name}'...")
                    try:
                        _forget_modules(watch.seen)
                        _serve(_load(target, args), name, route_prefix, runtime_env)
                        click.echo(f"Application '{name}' redeployed.")
                    except Exception as e:  # a broken edit: keep serving what runs, wait for the next
                        click.echo(f"Redeploying '{name}' failed: {type(e).__name__}: {e}", err=True)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        click.echo("Shutting down...")
    finally:
        if attach:
            for app_name in deployed:
                with contextlib.suppress(Exception):
                    serve.delete(app_name)
        flotilla.shutdown()


def _runtime_env_option(as_json: str | None, path: str | None, working_dir: str | None) -> dict[str, Any]:
    """The runtime_env `flotilla run` was given (--runtime-env-json, --runtime-env, --working-dir)."""
    if as_json and path:
        raise click.BadParameter("give --runtime-env-json or --runtime-env, not both", param_hint="--runtime-env")
    env: Any = {}
    if as_json:
        try:
            env = json.loads(as_json)
        except ValueError as e:
            raise click.BadParameter(f"not JSON: {e}", param_hint="--runtime-env-json") from None
    elif path:
        import yaml

        with open(path) as f:
            env = yaml.safe_load(f) or {}
    if not isinstance(env, dict):
        raise click.BadParameter("a runtime_env is a mapping (env_vars, working_dir)", param_hint="--runtime-env")
    if working_dir:
        env["working_dir"] = os.path.abspath(working_dir)
    unknown = sorted(set(env) - {"env_vars", "working_dir"})
    if unknown:
        raise click.BadParameter(f"runtime_env field(s) {unknown} are not supported on this machine: only "
                                 "env_vars and working_dir (install dependencies into the environment "
                                 "flotilla runs in)", param_hint="--runtime-env")
    return env


def _serve(app: Any, name: str, route_prefix: str, runtime_env: dict[str, Any]) -> None:
    """`serve.run(app)`, with the runtime_env's env_vars set in all its replicas."""
    from flotilla.serve import api

    env = runtime_env.get("env_vars") or None
    if env is not None and not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())):
        raise click.BadParameter("runtime_env env_vars must map names to strings", param_hint="--runtime-env")
    spec = api._checked_spec("flotilla run", app, name, route_prefix, None, env)
    api._deploy([(app, spec)], True)


class _CodeWatch:
    """Which .py files under some directories changed since the last look (by mtime and size;
    polled, as `serve run --reload` watches)."""

    LIMIT = 20_000  # files looked at per directory tree

    def __init__(self, dirs: list[str]) -> None:
        self.dirs = dirs
        self.seen = self._scan()

    def _scan(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for top in self.dirs:
            for root, subdirs, files in os.walk(top):
                subdirs[:] = [d for d in subdirs if not d.startswith(".") and d not in ("__pycache__", "node_modules")
                              and not os.path.exists(os.path.join(root, d, "pyvenv.cfg"))]
                for f in files:
                    if f.endswith(".py") and len(out) < self.LIMIT:
                        path = os.path.join(root, f)
                        with contextlib.suppress(OSError):
                            st = os.stat(path)
                            out[path] = (st.st_mtime_ns, st.st_size)
        return out

    def changed(self) -> bool:
        now = self._scan()
        changed, self.seen = now != self.seen, now
        return changed


def _forget_modules(files: Any) -> None:
    """Drop the imported modules loaded from `files` (the watched ones: no virtualenv, no
    hidden folder, never flotilla itself), so the next import reads them anew."""
    for mod_name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and os.path.abspath(f) in files and mod_name.split(".")[0] != "flotilla":
            del sys.modules[mod_name]


def _wait_config_running(rt: Any, names: list[str], timeout: float = 600.0) -> dict[str, str]:
    """Wait until each application runs or failed to deploy; the failed ones' messages (an
    error when every one failed: nothing would serve)."""
    deadline = time.monotonic() + timeout
    while True:
        st = rt.call_head("status")
        states = {n: st.applications.get(n) for n in names}
        failed = {n: a.message for n, a in states.items() if a is not None and a.status.value == "DEPLOY_FAILED"}
        if names and len(failed) == len(names):
            raise click.ClickException("; ".join(f"application {n!r} failed to deploy: {m}" for n, m in failed.items()))
        if all(a is not None and a.status.value in ("RUNNING", "DEPLOY_FAILED") for a in states.values()):
            return failed
        if time.monotonic() > deadline:
            raise click.ClickException(f"the applications did not reach RUNNING within {timeout:g}s")
        time.sleep(0.1)


if __name__ == "__main__":
    main()
