"""The evaluate stage's pairwise judges: criterion by criterion, as in the paper.

For each (P-Soups variant, opponent, combination, prompt) a judge answers one question per
pole of the combination: which response better satisfies that pole. The pair's outcome on
a prompt is the mean over the criteria of 1 (soup better), 0.5 (tie), 0 (opponent better)
(:func:`criterion_outcomes`, for any :class:`~psoups_ray.judges.PairwiseJudge`).

- ``llm`` (:func:`llm_outcomes`): an LLM asked about the criterion
  ``evaluate.llm_judge.criteria[pole]``, else the pole's preference prompt. The judge draws
  the order of the two responses per question (position bias cancels), ties are allowed
  and an unparseable answer counts as a tie. Answers are cached in the run directory, so a
  re-run pays only for new questions; the key is read from the environment and written
  nowhere.
- ``text`` (:func:`text_judgements`): the programmatic text judges
  (:mod:`psoups_ray.judges.text`), deterministic, so no order to draw. They also
  give each system's per-pole success against ``base``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from psoups_ray.config import PsoupsConfig
from psoups_ray.judges import PairToJudge, PairwiseJudge
from psoups_ray.judges.openai import JudgeCache, OpenAIJudge, judge_criteria
from psoups_ray.progress import log
from psoups_ray.rundir import RunDir

LLM_CACHE_PATH = "evaluation/llm_judge_cache.jsonl"
_POINTS = {"a": 1.0, "tie": 0.5, "b": 0.0}


def pole_points(
    judge: PairwiseJudge,
    pole: str,
    prompts: Sequence[str],
    mine: Sequence[str],
    theirs: Sequence[str],
) -> np.ndarray:
    """Per prompt, 1 / 0.5 / 0 when the judge finds ``mine`` better / tied / worse for
    ``pole``: (prompts,). Texts beyond ``len(prompts)`` are not judged."""
    questions = [
        PairToJudge(prompt, a, b) for prompt, a, b in zip(prompts, mine, theirs, strict=False)
    ]
    return np.array([_POINTS[verdict] for verdict in judge.compare_batch(pole, questions)])


def criterion_outcomes(
    judge: PairwiseJudge,
    name: str,
    combinations: Sequence[tuple[str, ...]],
    prompts: Sequence[str],
    responses: Mapping[str, Mapping[str, Any]],
    pairs: Sequence[tuple[str, str]],
) -> dict[tuple[str, str], np.ndarray]:
    """``{(soup, opponent): outcomes (combinations, prompts)}``: per prompt, the mean over
    the combination's poles of :func:`pole_points`. ``responses[key][system].texts`` are
    the system's answers for the combination ``key``; ``name`` labels the progress log."""
    outcomes: dict[tuple[str, str], np.ndarray] = {}
    for soup, other in pairs:
        rows = []
        for poles in combinations:
            key = "+".join(poles)
            mine, theirs = responses[key][soup].texts, responses[key][other].texts
            points = [pole_points(judge, pole, prompts, mine, theirs) for pole in poles]
            rows.append(np.mean(points, axis=0))  # (criteria, prompts) -> (prompts,)
        outcomes[soup, other] = np.array(rows)  # (combinations, prompts)
        log(f"evaluate: {name} judge done for {soup} vs {other}")
    return outcomes


def llm_outcomes(
    config: PsoupsConfig,
    rundir: RunDir,
    combinations: list[tuple[str, ...]],
    prompts: list[str],
    responses: dict[str, dict[str, Any]],
    pairs: list[tuple[str, str]],
) -> tuple[dict[tuple[str, str], np.ndarray], dict[str, Any]]:
    """``{(soup, opponent): outcomes (combinations, judged prompts)}`` and what the
    manifest records about the judge."""
    spec = config.evaluate
    assert spec.llm_judge is not None
    judged = prompts[: spec.llm_judge_prompts or len(prompts)]
    criteria = judge_criteria(spec.llm_judge, config.space)
    questions = len(pairs) * sum(len(poles) for poles in combinations) * len(judged)
    log(f"evaluate: asking the LLM judge {spec.llm_judge.model} {questions} questions "
        f"({len(judged)} prompts, one per criterion)")  # fmt: skip
    cache = JudgeCache(rundir, LLM_CACHE_PATH)
    judge = OpenAIJudge(spec.llm_judge, criteria, seed=config.seed, cache=cache)
    try:
        outcomes = criterion_outcomes(judge, "LLM", combinations, judged, responses, pairs)
        described = judge.describe()
    finally:
        judge.close()
    described["num_prompts"] = len(judged)
    return outcomes, described


def text_judgements(
    combinations: list[tuple[str, ...]],
    prompts: list[str],
    responses: dict[str, dict[str, Any]],
    pairs: list[tuple[str, str]],
) -> tuple[
    dict[tuple[str, str], np.ndarray], dict[str, dict[str, dict[str, float]]], dict[str, Any]
]:
    """The text judges' outcomes (as :func:`criterion_outcomes`), each system's success
    against ``base`` and what the manifest records about the judge.

    Success: ``{combination key: {system: {pole: share of prompts where the judge prefers
    the system's response to base's for that pole, ties half}}}``; empty without a ``base``
    system. ``base`` against itself ties on every prompt (identical texts): 0.5.
    """
    from psoups_ray.judges.text import TextJudge

    judge = TextJudge()
    log(f"evaluate: text judges on {len(pairs)} pairs x {len(combinations)} combinations x "
        f"{len(prompts)} prompts, one question per criterion")  # fmt: skip
    outcomes = criterion_outcomes(judge, "text", combinations, prompts, responses, pairs)
    success: dict[str, dict[str, dict[str, float]]] = {}
    for poles in combinations:
        key = "+".join(poles)
        if "base" not in responses[key]:
            continue
        base = responses[key]["base"].texts
        success[key] = {
            system: {
                pole: float(pole_points(judge, pole, prompts, answers.texts, base).mean())
                for pole in poles
            }
            for system, answers in responses[key].items()
        }
    if not success:
        log("evaluate: no base system, so no per-system text judge success against base")
    described = judge.describe()
    judge.close()
    described["num_prompts"] = len(prompts)
    return outcomes, success, described
