"""The Ray Serve application: an OpenAI-compatible ingress and an autoscaling soup model.

    serve run serve_configs/tiny.yaml            # args.run names the run directory
    psoups serve --run runs/tiny [--config serve_configs/tiny.yaml] [--port 8000]

Two deployments:

- ``Ingress`` (FastAPI): auth, request validation, prompt formatting, OpenAI response
  shapes and server-sent events. It loads only the tokenizer and the run's catalog
  (preference space, poles, tuned weights), so bad requests never reach a model replica.
- ``SoupModel``: the base with every pole policy mixed in activation space
  (:class:`SoupEngine`), loaded once per replica. Requests are batched dynamically by
  ``@serve.batch``; one batch holds rows for different combinations and weights. This is
  the deployment the YAML's ``autoscaling_config`` scales.

A request picks its soup by ``model`` (``psoups:base``, ``psoups:P1A``,
``psoups:P1A+P2B+P3A``: tuned weights when the run has them, else uniform) or by the
extension fields ``preferences`` (a list of poles) or ``weights`` ({pole: weight}).
Adapters are only ever loaded from the run directory, never from a path in a request.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from psoups_ray.errors import PsoupsError
from psoups_ray.serve.args import ServeArgs
from psoups_ray.serve.engine import SoupCatalog
from psoups_ray.serve.ingress import Ingress
from psoups_ray.serve.model import SoupModel
from psoups_ray.serve.scorer import PreferenceScorer

__all__ = ["Ingress", "ServeArgs", "SoupModel", "bind_app", "build_app"]


def build_app(args: dict[str, Any]):
    """The application builder that ``serve run`` and ``serve deploy`` call with a Serve
    YAML's ``args`` (Ray Serve requires exactly one parameter); the YAML's
    ``deployments`` section is applied by Serve itself."""
    return bind_app(args)


def bind_app(args: dict[str, Any], deployment_options: dict[str, dict] | None = None):
    """The bound application for ``args``: validated, and the run checked, before anything
    starts. ``deployment_options`` ({deployment name: options}) is how ``psoups serve``
    applies a YAML's ``deployments`` section, which ``serve run`` applies itself."""
    try:
        settings = ServeArgs.model_validate(args)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise PsoupsError(f"invalid serve args: {problems}") from None
    run = settings.run
    if "://" not in run and Path(run).exists():
        run = str(Path(run).resolve())  # replicas may start in another directory
    settings = settings.model_copy(update={"run": run})
    catalog = SoupCatalog(run)  # fail here, with the reason, rather than in every replica
    catalog.run.check_loadable(catalog.run.model_set(catalog.baselines, rewards=False))
    token = None
    if settings.auth_token_env:
        token = os.environ.get(settings.auth_token_env)
        if not token:
            raise PsoupsError(
                f"auth_token_env is {settings.auth_token_env!r} but that environment variable "
                "is empty or unset; export the token, or drop auth_token_env to serve without auth"
            )
    scorer = None
    if settings.personal.enabled:
        _check_personal(settings, catalog)
    dumped = settings.model_dump()
    options = deployment_options or {}
    known = {"SoupModel", "Ingress", "PreferenceScorer"}
    unknown = sorted(set(options) - known)
    if unknown:
        names = ", ".join(sorted(known))
        raise PsoupsError(f"unknown deployment(s) {unknown}; the app has {names}")
    if settings.personal.enabled:
        scorer = PreferenceScorer.options(**options.get("PreferenceScorer", {})).bind(dumped)
    model = SoupModel.options(**options.get("SoupModel", {}))
    ingress = Ingress.options(**options.get("Ingress", {}))
    return ingress.bind(model.bind(dumped), dumped, token, scorer)


def _check_personal(settings: ServeArgs, catalog: SoupCatalog) -> None:
    """Personal soups need every pole's reward model (their features) and a profile store
    that opens; fail here, naming what to do, rather than in the replicas."""
    from psoups_ray.personal.service import database_url
    from psoups_ray.personal.store import ProfileStore

    try:
        catalog.run.check_loadable(catalog.run.model_set(catalog.baselines, rewards=True))
        ProfileStore(database_url(settings.personal, catalog.run.location)).close()
    except PsoupsError as exc:
        raise PsoupsError(
            f"personal soups: {exc}\n(serve without them: personal: {{enabled: false}} in the "
            "serve args)"
        ) from None
    try:
        catalog.resolve(settings.personal.default)
    except PsoupsError as exc:
        raise PsoupsError(f"personal.default: {exc}") from None
