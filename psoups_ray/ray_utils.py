"""The Ray edge: connecting to a cluster and launching Ray Train runs.

Stage logic stays callable without Ray; these helpers wrap it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psoups_ray.config import RayConfig, ScalingSpec
from psoups_ray.errors import PsoupsError
from psoups_ray.progress import log
from psoups_ray.rundir import RunDir

QUEUE_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
QUEUE_TIMEOUT_S = 24 * 3600


def ensure_ray(config: RayConfig) -> None:
    """Connect to ``config.address`` / ``RAY_ADDRESS``, or start a local cluster (127.0.0.1)."""
    import ray

    # Ray Train's print() patch drops print's ``file=`` argument, so libraries that print
    # into buffers (datasets' fingerprinting runs dis.dis) flood the logs. Workers inherit it.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        log(f"connecting to Ray cluster at {address}")
        ray.init(address=address, log_to_driver=True)
        return
    log("starting a local Ray cluster")
    ray.init(
        num_cpus=config.num_cpus,
        num_gpus=config.num_gpus,
        include_dashboard=config.include_dashboard,
        dashboard_host=config.dashboard_host,
        log_to_driver=True,
    )


def scaling_config(spec: ScalingSpec):
    from ray.train import ScalingConfig

    resources: dict[str, float] = {"CPU": spec.cpus_per_worker}
    if spec.use_gpu:
        resources["GPU"] = spec.gpus_per_worker
    return ScalingConfig(
        num_workers=spec.num_workers, use_gpu=spec.use_gpu, resources_per_worker=resources
    )


def fit_torch_run(
    train_loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    resources: ScalingSpec,
    rundir: RunDir,
    stage: str,
    name: str,
):
    """Run one Ray Train ``TorchTrainer`` whose checkpoints live in ``<run>/ray/<stage>/<name>``.

    A run restarted with the same run directory and name resumes from its last
    checkpoint (Ray Train restores it; the loop picks it up with
    ``ray.train.get_checkpoint()``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    # Runs launched together queue for resources on purpose; Ray Train's default is to
    # give up on a worker group after 60 s and retry forever, logging an error each time.
    # The controller reads this from the process that calls fit() (this one).
    os.environ.setdefault(QUEUE_TIMEOUT_ENV, str(QUEUE_TIMEOUT_S))

    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=scaling_config(resources),
        run_config=RunConfig(
            name=name,
            storage_path=rundir.uri(f"ray/{stage}"),
            failure_config=FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; surface the cause in one line
        raise PsoupsError(f"Ray Train run {name!r} failed: {exc}") from exc
    if result.error is not None:
        raise PsoupsError(f"Ray Train run {name!r} failed: {result.error}")
    return result


@dataclass(frozen=True)
class TorchRun:
    """One Ray Train run to launch alongside others (see :func:`fit_torch_runs`)."""

    train_loop: Callable[[dict[str, Any]], None]
    loop_config: dict[str, Any]
    resources: ScalingSpec
    stage: str
    name: str


def fit_torch_runs(runs: list[TorchRun], rundir: RunDir) -> None:
    """Launch every run at once, each ``TorchTrainer.fit()`` in its own zero-CPU Ray task.

    Runs execute concurrently as far as the cluster's resources allow; the rest queue
    for their placement groups. Waits for all; raises one error naming every failed run.
    """
    import ray

    _warn_if_unschedulable(runs)
    fit_remote = ray.remote(num_cpus=0, max_retries=0)(fit_torch_run)
    pending = {
        fit_remote.remote(run.train_loop, run.loop_config, run.resources, rundir, run.stage,
                          run.name): run.name
        for run in runs
    }  # fmt: skip
    log(f"{runs[0].stage}: launched {len(runs)} Ray Train runs: {', '.join(pending.values())}")
    failures = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(done[0])
        try:
            ray.get(done[0])
            log(f"{runs[0].stage}: run {name} finished ({len(pending)} still running or queued)")
        except Exception as exc:  # a failed run must not hide the others' results
            failures.append(f"{name}: {getattr(exc, 'cause', None) or exc}")
    if failures:
        raise PsoupsError(f"{len(failures)} Ray Train run(s) failed:\n  " + "\n  ".join(failures))


def _warn_if_unschedulable(runs: list[TorchRun]) -> None:
    """Say so when a run asks for more than the whole cluster has (it would wait forever,
    unless an autoscaler adds nodes)."""
    import ray

    total = ray.cluster_resources()
    for run in runs:
        spec = run.resources
        needs = {"CPU": spec.num_workers * spec.cpus_per_worker}
        if spec.use_gpu:
            needs["GPU"] = spec.num_workers * spec.gpus_per_worker
        short = {k: v for k, v in needs.items() if v > total.get(k, 0.0)}
        if short:
            have = ", ".join(f"{k} {total.get(k, 0.0):g}" for k in short)
            want = ", ".join(f"{k} {v:g}" for k, v in short.items())
            log(
                f"{run.stage}: warning: run {run.name} needs {want} but the cluster has {have}; "
                "it waits until an autoscaler adds nodes (or lower its resources in the config)"
            )
