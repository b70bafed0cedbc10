"""The `ray job submit` entry scripts (a job on a real cluster: tests/test_cluster.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_job_script_rejects_bad_arguments_clearly():
    result = subprocess.run(
        [sys.executable, "jobs/base.py", "--set", "base.sft.steps=0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "base.sft.steps: Input should be greater than or equal to 1 (given 0)" in result.stderr


@pytest.mark.parametrize("stage", ["policies", "tune", "evaluate", "report"])
def test_stage_job_script_shows_the_stage_help(stage):
    result = subprocess.run(
        [sys.executable, f"jobs/{stage}.py", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0 and stage in result.stdout
