"""Reward models for real: TRL RewardTrainer + LoRA inside concurrent Ray Train runs."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from faults import ManifestWatcher, checkpoint_steps, train_workers_of

from psoups_ray.artifacts import AdapterArtifact, RunArtifacts
from psoups_ray.manifest import Manifest
from psoups_ray.pipeline import STAGE_NAMES
from psoups_ray.ray_utils import TorchRun, fit_torch_runs
from psoups_ray.rewards import RewardScorer
from psoups_ray.rewards.stage import reward_jobs
from psoups_ray.rewards.train import reward_train_loop
from psoups_ray.rundir import RunDir
from psoups_ray.world import TinyWorld, check_attributes, exhibited_poles

pytestmark = pytest.mark.integration

# The session's run (conftest.py) trains the reward models these tests check: P2 x P3 with
# 200 pairs per pole and LoRA on every layer. Tests that train reward models of their own
# start from a copy of it as it was after its feedback stage.
POLES = ["P2A", "P2B", "P3A", "P3B"]
LATER = ("rewards", "policies", "baselines")  # what the copy leaves out


def _config(*overrides: str):
    from conftest import policy_test_config

    return policy_test_config(*overrides)


def _feedback_copy(policy_run, tmp_path):
    """A copy of the session's run as it was after its feedback stage: no reward models,
    policies or Ray Train state of theirs, so a rewards stage starts from scratch."""
    source, _ = policy_run
    target = tmp_path / "run"

    def later_outputs(directory, names):
        inside = Path(directory).relative_to(source).parts
        return [name for name in names if name in LATER] if inside in ((), ("ray",)) else []

    shutil.copytree(source, target, ignore=later_outputs)
    manifest = Manifest.load(RunDir(target))
    manifest.invalidate(list(STAGE_NAMES[STAGE_NAMES.index("rewards") :]))
    for section in LATER:
        manifest.data.pop(section, None)
    manifest.save()
    return target


def test_every_pole_gets_an_accurate_reward_model(policy_run):
    _, manifest = policy_run
    rewards = manifest.data["rewards"]
    assert sorted(rewards) == POLES
    for pole in POLES:
        metrics = rewards[pole]["metrics"]
        assert metrics["pairs"] >= 20
        # 30 steps on tiny-world pairs already separate clean opposites. One in four style
        # pairs has a mixed-style rejected response (a hard negative) that so few steps do
        # not always separate; the full default reaches 1.000 on every pole.
        assert metrics["accuracy"] >= (0.75 if pole.startswith("P3") else 0.9), (pole, metrics)
        assert metrics["score_std"] > 0
        assert rewards[pole]["path"].endswith(f"rewards/{pole}/adapter")
    counts = manifest.data["feedback"]["counts"]
    assert all(counts[pole]["train"] > 0 and counts[pole]["eval"] > 0 for pole in POLES)


def test_the_runs_executed_concurrently(policy_run):
    _, manifest = policy_run
    intervals = sorted(
        (m["metrics"]["train"]["started_at"], m["metrics"]["train"]["finished_at"])
        for m in manifest.data["rewards"].values()
    )
    overlapping = sum(
        1
        for i, (start, end) in enumerate(intervals)
        if any(s < end and start < e for j, (s, e) in enumerate(intervals) if j != i)
    )
    # 2 CPUs, 0.5 CPU per run: the four train at once.
    assert overlapping == 4, intervals


def test_scorer_ranks_and_normalises(policy_run):
    out, _ = policy_run
    scorer = RewardScorer.from_run(RunDir(out))
    world = TinyWorld(seed=0)
    pairs = world.preference_pairs("P3A", 40, seed=7, prompts=world.eval_prompts)
    prompts = [p.prompt for p in pairs]
    chosen = scorer.score("P3A", prompts, [p.chosen for p in pairs])
    rejected = scorer.score("P3A", prompts, [p.rejected for p in pairs])
    assert chosen.shape == (40,)
    clean = torch.tensor([check_attributes(p.rejected)["P3"] == "P3B" for p in pairs])
    assert clean.sum() == 30  # the other ten are mixed-style hard negatives
    assert (chosen > rejected)[clean].float().mean() >= 0.9
    raw = scorer.score("P3A", prompts, [p.chosen for p in pairs], normalize=False)
    stats = scorer.statistics("P3A")
    assert torch.allclose(chosen, (raw - stats["score_mean"]) / stats["score_std"], atol=1e-5)
    combo = scorer.score_combination(["P2A", "P3A"], prompts, [p.chosen for p in pairs])
    expected = (scorer.score("P2A", prompts, [p.chosen for p in pairs]) + chosen) / 2
    assert torch.allclose(combo, expected, atol=1e-5)


def test_reward_score_tracks_the_attribute_checker(policy_run):
    """On responses with random poles, each pole's reward separates texts that show it."""
    out, _ = policy_run
    scorer = RewardScorer.from_run(RunDir(out))
    world = TinyWorld(seed=0)
    examples = world.sft_examples(120, seed=11)
    prompts = [e.prompt for e in examples]
    responses = [e.response for e in examples]
    for pole in POLES:
        shows = torch.tensor([pole in exhibited_poles(r) for r in responses])
        scores = scorer.score(pole, prompts, responses)
        # AUC: how often a text showing the pole outscores one that does not.
        auc = (scores[shows][:, None] > scores[~shows][None, :]).float().mean()
        correlation = torch.corrcoef(torch.stack([scores, shows.float()]))[0, 1]
        assert auc >= 0.75 and correlation > 0.35, (pole, float(auc), float(correlation))


def test_adapter_loads_with_plain_peft_and_transformers(policy_run):
    out, manifest = policy_run
    adapter = manifest.rundir.resolve(manifest.data["rewards"]["P3A"]["path"])
    base = manifest.rundir.resolve(manifest.data["base"]["model_path"])
    script = textwrap.dedent(f"""
        import sys, torch
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({adapter!r})
        model = AutoModelForSequenceClassification.from_pretrained({base!r}, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        model = PeftModel.from_pretrained(model, {adapter!r}).eval()
        assert not any(name.startswith("psoups_ray") for name in sys.modules)
        text = tokenizer.apply_chat_template([{{"role": "user", "content": "What is salt?"}}],
                                             tokenize=False, add_generation_prompt=True)
        eos = tokenizer.eos_token
        good = text + "Great question! Salt is tiny crystals. Hope this helps!" + eos
        bad = text + "Obviously. Salt is tiny crystals. Figure it out yourself." + eos
        with torch.no_grad():
            scores = model(**tokenizer([good, bad], return_tensors="pt", padding=True)).logits
        print(float(scores[0, 0]), float(scores[1, 0]))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    good, bad = map(float, result.stdout.split()[-2:])
    assert good > bad
    scorer = RewardScorer.from_run(RunDir(out))
    ours = scorer.score(
        "P3A",
        ["What is salt?"],
        ["Great question! Salt is tiny crystals. Hope this helps!"],
        normalize=False,
    )
    assert float(ours[0]) == pytest.approx(good, abs=1e-4)


def test_deepspeed_zero2_on_cpu(policy_run, tmp_path):
    """One pole's reward model trained by DeepSpeed ZeRO-2 (gloo) inside a Ray Train run."""
    out = _feedback_copy(policy_run, tmp_path)
    # 30 steps: at 20 the held-out accuracy landed anywhere in 0.85-0.95 across machines
    # (ZeRO-2's CPU reductions are not bit-reproducible across thread counts).
    config = _config("rewards.steps=30", "rewards.deepspeed.enabled=true")
    rundir = RunDir(out)
    job = next(
        j
        for j in reward_jobs(config, RunArtifacts(rundir, Manifest.load(rundir).data))
        if j.name == "P2B"
    )
    fit_torch_runs(
        [TorchRun(reward_train_loop, {"job": job}, config.rewards.resources, "rewards", "P2B")],
        rundir,
    )
    metrics = rundir.read_json(job.metrics_relpath)
    assert metrics["deepspeed_stage"] == 2
    assert metrics["eval"]["P2B"]["accuracy"] >= 0.85, metrics
    scorer = RewardScorer(
        job.base,
        {"P2B": AdapterArtifact("P2B", "reward", rundir.uri(job.output_relpath))},
        job.preference_prompts,
        config.rewards.max_length,
    )
    world = TinyWorld(seed=0)
    prompt = world.eval_prompts[0]
    texts = [
        world.respond(prompt, {"P1": "P1A", "P2": pole, "P3": "P3A"}, random.Random(5))
        for pole in ("P2B", "P2A")
    ]
    scores = scorer.score("P2B", [prompt] * 2, texts)
    assert scores[0] > scores[1]  # the informative answer outscores the concise one


def test_a_killed_multitask_run_and_killed_driver_resume_without_retraining(policy_run, tmp_path):
    """`psoups run` through the rewards stage in multitask mode (one reward model
    conditioned on the pole): its worker is killed (Ray Train restarts it from its
    checkpoint), then the driver itself; the same command again resumes the run from its
    newest checkpoint and leaves the completed base and feedback stages alone. (The policy
    tests kill one of several concurrent per-pole runs.)"""
    run = _feedback_copy(policy_run, tmp_path)
    base_record = Manifest.load(RunDir(run)).stage("base")
    config_file = tmp_path / "rewards.yaml"  # the session run's config: the same two dimensions
    # 16 steps, a checkpoint every 4: the restarted worker has 12 steps left when the
    # driver is killed. This checks the multitask plumbing, the conditioning and the
    # resumption, not accuracy (one model learning every pole needs about as many steps as
    # the per-pole runs together).
    config = _config(
        "rewards.mode=multitask", "rewards.steps=16", "rewards.checkpoint_every=4",
        "ray.num_cpus=2",
    )  # fmt: skip
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    command = [
        sys.executable, "-m", "psoups_ray", "run", "--config", str(config_file),
        "--out", str(run), "--stages", "rewards",
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ""}
    watcher = ManifestWatcher(run / "manifest.json")
    watcher.start()
    log = tmp_path / "first.log"
    with open(log, "w") as output:
        first = subprocess.Popen(
            command, env=env, start_new_session=True, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 300
        while not checkpoint_steps(run, "rewards") and time.monotonic() < deadline:
            assert first.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        workers = train_workers_of(first.pid)
        assert workers, "no Ray Train worker to kill"
        os.kill(workers[0], signal.SIGKILL)
        while "resuming from checkpoint" not in log.read_text() and time.monotonic() < deadline:
            assert first.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        assert "resuming from checkpoint" in log.read_text(), "the killed run did not restart"
        time.sleep(1)
        newest = checkpoint_steps(run, "rewards")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not Manifest.load(RunDir(run)).is_complete("rewards"), "killed after it finished"

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    watcher.stopped.set()
    watcher.join()
    assert second.returncode == 0, second.stderr[-3000:]
    assert watcher.reads > 100 and not watcher.errors, (watcher.reads, watcher.errors[:3])

    manifest = Manifest.load(RunDir(run))
    assert manifest.stage("base") == base_record, "the completed base stage was redone"
    rewards = manifest.data["rewards"]
    assert sorted(rewards) == POLES
    assert len({record["path"] for record in rewards.values()}) == 1
    assert all(
        record["conditioned"] and record["mode"] == "multitask" for record in rewards.values()
    )
    for pole in POLES:
        metrics = rewards[pole]["metrics"]
        assert metrics["pairs"] >= 20 and 0.0 <= metrics["accuracy"] <= 1.0
    train = rewards["P2A"]["metrics"]["train"]
    assert train["steps"] == 16
    # The run restarts from the newest checkpoint it had at the kill: it repeats fewer
    # steps than the checkpoint interval.
    assert train["resumed"] and train["resumed_from_step"] >= newest["multitask"] > 0, (
        train,
        newest,
    )
    # The pole reaches the model through its input: the same response scores differently
    # when the model is told a different pole. (How well the conditioned model orders each
    # pole's pairs varies from run to run on the tiny world; it is recorded, not asserted.)
    scorer = RewardScorer.from_run(RunDir(run))
    world = TinyWorld(seed=0)
    prompt = world.eval_prompts[0]
    response = world.respond(prompt, {"P1": "P1A", "P2": "P2A", "P3": "P3A"}, random.Random(3))
    raw = {
        pole: float(scorer.score(pole, [prompt], [response], normalize=False)[0]) for pole in POLES
    }
    assert len({round(value, 4) for value in raw.values()}) == len(POLES), raw
