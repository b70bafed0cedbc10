"""The evaluate stage: every system answers the held-out prompts for every combination;
judges compare each P-Soups variant with every other system, prompt by prompt.

Systems (``evaluate.systems``), each a :class:`~psoups_ray.runtime.queries.SoupQuery` on
one loaded base (the baselines' adapters are mixed in like the poles', so weight 1 on a
baseline alone is that baseline's policy):

===============  ==============================  ===================================
system           weights                         preference prompt
===============  ==============================  ===================================
base             none                            none
base+prompt      none                            the combination's
rlhf             ``rlhf`` 1                      none (trained unprompted)
pmorl            ``pmorl`` 1                     the combination's
psoups-uniform   1/N on the combination's poles  the combination's if policies.prompted
psoups-tuned     the tuned weights               the combination's if policies.prompted
===============  ==============================  ===================================

``base`` and ``rlhf`` do not depend on the combination: they answer once and are scored
for every combination. Judges: ``reward`` (mean normalised reward of the combination's
poles; a tie under ``evaluate.reward_tie_threshold``), ``attributes`` (where the run's
world has an attribute judge, as the tiny world does: share of the combination's poles
its checkers find) and optionally ``llm`` and ``text``
(criterion by criterion, see :mod:`psoups_ray.evaluate.llm`). With the text judges each
system's metrics also hold ``text_success`` (per pole, the share of prompts where the text
judge prefers its response to ``base``'s, ties half; ``base`` itself scores 0.5) and
``text_success_mean`` (over the combination's poles).

Artifacts: ``evaluation/samples.jsonl`` (every response with its scores),
``evaluation/win_rates.csv``, ``evaluation/metrics.csv``, ``evaluation/summary.json``.
Manifest: ``evaluate`` (how it ran) and ``evaluation`` (the results).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from psoups_ray import progress
from psoups_ray.artifacts import PROMPTS_FILES, RunArtifacts
from psoups_ray.config import SOUP_SYSTEMS, GenerationSpec, PsoupsConfig
from psoups_ray.errors import PsoupsError
from psoups_ray.evaluate.winrates import reward_outcome, share_outcome, win_rates
from psoups_ray.manifest import Manifest
from psoups_ray.preferences import PreferenceSpace
from psoups_ray.progress import log
from psoups_ray.rundir import RunDir
from psoups_ray.runtime.pool import start_evaluators
from psoups_ray.runtime.queries import SoupModels, SoupQuery
from psoups_ray.runtime.sampling import row_seed
from psoups_ray.seeding import derive_seed

UNPROMPTED_SYSTEMS = ("base", "rlhf")  # the same responses for every combination
BASELINE_ADAPTERS = ("rlhf", "pmorl")
SAMPLES_PATH = "evaluation/samples.jsonl"
PROMPTS_PATH = PROMPTS_FILES["evaluation"]
WIN_RATES_PATH = "evaluation/win_rates.csv"
METRICS_PATH = "evaluation/metrics.csv"
SUMMARY_PATH = "evaluation/summary.json"
PER_POLE_METRICS = {"rewards": "reward", "text_success": "text_success"}
"""System metrics that hold ``{pole: value}``, and their ``metrics.csv`` column prefix."""


@dataclass
class Responses:
    """One system's answers for one combination: ``(prompts,)`` lists."""

    texts: list[str]
    rewards: dict[str, list[float]]  # pole -> normalised reward per response
    shown: list[set[str]] | None  # the poles the attribute judge finds, per response
    requests: list[dict[str, Any]] = field(default_factory=list)  # per response: the body
    # that, POSTed to `psoups serve` on this run, returns the same text (served_request)

    def reward_scores(self, poles: tuple[str, ...]) -> np.ndarray:
        """Mean normalised reward of ``poles`` per response: (prompts,)."""
        return np.mean([self.rewards[pole] for pole in poles], axis=0)

    def pole_shares(self, poles: tuple[str, ...]) -> np.ndarray:
        """Share of ``poles`` each response exhibits: (prompts,)."""
        assert self.shown is not None
        return np.array([len(set(poles) & shown) / len(poles) for shown in self.shown])


def served_request(
    query: SoupQuery, prompt: str, seed: int, spec: GenerationSpec, poles: Sequence[str]
) -> dict[str, Any]:
    """The OpenAI-style chat request that makes ``psoups serve`` on the same run answer
    ``prompt`` as the soup evaluator did: the same soup (``weights`` over ``poles``, a
    baseline by name, or the base), user message, seed and sampling settings."""
    from psoups_ray.prompting import user_message

    weights = {name: float(w) for name, w in query.weights.items() if w}
    body: dict[str, Any] = {"model": "psoups:base"}
    if weights and set(weights) <= set(poles):
        body = {"model": "psoups", "weights": weights}
    elif len(weights) == 1:  # a baseline's policy, whole
        body = {"model": f"psoups:{next(iter(weights))}"}
    elif weights:
        raise PsoupsError(f"no served soup for the weights {weights}")
    return {
        **body,
        "messages": [{"role": "user", "content": user_message(prompt, query.preference_prompt)}],
        "seed": seed,
        "temperature": spec.temperature,
        "top_p": spec.top_p,
        "top_k": spec.top_k,
        "max_tokens": spec.max_new_tokens,
    }


def check_evaluate_config(config: PsoupsConfig) -> None:
    """Every problem with the ``evaluate`` section, before any stage runs."""
    from psoups_ray.errors import ConfigError
    from psoups_ray.judges.openai import openai_judge_problems

    spec = config.evaluate
    problems = [
        f"evaluate.systems: {name!r} needs the {name} baseline policy; add it to "
        f"policies.baselines (now {config.policies.baselines}) or drop it from evaluate.systems"
        for name in BASELINE_ADAPTERS
        if name in spec.systems and name not in config.policies.baselines
    ]
    if spec.text_judge:
        from psoups_ray.judges.text import text_judge_problems

        problems += text_judge_problems("evaluate.text_judge")
    if spec.llm_judge is not None:
        problems += openai_judge_problems(
            spec.llm_judge, "evaluate.llm_judge", config.space.pole_ids
        )
    if problems:
        raise ConfigError(problems)


def evaluation_prompts(config: PsoupsConfig, run: RunArtifacts):
    """The last ``evaluate.num_prompts`` held-out prompts, and how many of them the tune
    trials used (they picked the tuned weights, so overlap flatters ``psoups-tuned``)."""
    prompts = run.prompts("held_out")
    if not prompts:
        raise PsoupsError("the feedback stage left no held-out prompts to evaluate on")
    wanted = config.evaluate.num_prompts
    chosen = prompts[-wanted:]
    if len(chosen) < wanted:
        log(f"evaluate: only {len(chosen)} held-out prompts (evaluate.num_prompts is {wanted})")
    overlap = len(set(run.prompts("tune_trials")) & set(chosen))
    if overlap:
        log(
            f"evaluate: warning: {overlap} of the {len(chosen)} evaluation prompts were tune "
            "trial prompts (raise world.num_eval_prompts or lower evaluate.num_prompts / "
            "tune.num_prompts to keep them apart)"
        )
    return chosen, overlap


def system_query(
    system: str,
    poles: tuple[str, ...],
    space: PreferenceSpace,
    tuned: dict[str, float] | None,
    prompted: bool,
) -> SoupQuery:
    """The soup query that makes ``system`` answer for the combination ``poles`` (``base``
    and ``rlhf`` ignore the combination: any poles do)."""
    if system == "base":
        return SoupQuery({}, poles, None)
    if system == "rlhf":
        return SoupQuery({"rlhf": 1.0}, poles, None)
    preference = space.preference_prompt(space.combination(list(poles)))
    if system == "base+prompt":
        return SoupQuery({}, poles, preference)
    if system == "pmorl":
        return SoupQuery({"pmorl": 1.0}, poles, preference)
    soup_prompt = preference if prompted else None
    if system == "psoups-uniform":
        return SoupQuery({pole: 1.0 / len(poles) for pole in poles}, poles, soup_prompt)
    if system == "psoups-tuned":
        if tuned is None:
            raise PsoupsError(f"no tuned weights for {'+'.join(poles)}; run the tune stage")
        return SoupQuery(dict(tuned), poles, soup_prompt)
    raise PsoupsError(f"unknown system {system!r}")


def run_evaluate_stage(config: PsoupsConfig, rundir: RunDir) -> dict[str, dict[str, Any]]:
    """Generate, judge and tabulate; returns the ``evaluate`` and ``evaluation`` sections."""
    spec, space = config.evaluate, config.space
    run = RunArtifacts(rundir, Manifest.load(rundir).data)
    tuned_weights = run.tuned_weights
    if not tuned_weights:
        raise PsoupsError(
            f"{rundir.location} has no tuned weights; run the tune stage first "
            f"(psoups run --stages tune --out {rundir.location})"
        )
    combinations = [tuple(space.parse(key)) for key in tuned_weights]
    keys = ["+".join(poles) for poles in combinations]
    prompts, overlap = evaluation_prompts(config, run)
    rundir.write_json(PROMPTS_PATH, {"evaluation": prompts})
    baselines = [name for name in BASELINE_ADAPTERS if name in spec.systems]
    models = SoupModels.from_run(run, config.rewards.max_length, spec.resources.use_gpu, baselines)
    started = time.monotonic()
    responses, evaluators = _generate(config, models, combinations, prompts, tuned_weights)
    generate_seconds = time.monotonic() - started
    log(f"evaluate: {len(spec.systems)} systems x {len(keys)} combinations x {len(prompts)} "
        f"prompts answered and scored in {generate_seconds:.0f}s; judging")  # fmt: skip

    outcomes: dict[str, dict[tuple[str, str], np.ndarray]] = {"reward": {}}
    attributes = models.attributes is not None  # the run's world has an attribute judge
    if attributes:
        outcomes["attributes"] = {}
    soups = [system for system in spec.systems if system in SOUP_SYSTEMS]
    pairs = [(soup, other) for soup in soups for other in spec.systems if other != soup]
    for soup, other in pairs:
        reward_rows, share_rows = [], []
        for poles, key in zip(combinations, keys, strict=True):
            mine, theirs = responses[key][soup], responses[key][other]
            a, b = mine.reward_scores(poles), theirs.reward_scores(poles)
            reward_rows.append([reward_outcome(x, y, spec.reward_tie_threshold)
                                for x, y in zip(a, b, strict=True)])  # fmt: skip
            if attributes:
                a, b = mine.pole_shares(poles), theirs.pole_shares(poles)
                share_rows.append([share_outcome(x, y) for x, y in zip(a, b, strict=True)])
        outcomes["reward"][soup, other] = np.array(reward_rows)  # (combinations, prompts)
        if attributes:
            outcomes["attributes"][soup, other] = np.array(share_rows)
    text: dict[str, Any] | None = None
    text_success: dict[str, dict[str, dict[str, float]]] = {}
    if spec.text_judge:
        from psoups_ray.evaluate.llm import text_judgements

        outcomes["text"], text_success, text = text_judgements(
            combinations, prompts, responses, pairs
        )
    llm: dict[str, Any] | None = None
    if spec.llm_judge is not None:
        from psoups_ray.evaluate.llm import llm_outcomes

        outcomes["llm"], llm = llm_outcomes(config, rundir, combinations, prompts, responses, pairs)

    tables = {
        judge: _win_rate_tables(config, by_pair, keys, derive_seed(config.seed, "bootstrap", judge))
        for judge, by_pair in outcomes.items()
    }
    metrics = {
        key: {
            system: _system_metrics(
                responses[key][system],
                poles,
                attributes,
                text_success.get(key, {}).get(system),
            )
            for system in spec.systems
        }
        for poles, key in zip(combinations, keys, strict=True)
    }
    overall = {
        system: {
            name: float(np.mean([metrics[key][system][name] for key in keys]))
            for name in metrics[keys[0]][system]
            if name not in PER_POLE_METRICS
        }
        for system in spec.systems
    }
    _write_samples(rundir, combinations, keys, prompts, responses)
    rundir.write_csv(WIN_RATES_PATH, _win_rate_rows(tables))
    rundir.write_csv(METRICS_PATH, _metric_rows(metrics))
    evaluation = {
        "systems": list(spec.systems),
        "soups": soups,
        "combinations": keys,
        "num_prompts": len(prompts),
        "judges": list(tables),
        "reward_tie_threshold": spec.reward_tie_threshold,
        "confidence": spec.confidence,
        "win_rates": tables,
        "metrics": metrics,
        "metrics_overall": overall,
        "llm_judge": llm,
        "text_judge": text,
        "files": {
            "samples": rundir.locate(SAMPLES_PATH),
            "win_rates": rundir.locate(WIN_RATES_PATH),
            "metrics": rundir.locate(METRICS_PATH),
            "summary": rundir.locate(SUMMARY_PATH),
            "prompts": rundir.locate(PROMPTS_PATH),
        },
    }
    rundir.write_json(SUMMARY_PATH, evaluation)
    _log_headline(tables, soups)
    run = {
        "num_prompts": len(prompts),
        "prompts_shared_with_tune_trials": overlap,
        "evaluators": evaluators,
        "generate_seconds": round(generate_seconds, 1),
        "seconds": round(time.monotonic() - started, 1),
    }
    return {"evaluate": run, "evaluation": evaluation}


def _generate(config, models, combinations, prompts, tuned_weights):
    """Every system's responses and rewards: ``{combination key: {system: Responses}}``."""
    spec, space = config.evaluate, config.space
    prompted = config.policies.prompted
    shared = [system for system in spec.systems if system in UNPROMPTED_SYSTEMS]
    own = [system for system in spec.systems if system not in UNPROMPTED_SYSTEMS]
    every_pole = tuple(dict.fromkeys(pole for poles in combinations for pole in poles))
    requests, labels = [], []
    for poles in combinations:
        key = "+".join(poles)
        queries = [system_query(s, poles, space, tuned_weights.get(key), prompted) for s in own]
        seed = derive_seed(config.seed, "evaluate", key)
        requests.append((queries, prompts, spec.generation, seed, poles))
        labels.append((key, own))
    if shared:  # the smallest request last: the actors finish together
        queries = [system_query(s, every_pole, space, None, prompted) for s in shared]
        seed = derive_seed(config.seed, "evaluate", "unprompted")
        requests.append((queries, prompts, spec.generation, seed, every_pole))
        labels.append((None, shared))
    rows = sum(len(request[0]) for request in requests) * len(prompts)
    resources = spec.resources
    gpus = resources.gpus if resources.use_gpu else 0.0
    count = min(spec.num_evaluators, len(requests))
    pool = start_evaluators(models, count, resources.cpus, gpus, "evaluate")

    def on_result(done: int, total: int) -> None:
        progress.update("evaluate", done, total, "request", f"{rows} responses in all")

    try:
        results = pool.map(requests, method="sample", on_result=on_result)
        evaluators = pool.stats()
    finally:
        pool.stop()
    by_label: dict[str | None, dict[str, Responses]] = {}
    for (key, systems), request, result in zip(labels, requests, results, strict=True):
        queries, seed = request[0], request[3]
        by_label[key] = {
            system: Responses(
                texts=sampled["responses"],
                rewards=sampled["rewards"],
                requests=[
                    served_request(
                        query, prompt, row_seed(seed, index), spec.generation, space.pole_ids
                    )  # fmt: skip
                    for index, prompt in enumerate(prompts)
                ],
                shown=[models.attributes.shown(t) for t in sampled["responses"]]
                if models.attributes is not None
                else None,
            )
            for system, query, sampled in zip(systems, queries, result, strict=True)
        }
    keys = ["+".join(poles) for poles in combinations]
    return {key: {**by_label.get(None, {}), **by_label[key]} for key in keys}, evaluators


def _win_rate_tables(config, by_pair, keys, seed) -> dict[str, dict[str, Any]]:
    """``{soup: {opponent: {"overall": WinRate, "combinations": {key: WinRate}}}}``."""
    spec = config.evaluate
    tables: dict[str, dict[str, Any]] = {}
    for (soup, other), outcomes in by_pair.items():
        per_combination, overall = win_rates(
            outcomes, spec.bootstrap_samples, spec.confidence, seed
        )
        tables.setdefault(soup, {})[other] = {
            "overall": overall.to_dict(),
            "combinations": {
                key: rate.to_dict() for key, rate in zip(keys, per_combination, strict=True)
            },
        }
    return tables


def _system_metrics(
    responses: Responses,
    poles: tuple[str, ...],
    attributes: bool,
    text_success: dict[str, float] | None,
) -> dict[str, Any]:
    """One system's metrics for one combination; the per-pole ones are
    :data:`PER_POLE_METRICS`, every other is a float (averaged into ``metrics_overall``).
    ``text_success``: the text judge's per-pole success against ``base``, if it judged."""
    metrics: dict[str, Any] = {
        "reward": float(responses.reward_scores(poles).mean()),
        "rewards": {pole: float(np.mean(responses.rewards[pole])) for pole in poles},
        "response_words": float(np.mean([len(text.split()) for text in responses.texts])),
    }
    if attributes:
        shares = responses.pole_shares(poles)
        metrics["success_rate"] = float((shares == 1.0).mean())
        metrics["pole_share"] = float(shares.mean())
    if text_success is not None:
        metrics["text_success"] = text_success
        metrics["text_success_mean"] = float(np.mean(list(text_success.values())))
    return metrics


def _write_samples(rundir, combinations, keys, prompts, responses) -> None:
    lines = []
    for poles, key in zip(combinations, keys, strict=True):
        for system, answers in responses[key].items():
            for index, (prompt, text) in enumerate(zip(prompts, answers.texts, strict=True)):
                record = {
                    "combination": key,
                    "system": system,
                    "prompt": prompt,
                    "response": text,
                    "rewards": {pole: round(answers.rewards[pole][index], 4) for pole in poles},
                }
                if answers.shown is not None:
                    record["poles_shown"] = sorted(answers.shown[index])
                if answers.requests:
                    record["request"] = answers.requests[index]
                lines.append(json.dumps(record, ensure_ascii=False))
    rundir.write_text(SAMPLES_PATH, "\n".join(lines) + "\n")


def _win_rate_rows(tables: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per judge, soup, opponent and combination (``all`` first)."""
    rows = []
    for judge, table in tables.items():
        for soup, opponents in table.items():
            for other, rates in opponents.items():
                cells = [("all", rates["overall"]), *rates["combinations"].items()]
                rows += [
                    {"judge": judge, "soup": soup, "opponent": other, "combination": key, **rate}
                    for key, rate in cells
                ]
    return rows


def _metric_rows(metrics: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per combination and system; a per-pole metric as one column per pole,
    ``<prefix>_<POLE>`` (:data:`PER_POLE_METRICS`)."""
    rows = []
    for key, systems in metrics.items():
        for system, values in systems.items():
            row = {"combination": key, "system": system}
            for name, value in values.items():
                if name in PER_POLE_METRICS:
                    prefix = PER_POLE_METRICS[name]
                    row.update({f"{prefix}_{pole}": round(v, 4) for pole, v in value.items()})
                else:
                    row[name] = round(value, 4)
            rows.append(row)
    return rows


def _log_headline(tables: dict[str, dict[str, Any]], soups: list[str]) -> None:
    for judge, table in tables.items():
        for soup in soups:
            parts = [
                f"{other} {rates['overall']['win_rate']:.0%}"
                for other, rates in table.get(soup, {}).items()
            ]
            log(f"evaluate [{judge} judge] {soup} wins vs " + ", ".join(parts))
