"""Ray Tune search of soup weights, every combination in one experiment, served by
evaluator actors (:class:`CombinationSearch` gives each combination its own sampler).

A trial is (combination, weights on the simplex): it borrows a :class:`SoupEvaluator`
actor from a pool, which generates on the trial prompts with the soup and scores the
responses with the combination's pole reward models; the trial reports its
``objective`` (the mean or, with ``tune.objective: worst``, the lowest of the poles' mean
normalised rewards), each pole's reward and weight and, in the tiny world,
the attribute success rate. The actors keep base, policies and reward models loaded for
the whole stage, so no trial loads a model.
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

from psoups_ray.config import GenerationSpec, TuneConfig
from psoups_ray.errors import PsoupsError
from psoups_ray.progress import log
from psoups_ray.soup.pool import EvaluatorPool, SoupQuery
from psoups_ray.tuning.simplex import from_cube, simplex_grid, to_cube

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

    @property
    def key(self) -> str:
        return "+".join(self.combination)


def _weights_of(config: dict[str, Any], n: int) -> list[float]:
    if "weights" in config:  # grid search
        return [float(w) for w in config["weights"]]
    return from_cube([config[f"u{k}"] for k in range(n - 1)])


def soup_trial(config: dict[str, Any], pool: EvaluatorPool, sweeps: dict[str, Sweep]) -> None:
    """The Tune trainable: one soup of one combination measured, one result reported."""
    from ray import tune

    started_at = time.time()
    sweep = sweeps[config[COMBINATION]]
    weights = _weights_of(config, len(sweep.combination))
    query = SoupQuery(
        dict(zip(sweep.combination, weights, strict=True)),
        sweep.combination,
        sweep.preference_prompt,
    )
    result = pool.evaluate([query], sweep.prompts, sweep.generation, sweep.seed)[0]
    tune.report(
        {
            **trial_metrics(sweep.combination, weights, result, sweep.objective),
            "started_at": started_at,
        }
    )


def objective_of(rewards: dict[str, float], kind: str) -> float:
    """A trial's objective from its poles' mean normalised rewards (``tune.objective``)."""
    values = list(rewards.values())
    if kind == "worst":
        return min(values)
    return sum(values) / len(values)


def trial_metrics(combination, weights, result: dict[str, Any], objective: str) -> dict[str, float]:
    metrics = {
        OBJECTIVE: objective_of(result["rewards"], objective),
        "mean_reward": result["mean_reward"],
        "response_words": result["response_words"],
    }
    for pole, weight in zip(combination, weights, strict=True):
        metrics[f"weight_{pole}"] = weight
        metrics[f"reward_{pole}"] = result["rewards"][pole]
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


def _sub_search(sweep: Sweep, spec: TuneConfig):
    """(sub-search, number of trials) of one combination: Optuna's TPE over the cube that
    maps onto the simplex, its first trial the uniform soup, or the simplex grid."""
    n = len(sweep.combination)
    if spec.search == "grid":
        points = simplex_grid(n, spec.grid_resolution)
        return _GridPoints(points), len(points)
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    uniform = to_cube([1.0 / n] * n)
    # Optuna's default TPE samples its first 10 trials at random, most of a typical budget
    # of 16; a quarter of the budget is enough to seed it on a 2-4 dimensional simplex, and
    # the multivariate model follows the coupling of the weights.
    sampler = optuna.samplers.TPESampler(
        n_startup_trials=max(2, spec.num_samples // 4),
        multivariate=True,
        seed=sweep.seed % 2**31,
    )
    search = OptunaSearch(
        space={f"u{k}": tune.uniform(0.0, 1.0) for k in range(n - 1)},
        metric=OBJECTIVE,
        mode="max",
        sampler=sampler,
        points_to_evaluate=[{f"u{k}": uniform[k] for k in range(n - 1)}],
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
    return [{"trial": 0, **trial_metrics(sweep.combination, [1.0], result, sweep.objective)}]


def _metric_keys(metrics: dict[str, Any]) -> list[str]:
    prefixes = ("weight_", "reward_")
    return [
        key
        for key in metrics
        if key in (OBJECTIVE, "mean_reward", "success_rate", "response_words")
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
        success = f" success {result['success_rate']:.2f}" if "success_rate" in result else ""
        log(
            f"[tune {key}] trial {len(rows)}/{self.budgets[key]}: {weights} -> objective "
            f"{result[OBJECTIVE]:+.3f}{success} (best {self.best[key]:+.3f}, "
            f"{time.monotonic() - self.started:.0f}s)"
        )
        if len(rows) == self.budgets[key] and self.on_done is not None:
            self.on_done(key, _numbered(rows))
