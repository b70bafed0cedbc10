"""The benchmark scripts run (smoke sizes) and print the ratios they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def test_ppo_memory_benchmark_compares_both_layouts():
    result = subprocess.run(
        [sys.executable, "bench/ppo_memory.py", "--smoke-test", "--threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shared: peak memory" in result.stdout and "separate: peak memory" in result.stdout
    ratios = json.loads(result.stdout.split("RATIOS ", 1)[1].splitlines()[0])
    assert ratios["memory"] > 0 and ratios["time"] > 0


def test_tune_efficiency_benchmark_runs_both_searches(policy_run):
    out, _ = policy_run
    result = subprocess.run(
        [sys.executable, "bench/tune_efficiency.py", "--run", str(out), "--smoke-test"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ratios = json.loads(result.stdout.split("RATIOS ", 1)[1].splitlines()[0])
    assert ratios["trials"] == pytest.approx(1 / 3)  # 1 Optuna trial vs the 3-point grid
    assert 0 <= ratios["grid_points_at_or_below_optuna_best"] <= 1
    assert "grid:   3 trials" in result.stdout
