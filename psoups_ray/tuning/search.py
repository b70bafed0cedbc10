"""Ray Tune sweeps of soup weights, one per combination, served by evaluator actors.

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
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback

from psoups_ray.config import GenerationSpec, TuneConfig
from psoups_ray.errors import PsoupsError
from psoups_ray.progress import log
from psoups_ray.soup.pool import EvaluatorPool, SoupQuery
from psoups_ray.tuning.simplex import from_cube, simplex_grid, to_cube

OBJECTIVE = "objective"
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


def soup_trial(config: dict[str, Any], pool: EvaluatorPool, sweep: Sweep) -> None:
    """The Tune trainable: one soup measured, one result reported."""
    from ray import tune

    started_at = time.time()
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


def _param_space(spec: TuneConfig, n: int) -> tuple[dict[str, Any], Any, int]:
    """(param_space, search_alg, num_samples) of a sweep over the n-simplex."""
    from ray import tune

    if spec.search == "grid":
        points = simplex_grid(n, spec.grid_resolution)
        return {"weights": tune.grid_search(points)}, None, 1
    return {f"u{k}": tune.uniform(0.0, 1.0) for k in range(n - 1)}, "optuna", spec.num_samples


def run_sweep(
    sweep: Sweep, pool: EvaluatorPool, spec: TuneConfig, storage_path: str
) -> list[dict[str, Any]]:
    """One combination's Tune experiment; returns every trial's metrics (trial order)."""
    from ray import tune

    n = len(sweep.combination)
    if n == 1:  # nothing to search: a single policy
        result = pool.evaluate(
            [SoupQuery({sweep.combination[0]: 1.0}, sweep.combination, sweep.preference_prompt)],
            sweep.prompts,
            sweep.generation,
            sweep.seed,
        )[0]
        return [{"trial": 0, **trial_metrics(sweep.combination, [1.0], result, sweep.objective)}]
    # Tune's default console output boxes every experiment; the callback below logs one
    # line per trial instead (the legacy reporter at verbose=0 prints nothing).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    param_space, search, num_samples = _param_space(spec, n)
    search_alg = None
    if search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

        uniform = to_cube([1.0 / n] * n)
        # Optuna's default TPE samples its first 10 trials at random, most of a typical
        # budget of 16; a quarter of the budget is enough to seed it on a 2-4 dimensional
        # simplex, and the multivariate model follows the coupling of the weights.
        sampler = optuna.samplers.TPESampler(
            n_startup_trials=max(2, num_samples // 4),
            multivariate=True,
            seed=sweep.seed % 2**31,
        )
        search_alg = OptunaSearch(
            metric=OBJECTIVE,
            mode="max",
            sampler=sampler,
            points_to_evaluate=[{f"u{k}": uniform[k] for k in range(n - 1)}],
        )
    total = num_samples if search_alg else len(param_space["weights"]["grid_search"])
    tuner = tune.Tuner(
        tune.with_resources(
            tune.with_parameters(soup_trial, pool=pool, sweep=sweep),
            {"memory": TRIAL_MEMORY_BYTES},
        ),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE,
            mode="max",
            search_alg=search_alg,
            num_samples=num_samples,
            max_concurrent_trials=spec.max_concurrent_trials,
            # A trial is one call to an evaluator actor; a fresh Ray worker process per
            # trial (Tune's default) cost more CPU than the call on a small machine.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"sweep-{sweep.key}",
            storage_path=storage_path,
            verbose=0,
            callbacks=[_Progress(sweep.key, total)],
        ),
    )
    grid = tuner.fit()
    errors = [str(result.error) for result in grid if result.error is not None]
    if errors:
        raise PsoupsError(f"tune {sweep.key}: {len(errors)} trial(s) failed: {errors[0]}")
    rows = []
    for result in grid:
        metrics = {key: result.metrics[key] for key in _metric_keys(result.metrics)}
        metrics["trial_id"] = result.metrics["trial_id"]
        metrics["started_at"] = result.metrics["started_at"]
        rows.append(metrics)
    rows.sort(key=lambda row: row["started_at"])
    return [{"trial": index, **row} for index, row in enumerate(rows)]


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
    """One log line per finished trial: its weights, objective and the best so far."""

    def __init__(self, key: str, total: int):
        self.key, self.total = key, total
        self.done, self.best = 0, -math.inf
        self.started = time.monotonic()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.done += 1
        self.best = max(self.best, result[OBJECTIVE])
        weights = " ".join(
            f"{key.removeprefix('weight_')}={value:.2f}"
            for key, value in result.items()
            if key.startswith("weight_")
        )
        success = f" success {result['success_rate']:.2f}" if "success_rate" in result else ""
        log(
            f"[tune {self.key}] trial {self.done}/{self.total}: {weights} -> objective "
            f"{result[OBJECTIVE]:+.3f}{success} (best {self.best:+.3f}, "
            f"{time.monotonic() - self.started:.0f}s)"
        )
