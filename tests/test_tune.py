"""The tune stage for real: Ray Tune sweeps served by evaluator actors over the smoke run's
PPO policies (P2 x P3), tuned weights in the manifest, Pareto fronts; and the simplex."""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from psoups_ray.artifacts import RunArtifacts
from psoups_ray.config import load_config
from psoups_ray.errors import ConfigError
from psoups_ray.manifest import Manifest
from psoups_ray.pipeline import run_pipeline
from psoups_ray.preferences import PreferenceSpace
from psoups_ray.rundir import RunDir
from psoups_ray.tune.pareto import interpolation_weights, pareto_pairs
from psoups_ray.tune.simplex import from_cube, simplex_grid, to_cube

COMBOS = ["P2A+P3A", "P2A+P3B", "P2B+P3A", "P2B+P3B"]


# -- the simplex ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 5])
def test_cube_to_simplex_is_a_bijection_onto_the_simplex(n):
    rng = random.Random(n)
    for _ in range(200):
        u = [rng.random() for _ in range(n - 1)]
        w = from_cube(u)
        assert len(w) == n and all(x >= 0 for x in w) and math.isclose(sum(w), 1.0)
        assert to_cube(w) == pytest.approx(u, abs=1e-9)
    assert from_cube(to_cube([1.0 / n] * n)) == pytest.approx([1.0 / n] * n)
    assert from_cube([1.0] + [0.0] * (n - 2)) == pytest.approx([1.0] + [0.0] * (n - 1))


def test_uniform_cube_samples_cover_the_simplex_evenly():
    rng = random.Random(0)
    samples = [from_cube([rng.random(), rng.random()]) for _ in range(20000)]
    means = [sum(s[i] for s in samples) / len(samples) for i in range(3)]
    assert means == pytest.approx([1 / 3] * 3, abs=0.01)  # Dirichlet(1,1,1): all means 1/3
    # ... and each weight's marginal is Beta(1, 2): P(w_i < 0.5) = 0.75
    for i in range(3):
        assert sum(s[i] < 0.5 for s in samples) / len(samples) == pytest.approx(0.75, abs=0.01)


def test_simplex_grid_enumerates_every_point_once():
    for n, resolution in [(2, 10), (3, 10), (3, 4), (4, 3)]:
        points = simplex_grid(n, resolution)
        assert len(points) == math.comb(resolution + n - 1, n - 1)
        assert len({tuple(p) for p in points}) == len(points)
        for point in points:
            assert math.isclose(sum(point), 1.0) and min(point) >= 0
            assert all(math.isclose(x * resolution, round(x * resolution)) for x in point)
        corners = {tuple(float(i == j) for i in range(n)) for j in range(n)}
        assert corners <= {tuple(p) for p in points}
    assert len(simplex_grid(3, 10)) == 66


def test_evaluators_that_fit_the_cluster():
    from psoups_ray.runtime.pool import evaluators_that_fit

    assert evaluators_that_fit(1.0, 0.0, {"CPU": 2.0}) == 2
    assert evaluators_that_fit(2.0, 0.25, {"CPU": 16.0, "GPU": 1.0}) == 4
    assert evaluators_that_fit(1.0, 0.3, {"CPU": 16.0, "GPU": 1.0}) == 3
    assert evaluators_that_fit(1.0, 1.0, {"CPU": 16.0}) == 0  # no GPU yet (autoscaler)
    assert evaluators_that_fit(0.5, 0.0, {"CPU": 1.5}) == 3


def test_a_trial_process_imports_neither_torch_nor_transformers():
    # Tune starts trial processes that unpickle soup_trial (and the pool and the sweep):
    # they must stay light, the models live in the evaluator actors.
    code = (
        "import pickle, sys\n"
        "import psoups_ray.tune.search as search\n"
        "pickle.loads(pickle.dumps(search.soup_trial))\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


class _Recorder:
    """A sub-search that hands out numbered points and records what it was told."""

    def __init__(self, name: str):
        self.name, self.count, self.completed = name, 0, []

    def suggest(self, trial_id):
        self.count += 1
        return {"point": f"{self.name}{self.count}"}

    def on_trial_result(self, trial_id, result):
        pass

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.completed.append((trial_id, result))


def test_one_search_routes_trials_to_each_combinations_own_sub_search():
    from ray.tune.search import Searcher

    from psoups_ray.tune.search import CombinationSearch

    a, b, c = _Recorder("a"), _Recorder("b"), _Recorder("c")
    search = CombinationSearch({"A": (a, 2), "B": (b, 1), "C": (c, 2)})
    # Round robin over combinations with no trial running.
    assert search.suggest("t1") == {"combination": "A", "point": "a1"}
    assert search.suggest("t2") == {"combination": "B", "point": "b1"}
    assert search.suggest("t3") == {"combination": "C", "point": "c1"}
    # Every combination has a trial running: a second one of a combination with budget left.
    assert search.suggest("t4") == {"combination": "A", "point": "a2"}
    search.on_trial_complete("t3", {"objective": 0.5})
    assert c.completed == [("t3", {"objective": 0.5})] and not a.completed
    assert search.suggest("t5") == {"combination": "C", "point": "c2"}
    # Every budget is spent (A 2, B 1, C 2): Tune is told the search is over.
    assert search.suggest("t6") == Searcher.FINISHED
    search.on_trial_complete("t1", {"objective": 0.1})
    search.on_trial_complete("t2", None, error=True)
    assert a.completed == [("t1", {"objective": 0.1})] and b.completed == [("t2", None)]


def test_a_combination_runs_two_trials_at_once_only_when_no_other_can_start():
    from psoups_ray.tune.search import CombinationSearch

    a, b = _Recorder("a"), _Recorder("b")
    search = CombinationSearch({"A": (a, 3), "B": (b, 1)})
    assert search.suggest("t1")["combination"] == "A"
    assert search.suggest("t2")["combination"] == "B"
    search.on_trial_complete("t2", {"objective": 0.0})  # B is done; A's trial still runs
    assert search.suggest("t3") == {"combination": "A", "point": "a2"}  # nothing else left
    search.on_trial_complete("t1", {"objective": 0.0})
    search.on_trial_complete("t3", {"objective": 0.0})
    assert search.suggest("t4") == {"combination": "A", "point": "a3"}


def test_gain_scores_measure_each_pole_from_the_base_to_its_own_policy():
    from psoups_ray.tune.search import MIN_GAIN_SPAN, objective_of, pole_scores

    references = {"P1A": {"base": -0.5, "policy": 1.5}, "P2B": {"base": 0.2, "policy": 0.22}}
    scores = pole_scores({"P1A": 0.5, "P2B": 0.3}, references)
    # P1A kept half its policy's gain; P2B's policy barely beat the base, so its gap is
    # taken as MIN_GAIN_SPAN (0.1) instead of 0.02: 1.0, not 5.0.
    assert MIN_GAIN_SPAN == 0.1
    assert scores == pytest.approx({"P1A": 0.5, "P2B": 1.0})
    assert objective_of(scores, "worst") == pytest.approx(0.5)
    assert objective_of(scores, "mean") == pytest.approx(0.75)
    assert pole_scores({"P1A": 0.5}, None) == {"P1A": 0.5}  # pole_score: reward


def _sweep(spec, combination=("P1A", "P2B", "P3A")):
    from psoups_ray.tune.search import Sweep

    return Sweep(combination, ("a prompt",), None, spec.generation, seed=0, scale=spec.scale)


def test_a_scale_range_is_searched_with_the_simplex_from_the_uniform_soup_at_each_total():
    from psoups_ray.tune.search import _sub_search, _weights_of

    spec = load_config(None, ["tune.scale=[1, 3]", "tune.num_samples=12"]).tune
    sweep = _sweep(spec)
    search, budget = _sub_search(sweep, spec)
    assert budget == 12
    totals = []
    for k in range(budget):
        config = search.suggest(f"t{k}")
        weights = _weights_of(config, sweep)
        assert min(weights) >= 0 and sum(weights) == pytest.approx(config["scale"])
        totals.append(sum(weights))
        if k < 3:  # the paper's uniform soup (total 1), then at totals 2 and 3
            assert weights == pytest.approx([(k + 1) / 3] * 3)
        search.on_trial_complete(f"t{k}", {"objective": -((sum(weights) - 2.5) ** 2)})
    assert all(1.0 <= total <= 3.0 for total in totals)
    assert max(totals) - min(totals) > 0.5, totals  # the total is a searched dimension
    # A range without 1: the uniform soup at the total nearest 1 first.
    spec = load_config(None, ["tune.scale=[1.5, 2.5]", "tune.scale_points=2"]).tune
    search, _ = _sub_search(_sweep(spec), spec)
    assert [search.suggest(f"s{k}")["scale"] for k in range(2)] == [1.5, 2.5]
    # A single total: no extra dimension, every soup sums to it.
    spec = load_config(None, ["tune.scale=[2, 2]"]).tune
    sweep = _sweep(spec)
    search, _ = _sub_search(sweep, spec)
    for k in range(3):
        config = search.suggest(f"t{k}")
        assert "scale" not in config
        assert sum(_weights_of(config, sweep)) == pytest.approx(2.0)
        search.on_trial_complete(f"t{k}", {"objective": 0.0})


def test_a_grid_search_with_a_scale_range_tries_each_total_with_every_simplex_point():
    from psoups_ray.tune.search import _sub_search, _weights_of, scale_grid

    assert scale_grid(1.0, 3.0, 3) == [1.0, 2.0, 3.0]
    assert scale_grid(2.0, 2.0, 5) == [2.0]
    spec = load_config(
        None,
        ["tune.search=grid", "tune.grid_resolution=2", "tune.scale=[1, 2]", "tune.scale_points=2"],
    ).tune
    sweep = _sweep(spec, ("P2A", "P3B"))
    search, budget = _sub_search(sweep, spec)
    points = [_weights_of(search.suggest(f"t{k}"), sweep) for k in range(budget)]
    assert search.suggest("t-last") is None
    expected = [[0, 1], [0.5, 0.5], [1, 0], [0, 2], [1, 1], [2, 0]]
    assert [w for point in points for w in point] == pytest.approx(sum(expected, []))


def test_pareto_pairs_cross_dimensions():
    space = PreferenceSpace.default()
    pairs = pareto_pairs(space)
    assert len(pairs) == 12  # 3 pairs of dimensions x 2 x 2 poles
    for pair in pairs:
        assert space.dimension_of(pair.a).id != space.dimension_of(pair.b).id
    assert interpolation_weights(11) == pytest.approx([i / 10 for i in range(11)])


def test_tune_config_is_validated():
    with pytest.raises(ConfigError, match=r"tune.combinations\[0\].*P1A.*P1B"):
        load_config(None, ["tune.combinations=[P1A+P1B+P2A]"])
    with pytest.raises(ConfigError, match="unknown pole"):
        load_config(None, ["tune.combinations=[P1A+P9Z]"])
    with pytest.raises(ConfigError, match="tune.generation.max_new_tokens"):
        load_config(None, ["tune.generation.max_new_tokens=300"])
    with pytest.raises(ConfigError, match="tune.search"):
        load_config(None, ["tune.search=random"])
    for bad in ("[3, 1]", "[0, 1]", "[1, 11]"):
        with pytest.raises(ConfigError, match=r"scale must be \[low, high\] with 0 < low <= high"):
            load_config(None, [f"tune.scale={bad}"])
    with pytest.raises(ConfigError, match="tune.scale"):
        load_config(None, ["tune.scale=[1, 2, 3]"])


# -- the stage -----------------------------------------------------------------------


def _config(*overrides: str):
    from conftest import tuned_test_config

    return tuned_test_config(*overrides)


@pytest.fixture
def tune_run(tuned_run):
    return tuned_run


def _trials(out: Path, combo: str) -> list[dict[str, float]]:
    with open(out / "tune" / combo / "trials.csv") as handle:
        return [
            {k: float(v) if k != "trial_id" else v for k, v in row.items()}
            for row in csv.DictReader(handle)
        ]


@pytest.mark.integration
def test_every_combination_is_tuned_by_ray_tune(tune_run):
    out, manifest = tune_run
    assert manifest.is_complete("tune")
    tuned = manifest.data["tuned_weights"]
    section = manifest.data["tune"]
    assert sorted(tuned) == COMBOS
    # The tiny default scores each pole by its gain over the base, relative to its own
    # policy's (tune.pole_score: gain): both ends measured on the trial prompts first.
    references = section["references"]
    assert section["pole_score"] == "gain" and sorted(references) == ["P2A", "P2B", "P3A", "P3B"]
    for combo, weights in tuned.items():
        poles = combo.split("+")
        assert list(weights) == poles
        # The tiny default searches the total weight too (tune.scale: [1, 3]).
        assert min(weights.values()) >= 0 and 1.0 <= sum(weights.values()) <= 3.0
        rows = _trials(out, combo)
        assert len(rows) == 3  # tune.num_samples (smoke)
        # Optuna's first suggestions are the uniform soup at totals 1, 2 and 3, in that
        # order: a combination's trials ran one after another (four combinations for two
        # concurrent trials).
        for row, total in zip(rows, (1, 2, 3), strict=True):
            assert [row[f"weight_{p}"] for p in poles] == pytest.approx([total / 2] * 2), rows
        for row in rows:
            assert row["scale"] == pytest.approx(sum(row[f"weight_{p}"] for p in poles))
            rewards = [row[f"reward_{p}"] for p in poles]
            assert row["mean_reward"] == pytest.approx(sum(rewards) / len(rewards))
            gains = [
                (row[f"reward_{p}"] - references[p]["base"])
                / max(references[p]["policy"] - references[p]["base"], 0.1)
                for p in poles
            ]
            assert [row[f"gain_{p}"] for p in poles] == pytest.approx(gains)
            # The tiny default maximises the worst pole's gain (tune.objective: worst).
            assert row["objective"] == pytest.approx(min(gains))
            assert 0.0 <= row["success_rate"] <= 1.0
        best = max(rows, key=lambda row: row["objective"])
        assert [weights[p] for p in poles] == pytest.approx([best[f"weight_{p}"] for p in poles])
        held_out = section["combinations"][combo]["held_out"]
        assert held_out["tuned"]["weights"] == pytest.approx(weights)
        assert held_out["uniform"]["weights"] == pytest.approx({p: 0.5 for p in poles})
        assert 0.0 <= held_out["tuned"]["success_rate"] <= 1.0
    # One Tune experiment searched every combination and reused its trial processes:
    # the 12 trials ran in at most two (one per concurrent trial), not a fresh Ray worker
    # process each, nor two per combination.
    results = list((out / "ray" / "tune" / "sweeps").glob("*/result.json"))
    assert len(results) == 4 * 3
    first = [json.loads(path.read_text().splitlines()[0]) for path in results]
    assert sorted(r["config"]["combination"] for r in first) == sorted(COMBOS * 3)
    assert len({r["pid"] for r in first}) <= 2, first
    # Two long-lived evaluators served every trial, the comparison and the Pareto sweeps:
    # the models were loaded twice in all, not once per trial.
    evaluators = section["evaluators"]
    assert len(evaluators) == 2 and len({e["pid"] for e in evaluators}) == 2
    # 4 x 3 trials, 2 reference requests (base; each pole's policy), 4 comparisons and 4
    # Pareto pairs.
    assert sum(e["calls"] for e in evaluators) == 4 * 3 + 2 + 4 + 4
    assert all(e["calls"] > 1 for e in evaluators)


@pytest.mark.integration
def test_pareto_fronts_are_swept_and_plotted(tune_run):
    out, manifest = tune_run
    plots = manifest.data["tune"]["pareto"]
    assert sorted(plots) == ["P2A-P3A", "P2A-P3B", "P2B-P3A", "P2B-P3B"]
    fronts = json.loads((out / "tune" / "pareto.json").read_text())
    for key, path in plots.items():
        assert Path(manifest.rundir.resolve(path)).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        points = fronts[key]["points"]
        line = [p for p in points if p["kind"] == "interpolation"]
        assert [p["weight_a"] for p in line] == pytest.approx([i / 10 for i in range(11)])
        marked = {(p["kind"], p["combination"]) for p in points if p["kind"] != "interpolation"}
        assert marked == {("uniform", key.replace("-", "+")), ("tuned", key.replace("-", "+"))}
        for point in points:
            assert math.isfinite(point["reward_a"]) and math.isfinite(point["reward_b"])


@pytest.mark.integration
def test_a_trial_is_reproduced_by_the_evaluator_in_process(tune_run):
    """Trial results are real measurements: the same soup, prompts and seed give the same
    rewards outside Ray."""
    from psoups_ray.runtime.evaluator import SoupEvaluator
    from psoups_ray.runtime.queries import SoupModels, SoupQuery
    from psoups_ray.seeding import derive_seed
    from psoups_ray.tune.stage import tune_prompts

    out, manifest = tune_run
    config = _config()
    combo = "P2A+P3B"
    best = max(_trials(out, combo), key=lambda row: row["objective"])
    poles = tuple(combo.split("+"))
    weights = {p: best[f"weight_{p}"] for p in poles}
    run = RunArtifacts.load(out)
    models = SoupModels.from_run(run, config.rewards.max_length, False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the 1-CPU actor
    try:
        evaluator = SoupEvaluator(models)
        result = evaluator.evaluate(
            [SoupQuery(weights, poles)],
            tune_prompts(config, run)[0],
            config.tune.generation,
            derive_seed(config.seed, "tune", combo),
        )[0]
    finally:
        torch.set_num_threads(threads)
    assert result["mean_reward"] == pytest.approx(best["mean_reward"], abs=1e-4)
    for pole in poles:
        assert result["rewards"][pole] == pytest.approx(best[f"reward_{pole}"], abs=1e-4)
    # ... and so are the references the gains are measured from: the base, then each
    # policy alone, on the trial prompts with the references' seed.
    references = manifest.data["tune"]["references"]
    torch.set_num_threads(1)
    try:
        ends = [
            evaluator.evaluate(
                queries,
                tune_prompts(config, run)[0],
                config.tune.generation,
                derive_seed(config.seed, "tune", "references"),
            )
            for queries in (
                [SoupQuery({}, tuple(references))],
                [SoupQuery({p: 1.0}, (p,)) for p in references],
            )
        ]
    finally:
        torch.set_num_threads(threads)
    for pole, alone in zip(references, ends[1], strict=True):
        assert ends[0][0]["rewards"][pole] == pytest.approx(references[pole]["base"], abs=1e-4)
        assert alone["rewards"][pole] == pytest.approx(references[pole]["policy"], abs=1e-4)


@pytest.mark.integration
def test_merge_defaults_to_the_tuned_weights(tune_run, tmp_path):
    from psoups_ray.runtime.export import make_soup

    out, manifest = tune_run
    summary = make_soup(str(out), "P3B+P2A", str(tmp_path / "soup"))
    assert summary["weights_from"] == "tuned"
    assert summary["weights"] == pytest.approx(manifest.data["tuned_weights"]["P2A+P3B"])


@pytest.mark.integration
def test_an_interrupted_stage_resumes_and_grid_search_walks_the_simplex_and_totals(
    tune_run, tmp_path
):
    source, manifest = tune_run
    out = tmp_path / "run"
    shutil.copytree(source, out)
    rundir = RunDir(out)
    Manifest.load(rundir).fail_stage("tune", "interrupted")  # as if killed after 3 sweeps
    rundir.delete("ray/tune/results/P2B+P3B.json")
    resumed = run_pipeline(_config(), str(out), ["tune"], run_prerequisites=False)
    tuned = resumed.data["tuned_weights"]
    for combo in COMBOS[:3]:
        assert tuned[combo] == manifest.data["tuned_weights"][combo]
    calls = sum(e["calls"] for e in resumed.data["tune"]["evaluators"])
    # one sweep redone, then the comparison and the fronts; the references the gains are
    # measured from are read back, not measured again
    assert calls == 3 + 4 + 4
    assert resumed.data["tune"]["references"] == manifest.data["tune"]["references"]

    grid = _config(
        "tune.search=grid",
        "tune.grid_resolution=2",
        "tune.scale=[1, 2]",
        "tune.scale_points=2",
        "tune.combinations=[P2A+P3B]",
        "tune.pareto=false",
        "tune.num_report_prompts=0",
        # more evaluators than the 2-CPU cluster holds: the stage starts the 2 that fit
        # instead of waiting for the others forever
        "tune.max_concurrent_trials=5",
        "tune.resources.cpus=1",
    )
    manifest = run_pipeline(grid, str(out), ["tune"], force=True, run_prerequisites=False)
    assert len(manifest.data["tune"]["evaluators"]) == 2
    rows = _trials(out, "P2A+P3B")
    points = sorted((row["weight_P2A"], row["weight_P3B"]) for row in rows)
    assert points == [(0, 1), (0, 2), (0.5, 0.5), (1, 0), (1, 1), (2, 0)]
    assert all(row["scale"] == row["weight_P2A"] + row["weight_P3B"] for row in rows)
    best = max(rows, key=lambda row: row["objective"])
    assert manifest.data["tuned_weights"] == {
        "P2A+P3B": {"P2A": best["weight_P2A"], "P3B": best["weight_P3B"]}
    }
    assert manifest.data["tune"]["pareto"] == {}
