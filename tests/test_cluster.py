"""The system on clusters it did not start: `ray job submit` to a `ray start --head`
cluster, and per-pole runs spread over the nodes of a simulated multi-node cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from clusters import RAY_CLI, RayStartCluster
from console_checks import assert_quiet_console

REPO = Path(__file__).resolve().parents[1]
EXCLUDES = ["runs/", ".venv/", ".git/", "*.safetensors", "*.bin"]

pytestmark = pytest.mark.integration


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def test_the_pipeline_job_on_a_ray_start_cluster_trains_tunes_evaluates_and_reports(
    policy_run, tmp_path
):
    """`ray job submit` of jobs/pipeline.py with a reduced tiny config (two dimensions, smoke
    sizes, no baselines). To keep CI short the job resumes a copy of the session's smoke run:
    base, feedback and rewards are complete and skipped; the job retrains the policies (Ray
    Train), then tunes (Ray Tune), evaluates and reports, all on the cluster it was sent to."""
    from conftest import policy_test_config
    from ray.job_submission import JobStatus, JobSubmissionClient

    source, _ = policy_run
    out = tmp_path / "run"
    shutil.copytree(source, out)
    reduced = policy_test_config(
        "name=reduced",
        "policies.baselines=[]",
        "evaluate.systems=[base,base+prompt,psoups-uniform,psoups-tuned]",
    )
    config_file = tmp_path / "reduced.yaml"
    config_file.write_text(yaml.safe_dump(reduced.model_dump(mode="json")))  # smoke sizes in it
    with RayStartCluster(num_cpus=2) as cluster:
        command = [
            RAY_CLI, "job", "submit", "--address", cluster.dashboard_url,
            "--submission-id", "psoups-pipeline-test",
            "--working-dir", str(REPO),
            "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
            "--", sys.executable, "jobs/pipeline.py", "--config", str(config_file),
            "--out", str(out), "--stages", "policies,report", "--force",
        ]  # fmt: skip
        result = subprocess.run(command, cwd=REPO, env=_clean_env(), capture_output=True,
                                text=True, timeout=900)  # fmt: skip
        logs = result.stdout + result.stderr
        status = JobSubmissionClient(cluster.dashboard_url).get_job_status("psoups-pipeline-test")
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert result.returncode == 0
    assert "connecting to Ray cluster" in logs
    assert "stages: policies -> tune -> evaluate -> report" in logs, logs[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    before = json.loads((source / "manifest.json").read_text())
    for stage in ("base", "feedback", "rewards"):  # complete in the copy: left alone
        assert manifest["stages"][stage] == before["stages"][stage]
    stages = ["base", "feedback", "rewards", "policies", "tune", "evaluate", "report"]
    assert {name: manifest["stages"][name]["status"] for name in stages} == dict.fromkeys(
        stages, "complete"
    )
    assert sorted(manifest["policies"]) == ["P2A", "P2B", "P3A", "P3B"]
    assert manifest["baselines"] == {}  # retrained by the job, with its config
    assert sorted(manifest["tuned_weights"]) == ["P2A+P3A", "P2A+P3B", "P2B+P3A", "P2B+P3B"]
    assert (out / "report.md").read_text().startswith("# P-Soups report: reduced")
    assert manifest["evaluation"]["systems"] == ["base", "base+prompt", "psoups-uniform",
                                                 "psoups-tuned"]  # fmt: skip
    assert f"report: {out / 'report.md'}" in logs
    assert f"psoups serve --run {out}" in logs
    # The job's output (no terminal): the project's lines and plain progress; what the
    # workers print is in the run's logs.
    assert_quiet_console(logs, out)
    assert "[policies P2A] iteration" in logs
    assert (out / "logs/tune/evaluator-0.log").is_file()


def test_per_pole_runs_spread_over_simulated_nodes_through_the_run_directory(policy_run, tmp_path):
    source, _ = policy_run
    out = tmp_path / "run"
    shutil.copytree(source, out)
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "multinode_driver.py"), str(out)],
        cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs[-4000:]
    summary = json.loads(logs.split("SUMMARY ", 1)[1].splitlines()[0])
    assert len(summary["nodes"]) == 3
    assert any("node_0" in names for names in summary["node_resources"])
    rewards = summary["rewards"]
    assert sorted(rewards) == ["P2A", "P2B", "P3A", "P3B"]
    used = {record["metrics"]["train"]["node_id"] for record in rewards.values()}
    # Each run needs a node's whole CPU: four runs on three nodes used at least three.
    assert used <= set(summary["nodes"]) and len(used) >= 3, used
    for pole, record in rewards.items():
        # Every artifact went through the run directory's storage, none stayed node-local.
        assert record["path"] == f"./rewards/{pole}/adapter"  # relative to the run directory
        assert (out / "rewards" / pole / "adapter" / "adapter_model.safetensors").is_file()
        assert any((out / "ray" / "rewards" / pole).glob("checkpoint_*")), pole
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["rewards"]["status"] == "complete"
    assert "policies" not in manifest["stages"]  # redone rewards: later stages must rerun
