"""The pipeline: stages in order, each skipped when the manifest says it is done.

A stage is complete when the manifest records it with the fingerprint of the
config sections it reads. Re-running a complete stage needs ``--force``;
re-running a stage with changed inputs without ``--force`` is refused (the
message lists what changed), and redoing a stage forgets the completion of
every later stage, which read its artifacts.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from psoups_ray import progress
from psoups_ray.config import PsoupsConfig
from psoups_ray.errors import ConfigError, PsoupsError
from psoups_ray.manifest import STAGE_ORDER, Manifest, diff_keys
from psoups_ray.progress import log
from psoups_ray.rundir import RunDir


def _run_base(config: PsoupsConfig, rundir: RunDir) -> dict[str, Any]:
    from psoups_ray.base.stage import run_base_stage

    return run_base_stage(config, rundir)


def _check_base(config: PsoupsConfig) -> None:
    from psoups_ray.base.stage import check_base_config

    check_base_config(config)


def _check_policies(config: PsoupsConfig) -> None:
    from psoups_ray.errors import ConfigError
    from psoups_ray.judges.text import text_judge_problems

    if config.uses_text_judge:  # each run measures its text judge win rate at the end
        problems = text_judge_problems("policies (text judge win rates)")
        if problems:
            raise ConfigError(problems)


def _run_feedback(config: PsoupsConfig, rundir: RunDir) -> dict[str, Any]:
    from psoups_ray.feedback import run_feedback_stage

    return run_feedback_stage(config, rundir)


def _check_feedback(config: PsoupsConfig) -> None:
    from psoups_ray.feedback import check_feedback_config

    check_feedback_config(config)


def _run_rewards(config: PsoupsConfig, rundir: RunDir) -> dict[str, Any]:
    from psoups_ray.rewards import run_rewards_stage

    return run_rewards_stage(config, rundir)


def _run_policies(config: PsoupsConfig, rundir: RunDir) -> dict[str, Any]:
    from psoups_ray.policies.stage import run_policies_stage

    return run_policies_stage(config, rundir)


def _run_tune(config: PsoupsConfig, rundir: RunDir) -> dict[str, Any]:
    from psoups_ray.tune.stage import run_tune_stage

    return run_tune_stage(config, rundir)


def _run_evaluate(config: PsoupsConfig, rundir: RunDir) -> dict[str, Any]:
    from psoups_ray.evaluate import run_evaluate_stage

    return run_evaluate_stage(config, rundir)


def _check_evaluate(config: PsoupsConfig) -> None:
    from psoups_ray.evaluate.stage import check_evaluate_config

    check_evaluate_config(config)


def _run_report(config: PsoupsConfig, rundir: RunDir) -> dict[str, Any]:
    from psoups_ray.report import build_report

    return build_report(rundir)


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    needs: tuple[str, ...]  # stages whose artifacts this one reads
    inputs: tuple[str, ...]  # top-level config keys it reads (its fingerprint)
    run: Callable[[PsoupsConfig, RunDir], dict[str, Any]]
    uses_ray: bool = True
    check: Callable[[PsoupsConfig], None] | None = None  # preflight, before any stage runs
    extra_sections: tuple[str, ...] = ()  # other manifest sections it writes (run returns
    # {section: content} for its own name and each of these)


STAGES: tuple[Stage, ...] = (
    Stage(
        "base",
        "tokenizer + SFT'd base model (tiny) or a validated model reference",
        (),
        ("seed", "world", "base", "preferences"),
        _run_base,
        check=_check_base,
    ),
    Stage(
        "feedback",
        "pairwise preference data per pole",
        ("base",),
        ("seed", "world", "preferences", "feedback"),
        _run_feedback,
        check=_check_feedback,
    ),
    Stage(
        "rewards",
        "one Bradley-Terry reward model per pole, in parallel",
        ("feedback",),
        ("seed", "preferences", "rewards"),
        _run_rewards,
    ),
    Stage(
        "policies",
        "one PPO LoRA policy per pole, in parallel, plus baselines",
        ("rewards",),
        ("seed", "preferences", "policies"),
        _run_policies,
        check=_check_policies,
        extra_sections=("baselines",),
    ),
    Stage(
        "tune",
        "Ray Tune search of soup weights per combination, and Pareto fronts",
        ("policies",),
        ("seed", "preferences", "tune"),
        _run_tune,
        extra_sections=("tuned_weights",),
    ),
    Stage(
        "evaluate",
        "win rates of P-Soups against the baselines, by judge",
        ("tune",),
        ("seed", "preferences", "evaluate"),
        _run_evaluate,
        check=_check_evaluate,
        extra_sections=("evaluation",),
    ),
    Stage(
        "report",
        "report.md and plots",
        ("evaluate",),
        (),
        _run_report,
        uses_ray=False,
    ),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
assert STAGE_NAMES == STAGE_ORDER, "the manifest's stage order is the pipeline's"
_BY_NAME = {stage.name: stage for stage in STAGES}


def preflight_problems(config: PsoupsConfig) -> list[str]:
    """What every stage's preflight check finds (files, environment), without running."""
    problems: list[str] = []
    for stage in STAGES:
        if stage.check is None:
            continue
        try:
            stage.check(config)
        except ConfigError as exc:
            problems.extend(exc.problems)
        except PsoupsError as exc:
            problems.append(str(exc))
    return problems


def describe_plan(config: PsoupsConfig) -> list[str]:
    """What ``psoups run`` would do with ``config``: runs per stage and their resources."""
    from psoups_ray.judges.attributes import attribute_judge

    space = config.space
    combinations = config.tune.combinations or [str(c) for c in space.full_combinations()]

    def scale(spec) -> str:
        unit = f"{spec.gpus_per_worker:g} GPU" if spec.use_gpu else f"{spec.cpus_per_worker:g} CPU"
        return f"{spec.num_workers} worker(s) x {unit}"

    base = config.base
    rewards, policies, tune, evaluate = (
        config.rewards,
        config.policies,
        config.tune,
        config.evaluate,
    )
    deepspeed = rewards.deepspeed
    runs = len(space.pole_ids) if rewards.mode == "per_pole" else 1
    lines = [
        f"base: {base.model} ({base.dtype})"
        + (f", SFT {base.sft.steps} steps on {scale(base.sft.resources)}" if base.is_tiny else ""),
        f"preferences: {len(space.dimensions)} dimensions, poles {', '.join(space.pole_ids)}; "
        f"{len(combinations)} combinations",
        f"feedback: source {config.feedback.source}, judge {config.feedback.judge}",
        f"rewards: {runs} Ray Train run(s) ({rewards.mode}), {rewards.steps} steps each on "
        f"{scale(rewards.resources)}"
        + (f", DeepSpeed ZeRO-{deepspeed.stage}" if deepspeed.enabled else ""),
        f"policies: {len(space.pole_ids)} PPO runs + baselines "
        f"{', '.join(policies.baselines) or 'none'}, {policies.steps} steps x "
        f"{policies.rollout_batch_size} rollouts each on {scale(policies.resources)}",
        f"tune: {tune.search} search, {tune.num_samples if tune.search == 'optuna' else 'grid'} "
        f"trials per combination, {tune.max_concurrent_trials} evaluator(s) of "
        + (
            f"{tune.resources.gpus:g} GPU"
            if tune.resources.use_gpu
            else f"{tune.resources.cpus:g} CPU"
        ),  # fmt: skip
        f"evaluate: {', '.join(evaluate.systems)} on {evaluate.num_prompts} prompts; judges "
        "reward"
        + (", attributes" if attribute_judge(config) is not None else "")
        + (", text" if evaluate.text_judge else "")
        + (f", llm ({evaluate.llm_judge.model})" if evaluate.llm_judge else ""),
    ]
    return lines


def parse_stages(text: str | None) -> list[str] | None:
    """``"base,feedback"`` -> names in pipeline order; None/empty -> None (all stages)."""
    if text is None or not text.strip():
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in _BY_NAME]
    if unknown:
        raise PsoupsError(
            f"unknown stage(s) {', '.join(unknown)}; stages are: {', '.join(STAGE_NAMES)}"
        )
    return [name for name in STAGE_NAMES if name in names]


def _prerequisites(name: str) -> list[str]:
    ordered: list[str] = []
    for need in _BY_NAME[name].needs:
        for prerequisite in [*_prerequisites(need), need]:
            if prerequisite not in ordered:
                ordered.append(prerequisite)
    return ordered


def _inputs(config: PsoupsConfig, stage: Stage) -> dict[str, Any]:
    dumped = config.model_dump(mode="json")
    return {key: dumped[key] for key in stage.inputs}


def run_pipeline(
    config: PsoupsConfig,
    out: str,
    stages: Sequence[str] | None = None,
    force: bool = False,
    run_prerequisites: bool = True,
) -> Manifest:
    """Run ``stages`` (default: all) in pipeline order and return the final manifest.

    Missing prerequisites are run first when ``run_prerequisites``, else refused.
    ``force`` redoes the requested stages even when complete (not their prerequisites).
    """
    rundir = RunDir(out)
    manifest = Manifest.open(rundir, config.model_dump(mode="json"), config.space.to_dict())
    requested = list(stages) if stages else list(STAGE_NAMES)
    plan: list[str] = []
    for name in requested:
        for prerequisite in _prerequisites(name):
            if prerequisite not in plan and not manifest.is_complete(prerequisite):
                if not run_prerequisites:
                    raise PsoupsError(
                        f"stage {name!r} needs stage {prerequisite!r}, which is not complete in "
                        f"{rundir.location}; run `psoups run --stages {name} --out "
                        f"{rundir.location}` to run missing stages first"
                    )
                plan.append(prerequisite)
        if name not in plan:
            plan.append(name)
    plan = [name for name in STAGE_NAMES if name in plan]

    for name in plan:  # everything checkable is checked before any work starts
        stage = _BY_NAME[name]
        will_run = not manifest.is_complete(name) or (force and name in requested)
        if will_run and stage.check is not None:
            stage.check(config)
    log(f"run directory: {rundir.location}")
    log(f"stages: {' -> '.join(plan)}")
    for index, name in enumerate(plan, start=1):
        stage = _BY_NAME[name]
        prefix = f"[{index}/{len(plan)}] {name}"
        inputs = _inputs(config, stage)
        fingerprint = config.section_fingerprint(*stage.inputs)
        record = manifest.stage(name)
        forced = force and name in requested
        if manifest.is_complete(name) and not forced:
            if record.get("fingerprint") != fingerprint:
                changes = diff_keys(record.get("inputs", {}), inputs)
                raise PsoupsError(
                    f"stage {name!r} is complete in {rundir.location} but its configuration "
                    f"changed:\n  " + "\n  ".join(changes or ["(inputs differ)"]) + "\nPass "
                    "--force to redo it (later stages are then redone too), or use a new --out"
                )
            log(f"{prefix}: complete, skipped (--force redoes it)")
            continue
        if record and record.get("fingerprint") != fingerprint or forced:
            _discard_train_state(rundir, name)
        dropped = manifest.invalidate(list(STAGE_NAMES[STAGE_NAMES.index(name) + 1 :]))
        if dropped:
            log(f"{prefix}: later stages {', '.join(dropped)} will need to run again")
        if stage.uses_ray:
            from psoups_ray.ray_utils import ensure_ray

            ensure_ray(config.ray)
        log(f"{prefix}: {stage.summary}")
        manifest.start_stage(name, fingerprint, inputs)
        started = time.monotonic()
        progress.start(name, stage.summary)
        try:
            section = stage.run(config, rundir)
        except BaseException as exc:
            manifest.fail_stage(name, "".join(traceback.format_exception_only(exc)).strip())
            raise
        finally:
            progress.finish(name)
        seconds = time.monotonic() - started
        extra = {key: section[key] for key in stage.extra_sections}
        if stage.extra_sections:
            section = section[name]
        manifest.complete_stage(name, section, seconds, extra)
        log(f"{prefix}: done in {seconds:.0f}s")
    return manifest


def _discard_train_state(rundir: RunDir, name: str) -> None:
    """Drop a stage's Ray Train checkpoints so a redo does not resume stale state."""
    relpath = f"ray/{name}"
    if rundir.exists(relpath):
        rundir.delete(relpath)
