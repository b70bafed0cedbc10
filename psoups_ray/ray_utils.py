"""The Ray edge: connecting to a cluster and launching Ray Train runs.

Stage logic stays callable without Ray; these helpers wrap it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psoups_ray import console, progress
from psoups_ray.config import RayConfig, ScalingSpec
from psoups_ray.console import RunLog
from psoups_ray.errors import PsoupsError
from psoups_ray.progress import log
from psoups_ray.rundir import RunDir

QUEUE_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
QUEUE_TIMEOUT_S = 24 * 3600
LOCAL_CLUSTER_ENV = "PSOUPS_LOCAL_CLUSTER"  # set in the processes of a cluster we started


def ensure_ray(config: RayConfig) -> None:
    """Connect to ``config.address`` / ``RAY_ADDRESS``, or start a local cluster (127.0.0.1).

    Under a console (``psoups run``) Ray does not forward workers' output to this process:
    the workers that matter write it to the run's logs (:mod:`psoups_ray.console`).
    """
    import ray

    # Ray Train's print() patch drops print's ``file=`` argument, so libraries that print
    # into buffers (datasets' fingerprinting runs dis.dis) flood the logs. Workers inherit it.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    run_console = console.active()
    if not ray.is_initialized():
        _init_ray(config, log_to_driver=run_console is None)
    if run_console is not None:
        run_console.attach_ray()


def _init_ray(config: RayConfig, log_to_driver: bool) -> None:
    import ray

    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        os.environ.pop(LOCAL_CLUSTER_ENV, None)  # runs fit from here too (fit_torch_run)
        log(f"connecting to Ray cluster at {address}")
        ray.init(address=address, log_to_driver=log_to_driver)
        return
    log("starting a local Ray cluster")
    # Ray Train's preemption watcher (one more actor process per run) polls for nodes being
    # drained, which a single machine's cluster never is.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ[LOCAL_CLUSTER_ENV] = "1"  # the cluster's processes inherit it (see _fit)
    ray.init(
        num_cpus=config.num_cpus,
        num_gpus=config.num_gpus,
        include_dashboard=config.include_dashboard,
        dashboard_host=config.dashboard_host,
        log_to_driver=log_to_driver,
    )


def scaling_config(spec: ScalingSpec):
    from ray.train import ScalingConfig

    resources: dict[str, float] = {"CPU": spec.cpus_per_worker}
    if spec.use_gpu:
        resources["GPU"] = spec.gpus_per_worker
    return ScalingConfig(
        num_workers=spec.num_workers, use_gpu=spec.use_gpu, resources_per_worker=resources
    )


def _serialize_loop(
    train_loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    log: RunLog | None,
) -> bytes:
    """(loop, config, log) as bytes: Ray Train's controller, and the task that calls
    ``fit()``, then never unpickle them, so they do not import torch, transformers and peft
    for the stage's modules (several CPU-seconds per process, per run, on a small machine);
    only the workers, which need them anyway, do."""
    from ray import cloudpickle

    return cloudpickle.dumps((train_loop, loop_config, log))


def _run_serialized_loop(config: dict[str, bytes]) -> None:
    """The per-worker entry point of every run: unpickle the stage's loop and run it, its
    output in the run's log (rank 0: ``<name>.log``, others ``<name>.rank<k>.log``)."""
    from ray import cloudpickle

    train_loop, loop_config, output = cloudpickle.loads(config["loop"])
    if output is not None:
        import ray.train

        output = output.for_rank(ray.train.get_context().get_world_rank())
    with console.worker_output(output):
        train_loop(loop_config)


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
    output = console.run_log(stage, name)
    task = progress.task_name(stage, name)
    progress.start(task, "starting")
    try:
        loop = _serialize_loop(train_loop, loop_config, output)
        return _fit(loop, resources, rundir, stage, name)
    except PsoupsError as exc:
        raise PsoupsError(f"{exc}{console.log_tail(output)}") from exc
    finally:
        progress.finish(task)


def _fit(loop: bytes, resources: ScalingSpec, rundir: RunDir, stage: str, name: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    # Runs launched together queue for resources on purpose; Ray Train's default is to
    # give up on a worker group after 60 s and retry forever, logging an error each time.
    # The controller reads this from the process that calls fit() (this one).
    os.environ.setdefault(QUEUE_TIMEOUT_ENV, str(QUEUE_TIMEOUT_S))

    trainer = _trainer_class()(
        _run_serialized_loop,
        train_loop_config={"loop": loop},
        scaling_config=scaling_config(resources),
        run_config=RunConfig(
            name=name,
            storage_path=rundir.uri(f"ray/{stage}"),
            failure_config=FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    # fit() installs a SIGINT handler (in the main thread) that aborts the run; it holds
    # the run's controller actor, which stays alive (and polls, ~400 MB) until the next
    # fit() in this process replaces the handler. Put the previous handler back.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; surface the cause in one line
        raise PsoupsError(f"Ray Train run {name!r} failed: {exc}") from exc
    finally:
        if main:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    if result.error is not None:
        raise PsoupsError(f"Ray Train run {name!r} failed: {result.error}")
    return result


def _trainer_class():
    """``TorchTrainer``, without two helper actors where they have nothing to do.

    Ray Train starts, for every run, a ``DatasetManager`` actor (Ray Data shards; our
    runs pass no datasets) and a ``PlacementGroupCleaner`` actor that asks the state API
    every second whether the run's controller is still alive, to free its placement group
    if it died. On a small machine they cost CPU the runs need: in the tiny run here about
    4 CPU-seconds (start-up) and 5 CPU-seconds (start-up and polling) per run, next to
    the controller's 8. The dataset actor is dropped for every run; the cleaner only on a
    local cluster that ``psoups`` started, which goes away with the command. If a
    Ray version renames these internals, the plain ``TorchTrainer`` is used.
    """
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import (
            PlacementGroupCleanerCallback,
        )
    except ImportError:
        return TorchTrainer
    if not hasattr(TorchTrainer, "_create_default_callbacks"):
        return TorchTrainer
    dropped: tuple[type, ...] = (DatasetsCallback,)
    if os.environ.get(LOCAL_CLUSTER_ENV) == "1":
        dropped += (PlacementGroupCleanerCallback,)

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if self.datasets:  # Ray Data inputs need their manager
                return callbacks
            return [callback for callback in callbacks if not isinstance(callback, dropped)]

    return LeanTorchTrainer


@dataclass(frozen=True)
class TorchRun:
    """One Ray Train run to launch alongside others (see :func:`fit_torch_runs`)."""

    train_loop: Callable[[dict[str, Any]], None]
    loop_config: dict[str, Any]
    resources: ScalingSpec
    stage: str
    name: str


def fit_torch_runs(
    runs: list[TorchRun], rundir: RunDir, max_concurrent: int | None = None
) -> dict[str, dict[str, float]]:
    """Run every run, each ``TorchTrainer.fit()`` in its own zero-CPU Ray task.

    Runs are launched in order: with ``max_concurrent`` empty, as many as the cluster's
    CPUs and GPUs hold at once (re-read whenever one finishes, so nodes added meanwhile
    are used); otherwise that many, the rest queueing in Ray for their placement groups
    (which lets an autoscaler see the demand). Launching in order matters: Ray does not
    grant queued placement groups first come first served, and the longest runs (the
    baselines) come first. Waits for all; raises one error naming every failed run.

    Returns ``{name: {"launched_at": t, "returned_at": t}}``: when each run was handed to
    Ray and when its ``fit()`` was seen to return (Unix times, this process's clock),
    start-up, queueing for resources and the run's own saving included.
    """
    import ray

    _warn_if_unschedulable(runs)
    fit_remote = ray.remote(num_cpus=0, max_retries=0)(_fit)
    stage = runs[0].stage
    waiting, running, failures = list(runs), {}, []
    logs = {run.name: console.run_log(stage, run.name) for run in runs}
    times: dict[str, dict[str, float]] = {}
    log(f"{stage}: {len(runs)} Ray Train runs: {', '.join(run.name for run in runs)}")
    progress.update(stage, 0, len(runs), "run", "0 running")
    while waiting or running:
        total = ray.cluster_resources() if max_concurrent is None else {}
        while waiting and _may_launch(waiting[0], list(running.values()), max_concurrent, total):
            run = waiting.pop(0)
            loop = _serialize_loop(run.train_loop, run.loop_config, logs[run.name])
            running[fit_remote.remote(loop, run.resources, rundir, stage, run.name)] = run
            times[run.name] = {"launched_at": time.time()}
            progress.start(progress.task_name(stage, run.name), "starting")
            progress.note(
                f"{stage}: launched run {run.name} ({len(running)} running, {len(waiting)} waiting)"
            )
        done, _ = ray.wait(list(running), num_returns=1)
        run = running.pop(done[0])
        times[run.name]["returned_at"] = time.time()
        progress.finish(progress.task_name(stage, run.name))
        try:
            ray.get(done[0])
            progress.note(f"{stage}: run {run.name} finished ({len(running) + len(waiting)} to go)")
        except Exception as exc:  # a failed run must not hide the others' results
            cause = getattr(exc, "cause", None) or exc
            failures.append(f"{run.name}: {cause}{console.log_tail(logs[run.name])}")
            log(f"{stage}: run {run.name} failed")
        finished = len(runs) - len(running) - len(waiting)
        progress.update(stage, finished, len(runs), "run", f"{len(running)} running")
    if failures:
        raise PsoupsError(f"{len(failures)} Ray Train run(s) failed:\n  " + "\n  ".join(failures))
    return times


def _needs(spec: ScalingSpec) -> dict[str, float]:
    """Cluster resources one run holds while it trains."""
    needs = {"CPU": spec.num_workers * spec.cpus_per_worker}
    if spec.use_gpu:
        needs["GPU"] = spec.num_workers * spec.gpus_per_worker
    return needs


def _may_launch(
    run: TorchRun,
    running: list[TorchRun],
    max_concurrent: int | None,
    total: dict[str, float],
) -> bool:
    """Whether ``run`` may start now: under ``max_concurrent``, else when the resources of
    the running runs plus its own fit in the cluster's ``total``."""
    if not running:
        return True
    if max_concurrent is not None:
        return len(running) < max_concurrent
    held: dict[str, float] = {}
    for other in running:
        for key, value in _needs(other.resources).items():
            held[key] = held.get(key, 0.0) + value
    return all(
        held.get(key, 0.0) + value <= total.get(key, 0.0) + 1e-9
        for key, value in _needs(run.resources).items()
    )


def _warn_if_unschedulable(runs: list[TorchRun]) -> None:
    """Say so when a run asks for more than the whole cluster has (it would wait forever,
    unless an autoscaler adds nodes)."""
    import ray

    total = ray.cluster_resources()
    for run in runs:
        needs = _needs(run.resources)
        short = {k: v for k, v in needs.items() if v > total.get(k, 0.0)}
        if short:
            have = ", ".join(f"{k} {total.get(k, 0.0):g}" for k in short)
            want = ", ".join(f"{k} {v:g}" for k, v in short.items())
            log(
                f"{run.stage}: warning: run {run.name} needs {want} but the cluster has {have}; "
                "it waits until an autoscaler adds nodes (or lower its resources in the config)"
            )
