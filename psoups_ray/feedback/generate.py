"""The ``generate`` source: sample two responses per prompt from the base, let a judge pick.

For each pole, ``prompts_per_pole`` instructions get the pole's preference prompt appended,
the base samples two responses (two seeds), and a pairwise judge says which better
satisfies the pole. With ``feedback.pairs: contrast`` the second response is sampled with
the other pole of the dimension's preference prompt instead, and the two poles of a
dimension share the samples: every pair is judged for both (half the sampling per pair).

:func:`sample_responses` and :func:`judge_responses` do the work and run
anywhere (:func:`sample_and_judge` chains them); :func:`run_sampling_task` runs the sampling
as one Ray task with ``feedback.resources`` (GPUs for a real model).

The judging runs in the driver, after the sampling task has returned: the task's GPU is not
held through thousands of rate-limited HTTP calls, the judge's API key never has to be
shipped to a worker, and the judge cache is written by the process that writes the manifest.
"""

from __future__ import annotations

import gc
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from psoups_ray import console, progress
from psoups_ray.artifacts import BaseArtifact, PreferenceRow, RunArtifacts
from psoups_ray.config import GenerationSpec, PsoupsConfig, ScalingSpec
from psoups_ray.console import RunLog
from psoups_ray.errors import PsoupsError, StorageError
from psoups_ray.judges import PairToJudge, PairwiseJudge, Verdict
from psoups_ray.judges.attributes import AttributeJudge
from psoups_ray.manifest import MANIFEST_NAME, Manifest
from psoups_ray.progress import log
from psoups_ray.rundir import RunDir, data_kind, local_data
from psoups_ray.seeding import derive_seed
from psoups_ray.world import data_world

MIN_JUDGE_BATCH = 32
"""Pairs judged between two progress lines (at least; more with a concurrent judge)."""

Responses = dict[str, tuple[list[str], list[str]]]
"""``{pole: (responses_a, responses_b)}``, aligned with the pole's prompts."""


@dataclass(frozen=True)
class PoleSampling:
    """What to sample for one pole: its preference prompt and the raw instructions.

    ``contrast_prompt``: the second response's preference prompt (empty: the pole's own,
    two samples of the same query); ``also_judged``: further poles whose labels come from
    the same pairs (the other pole of a two-pole dimension under ``pairs: contrast``).
    """

    pole: str
    preference_prompt: str
    prompts: tuple[str, ...]
    contrast_prompt: str | None = None
    also_judged: tuple[str, ...] = ()

    @property
    def judged_poles(self) -> tuple[str, ...]:
        return (self.pole, *self.also_judged)


@dataclass(frozen=True)
class SamplingJob:
    """Everything the sampling task needs; built on the driver, shipped to the Ray task."""

    base: BaseArtifact
    poles: tuple[PoleSampling, ...]
    generation: GenerationSpec
    seed: int
    use_gpu: bool = False
    held_out: tuple[str, ...] = ()  # feedback.eval_prompts_file's prompts (the eval split)


@dataclass(frozen=True)
class Label:
    """One judged pair: two responses to ``prompt`` for ``pole`` and the judge's verdict."""

    prompt: str
    pole: str
    response_a: str
    response_b: str
    verdict: Verdict
    skipped: str | None = None  # why the judge was not asked (empty or identical responses)

    def to_row(self) -> PreferenceRow:
        """The preference pair (not for a tie)."""
        if self.verdict == "tie":
            raise ValueError("a tie is not a preference pair")
        chosen, rejected = (
            (self.response_a, self.response_b)
            if self.verdict == "a"
            else (self.response_b, self.response_a)
        )
        return PreferenceRow(self.prompt, self.pole, chosen, rejected)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        if record["skipped"] is None:
            del record["skipped"]
        return record


# --- prompts (driver side) ---------------------------------------------------------------------


BUILTIN_PREFIX = "builtin:"


def read_prompts_file(path: str, key: str = "feedback.prompts_file") -> list[str]:
    """Instructions from a text file (one per line), JSONL with a ``prompt`` field, or
    ``builtin:<split>`` (the package's own instruction sets, :mod:`psoups_ray.data`)."""
    if path.startswith(BUILTIN_PREFIX):
        from psoups_ray.data import load_prompts

        try:
            return load_prompts(path[len(BUILTIN_PREFIX) :])
        except PsoupsError as exc:
            raise PsoupsError(f"{key}: {exc}") from None
    if data_kind(path) != "file":
        raise PsoupsError(f"{key}: {path} does not exist")
    try:
        with local_data(path) as file:
            text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError, StorageError) as exc:
        raise PsoupsError(f"{key}: cannot read {path} as UTF-8 text ({exc})") from None
    prompts: list[str] = []
    is_jsonl = file.suffix.lower() in (".jsonl", ".json")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if not is_jsonl:
            prompts.append(line.strip())
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PsoupsError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
        value = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise PsoupsError(
                f"{path}: line {number}: field 'prompt' must be a non-empty string, "
                f"got {value!r:.60}"
            )
        prompts.append(value.strip())
    if not prompts:
        raise PsoupsError(f"{key}: {path} holds no prompts")
    return prompts


def sample_prompts(pool: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` prompts from ``pool``: distinct while the pool lasts, then it is reshuffled."""
    distinct = list(dict.fromkeys(pool))
    rng = random.Random(seed)
    if n <= len(distinct):
        return rng.sample(distinct, n)
    chosen: list[str] = []
    while len(chosen) < n:
        chosen.extend(rng.sample(distinct, len(distinct)))
    return chosen[:n]


def _prompt_pool(config: PsoupsConfig) -> list[str]:
    if config.feedback.prompts_file:
        return read_prompts_file(config.feedback.prompts_file)
    world = data_world(config)
    if world is not None:
        return list(world.train_prompts)
    raise PsoupsError(
        "feedback.source 'generate' with a real base model needs feedback.prompts_file "
        "(a .txt with one instruction per line, or JSONL with a 'prompt' field)"
    )


def held_out_prompts(config: PsoupsConfig, pool: Sequence[str]) -> list[str]:
    """``feedback.eval_prompts_file``'s instructions (none when it is not set); an
    instruction also in the training ``pool`` is an error (it would not be held out)."""
    feedback = config.feedback
    if not feedback.eval_prompts_file:
        return []
    held_out = read_prompts_file(feedback.eval_prompts_file, "feedback.eval_prompts_file")
    shared = set(held_out) & set(pool)
    if shared:
        raise PsoupsError(
            f"feedback.eval_prompts_file: {len(shared)} instruction(s) are also in the training "
            f"prompts (e.g. {sorted(shared)[0]!r:.80}); held-out prompts must not be trained on"
        )
    return held_out


def eval_pairs_per_pole(config: PsoupsConfig) -> int:
    """Pairs per pole sampled on the held-out prompts: ``eval_fraction`` of them, at least 2."""
    feedback = config.feedback
    return max(2, round(feedback.prompts_per_pole * feedback.eval_fraction))


def build_sampling_job(config: PsoupsConfig, rundir: RunDir) -> SamplingJob:
    """The sampling job for ``config``, with the base model recorded in the run's manifest."""
    if not rundir.exists(MANIFEST_NAME):
        raise PsoupsError(
            f"feedback.source 'generate' samples from the base model, but {rundir.location} "
            "has no run yet; run the base stage first"
        )
    base = RunArtifacts(rundir, Manifest.load(rundir).data).base
    pool = _prompt_pool(config)
    space = config.space
    feedback = config.feedback
    held_out = held_out_prompts(config, pool)
    n_eval = eval_pairs_per_pole(config) if held_out else 0

    def prompts_for(pole_id: str) -> tuple[str, ...]:
        n_train = feedback.prompts_per_pole - n_eval
        train = sample_prompts(pool, n_train, derive_seed(config.seed, "prompts", pole_id))
        held = sample_prompts(held_out, n_eval, derive_seed(config.seed, "eval-prompts", pole_id))
        return tuple(train + held)

    if feedback.pairs == "contrast":
        poles = contrast_samplings(config, prompts_for)
    else:
        poles = tuple(
            PoleSampling(pole_id, space.pole(pole_id).prompt, prompts_for(pole_id))
            for pole_id in space.pole_ids
        )
    return SamplingJob(
        base=base,
        poles=poles,
        generation=feedback.generation,
        seed=config.seed,
        use_gpu=feedback.resources.use_gpu,
        held_out=tuple(held_out),
    )


def contrast_samplings(
    config: PsoupsConfig, prompts_for: Callable[[str], tuple[str, ...]]
) -> tuple[PoleSampling, ...]:
    """``pairs: contrast``: per dimension, each pole's query against the next pole's (the
    last pole's against the first's); a two-pole dimension samples once for both poles."""
    space = config.space
    samplings = []
    for dimension in space.dimensions:
        poles = list(dimension.poles)
        if len(poles) == 1:
            raise PsoupsError(
                f"feedback.pairs 'contrast' needs two poles per dimension; {dimension.id} has one"
            )
        shared = len(poles) == 2
        for index, pole in enumerate(poles[:1] if shared else poles):
            other = poles[(index + 1) % len(poles)]
            samplings.append(
                PoleSampling(
                    pole=pole.id,
                    preference_prompt=pole.prompt,
                    prompts=prompts_for(pole.id),
                    contrast_prompt=other.prompt,
                    also_judged=(other.id,) if shared else (),
                )
            )
    return tuple(samplings)


# --- sampling (runs in the Ray task) ----------------------------------------------------------


def sample_responses(job: SamplingJob) -> Responses:
    """Two sampled responses per (pole, prompt) from the base; the model is freed after."""
    import torch

    from psoups_ray.prompting import format_prompt
    from psoups_ray.runtime.loading import load_base_model, load_base_tokenizer
    from psoups_ray.runtime.sampling import Sampler, sample_texts

    tokenizer = load_base_tokenizer(job.base)
    model = load_base_model(job.base, device="auto" if job.use_gpu else "cpu")
    sampler = Sampler(model, tokenizer)
    responses: Responses = {}
    for sampling in job.poles:
        queries = {
            "a": sampling.preference_prompt,
            "b": sampling.contrast_prompt or sampling.preference_prompt,
        }
        samples = []
        for which, preference_prompt in queries.items():
            formatted = [
                format_prompt(tokenizer, prompt, preference_prompt) for prompt in sampling.prompts
            ]
            seed = derive_seed(job.seed, "generate", sampling.pole, which)
            on_sampled = _sampling_progress(sampling.pole, which)
            samples.append(sample_texts(sampler, formatted, job.generation, seed, on_sampled))
            progress.finish(f"feedback {sampling.pole} {which}")
        responses[sampling.pole] = (samples[0], samples[1])
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return responses


def _sampling_progress(pole: str, which: str) -> Callable[[int, int], None]:
    def on_sampled(done: int, total: int) -> None:
        progress.update(f"feedback {pole} {which}", done, total, "response", "sampling")

    return on_sampled


# --- judging (driver) ----------------------------------------------------------------------------


def make_judge(config: PsoupsConfig, rundir: RunDir) -> PairwiseJudge:
    """The configured judge; the LLM judge caches its answers in the run directory."""
    feedback = config.feedback
    if feedback.judge == "checkers":
        return AttributeJudge()
    if feedback.judge == "openai":
        from psoups_ray.judges.openai import JudgeCache, OpenAIJudge, judge_criteria

        criteria = judge_criteria(feedback.openai, config.space)
        return OpenAIJudge(feedback.openai, criteria, seed=config.seed, cache=JudgeCache(rundir))
    if feedback.judge == "text":
        from psoups_ray.judges.text import TextJudge

        return TextJudge()
    raise PsoupsError(f"feedback.judge {feedback.judge!r} is not one of checkers, openai, text")


def judge_responses(
    poles: Sequence[PoleSampling],
    responses: Mapping[str, tuple[Sequence[str], Sequence[str]]],
    judge: PairwiseJudge,
    batch_size: int = MIN_JUDGE_BATCH,
) -> list[Label]:
    """One label per (judged pole, prompt), in order; pairs with an empty or identical
    response are ties without asking the judge."""
    return [
        label
        for sampling in poles
        for pole in sampling.judged_poles
        for label in _judge_pole(judge, pole, sampling, *responses[sampling.pole], batch_size)
    ]


def sample_and_judge(
    job: SamplingJob, judge: PairwiseJudge, batch_size: int = MIN_JUDGE_BATCH
) -> list[Label]:
    """Sampling and judging in this process (no Ray)."""
    return judge_responses(job.poles, sample_responses(job), judge, batch_size)


def _skip_reason(a: str, b: str) -> str | None:
    if not a.strip() or not b.strip():
        return "empty response"
    if a.strip() == b.strip():
        return "identical responses"
    return None


def _judge_pole(
    judge: PairwiseJudge,
    pole: str,
    sampling: PoleSampling,
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    batch_size: int,
) -> list[Label]:
    """Judge ``sampling``'s pairs for ``pole`` in batches, a progress line per batch."""
    triples = list(zip(sampling.prompts, responses_a, responses_b, strict=True))
    skipped = [_skip_reason(a, b) for _, a, b in triples]
    to_judge = [index for index, reason in enumerate(skipped) if reason is None]
    verdicts: dict[int, Verdict] = {}
    for start in range(0, len(to_judge), batch_size):
        batch = to_judge[start : start + batch_size]
        pairs = [PairToJudge(*triples[index]) for index in batch]
        verdicts.update(zip(batch, judge.compare_batch(pole, pairs), strict=True))
        progress.update(f"feedback {pole}", start + len(batch), len(to_judge), "pair", "judging")
    progress.finish(f"feedback {pole}")
    return [
        Label(prompt, pole, a, b, verdicts.get(index, "tie"), skipped[index])
        for index, (prompt, a, b) in enumerate(triples)
    ]


# --- the Ray edge ------------------------------------------------------------------------------


def run_sampling_task(job: SamplingJob, resources: ScalingSpec) -> Responses:
    """Run :func:`sample_responses` as one Ray task (in this process when Ray is not up)."""
    import ray

    if not ray.is_initialized():
        log("feedback: Ray is not initialised; sampling in this process")
        return sample_responses(job)
    task = ray.remote(_sample_responses_logged).options(
        num_cpus=resources.cpus_per_worker,
        num_gpus=resources.gpus_per_worker if resources.use_gpu else 0,
        max_retries=resources.max_failures,
    )
    output = console.run_log("feedback", "sampling")
    try:
        return ray.get(task.remote(job, output))
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, PsoupsError):
            raise PsoupsError(f"{exc.cause}{console.log_tail(output)}") from None
        raise PsoupsError(
            f"the feedback sampling task failed: {exc.cause!r}{console.log_tail(output)}"
        ) from exc


def _sample_responses_logged(job: SamplingJob, output: RunLog | None) -> Responses:
    with console.worker_output(output):
        return sample_responses(job)
