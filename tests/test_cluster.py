"""The system on a cluster it did not start: `ray job submit` to a multi-node `ray start`
cluster, the per-pole runs spread over its nodes, and `serve deploy` of what it trained."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from clusters import (
    RAY_CLI,
    REPO,
    SERVE_CLI,
    RayStartCluster,
    first_chat_answer,
    free_port,
    shipped_serve_config,
)
from console_checks import assert_quiet_console
from ray.util.state import list_nodes

EXCLUDES = ["runs/", ".venv/", ".git/", "*.safetensors", "*.bin"]

pytestmark = pytest.mark.integration


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def test_a_pipeline_job_on_a_multi_node_cluster_trains_tunes_reports_and_serve_deploys(
    policy_run, tmp_path
):
    """`ray job submit` of jobs/pipeline.py to a four-node `ray start` cluster (a head and
    three nodes joined with `ray start --address`, one CPU each, on this machine), with a
    reduced tiny config (two dimensions, smoke sizes, no baselines). To keep CI short the
    job resumes a copy of the session's smoke run: base, feedback and rewards are complete
    and skipped; the job retrains the policies, one Ray Train run per pole, each needing a
    node's whole CPU (so the four runs use every node at once, their artifacts going through the
    run directory, not staying node-local), then tunes (Ray Tune), evaluates and reports,
    all on the cluster it was sent to. Then `serve deploy` serves the job's run there."""
    from conftest import policy_test_config
    from ray.job_submission import JobStatus, JobSubmissionClient

    source, _ = policy_run
    out = tmp_path / "run"
    shutil.copytree(source, out)
    reduced = policy_test_config(
        "name=reduced",
        "policies.baselines=[]",
        "policies.resources.cpus_per_worker=1",
        "evaluate.systems=[base,base+prompt,psoups-uniform,psoups-tuned]",
    )
    config_file = tmp_path / "reduced.yaml"
    config_file.write_text(yaml.safe_dump(reduced.model_dump(mode="json")))  # smoke sizes in it
    nodes = [(1, {f"node_{index}": 1}) for index in range(3)]
    with RayStartCluster(num_cpus=1, resources={"node_head": 1}, workers=nodes) as cluster:
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
        alive = [node for node in list_nodes(cluster.dashboard_url) if node.state == "ALIVE"]
        served = _serve_deploy(cluster, out, tmp_path) if status == JobStatus.SUCCEEDED else None
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

    # The per-pole runs spread over the nodes, through the run directory.
    policies = manifest["policies"]
    assert sorted(policies) == ["P2A", "P2B", "P3A", "P3B"]
    assert len(alive) == 4 and sorted(
        name for node in alive for name in node.resources_total if name.startswith("node_")
    ) == ["node_0", "node_1", "node_2", "node_head"]
    used = {record["metrics"]["node_id"] for record in policies.values()}
    assert used == {node.node_id for node in alive}, used  # a whole node's CPU each
    for pole, record in policies.items():
        assert record["path"] == f"./policies/{pole}/adapter"  # relative to the run directory
        assert (out / "policies" / pole / "adapter" / "adapter_model.safetensors").is_file()
        assert any((out / "ray" / "policies" / pole).glob("checkpoint_*")), pole

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

    # `serve deploy` of the shipped config, pointed at the job's run, to the same cluster
    # (token auth, as `ray start` clusters have), then `serve shutdown`.
    assert served["psoups"] == {
        "weights": manifest["tuned_weights"]["P2A+P3B"],
        "source": "tuned",
    }
    assert served["choices"][0]["finish_reason"] in ("stop", "length")


def _serve_deploy(cluster: RayStartCluster, run: Path, tmp_path: Path) -> dict:
    """Deploy serve_configs/tiny.yaml for ``run`` with `serve deploy`, return its first chat
    answer, and shut it down with `serve shutdown`."""
    port = free_port()
    config = shipped_serve_config(tmp_path, run, port)
    address = ["--address", cluster.dashboard_url]
    deployed = subprocess.run(
        [SERVE_CLI, "deploy", str(config), *address],
        cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
    answer = first_chat_answer(f"http://127.0.0.1:{port}", lambda: True)
    stopped = subprocess.run(
        [SERVE_CLI, "shutdown", "--yes", *address],
        cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert stopped.returncode == 0, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    return answer
