"""The ``psoups`` command line: parse, load the config, call one library function."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

import yaml

from psoups_ray import __version__
from psoups_ray.errors import PsoupsError

DEFAULT_OUT_ROOT = "runs"


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="NAME_OR_FILE",
        help="built-in config name or YAML file (default: the built-in 'tiny')",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set base.sft.steps=100 (repeatable; "
        "`psoups config --explain` lists every key)",
    )
    parser.add_argument(
        "--smoke-test",
        action="store_true",
        help="a few steps of everything, to check an installation or cluster quickly",
    )


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    _add_config_args(parser)
    parser.add_argument(
        "--out",
        metavar="PATH_OR_URI",
        help="run directory: a local path or a pyarrow.fs URI (file://, s3://, gs://); "
        f"default: ./{DEFAULT_OUT_ROOT}/<config name>",
    )
    parser.add_argument(
        "--force", action="store_true", help="redo the requested stages even when complete"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="raw output of every process (Ray workers included) instead of the live progress "
        "display; without it that output goes to RUN/logs/",
    )


def build_parser() -> argparse.ArgumentParser:
    from psoups_ray.pipeline import STAGE_NAMES, STAGES

    parser = argparse.ArgumentParser(
        prog="psoups",
        description="Personalized Soups on Ray: per-preference reward models and PPO "
        "policies trained in parallel, merged per combination, tuned and served.",
    )
    parser.add_argument("--version", action="version", version=f"psoups_ray {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="run the pipeline (all stages, or --stages), resuming a previous run",
        description="Run stages in pipeline order; stages already complete in the run "
        "directory are skipped, missing prerequisites run first.",
    )
    _add_run_args(run)
    run.add_argument(
        "--stages",
        metavar="LIST",
        help=f"comma-separated stages to run (default: all): {','.join(STAGE_NAMES)}",
    )
    for stage in STAGES:
        if stage.name == "report":
            report = commands.add_parser(
                "report",
                help="stage: (re)build report.md and its plots from a run directory",
                description="Rebuild report.md and its plots from what the run directory "
                "holds (any stages that have run); reads no config.",
            )
            report.add_argument("--run", "--out", dest="run", required=True, metavar="RUN",
                                help="run directory")  # fmt: skip
            continue
        sub = commands.add_parser(
            stage.name,
            help=f"stage: {stage.summary}",
            description=f"Run only the {stage.name} stage ({stage.summary}); the stages it "
            "needs must already be complete in the run directory.",
        )
        _add_run_args(sub)

    merge = commands.add_parser(
        "merge",
        help="merge a run's pole policies for one combination (a soup) into an adapter/model",
        description="Soup the pole policies of a combination: weights default to the tuned "
        "weights in the manifest, else uniform. The result loads with plain PEFT/transformers.",
    )
    merge.add_argument("--run", required=True, metavar="RUN", help="run directory")
    merge.add_argument("--combo", required=True, help="combination, e.g. P1A+P2B+P3A")
    merge.add_argument("--weights", help="per-pole weights, e.g. P1A=0.5,P2B=0.3,P3A=0.2")
    merge.add_argument(
        "--method",
        default="delta",
        choices=["delta", "factor", "ties", "dare_linear", "dare_ties", "svd"],
        help="delta: exact weighted sum of updates (default); factor: average A and B "
        "separately (the paper's code); others: PEFT's add_weighted_adapter",
    )
    merge.add_argument(
        "--export",
        default="adapter",
        choices=["adapter", "model"],
        help="a PEFT adapter directory, or a merged full model directory",
    )
    merge.add_argument(
        "--density", type=float, default=0.5, help="ties/dare: share of weights kept"
    )
    merge.add_argument(
        "--allow-negative", action="store_true", help="accept negative weights (extrapolation)"
    )
    merge.add_argument("--out", required=True, metavar="DIR", help="new output directory")

    serve_cmd = commands.add_parser(
        "serve",
        help="serve a run's soups: OpenAI-compatible Ray Serve app on 127.0.0.1 (Ctrl-C stops)",
        description="Deploy the Ray Serve application for a run directory and block until "
        "interrupted. Any combination per request: model 'psoups:P1A+P2B+P3A'.",
    )
    serve_cmd.add_argument("--run", required=True, metavar="RUN", help="run directory")
    serve_cmd.add_argument(
        "--config",
        metavar="YAML",
        help="Serve config whose args and deployments to use, e.g. serve_configs/tiny.yaml "
        "(its args.run is replaced by --run)",
    )
    serve_cmd.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)"
    )
    serve_cmd.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")

    validate = commands.add_parser(
        "validate",
        help="check a configuration and show what it would run, without running it",
        description="Validate a config (schema, cross-checks, and each stage's preflight: "
        "files, environment variables) and print the plan: runs and resources per stage. "
        "Exit status 2 for an invalid config; preflight problems are listed and make the "
        "exit status 1 only with --strict.",
    )
    _add_config_args(validate)
    validate.add_argument(
        "--strict", action="store_true", help="fail (status 1) on preflight problems too"
    )

    config = commands.add_parser(
        "config", help="print the resolved configuration, or --explain every key"
    )
    _add_config_args(config)
    config.add_argument(
        "--explain", action="store_true", help="list every key with its type, default and doc"
    )
    return parser


def _command(args: argparse.Namespace, shutdown_ray: bool) -> int:
    from psoups_ray.config import SMOKE_TEST_OVERRIDES, explain, load_config

    if args.command == "merge":
        from psoups_ray.runtime.export import make_soup, parse_weights

        if not 0 < args.density <= 1:
            raise PsoupsError(f"--density must be in (0, 1], got {args.density}")
        make_soup(
            args.run,
            args.combo,
            args.out,
            parse_weights(args.weights),
            args.method,
            args.export,
            args.density,
            args.allow_negative,
        )
        return 0

    if args.command == "serve":
        from psoups_ray.serve.launch import serve_forever

        if not 0 < args.port < 65536:
            raise PsoupsError(f"--port must be in 1-65535, got {args.port}")
        serve_forever(args.run, args.config, args.host, args.port)
        return 0

    if args.command == "report":
        from psoups_ray.report import rebuild_report

        rebuild_report(args.run)
        return 0

    if args.command == "config" and args.explain:
        print("\n".join(explain()))
        return 0
    overrides = [*(SMOKE_TEST_OVERRIDES if args.smoke_test else ()), *args.overrides]
    config = load_config(args.config, overrides)
    if args.command == "config":
        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    if args.command == "validate":
        from psoups_ray.pipeline import describe_plan, preflight_problems

        print(f"config {config.name!r} is valid:")
        print("\n".join(f"  {line}" for line in describe_plan(config)))
        problems = preflight_problems(config)
        if problems:
            print("before `psoups run` can start, fix:")
            print("\n".join(f"  - {problem}" for problem in problems))
            return 1 if args.strict else 0
        print("preflight checks passed")
        return 0

    from psoups_ray.pipeline import parse_stages, run_pipeline
    from psoups_ray.progress import log

    out = args.out or f"{DEFAULT_OUT_ROOT}/{config.name}"
    if args.command == "run":
        stages, prerequisites = parse_stages(args.stages), True
    else:
        stages, prerequisites = [args.command], False
    with contextlib.ExitStack() as console:
        if not args.verbose:
            from psoups_ray.console import RunConsole
            from psoups_ray.rundir import RunDir

            console.enter_context(RunConsole(RunDir(out)))
        if shutdown_ray:  # under the console: what Ray prints as it stops goes to the log
            console.callback(_shutdown_ray)
        manifest = run_pipeline(
            config, out, stages, force=args.force, run_prerequisites=prerequisites
        )
    complete = [name for name in manifest.data["stages"] if manifest.is_complete(name)]
    log(f"complete stages: {', '.join(complete) or 'none'}")
    log(f"manifest: {manifest.rundir.uri('manifest.json')}")
    if manifest.is_complete("report"):
        log(f"report: {manifest.rundir.resolve(manifest.data['report']['path'])}")
    if manifest.is_complete("policies"):
        log(f"serve it: psoups serve --run {manifest.rundir.location}   (then any combination "
            "per request, model 'psoups:P1A+P2B+P3A', on http://127.0.0.1:8000/v1)")  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    connected = _ray_is_connected()  # a caller's Ray (a notebook, a test) stays up
    try:
        return _command(args, shutdown_ray=not connected)
    except PsoupsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: completed stages are recorded; re-run the same command to resume",
            file=sys.stderr,
        )
        return 130
    finally:
        if not connected:
            _shutdown_ray()


def _ray_is_connected() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _shutdown_ray() -> None:
    """Disconnect from Ray, stopping the local cluster the command started (a no-op when
    connected elsewhere)."""
    if _ray_is_connected():
        sys.modules["ray"].shutdown()


if __name__ == "__main__":
    sys.exit(main())
