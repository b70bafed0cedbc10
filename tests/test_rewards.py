"""Reward models for real: TRL RewardTrainer + LoRA inside concurrent Ray Train runs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from psoups_ray.config import SMOKE_TEST_OVERRIDES, load_config
from psoups_ray.manifest import Manifest
from psoups_ray.pipeline import run_pipeline
from psoups_ray.rewards import RewardScorer
from psoups_ray.rundir import RunDir
from psoups_ray.world import TinyWorld, exhibited_poles

pytestmark = pytest.mark.integration

POLES = ["P1A", "P1B", "P2A", "P2B", "P3A", "P3B"]


def _config(*overrides: str):
    return load_config(None, [*SMOKE_TEST_OVERRIDES, "rewards.steps=30", *overrides])


@pytest.fixture(scope="module")
def rewarded_run(ray_cluster, tmp_path_factory):
    """One smoke run through feedback and per-pole rewards, shared by the module's tests."""
    out = tmp_path_factory.mktemp("rewards") / "run"
    manifest = run_pipeline(_config(), str(out), ["rewards"])
    return out, manifest


def test_every_pole_gets_an_accurate_reward_model(rewarded_run):
    _, manifest = rewarded_run
    rewards = manifest.data["rewards"]
    assert sorted(rewards) == POLES
    for pole in POLES:
        metrics = rewards[pole]["metrics"]
        assert metrics["pairs"] >= 10
        # 30 steps on tiny-world pairs already separate every pole's pairs.
        assert metrics["accuracy"] >= 0.9, (pole, metrics)
        assert metrics["score_std"] > 0
        assert rewards[pole]["path"].endswith(f"rewards/{pole}/adapter")
    counts = manifest.data["feedback"]["counts"]
    assert all(counts[pole]["train"] > 0 and counts[pole]["eval"] > 0 for pole in POLES)


def test_the_six_runs_executed_concurrently(rewarded_run):
    _, manifest = rewarded_run
    intervals = sorted(
        (m["metrics"]["train"]["started_at"], m["metrics"]["train"]["finished_at"])
        for m in manifest.data["rewards"].values()
    )
    overlapping = sum(
        1
        for i, (start, end) in enumerate(intervals)
        if any(s < end and start < e for j, (s, e) in enumerate(intervals) if j != i)
    )
    # 2 CPUs, 0.5 CPU per run: up to four train at once, so most intervals overlap.
    assert overlapping >= 4, intervals


def test_scorer_ranks_and_normalises(rewarded_run):
    out, _ = rewarded_run
    scorer = RewardScorer.from_run(RunDir(out))
    world = TinyWorld(seed=0)
    pairs = world.preference_pairs("P3A", 40, seed=7, prompts=world.eval_prompts)
    prompts = [p.prompt for p in pairs]
    chosen = scorer.score("P3A", prompts, [p.chosen for p in pairs])
    rejected = scorer.score("P3A", prompts, [p.rejected for p in pairs])
    assert chosen.shape == (40,)
    assert (chosen > rejected).float().mean() >= 0.9
    raw = scorer.score("P3A", prompts, [p.chosen for p in pairs], normalize=False)
    stats = scorer.statistics("P3A")
    assert torch.allclose(chosen, (raw - stats["score_mean"]) / stats["score_std"], atol=1e-5)
    combo = scorer.score_combination(["P1A", "P3A"], prompts, [p.chosen for p in pairs])
    expected = (scorer.score("P1A", prompts, [p.chosen for p in pairs]) + chosen) / 2
    assert torch.allclose(combo, expected, atol=1e-5)


def test_reward_score_tracks_the_attribute_checker(rewarded_run):
    """On responses with random poles, each pole's reward separates texts that show it."""
    out, _ = rewarded_run
    scorer = RewardScorer.from_run(RunDir(out))
    world = TinyWorld(seed=0)
    examples = world.sft_examples(120, seed=11)
    prompts = [e.prompt for e in examples]
    responses = [e.response for e in examples]
    for pole in POLES:
        shows = torch.tensor([pole in exhibited_poles(r) for r in responses], dtype=torch.float)
        scores = scorer.score(pole, prompts, responses)
        correlation = torch.corrcoef(torch.stack([scores, shows]))[0, 1]
        assert correlation > 0.6, (pole, float(correlation))


def test_adapter_loads_with_plain_peft_and_transformers(rewarded_run):
    out, manifest = rewarded_run
    adapter = manifest.data["rewards"]["P3A"]["path"]
    base = manifest.data["base"]["model_path"]
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
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    good, bad = map(float, result.stdout.split()[-2:])
    assert good > bad
    scorer = RewardScorer.from_run(RunDir(out))
    ours = scorer.score("P3A", ["What is salt?"],
                        ["Great question! Salt is tiny crystals. Hope this helps!"],
                        normalize=False)  # fmt: skip
    assert float(ours[0]) == pytest.approx(good, abs=1e-4)


def test_multitask_mode_trains_one_conditioned_model(ray_cluster, tmp_path):
    manifest = run_pipeline(_config("rewards.mode=multitask"), str(tmp_path / "run"), ["rewards"])
    rewards = manifest.data["rewards"]
    assert sorted(rewards) == POLES
    assert len({record["path"] for record in rewards.values()}) == 1
    assert all(
        record["conditioned"] and record["mode"] == "multitask" for record in rewards.values()
    )
    # One model, told the pole in its input, still orders each pole's held-out pairs.
    for pole in POLES:
        assert rewards[pole]["metrics"]["accuracy"] >= 0.8, (pole, rewards[pole]["metrics"])
    scorer = RewardScorer.from_run(RunDir(tmp_path / "run"))
    friendly = "Great question! Salt is tiny crystals. Hope this helps!"
    curt = "Obviously. Salt is tiny crystals. Figure it out yourself."
    up = scorer.score("P3A", ["What is salt?"] * 2, [friendly, curt])
    down = scorer.score("P3B", ["What is salt?"] * 2, [friendly, curt])
    assert up[0] > up[1] and down[1] > down[0]


def test_deepspeed_zero2_on_cpu(ray_cluster, tmp_path):
    space = {
        "dimensions": [
            {
                "id": "P3",
                "name": "style",
                "poles": [
                    {"id": "P3A", "name": "friendly", "prompt": "Be friendly."},
                    {"id": "P3B", "name": "unfriendly", "prompt": "Be unfriendly."},
                ],
            }
        ]
    }
    config_file = tmp_path / "ds.yaml"
    config_file.write_text(json.dumps({"preferences": space}))
    config = load_config(
        config_file, [*SMOKE_TEST_OVERRIDES, "rewards.steps=20", "rewards.deepspeed.enabled=true"]
    )
    manifest = run_pipeline(config, str(tmp_path / "run"), ["rewards"])
    for pole in ("P3A", "P3B"):
        metrics = manifest.data["rewards"][pole]["metrics"]
        assert metrics["train"]["deepspeed_stage"] == 2
        assert metrics["accuracy"] >= 0.9, metrics
    assert Manifest.load(RunDir(tmp_path / "run")).is_complete("rewards")
