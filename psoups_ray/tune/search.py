"""Ray Tune search of soup weights, every combination in one experiment, served by
evaluator actors (:class:`CombinationSearch` gives each combination its own sampler).

A trial is (combination, weights: a point of the simplex times the total weight λ, 1 unless
``tune.scale`` is a range to search): it borrows a :class:`SoupEvaluator`
actor from a pool, which generates on the trial prompts with the soup and scores the
responses with the combination's pole reward models; the trial reports its
``objective`` (the mean or, with ``tune.objective: worst``, the lowest of the poles'
scores: mean normalised rewards or, with ``tune.pole_score: gain``, each pole's share of
its own policy's gain over the base), each pole's reward, gain and weight, the weights'
total and, in the tiny world, the attribute success rate. The actors keep base, policies
and reward models loaded for the whole stage, so no trial loads a model.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback
from ray.tune.search import Searcher

from psoups_ray import progress
from psoups_ray.config import GenerationSpec, TuneConfig
from psoups_ray.errors import PsoupsError
from psoups_ray.runtime.pool import EvaluatorPool
from psoups_ray.runtime.queries import SoupQuery
from psoups_ray.tune.simplex import from_cube, simplex_grid, to_cube

OBJECTIVE = "objective"
COMBINATION = "combination"  # the trial config key naming the trial's combination
EXPERIMENT = "sweeps"  # the Tune experiment of every combination, under ray/tune/
TRIAL_MEMORY_BYTES = 2**20
"""A trial only forwards to an evaluator actor, which holds the CPUs/GPUs. Tune refuses
trials without resources, so each asks for 1 MiB of memory: nothing is counted twice."""


@dataclass(frozen=True)
class Sweep:
    """One combination's search: what every trial of it evaluates."""

    combination: tuple[str, ...]
    prompts: tuple[str, ...]
    preference_prompt: str | None
    generation: GenerationSpec
    seed: int
    objective: str = "mean"
    """``tune.objective``: how a trial's pole rewards become the number it maximises."""
    scale: tuple[float, float] = (1.0, 1.0)
    """``tune.scale``: the range of the soup's total weight."""
    references: dict[str, dict[str, float]] | None = None
    """``tune.pole_score: gain``: per pole, the base's and its policy's mean normalised
    reward on the trial prompts (:func:`measure_references`); None: scores are rewards."""

    @property
    def key(self) -> str:
        return "+".join(self.combination)


def _weights_of(config: dict[str, Any], sweep: Sweep) -> list[float]:
    if "weights" in config:  # grid search
        return [float(w) for w in config["weights"]]
    scale = float(config.get("scale", sweep.scale[0]))  # absent: a fixed total
    cube = [config[f"u{k}"] for k in range(len(sweep.combination) - 1)]
    return [scale * w for w in from_cube(cube)]


def soup_trial(config: dict[str, Any], pool: EvaluatorPool, sweeps: dict[str, Sweep]) -> None:
    """The Tune trainable: one soup of one combination measured, one result reported."""
    from ray import tune

    started_at = time.time()
    sweep = sweeps[config[COMBINATION]]
    weights = _weights_of(config, sweep)
    query = SoupQuery(
        dict(zip(sweep.combination, weights, strict=True)),
        sweep.combination,
        sweep.preference_prompt,
    )
    result = pool.evaluate([query], sweep.prompts, sweep.generation, sweep.seed)[0]
    tune.report(
        {
            **trial_metrics(sweep, weights, result),
            "started_at": started_at,
        }
    )


MIN_GAIN_SPAN = 0.1
"""Smallest policy-over-base reward gap a gain is divided by (in reward standard
deviations): a policy that barely beat the base must not blow its pole's gains up."""


def pole_scores(
    rewards: dict[str, float], references: dict[str, dict[str, float]] | None
) -> dict[str, float]:
    """Each pole's score (``tune.pole_score``): its reward, or with ``references`` its gain
    (r - r_base) / (r_policy - r_base)."""
    if references is None:
        return dict(rewards)
    return {
        pole: (reward - references[pole]["base"]) / gain_span(references[pole])
        for pole, reward in rewards.items()
    }


def gain_span(reference: dict[str, float]) -> float:
    return max(reference["policy"] - reference["base"], MIN_GAIN_SPAN)


def measure_references(
    pool: EvaluatorPool,
    poles: list[str],
    prompts: list[str],
    generation: GenerationSpec,
    seed: int,
    preference_prompts: dict[str, str | None],
) -> dict[str, dict[str, float]]:
    """Per pole, the mean normalised reward of the base (``base``) and of the pole's policy
    alone (``policy``) on ``prompts``, each prompted as the pole's soups are."""
    unprompted = all(preference_prompts[pole] is None for pole in poles)
    if unprompted:  # one base query scores every pole
        base_queries = [SoupQuery({}, tuple(poles), None)]
    else:
        base_queries = [SoupQuery({}, (pole,), preference_prompts[pole]) for pole in poles]
    policy_queries = [SoupQuery({pole: 1.0}, (pole,), preference_prompts[pole]) for pole in poles]
    base, policy = pool.map(
        [(base_queries, prompts, generation, seed), (policy_queries, prompts, generation, seed)]
    )
    base_rewards = {pole: r for result in base for pole, r in result["rewards"].items()}
    return {
        pole: {"base": base_rewards[pole], "policy": result["rewards"][pole]}
        for pole, result in zip(poles, policy, strict=True)
    }


def objective_of(scores: dict[str, float], kind: str) -> float:
    """A trial's objective from its poles' scores (``tune.objective``)."""
    values = list(scores.values())
    if kind == "worst":
        return min(values)
    return sum(values) / len(values)


def trial_metrics(sweep: Sweep, weights, result: dict[str, Any]) -> dict[str, float]:
    scores = pole_scores(result["rewards"], sweep.references)
    metrics = {
        OBJECTIVE: objective_of(scores, sweep.objective),
        "mean_reward": result["mean_reward"],
        "response_words": result["response_words"],
        "scale": sum(weights),
    }
    for pole, weight in zip(sweep.combination, weights, strict=True):
        metrics[f"weight_{pole}"] = weight
        metrics[f"reward_{pole}"] = result["rewards"][pole]
        if sweep.references is not None:
            metrics[f"gain_{pole}"] = scores[pole]
    if "success_rate" in result:
        metrics["success_rate"] = result["success_rate"]
    return metrics


class _GridPoints:
    """A simplex grid as a sub-search of :class:`CombinationSearch`: its points in order."""

    def __init__(self, points: list[list[float]]):
        self.points = list(points)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        return {"weights": self.points.pop(0)} if self.points else None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        pass


def scale_grid(low: float, high: float, steps: int) -> list[float]:
    """The totals a grid search tries: ``steps`` evenly spaced from low to high (one when
    the range is a single value)."""
    if low == high:
        return [low]
    return [low + (high - low) * k / (steps - 1) for k in range(steps)]


def _sub_search(sweep: Sweep, spec: TuneConfig):
    """(sub-search, number of trials) of one combination: Optuna's TPE over the cube that
    maps onto the simplex (and the total weight when ``tune.scale`` is a range), its first
    trials the uniform soup (at the total nearest 1, then at each of ``tune.scale_points``
    totals), or the simplex grid (times each of those totals)."""
    n = len(sweep.combination)
    low, high = sweep.scale
    if spec.search == "grid":
        points = [
            [scale * w for w in point]
            for scale in scale_grid(low, high, spec.scale_points)
            for point in simplex_grid(n, spec.grid_resolution)
        ]
        return _GridPoints(points), len(points)
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    uniform = {f"u{k}": value for k, value in enumerate(to_cube([1.0 / n] * n))}
    space = {f"u{k}": tune.uniform(0.0, 1.0) for k in range(n - 1)}
    seeds = [uniform]
    if low < high:  # the paper's uniform soup (or the total nearest 1), then larger totals
        space["scale"] = tune.uniform(low, high)
        first = min(max(1.0, low), high)
        grid = scale_grid(low, high, spec.scale_points)
        totals = [first, *(total for total in grid if not math.isclose(total, first))]
        seeds = [{**uniform, "scale": total} for total in totals][: spec.num_samples]
    # Optuna's default TPE samples its first 10 trials at random, most of a typical budget
    # of 16; a quarter of the budget is enough to seed it on a 2-4 dimensional simplex, and
    # the multivariate model follows the coupling of the weights.
    sampler = optuna.samplers.TPESampler(
        n_startup_trials=max(2, spec.num_samples // 4),
        multivariate=True,
        seed=sweep.seed % 2**31,
    )
    search = OptunaSearch(
        space=space,
        metric=OBJECTIVE,
        mode="max",
        sampler=sampler,
        points_to_evaluate=seeds,
    )
    return search, spec.num_samples


class CombinationSearch(Searcher):
    """One Tune search algorithm over every combination: each has its own sub-search
    (Optuna, or its simplex grid) and trial budget; a trial's config names its
    combination (``config["combination"]``) beside the sub-search's parameters.

    A suggestion goes to the next combination, round robin, that has no trial running,
    so a combination's trials run one after another and its sampler has seen every
    earlier result: its trials do not depend on the order other trials finish in. Only
    when every combination with budget left has a trial running (fewer of them than
    concurrent trials, as at the end of the search) does one get a second trial at once.
    """

    def __init__(self, searches: dict[str, tuple[Any, int]]):
        super().__init__(metric=OBJECTIVE, mode="max")
        self._searches = {key: search for key, (search, _) in searches.items()}
        self._left = {key: budget for key, (_, budget) in searches.items()}
        self._running: dict[str, set[str]] = {key: set() for key in searches}
        self._owner: dict[str, str] = {}
        self._next = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the sub-searches hold their own spaces; nothing from Tune's config

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        keys = list(self._searches)
        if not any(self._left.values()):
            return Searcher.FINISHED
        for allow_running in (False, True):
            for step in range(len(keys)):
                key = keys[(self._next + step) % len(keys)]
                if not self._left[key] or (self._running[key] and not allow_running):
                    continue
                config = self._searches[key].suggest(trial_id)
                if config is None:
                    continue
                self._left[key] -= 1
                self._running[key].add(trial_id)
                self._owner[trial_id] = key
                self._next = (keys.index(key) + 1) % len(keys)
                return {COMBINATION: key, **config}
        return None  # every combination waits for a running trial

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._owner:
            self._searches[self._owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        key = self._owner.get(trial_id)
        if key is None:
            return
        self._running[key].discard(trial_id)
        self._searches[key].on_trial_complete(trial_id, result=result, error=error)


def run_sweeps(
    sweeps: list[Sweep],
    pool: EvaluatorPool,
    spec: TuneConfig,
    storage_path: str,
    on_combination_done: Callable[[str, list[dict[str, Any]]], None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every combination's search as one Tune experiment (``sweeps``); returns each
    combination's trials' metrics (trial order). ``on_combination_done(key, rows)`` is
    called as soon as a combination's last trial has reported.

    One experiment instead of one per combination: Tune starts its trial processes once
    and reuses them for every trial (measured in the tiny run: each experiment took about
    8 s to its first result, most of it two new trial processes importing Ray Tune).
    """
    from ray import tune

    if not sweeps:
        return {}
    single = [sweep.key for sweep in sweeps if len(sweep.combination) < 2]
    if single:
        raise PsoupsError(f"nothing to tune for single poles: {', '.join(single)}")
    # Tune's default console output boxes every experiment; the callback below logs one
    # line per trial instead (the legacy reporter at verbose=0 prints nothing).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    searches = {sweep.key: _sub_search(sweep, spec) for sweep in sweeps}
    budgets = {key: budget for key, (_, budget) in searches.items()}
    progress = _Progress(budgets, on_combination_done)
    tuner = tune.Tuner(
        tune.with_resources(
            tune.with_parameters(
                soup_trial, pool=pool, sweeps={sweep.key: sweep for sweep in sweeps}
            ),
            {"memory": TRIAL_MEMORY_BYTES},
        ),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE,
            mode="max",
            search_alg=CombinationSearch(searches),
            num_samples=sum(budgets.values()),
            max_concurrent_trials=spec.max_concurrent_trials,
            # A trial is one call to an evaluator actor; a fresh Ray worker process per
            # trial (Tune's default) cost more CPU than the call on a small machine.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=storage_path,
            verbose=0,
            callbacks=[progress],
        ),
    )
    grid = tuner.fit()
    errors = [str(result.error) for result in grid if result.error is not None]
    if errors:
        raise PsoupsError(f"tune: {len(errors)} trial(s) failed: {errors[0]}")
    by_key: dict[str, list[dict[str, Any]]] = {key: [] for key in budgets}
    for result in grid:
        by_key[result.config[COMBINATION]].append(_row(result.metrics))
    return {key: _numbered(rows) for key, rows in by_key.items()}


def _row(metrics: dict[str, Any]) -> dict[str, Any]:
    row = {key: metrics[key] for key in _metric_keys(metrics)}
    row["trial_id"] = metrics["trial_id"]
    row["started_at"] = metrics["started_at"]
    return row


def _numbered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = sorted(rows, key=lambda row: row["started_at"])
    return [{"trial": index, **row} for index, row in enumerate(rows)]


def evaluate_single(sweep: Sweep, pool: EvaluatorPool) -> list[dict[str, Any]]:
    """A one-pole "combination": nothing to search, its policy measured once."""
    result = pool.evaluate(
        [SoupQuery({sweep.combination[0]: 1.0}, sweep.combination, sweep.preference_prompt)],
        sweep.prompts,
        sweep.generation,
        sweep.seed,
    )[0]
    return [{"trial": 0, **trial_metrics(sweep, [1.0], result)}]


def _metric_keys(metrics: dict[str, Any]) -> list[str]:
    prefixes = ("weight_", "reward_", "gain_")
    return [
        key
        for key in metrics
        if key in (OBJECTIVE, "mean_reward", "success_rate", "response_words", "scale")
        or key.startswith(prefixes)
    ]


def best_trial(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The trial with the highest objective (the earliest among equals)."""
    finite = [row for row in rows if math.isfinite(row[OBJECTIVE])]
    if not finite:
        raise PsoupsError("no trial reported a finite objective")
    return max(finite, key=lambda row: (row[OBJECTIVE], -row["trial"]))


class _Progress(Callback):
    """One log line per finished trial (its combination, weights, objective and that
    combination's best so far); hands each combination's rows on when it is complete."""

    def __init__(self, budgets: dict[str, int], on_done=None):
        self.budgets, self.on_done = budgets, on_done
        self.rows: dict[str, list[dict[str, Any]]] = {key: [] for key in budgets}
        self.best = dict.fromkeys(budgets, -math.inf)
        self.started = time.monotonic()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        key = trial.config[COMBINATION]
        rows = self.rows[key]
        rows.append(_row(result))
        self.best[key] = max(self.best[key], result[OBJECTIVE])
        weights = " ".join(
            f"{name.removeprefix('weight_')}={value:.2f}"
            for name, value in result.items()
            if name.startswith("weight_")
        )
        if not math.isclose(result["scale"], 1.0):
            weights += f" (total {result['scale']:.2f})"
        success = f" success {result['success_rate']:.2f}" if "success_rate" in result else ""
        task = progress.task_name("tune", key)
        progress.note(
            f"[{task}] trial {len(rows)}/{self.budgets[key]}: {weights} -> objective "
            f"{result[OBJECTIVE]:+.3f}{success}"
        )
        best = f"best {self.best[key]:+.3f}"
        progress.update(task, len(rows), self.budgets[key], "trial", best)
        if len(rows) == self.budgets[key]:
            progress.finish(task)
            if self.on_done is not None:
                self.on_done(key, _numbered(rows))
