"""The benchmark scripts run (smoke sizes) and print the ratios they promise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def run_bench(*args: str) -> tuple[str, dict]:
    """(stdout, the RATIOS line's JSON) of ``python bench/...`` run from the repository,
    which must leave nothing in its temporary directory."""
    scratch = Path(tempfile.mkdtemp(prefix="psoups-test-bench-"))
    try:
        result = subprocess.run(
            [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
            # Ray's session directories stay where Ray keeps them (it reads TMPDIR too).
            env={**os.environ, "TMPDIR": str(scratch),
                 "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", "/tmp")},
        )  # fmt: skip
        # torch keeps its compile cache there (torchinductor_<user>): not the benchmark's
        left = sorted(p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not left, f"the benchmark left {left} in its temporary directory"
    stdout = result.stdout
    return stdout, json.loads(stdout.split("RATIOS ", 1)[1].splitlines()[0])


def test_ppo_memory_benchmark_compares_both_layouts():
    stdout, ratios = run_bench("bench/ppo_memory.py", "--smoke-test", "--threads", "1")
    assert "shared: peak memory" in stdout and "separate: peak memory" in stdout
    assert ratios["memory"] > 0 and ratios["time"] > 0


def test_decode_benchmark_measures_ours_generate_and_the_bound_in_one_run():
    stdout, ratios = run_bench("bench/decode.py", "--smoke-test", "--dtypes", "float32")
    assert all(f"{name} " in stdout for name in ("bound", "generate", "merged", "mixing"))
    for key in ("ours_tokens_per_s", "generate_tokens_per_s", "bound_tokens_per_s"):
        assert ratios[key] > 0
    assert ratios["dtype"] == "float32" and len(ratios["rows"]) == 1
    row = ratios["rows"][0]
    assert ratios["ours_vs_bound"] == row["mixing_vs_bound"]
    assert row["mixing_vs_generate"] == round(
        row["mixing_tokens_per_s"] / row["generate_tokens_per_s"], 2
    )


def test_micro_batch_benchmark_trains_the_same_sft_steps_both_ways():
    stdout, ratios = run_bench("bench/micro_batches.py", "--smoke-test")
    assert " whole: " in stdout and " micro: " in stdout
    assert ratios["micro"] > 0 and ratios["same_loss"] is True


def test_tune_efficiency_benchmark_runs_both_searches(policy_run):
    out, _ = policy_run
    stdout, ratios = run_bench("bench/tune_efficiency.py", "--run", str(out), "--smoke-test")
    # The run's tune.scale is [1, 3]: the 3-point simplex grid at totals 1, 2 and 3, against
    # a quarter as many Optuna trials.
    assert ratios["trials"] == pytest.approx(2 / 9)
    assert 0 <= ratios["grid_points_at_or_below_optuna_best"] <= 1
    assert "grid:   9 trials" in stdout and "(grid: 1, 2, 3)" in stdout


def test_personal_soups_benchmark_simulates_users_on_the_run(policy_run, tmp_path):
    out, _ = policy_run
    stdout, ratios = run_bench(
        "bench/personal_soups.py", "--run", str(out), "--smoke-test", "--out", str(tmp_path)
    )
    # P2 x P3 at step 1/2: 8 grid soups, 4 named ones and the base.
    assert "bank: 13 soups (8 on the grid" in stdout
    for name in ("active", "random", "active_table"):
        assert 0 < ratios[f"{name}_share_at_10"] <= 2, ratios
    assert 0 <= ratios["base_share"] <= 2 and 0 <= ratios["named_share"] <= 2
    summary = json.loads((tmp_path / "personal_soups.json").read_text())
    assert set(summary["share"]) == {"active", "random", "active+table"}
    assert all(len(values) == 3 for values in summary["share"].values())  # 3 choices each
    assert (tmp_path / "personal_soups.png").stat().st_size > 0


def test_scaled_run_has_a_bigger_base_that_serves_the_same_soups_both_ways(policy_run, tmp_path):
    """bench/scaled_run.py: the serving benchmark's bigger base (random weights) loads in
    the serving engine, and its mixed soup equals the merged one."""
    import torch

    from psoups_ray.prompting import format_prompt
    from psoups_ray.serve.engine import GenerationJob, SamplingParams, SoupEngine

    source, _ = policy_run
    out = tmp_path / "scaled"
    result = subprocess.run(
        [sys.executable, "bench/scaled_run.py", "--run", str(source), "--out", str(out),
         "--hidden", "192", "--layers", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "base" / "model" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (192, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mixing = SoupEngine(str(out), device="cpu")
        merged = SoupEngine(str(out), device="cpu", strategy="merged")
        weights = mixing.catalog.resolve("psoups:P2B+P3A").weights
        assert weights.count(0.0) == 2 and sum(weights) == pytest.approx(1.0)
        prompt = format_prompt(mixing.tokenizer, "What is salt?")
        job = GenerationJob(prompt, weights, SamplingParams(12, temperature=0.0))
        soup = merged.merged_model(weights)
        plain = GenerationJob(prompt, [0.0] * len(weights), SamplingParams(12, temperature=0.0))
        texts = ["".join(out.text for step in engine_steps for out in step)
                 for engine_steps in (list(mixing.stream([job])),
                                      list(merged.stream([plain], model=soup)))]  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert texts[0] == texts[1] and texts[0]
    with pytest.raises(subprocess.CalledProcessError):  # an existing --out is refused
        subprocess.run(
            [sys.executable, "bench/scaled_run.py", "--run", str(source), "--out", str(out)],
            cwd=REPO, capture_output=True, check=True, timeout=600,
        )  # fmt: skip
