"""``psoups serve``: the Serve application in the foreground on 127.0.0.1 until Ctrl-C."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import yaml

from psoups_ray.config import safe_load_yaml
from psoups_ray.errors import PsoupsError
from psoups_ray.progress import log

APP_NAME = "psoups"


def read_serve_config(path: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(args, deployment options by name) of the psoups application in a Serve YAML."""
    file = Path(path)
    if not file.is_file():
        raise PsoupsError(f"serve config {path} does not exist (see serve_configs/)")
    try:
        data = safe_load_yaml(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PsoupsError(f"serve config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise PsoupsError(
            f"serve config {path} must hold a mapping with an 'applications' list (as in "
            f"serve_configs/tiny.yaml), got {type(data).__name__}"
        )
    applications = data.get("applications") or []
    if not isinstance(applications, list) or not all(isinstance(a, dict) for a in applications):
        raise PsoupsError(f"serve config {path}: 'applications' must be a list of mappings")
    apps = [
        app
        for app in applications
        if str(app.get("import_path", "")).startswith("psoups_ray.serve.app:")
    ]
    if len(apps) != 1:
        raise PsoupsError(
            f"serve config {path} must hold one application with import_path "
            "psoups_ray.serve.app:build_app"
        )
    args = apps[0].get("args") or {}
    entries = apps[0].get("deployments") or []
    if not isinstance(args, dict):
        raise PsoupsError(f"serve config {path}: the application's 'args' must be a mapping")
    if not isinstance(entries, list) or not all(
        isinstance(entry, dict) and isinstance(entry.get("name"), str) for entry in entries
    ):
        raise PsoupsError(
            f"serve config {path}: 'deployments' must be a list of mappings, each with a "
            "'name' (the deployment it configures, as in serve_configs/tiny.yaml)"
        )
    deployments = {}
    for entry in entries:
        entry = dict(entry)
        deployments[entry.pop("name")] = entry
    return dict(args), deployments


def serve_forever(run: str, config: str | None, host: str, port: int) -> None:
    """Deploy the app for ``run`` and block until interrupted; then shut Serve down."""
    import ray
    from ray import serve

    from psoups_ray.config import RayConfig
    from psoups_ray.ray_utils import ensure_ray
    from psoups_ray.serve.app import bind_app

    args, deployments = read_serve_config(config) if config else ({}, {})
    args["run"] = run
    app = bind_app(args, deployments)  # validates before anything starts
    ensure_ray(RayConfig())
    serve.start(http_options={"host": host, "port": port})

    def stop(signum, frame):  # SIGTERM ends like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
        log(f"serving {run} at http://{host}:{port}/v1 (models: GET /v1/models); Ctrl-C stops")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        log("stopping the Serve application")
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.shutdown()
        if ray.is_initialized():
            ray.shutdown()
