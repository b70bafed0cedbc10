"""The policies stage: one PPO run per pole (P-Soups) plus the baselines, on Ray Train.

Every run is launched at once (:func:`psoups_ray.ray_utils.fit_torch_runs`); they run
concurrently as far as the cluster's resources allow and queue otherwise.

Artifacts: ``policies/<POLE>/adapter/`` and ``baselines/<NAME>/adapter/`` (plain PEFT
adapters + tokenizer), each with a ``metrics.json`` next to it (summary, held-out
measurement against the base, per-iteration history). Manifest: ``policies.<POLE>`` and
``baselines.<NAME>`` with ``path`` and ``metrics``.
"""

from __future__ import annotations

from typing import Any

from psoups_ray.artifacts import RunArtifacts
from psoups_ray.config import PsoupsConfig
from psoups_ray.errors import PsoupsError
from psoups_ray.judges.attributes import attribute_judge
from psoups_ray.manifest import Manifest
from psoups_ray.policies.job import EpisodeKind, PolicyJob, policy_train_loop
from psoups_ray.ray_utils import TorchRun, fit_torch_runs
from psoups_ray.rundir import RunDir


def policy_jobs(
    config: PsoupsConfig, rundir: RunDir, names: list[str] | None = None
) -> list[PolicyJob]:
    """The runs of the stage: every pole, then the configured baselines (or ``names``)."""
    run = RunArtifacts(rundir, Manifest.load(rundir).data)
    space, spec = config.space, config.policies
    rewards = run.rewards()
    prompts = {pole: space.pole(pole).prompt for pole in space.pole_ids}
    kinds: dict[str, tuple[str, tuple[EpisodeKind, ...]]] = {
        pole: ("pole", (((pole,), prompts[pole] if spec.prompted else None),))
        for pole in space.pole_ids
    }
    if "pmorl" in spec.baselines:
        kinds["pmorl"] = (
            "pmorl",
            tuple((tuple(c), space.preference_prompt(c)) for c in space.full_combinations()),
        )
    if "rlhf" in spec.baselines:
        kinds["rlhf"] = ("rlhf", ((tuple(space.pole_ids), None),))
    if names is not None:
        unknown = [name for name in names if name not in kinds]
        if unknown:
            raise PsoupsError(f"unknown policy run(s) {unknown}; known: {', '.join(kinds)}")
        kinds = {name: kinds[name] for name in names}
    train_prompts = tuple(run.prompts("train"))
    eval_prompts = tuple(run.prompts("held_out"))
    base = run.base
    baseline_spec = spec
    if spec.baseline_steps is not None:
        baseline_spec = spec.model_copy(update={"steps": spec.baseline_steps})
    return [
        PolicyJob(
            run_location=rundir.location,
            name=name,
            kind=kind,
            episodes=episodes,
            reward_paths={pole: rewards[pole].location for pole in space.pole_ids},
            preference_prompts=prompts,
            base=base,
            policy=spec if kind == "pole" else baseline_spec,
            reward_max_length=config.rewards.max_length,
            train_prompts=train_prompts,
            eval_prompts=eval_prompts[: spec.num_eval_prompts],
            attributes=attribute_judge(config),
            seed=config.seed,
            output_relpath=f"{_folder(kind)}/{name}/adapter",
            metrics_relpath=f"{_folder(kind)}/{name}/metrics.json",
            text_judge=config.uses_text_judge,
        )
        for name, (kind, episodes) in kinds.items()
    ]


def _folder(kind: str) -> str:
    return "policies" if kind == "pole" else "baselines"


def run_policies_stage(config: PsoupsConfig, rundir: RunDir) -> dict[str, dict[str, Any]]:
    """Train every pole's policy and the baselines; returns the ``policies`` and
    ``baselines`` manifest sections."""
    jobs = policy_jobs(config, rundir)
    # The baselines' runs take longest (several reward models per rollout, longer prompts):
    # launched first, they do not leave the cluster waiting on them at the end.
    launch_order = sorted(jobs, key=lambda job: job.kind == "pole")
    times = fit_torch_runs(
        [
            TorchRun(
                policy_train_loop, {"job": job}, config.policies.resources, "policies", job.name
            )
            for job in launch_order
        ],
        rundir,
        config.ray.max_concurrent_runs,
    )
    sections: dict[str, dict[str, Any]] = {"policies": {}, "baselines": {}}
    for job in jobs:
        metrics = rundir.read_json(job.metrics_relpath)
        summary = {key: value for key, value in metrics.items() if key != "history"}
        summary["eval"].pop("samples", None)
        summary["ray_run"] = times[job.name]  # launch to fit() returning, seen by the driver
        sections[_folder(job.kind)][job.name] = {
            "path": rundir.locate(job.output_relpath),
            "kind": job.kind,
            "metrics": summary,
        }
    return sections
