"""The optional LLM judge of the evaluate stage: criterion by criterion, as in the paper.

For each (P-Soups variant, opponent, combination, prompt) the judge is asked one question
per pole of the combination: which response better satisfies that pole's criterion
(``evaluate.llm_judge.criteria[pole]``, else the pole's preference prompt). The order of
the two responses is drawn per question (position bias cancels), ties are allowed and an
unparseable answer counts as a tie. The pair's outcome on a prompt is the mean over the
criteria of 1 (soup better), 0.5 (tie), 0 (opponent better). Answers are cached in the
run directory, so a re-run pays only for new questions; the key is read from the
environment and written nowhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from psoups_ray.config import PsoupsConfig
from psoups_ray.feedback.judges import PairToJudge
from psoups_ray.feedback.openai_judge import JudgeCache, OpenAIJudge, judge_criteria
from psoups_ray.progress import log
from psoups_ray.rundir import RunDir

LLM_CACHE_PATH = "evaluation/llm_judge_cache.jsonl"
_POINTS = {"a": 1.0, "tie": 0.5, "b": 0.0}


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
    outcomes: dict[tuple[str, str], np.ndarray] = {}
    judge = OpenAIJudge(spec.llm_judge, criteria, seed=config.seed, cache=cache)
    try:
        for soup, other in pairs:
            rows = []
            for poles in combinations:
                key = "+".join(poles)
                mine, theirs = responses[key][soup].texts, responses[key][other].texts
                points = np.zeros((len(poles), len(judged)))  # (criteria, prompts)
                for row, pole in enumerate(poles):
                    questions_now = [
                        PairToJudge(prompt, a, b)
                        for prompt, a, b in zip(judged, mine, theirs, strict=False)
                    ]
                    verdicts = judge.compare_batch(pole, questions_now)
                    points[row] = [_POINTS[verdict] for verdict in verdicts]
                rows.append(points.mean(axis=0))
            outcomes[soup, other] = np.array(rows)  # (combinations, judged prompts)
            log(f"evaluate: LLM judge done for {soup} vs {other}")
        described = judge.describe()
    finally:
        judge.close()
    described["num_prompts"] = len(judged)
    return outcomes, described
