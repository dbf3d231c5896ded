"""`flotilla run module:app` — serve an application in the foreground (like `serve run`)."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from typing import Any

import click


def _load(import_path: str) -> Any:
    if ":" not in import_path:
        raise click.BadParameter("expected MODULE:ATTRIBUTE, e.g. examples.sklearn_app:app", param_hint="IMPORT_PATH")
    module_name, attr = import_path.split(":", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise click.ClickException(f"could not import {module_name!r}: {e}") from e
    try:
        target = getattr(module, attr)
    except AttributeError:
        raise click.ClickException(f"module {module_name!r} has no attribute {attr!r}") from None
    from flotilla.serve.deployments import Application, Deployment

    if isinstance(target, Deployment):
        target = target.bind()
    if not isinstance(target, Application):
        raise click.ClickException(f"{import_path} is a {type(target).__name__}, not an application (Deployment.bind(...))")
    return target


@click.group()
@click.version_option(package_name="flotilla")
def main() -> None:
    """flotilla: Ray Serve's API, served fast from one machine."""


@main.command()
@click.argument("import_path")
@click.option("--host", default="127.0.0.1", show_default=True, envvar="FLOTILLA_HOST", help="Interface the HTTP proxy binds.")
@click.option("--port", default=8000, show_default=True, type=int, envvar="FLOTILLA_PORT", help="HTTP port.")
@click.option("--name", default="default", show_default=True, help="Application name.")
@click.option("--route-prefix", default="/", show_default=True, help="Route prefix of the application.")
@click.option("--num-cpus", type=float, default=None, help="CPUs to offer replicas (default: detected).")
@click.option("--num-gpus", type=float, default=None, help="GPUs to offer replicas (default: detected).")
def run(import_path: str, host: str, port: int, name: str, route_prefix: str, num_cpus: float | None, num_gpus: float | None) -> None:
    """Deploy IMPORT_PATH (module:application) and serve it until Ctrl-C.

    Blocks in the foreground; Ctrl-C or SIGTERM drains and stops every process it started.
    """
    import flotilla
    from flotilla import serve

    app = _load(import_path)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    flotilla.init(num_cpus=num_cpus, num_gpus=num_gpus)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=name, route_prefix=route_prefix)
        from flotilla._private.client import Runtime

        url = Runtime.current().call_head("http_url")
        suffix = "" if route_prefix == "/" else route_prefix
        click.echo(f"Application '{name}' is serving at {url}{suffix} (Ctrl-C to stop)", err=False)
        sys.stdout.flush()
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        click.echo("Shutting down...")
    finally:
        flotilla.shutdown()


if __name__ == "__main__":
    main()
