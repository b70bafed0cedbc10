"""The tune stage: soup weights per combination by Ray Tune, then Pareto fronts.

1. ``max_concurrent_trials`` evaluator actors load the base, every pole policy (mixed in
   activation space) and every reward model, once.
2. One Ray Tune experiment searches the weights of every combination (per combination,
   Optuna TPE seeded with the uniform soup, or a simplex grid); the trials borrow the
   actors. A combination's trials are kept under ``ray/tune/results/`` as soon as its
   last one reports, so an interrupted stage redoes only the unfinished ones.
3. The tuned and the uniform soup of each combination are compared on further held-out
   prompts that no trial saw.
4. Pareto sweeps for pairs of poles from different dimensions, plotted.

Artifacts: ``tune/<COMBO>/trials.csv`` (every trial), ``tune/summary.json``,
``tune/pareto/<A>-<B>.png`` and ``tune/pareto.json``. Manifest: ``tune`` and
``tuned_weights.<COMBO>`` (pole -> weight), which ``psoups merge`` and serving default to.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from psoups_ray import progress
from psoups_ray.artifacts import PROMPTS_FILES, RunArtifacts
from psoups_ray.config import PsoupsConfig
from psoups_ray.errors import PsoupsError
from psoups_ray.manifest import Manifest
from psoups_ray.progress import log
from psoups_ray.rundir import RunDir
from psoups_ray.runtime.pool import start_evaluators
from psoups_ray.runtime.queries import SoupModels, SoupQuery
from psoups_ray.seeding import derive_seed
from psoups_ray.tune.pareto import (
    front_points,
    pareto_pairs,
    pareto_queries,
    plot_front,
)
from psoups_ray.tune.search import (
    MIN_GAIN_SPAN,
    Sweep,
    best_trial,
    evaluate_single,
    measure_references,
    run_sweeps,
)

RESULTS_DIR = "ray/tune/results"  # per-combination progress, discarded when the stage is redone
PROMPTS_PATH = PROMPTS_FILES["tune_trials"]
REFERENCES_PATH = f"{RESULTS_DIR}/references.json"  # the gains' ends, kept for a resume


def tune_prompts(config: PsoupsConfig, run: RunArtifacts) -> tuple[list[str], list[str]]:
    """(trial prompts, comparison prompts): the first held-out prompts, disjoint."""
    spec = config.tune
    prompts = run.prompts("held_out")
    if not prompts:
        raise PsoupsError("the feedback stage left no held-out prompts to tune on")
    trial = prompts[: spec.num_prompts]
    report = prompts[spec.num_prompts : spec.num_prompts + spec.num_report_prompts]
    if len(trial) < spec.num_prompts:
        log(f"tune: only {len(trial)} held-out prompts (tune.num_prompts is {spec.num_prompts})")
    if spec.num_report_prompts and not report:
        log(
            "tune: no held-out prompts left for the tuned-vs-uniform comparison; it uses the "
            "trial prompts (lower tune.num_prompts to keep some apart)"
        )
        report = trial
    return trial, report


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    keep = ("weights", "rewards", "mean_reward", "success_rate", "target_rates", "response_words")
    return {key: result[key] for key in keep if key in result}


def run_tune_stage(config: PsoupsConfig, rundir: RunDir) -> dict[str, dict[str, Any]]:
    """Tune every target combination and draw the Pareto fronts; returns the ``tune`` and
    ``tuned_weights`` manifest sections."""
    spec = config.tune
    space = config.space
    run = RunArtifacts(rundir, Manifest.load(rundir).data)
    models = SoupModels.from_run(run, config.rewards.max_length, spec.resources.use_gpu)
    combinations = (
        [space.parse(text) for text in spec.combinations]
        if spec.combinations
        else space.full_combinations()
    )
    trial_prompts, report_prompts = tune_prompts(config, run)
    rundir.write_json(PROMPTS_PATH, {"tune_trials": trial_prompts, "tune_check": report_prompts})
    prompted = config.policies.prompted
    started = time.monotonic()
    pool = None
    try:
        resources = spec.resources
        gpus = resources.gpus if resources.use_gpu else 0.0
        pool = start_evaluators(models, spec.max_concurrent_trials, resources.cpus, gpus, "tune")
        references = None
        if spec.pole_score == "gain" and rundir.exists(REFERENCES_PATH):
            references = rundir.read_json(REFERENCES_PATH)  # an interrupted stage measured them
            log("tune: gains over the base use the references measured before the interruption")
        elif spec.pole_score == "gain":
            references = _references(config, pool, combinations, trial_prompts)
            rundir.write_json(REFERENCES_PATH, references)
        sweeps = [
            Sweep(
                combination=tuple(combination),
                prompts=tuple(trial_prompts),
                preference_prompt=space.preference_prompt(combination) if prompted else None,
                generation=spec.generation,
                seed=derive_seed(config.seed, "tune", str(combination)),
                objective=spec.objective,
                scale=spec.scale,
                references=references,
            )
            for combination in combinations
        ]
        trials: dict[str, list[dict[str, Any]]] = {}

        def keep(key: str, rows: list[dict[str, Any]]) -> None:  # the resume point
            trials[key] = rows
            rundir.write_json(f"{RESULTS_DIR}/{key}.json", rows)

        for sweep in sweeps:
            if rundir.exists(f"{RESULTS_DIR}/{sweep.key}.json"):
                trials[sweep.key] = rundir.read_json(f"{RESULTS_DIR}/{sweep.key}.json")
        if trials:
            log(f"tune: trials already done for {', '.join(trials)}")
        for sweep in sweeps:
            if sweep.key not in trials and len(sweep.combination) == 1:
                keep(sweep.key, evaluate_single(sweep, pool))  # nothing to search
        todo = [sweep for sweep in sweeps if sweep.key not in trials]
        if todo:
            log(
                f"tune: {spec.search} search of {len(todo)} combination(s) in one Ray Tune "
                f"experiment, {spec.max_concurrent_trials} trial(s) at a time"
            )
            trials.update(run_sweeps(todo, pool, spec, rundir.uri("ray/tune"), keep))
        combos: dict[str, dict[str, Any]] = {}
        tuned: dict[str, dict[str, float]] = {}
        for sweep in sweeps:
            rows = trials[sweep.key]
            rundir.write_csv(f"tune/{sweep.key}/trials.csv", rows)
            best = best_trial(rows)
            tuned[sweep.key] = {pole: float(best[f"weight_{pole}"]) for pole in sweep.combination}
            combos[sweep.key] = {
                "trials": len(rows),
                "trials_path": rundir.locate(f"tune/{sweep.key}/trials.csv"),
                "best_trial": best,
                "first_trial": rows[0],
            }
        if report_prompts:
            _compare(config, pool, combos, tuned, report_prompts, prompted)
        pareto = _pareto(config, rundir, pool, tuned, trial_prompts) if spec.pareto else {}
        evaluators = pool.stats()
    finally:
        if pool is not None:
            pool.stop()
    section = {
        "search": spec.search,
        "evaluators": evaluators,  # each loaded the models once and served this many calls
        "num_trial_prompts": len(trial_prompts),
        "num_report_prompts": len(report_prompts),
        "prompts_path": rundir.locate(PROMPTS_PATH),
        "objective": spec.objective,
        "pole_score": spec.pole_score,
        "scale": list(spec.scale),
        "references": references,
        "combinations": combos,
        "pareto": pareto,
        "seconds": round(time.monotonic() - started, 1),
    }
    rundir.write_json("tune/summary.json", {**section, "tuned_weights": tuned})
    return {"tune": section, "tuned_weights": tuned}


def _references(config, pool, combinations, prompts) -> dict[str, dict[str, float]]:
    """``tune.pole_score: gain``: the base's and each pole policy's reward on the trial
    prompts, the ends of every gain."""
    space = config.space
    poles = list(dict.fromkeys(pole for combination in combinations for pole in combination))
    prompted = config.policies.prompted
    preference_prompts = {
        pole: space.preference_prompt(space.combination([pole])) if prompted else None
        for pole in poles
    }
    started = time.monotonic()
    references = measure_references(
        pool,
        poles,
        prompts,
        config.tune.generation,
        derive_seed(config.seed, "tune", "references"),
        preference_prompts,
    )
    log(
        "tune: pole scores are gains over the base, measured on the trial prompts ("
        + ", ".join(
            f"{pole} {ref['base']:+.2f} -> {ref['policy']:+.2f}" for pole, ref in references.items()
        )
        + f"; {time.monotonic() - started:.0f}s)"
    )
    weak = [pole for pole, ref in references.items() if ref["policy"] - ref["base"] < MIN_GAIN_SPAN]
    if weak:
        log(
            f"tune: warning: the policies of {', '.join(weak)} scored within {MIN_GAIN_SPAN:g} "
            f"reward std of the base on the trial prompts; their gains are divided by "
            f"{MIN_GAIN_SPAN:g} (train them longer, or use tune.pole_score=reward)"
        )
    return references


def _compare(config, pool, combos, tuned, prompts, prompted) -> None:
    """Uniform vs tuned soup of every combination on prompts no trial saw."""
    space, spec = config.space, config.tune
    requests, keys = [], []
    for key, weights in tuned.items():
        combination = space.parse(key)
        poles = tuple(combination)
        prompt = space.preference_prompt(combination) if prompted else None
        uniform = {pole: 1.0 / len(poles) for pole in poles}
        queries = [SoupQuery(uniform, poles, prompt), SoupQuery(weights, poles, prompt)]
        seed = derive_seed(config.seed, "tune-compare", key)
        requests.append((queries, list(prompts), spec.generation, seed))
        keys.append(key)
    log(f"tune: comparing tuned and uniform soups on {len(prompts)} further held-out prompts")
    for key, (uniform, best) in zip(keys, pool.map(requests), strict=True):
        combos[key]["held_out"] = {"uniform": _summary(uniform), "tuned": _summary(best)}
    _log_comparison(combos)


def _log_comparison(combos: dict[str, dict[str, Any]]) -> None:
    log("tune: held-out comparison (mean normalised reward; success = every pole shown)")
    for key, record in combos.items():
        uniform, tuned = record["held_out"]["uniform"], record["held_out"]["tuned"]
        line = (
            f"  {key:<14} uniform {uniform['mean_reward']:+.3f}  tuned {tuned['mean_reward']:+.3f}"
        )
        if "success_rate" in tuned:
            line += f"  success {uniform['success_rate']:.2f} -> {tuned['success_rate']:.2f}"
        weights = ", ".join(f"{p}={w:.2f}" for p, w in tuned["weights"].items())
        log(f"{line}  ({weights})")


def _pareto(config, rundir, pool, tuned, trial_prompts) -> dict[str, Any]:
    space, spec = config.space, config.tune
    pairs = pareto_pairs(space)
    if not pairs:
        return {}
    soups = {
        key: {"uniform": {p: 1.0 / len(weights) for p in weights}, "tuned": weights}
        for key, weights in tuned.items()
        if len(weights) > 1
    }
    prompts = trial_prompts[: spec.pareto_prompts]
    requests, labels = [], []
    for pair in pairs:
        queries, pair_labels = pareto_queries(
            space, pair, spec.pareto_points, soups, config.policies.prompted
        )
        seed = derive_seed(config.seed, "pareto", pair.key)
        requests.append((queries, prompts, spec.generation, seed))
        labels.append(pair_labels)
    soups_total = sum(len(request[0]) for request in requests)
    log(
        f"tune: Pareto fronts of {len(pairs)} pole pairs, {spec.pareto_points} weights each "
        f"(and the soups of the combinations holding both poles): {soups_total} soups on "
        f"{len(prompts)} prompts"
    )

    def on_result(done: int, total: int) -> None:
        progress.update("tune pareto", done, total, "pole pair", f"{soups_total} soups")

    progress.start("tune pareto")
    try:
        results = pool.map(requests, on_result=on_result)
    finally:
        progress.finish("tune pareto")
    fronts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="psoups-pareto-") as workdir:
        for pair, pair_labels, pair_results in zip(pairs, labels, results, strict=True):
            points = front_points(pair, pair_labels, pair_results)
            path = Path(workdir, f"{pair.key}.png")
            plot_front(pair, points, str(path))
            rundir.write_bytes(f"tune/pareto/{pair.key}.png", path.read_bytes())
            fronts[pair.key] = {"a": pair.a, "b": pair.b, "points": points}
    rundir.write_json("tune/pareto.json", fronts)
    return {key: rundir.locate(f"tune/pareto/{key}.png") for key in fronts}
