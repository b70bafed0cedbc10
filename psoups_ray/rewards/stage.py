"""The rewards stage: one reward model per pole (P-Soups) or one for all (P-MORL), on Ray Train.

Every pole's run is launched at once (:func:`psoups_ray.ray_utils.fit_torch_runs`); they
run concurrently as far as the cluster's resources allow and queue otherwise.

Artifacts: ``rewards/<NAME>/adapter/`` (PEFT adapter + score head + tokenizer +
``reward_stats.json``) and ``rewards/<NAME>/metrics.json``, NAME a pole id or ``multitask``.
Manifest: ``rewards.<POLE>.path`` and ``rewards.<POLE>.metrics`` (held-out accuracy, score
statistics, training summary) for every pole.
"""

from __future__ import annotations

from typing import Any

from psoups_ray.artifacts import AdapterArtifact, RunArtifacts
from psoups_ray.config import PsoupsConfig
from psoups_ray.judges.attributes import AttributeJudge, attribute_judge
from psoups_ray.manifest import Manifest
from psoups_ray.ray_utils import TorchRun, fit_torch_runs
from psoups_ray.rewards.train import RewardJob, reward_train_loop
from psoups_ray.rundir import RunDir

MULTITASK = "multitask"


def reward_jobs(config: PsoupsConfig, run: RunArtifacts) -> list[RewardJob]:
    """The runs the configured mode needs: one per pole, or one conditioned multitask run."""
    space = config.space
    base = run.base
    prompts = {pole: space.pole(pole).prompt for pole in space.pole_ids}
    groups = (
        [(pole, (pole,), False) for pole in space.pole_ids]
        if config.rewards.mode == "per_pole"
        else [(MULTITASK, tuple(space.pole_ids), True)]
    )
    return [
        RewardJob(
            run_location=run.location,
            name=name,
            poles=poles,
            conditioned=conditioned,
            preference_prompts=prompts,
            base=base,
            rewards=config.rewards,
            seed=config.seed,
            output_relpath=f"rewards/{name}/adapter",
            metrics_relpath=f"rewards/{name}/metrics.json",
        )
        for name, poles, conditioned in groups
    ]


def run_rewards_stage(config: PsoupsConfig, rundir: RunDir) -> dict[str, Any]:
    """Train the reward models; returns the manifest's ``rewards`` section."""
    jobs = reward_jobs(config, RunArtifacts(rundir, Manifest.load(rundir).data))
    times = fit_torch_runs(
        [
            TorchRun(reward_train_loop, {"job": job}, config.rewards.resources, "rewards", job.name)
            for job in jobs
        ],
        rundir,
        config.ray.max_concurrent_runs,
    )
    section: dict[str, Any] = {}
    for job in jobs:
        metrics = rundir.read_json(job.metrics_relpath)
        train = {k: v for k, v in metrics.items() if k != "eval"}
        train["ray_run"] = times[job.name]  # launch to fit() returning, seen by the driver
        for pole in job.poles:
            section[pole] = {
                "path": rundir.locate(job.output_relpath),
                "mode": config.rewards.mode,
                "conditioned": job.conditioned,
                "metrics": {**metrics["eval"][pole], "train": train},
            }
    judge = attribute_judge(config)
    if judge is not None:
        correlations = checker_agreement(config, rundir, section, judge)
        for pole, value in correlations.items():
            section[pole]["metrics"]["checker_correlation_on_base_samples"] = value
    return section


def checker_agreement(
    config: PsoupsConfig, rundir: RunDir, rewards: dict[str, Any], judge: AttributeJudge
) -> dict[str, float | None]:
    """Per pole: Pearson correlation between the reward and the attribute judge's verdict
    (1 if the text shows the pole, else 0) on the base model's held-out samples."""
    import json

    import torch

    from psoups_ray.progress import log
    from psoups_ray.rewards.scorer import RewardScorer

    artifacts = RunArtifacts(rundir, Manifest.load(rundir).data)
    samples_path = rundir.relpath_of(artifacts.data["base"].get("samples_path", ""))
    if samples_path is None or not rundir.exists(samples_path):
        return {}
    samples = [json.loads(line) for line in rundir.read_text(samples_path).splitlines() if line]
    space = config.space
    adapters = {
        pole: AdapterArtifact(pole, "reward", rundir.resolve(record["path"]))
        for pole, record in rewards.items()
    }
    scorer = RewardScorer(
        artifacts.base,
        adapters,
        {pole: space.pole(pole).prompt for pole in space.pole_ids},
        config.rewards.max_length,
    )
    prompts = [s["prompt"] for s in samples]
    responses = [s["response"] for s in samples]
    found = [judge.shown(text) for text in responses]
    result: dict[str, float | None] = {}
    for pole in rewards:
        shows = torch.tensor([pole in poles for poles in found], dtype=torch.float)
        if shows.std() == 0:  # the checker never (or always) sees the pole: undefined
            result[pole] = None
            continue
        scores = scorer.score(pole, prompts, responses)
        result[pole] = round(float(torch.corrcoef(torch.stack([scores, shows]))[0, 1]), 4)
    text = ", ".join(f"{p} {v:.2f}" if v is not None else f"{p} n/a" for p, v in result.items())
    log(f"rewards: correlation of reward and attribute checker on base samples: {text}")
    return result
