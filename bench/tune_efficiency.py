"""Tune efficiency: Optuna (TPE) against a dense grid on the simplex, same objective.

    python bench/tune_efficiency.py --run runs/tiny                  # a run with policies
    python bench/tune_efficiency.py --run RUN --combo P1A+P2B+P3A
    python bench/tune_efficiency.py --run RUN --smoke-test           # tiny sizes (CI)

Both searches run as the tune stage runs them (Ray Tune trials served by the same
evaluator actors) on one combination, with the same trial prompts and sampling seed, so
they optimise the same function of the weights. The grid has step 1/--grid-resolution
(66 points for 3 poles at 10), times each of the run's ``tune.scale_points`` totals when its
``tune.scale`` is a range; Optuna gets at most a quarter of the grid's trial count.
Prints both bests, both winners re-measured on prompts no trial saw (the best of many
noisy trials is biased upward), and the ratios measured in this one run (target: best
ratio >= 0.98 with trial ratio <= 0.25). Nothing is written to the run directory except Tune's
experiment folders under a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run directory with policies and rewards")
    parser.add_argument("--combo", help="combination (default: the space's first full one)")
    parser.add_argument("--grid-resolution", type=int, default=10)
    parser.add_argument("--optuna-trials", type=int, help="default: 25%% of the grid's trials")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--concurrency", type=int, default=2, help="evaluator actors")
    parser.add_argument(
        "--remeasure-seeds", type=int, default=4,
        help="sampling seeds for re-measuring both winners on unseen prompts",
    )  # fmt: skip
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, seconds")
    args = parser.parse_args()
    if args.smoke_test:
        args.grid_resolution, args.num_prompts, args.max_new_tokens = 2, 2, 16
        args.remeasure_seeds = 1

    import ray

    from psoups_ray.artifacts import RunArtifacts
    from psoups_ray.config import GenerationSpec, PsoupsConfig
    from psoups_ray.manifest import Manifest
    from psoups_ray.rundir import RunDir
    from psoups_ray.runtime.pool import EvaluatorPool, evaluator_actor_class
    from psoups_ray.runtime.queries import SoupModels
    from psoups_ray.seeding import derive_seed
    from psoups_ray.tune.search import Sweep, best_trial, objective_of, run_sweeps, scale_grid
    from psoups_ray.tune.simplex import simplex_grid
    from psoups_ray.tune.stage import tune_prompts

    rundir = RunDir(args.run)
    data = Manifest.load(rundir).data
    config = PsoupsConfig.model_validate(data["config"])
    config.tune.num_prompts = args.num_prompts
    config.tune.num_report_prompts = args.num_prompts
    space = config.space
    combination = space.parse(args.combo) if args.combo else space.full_combinations()[0]
    poles = tuple(combination)
    totals = scale_grid(*config.tune.scale, config.tune.scale_points)
    grid_trials = len(simplex_grid(len(poles), args.grid_resolution)) * len(totals)
    optuna_trials = args.optuna_trials or max(1, grid_trials // 4)

    ray.init(
        address="local", num_cpus=args.concurrency, include_dashboard=False, log_to_driver=False
    )
    try:
        run = RunArtifacts(rundir, data)
        models = SoupModels.from_run(run, config.rewards.max_length, False)
        actor = evaluator_actor_class(1.0, 0.0)
        pool = EvaluatorPool([actor.remote(models) for _ in range(args.concurrency)])
        sweep = Sweep(
            combination=poles,
            prompts=tuple(tune_prompts(config, run)[0]),
            preference_prompt=space.preference_prompt(combination)
            if config.policies.prompted
            else None,
            generation=GenerationSpec(max_new_tokens=args.max_new_tokens),
            seed=derive_seed(config.seed, "tune", str(combination)),
            objective=config.tune.objective,
            scale=config.tune.scale,
        )
        results = {}
        with tempfile.TemporaryDirectory(prefix="psoups-bench-tune-") as storage:
            for search, samples in (("grid", 1), ("optuna", optuna_trials)):
                spec = config.tune.model_copy(
                    update={
                        "search": search,
                        "grid_resolution": args.grid_resolution,
                        "num_samples": samples,
                        "max_concurrent_trials": args.concurrency,
                    }
                )
                started = time.monotonic()
                rows = run_sweeps([sweep], pool, spec, storage)[sweep.key]
                best = best_trial(rows)
                results[search] = {
                    "trials": len(rows),
                    "best": best["objective"],
                    "weights": {p: round(best[f"weight_{p}"], 3) for p in poles},
                    "weights_exact": {p: best[f"weight_{p}"] for p in poles},
                    "seconds": time.monotonic() - started,
                    "objectives": [row["objective"] for row in rows],
                }
        # The best of 66 noisy measurements is biased upward (winner's curse): measure
        # both winners again on prompts no trial saw.
        report_prompts = tune_prompts(config, run)[1]
        from psoups_ray.runtime.queries import SoupQuery

        queries = [
            SoupQuery({p: results[name]["weights_exact"][p] for p in poles}, poles)
            for name in ("grid", "optuna")
        ]
        rescored = pool.map(
            [
                (queries, list(report_prompts), sweep.generation,
                 derive_seed(config.seed, "tune-remeasure", sweep.key, repeat))
                for repeat in range(args.remeasure_seeds)
            ]
        )  # fmt: skip
        for index, name in enumerate(("grid", "optuna")):
            values = [
                objective_of(repeat[index]["rewards"], sweep.objective) for repeat in rescored
            ]
            results[name]["held_out"] = sum(values) / len(values)
    finally:
        ray.shutdown()

    grid, optuna = results["grid"], results["optuna"]
    beaten = sum(value <= optuna["best"] for value in grid["objectives"]) / grid["trials"]
    print(
        f"combination {'+'.join(poles)}, {len(sweep.prompts)} prompts per trial, objective "
        f"{sweep.objective}, total weights {config.tune.scale[0]:g}-{config.tune.scale[1]:g} "
        f"(grid: {', '.join(f'{total:g}' for total in totals)})"
    )
    for name, result in results.items():
        print(
            f"{name:>6}: {result['trials']:3d} trials, best objective "
            f"{result['best']:+.4f} at {result['weights']} ({result['seconds']:.0f}s); "
            f"re-measured on {len(report_prompts)} unseen prompts x {args.remeasure_seeds} seeds: "
            f"{result['held_out']:+.4f}"
        )
    ratios = {
        "best": optuna["best"] / grid["best"] if grid["best"] > 0 else None,
        "best_held_out": optuna["held_out"] / grid["held_out"] if grid["held_out"] > 0 else None,
        "trials": optuna["trials"] / grid["trials"],
        "grid_points_at_or_below_optuna_best": beaten,
        "gap": grid["best"] - optuna["best"],
    }
    print("RATIOS " + json.dumps(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
