"""The `ray job submit` entry points, submitted for real to the session's Ray cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def test_pipeline_job_submitted_to_a_running_cluster(ray_cluster, tmp_path):
    out = tmp_path / "run"
    ray_cli = Path(sys.executable).with_name("ray")
    command = [
        str(ray_cli), "job", "submit",
        "--address", f"http://{ray_cluster.dashboard_url}",
        "--working-dir", str(REPO),
        "--", sys.executable, "jobs/pipeline.py", "--smoke-test", "--stages", "base",
        "--out", str(out),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "connecting to Ray cluster" in result.stdout + result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["base"]["status"] == "complete"
    assert Path(manifest["base"]["model_path"], "config.json").is_file()


def test_job_script_rejects_bad_arguments_clearly():
    result = subprocess.run(
        [sys.executable, "jobs/base.py", "--set", "base.sft.steps=0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "base.sft.steps: Input should be greater than or equal to 1 (given 0)" in result.stderr


@pytest.mark.parametrize("stage", ["policies", "tune"])
def test_stage_job_script_shows_the_stage_help(stage):
    result = subprocess.run(
        [sys.executable, f"jobs/{stage}.py", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0 and stage in result.stdout
