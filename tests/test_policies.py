"""PPO policies for real: our PPO on a shared LoRA base inside concurrent Ray Train runs.

One smoke run (informativeness and style poles, see conftest's ``policy_run``) goes through
base, feedback, rewards and policies; the tests read it or copy it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from faults import checkpoint_steps, train_workers_of

from psoups_ray.artifacts import RunArtifacts
from psoups_ray.manifest import Manifest
from psoups_ray.pipeline import run_pipeline
from psoups_ray.policies.job import build_trainer, sample_queries
from psoups_ray.policies.stage import policy_jobs
from psoups_ray.rewards import RewardScorer
from psoups_ray.rundir import RunDir
from psoups_ray.runtime.evaluator import SoupEvaluator
from psoups_ray.runtime.queries import SoupModels

pytestmark = pytest.mark.integration

HISTORY_KEYS = {"reward", "kl", "entropy", "value_loss", "clip_fraction", "response_length"}


POLES = ["P2A", "P2B", "P3A", "P3B"]


def _config(*overrides: str):
    from conftest import policy_test_config

    return policy_test_config(*overrides)


def test_every_pole_and_baseline_is_trained_and_recorded(policy_run):
    out, manifest = policy_run
    assert manifest.is_complete("policies")
    policies, baselines = manifest.data["policies"], manifest.data["baselines"]
    assert sorted(policies) == POLES
    assert sorted(baselines) == ["pmorl", "rlhf"]
    for name, record in [*policies.items(), *baselines.items()]:
        path = manifest.rundir.resolve(record["path"])
        assert Path(path, "adapter_config.json").is_file(), name
        metrics = record["metrics"]
        assert metrics["steps"] == 3 and metrics["resumed_from_step"] == 0
        assert metrics["episodes"] == 3 * 8  # iterations x rollouts (smoke: 8) x one worker
        held_out = metrics["eval"]
        assert held_out["num_prompts"] == 8
        for which in ("policy", "base"):
            assert set(held_out[which]["target_rates"]) <= set(POLES)
        assert held_out["policy"]["kl_to_reference"] == held_out["policy"]["kl_to_reference"]
        # The hacking watch: per pole asked, the reward models' agreement with the checkers.
        agreement = held_out["policy"]["reward_judge_agreement"]
        assert sorted(agreement) == ([name] if name in POLES else POLES), agreement
        for entry in agreement.values():
            assert 0 <= entry["pairs"] <= 8
            assert (entry["agreement"] is None) == (entry["pairs"] == 0)
            assert entry["agreement"] is None or 0 <= entry["agreement"] <= 1
        history = json.loads(Path(path).parent.joinpath("metrics.json").read_text())
        assert len(history["history"]) == 3
        assert HISTORY_KEYS <= set(history["history"][0]), name
    # P-MORL asks for one combination per query; the single-reward baseline for every pole.
    assert baselines["pmorl"]["kind"] == "pmorl"
    assert set(baselines["rlhf"]["metrics"]["eval"]["policy"]["target_rates"]) == set(POLES)
    assert "success_rate" not in baselines["rlhf"]["metrics"]["eval"]["policy"]


def test_baselines_may_get_the_budget_of_all_the_pole_runs_together(policy_run):
    out, _ = policy_run
    budget = 3 * len(POLES)  # the smoke runs' 3 iterations, for each of the four poles
    jobs = policy_jobs(_config(f"policies.baseline_steps={budget}"), RunDir(out))
    steps = {job.name: job.policy.steps for job in jobs}
    assert steps == {**dict.fromkeys(POLES, 3), "pmorl": budget, "rlhf": budget}


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return max(a[0], b[0]) < min(a[1], b[1])


def test_the_runs_executed_concurrently(policy_run):
    _, manifest = policy_run
    records = {
        **manifest.data["policies"],
        **{f"baseline {k}": v for k, v in manifest.data["baselines"].items()},
    }
    # Each run's Ray Train run as the driver saw it (launch to fit() returning) and its
    # training loop (after start-up and model loading, before evaluation and saving).
    ray_runs = {
        name: (r["metrics"]["ray_run"]["launched_at"], r["metrics"]["ray_run"]["returned_at"])
        for name, r in records.items()
    }
    loops = {
        name: (r["metrics"]["started_at"], r["metrics"]["finished_at"])
        for name, r in records.items()
    }
    for name, (launched, returned) in ray_runs.items():
        assert launched <= loops[name][0] < loops[name][1] <= returned + 1, name
    # The runs are launched in order, baselines first, as many at once as the cluster
    # holds: four at 0.5 CPU on 2 CPUs; each later one when a running one has returned.
    by_launch = sorted(ray_runs, key=lambda name: ray_runs[name][0])
    assert set(by_launch[:2]) == {"baseline pmorl", "baseline rlhf"}, ray_runs
    in_flight = [
        sum(start <= ray_runs[name][0] < end for start, end in ray_runs.values())
        for name in by_launch
    ]
    assert max(in_flight) == 4, (in_flight, ray_runs)
    for name in by_launch[4:]:
        assert sum(end <= ray_runs[name][0] for _, end in ray_runs.values()) >= 1, ray_runs
    for name, span in ray_runs.items():  # no run ran alone
        assert any(_overlap(span, other) for o, other in ray_runs.items() if o != name), name
    # And training itself ran side by side: the first runs' loops overlap (which ones
    # depends on how fast each worker starts; a smoke run trains for a few seconds).
    names = list(loops)
    assert any(_overlap(loops[a], loops[b]) for i, a in enumerate(names) for b in names[i + 1 :]), (
        loops
    )


def test_every_file_of_a_run_honours_the_umask(policy_run):
    """Under umask 022 everything a run wrote (every stage, every Ray worker) is 0644 and
    every directory 0755, so teammates on a shared file system can read the run."""
    out, _ = policy_run
    modes = {}
    for path in [out, *out.rglob("*")]:
        if path.is_symlink() or path.name.startswith(".lock-"):
            continue  # a live scratch lock (none should be in a run directory anyway)
        mode = path.stat().st_mode & 0o777
        if mode != (0o755 if path.is_dir() else 0o644):
            modes[str(path.relative_to(out))] = oct(mode)
    assert len(list(out.rglob("*"))) > 50 and not modes, modes


def test_policy_adapter_loads_with_plain_peft(policy_run):
    out, manifest = policy_run
    adapter = manifest.rundir.resolve(manifest.data["policies"]["P3A"]["path"])
    base = manifest.rundir.resolve(manifest.data["base"]["model_path"])
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from peft import PeftModel
        assert not any(name.startswith("psoups_ray") for name in sys.modules)
        tokenizer = AutoTokenizer.from_pretrained({adapter!r})
        base = AutoModelForCausalLM.from_pretrained({base!r})
        ids = tokenizer("What is salt?", return_tensors="pt").input_ids
        with torch.no_grad():
            before = base(ids).logits
            model = PeftModel.from_pretrained(base, {adapter!r})
            after = model(ids).logits
        trained = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert trained and all(p.abs().sum() > 0 for p in trained)  # B starts at zero
        print("max_logit_change", float((after - before).abs().max()))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split()[-1]) > 1e-4


def test_ppo_step_trains_only_the_adapters_and_scores_like_the_reward_models(policy_run):
    """Without Ray: the shared-base roles agree with the standalone models they replace."""
    out, _ = policy_run
    config = _config("policies.critic_init=fresh")
    rundir = RunDir(out)
    job = policy_jobs(config, rundir, ["P3A"])[0]
    torch.manual_seed(0)
    trainer = build_trainer(job, torch.device("cpu"))
    models = trainer.models
    queries = sample_queries(job, step=0, rank=0, count=4)

    # One reward rule: PPO's reward function, the tune/evaluate evaluator and the public
    # RewardScorer give the same normalised score, for a text longer than the reward
    # models' max length too (each keeps its first rewards.max_length tokens).
    long_text = " ".join(["Hi there, my friend! Salt is a mineral, sodium chloride."] * 60)
    texts = ["Hi there, my friend! Salt is a mineral. Hope this helps!", "Obviously. Salt.",
             long_text, long_text + " Obviously."]  # fmt: skip
    scored = [*queries[:3], queries[2]]  # the two long texts answer the same query
    prompts = [q.prompt for q in scored]
    tokenizer = trainer.tokenizer
    assert len(tokenizer(texts[2])["input_ids"]) > config.rewards.max_length
    scorer = RewardScorer.from_run(rundir)
    expected = scorer.score("P3A", prompts, texts)
    assert torch.allclose(trainer.reward_fn(scored, texts), expected, atol=1e-4)
    evaluator = SoupEvaluator(SoupModels.from_run(RunArtifacts.load(out),
                                                  config.rewards.max_length, False))  # fmt: skip
    tuned = evaluator.normalized_rewards("P3A", prompts, texts, batch_size=3)
    assert torch.allclose(tuned, expected, atol=1e-4)
    # Past max_length nothing counts: the two long texts differ only after it.
    assert expected[2] == pytest.approx(float(expected[3]), abs=1e-5)
    del evaluator

    # A fresh LoRA policy is the reference (B = 0), token for token.
    sampled = trainer.sample(queries, 24, 1.0, 1.0, seed=0)
    encoded, responses = sampled.encoded, sampled.responses
    ids = torch.cat([encoded["input_ids"], responses], dim=1)
    attention = torch.ones_like(ids)
    attention[:, : encoded["input_ids"].shape[1]] = encoded["attention_mask"]
    query_length = encoded["input_ids"].shape[1]
    policy, _ = models.policy_logprobs(ids, attention, query_length, 1.0)
    reference = models.reference_logprobs(ids, attention, query_length, 1.0)
    assert torch.allclose(policy, reference, atol=1e-5)

    frozen = {n: p.detach().clone() for n, p in models.peft.named_parameters() if "lora" not in n}
    rewards_before = {
        n: p.detach().clone() for n, p in models.peft.named_parameters() if "reward_" in n
    }
    trainable = {
        id(p): p.detach().clone() for p in models.policy_parameters() + models.critic_parameters()
    }
    metrics = trainer.step(queries)
    assert HISTORY_KEYS <= set(metrics)
    trainer.step(sample_queries(job, step=1, rank=0, count=4))  # LoRA A moves once B != 0
    for parameter in models.policy_parameters() + models.critic_parameters():
        assert not torch.equal(parameter, trainable[id(parameter)])
    for name, parameter in models.peft.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
        if name in rewards_before:
            assert torch.equal(parameter, rewards_before[name]), name


def test_killed_worker_resumes_from_its_checkpoint(policy_run, tmp_path):
    from conftest import keep_dimensions

    source, _ = policy_run
    out = tmp_path / "run"
    shutil.copytree(source, out)
    shutil.rmtree(out / "ray" / "policies")  # only checkpoints of this test's runs count
    # Two data-parallel workers per run, so the run also exercises gradient averaging; the
    # two runs of one dimension (P2), each with its own checkpoints, at once.
    config = keep_dimensions(
        _config(
            "policies.steps=6",  # the kill comes after iteration 2, with 4 to go
            "policies.checkpoint_every=2",
            "policies.baselines=[]",
            "policies.resources.num_workers=2",
            "policies.resources.cpus_per_worker=0.25",  # both runs' workers at once
        ),
        ("P2",),
    )
    poles = ["P2A", "P2B"]
    errors: list[BaseException] = []

    def run():
        try:
            run_pipeline(config, str(out), ["policies"], force=True)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    # Ray Train lists a checkpoint in this snapshot once every worker has reported it.
    snapshots = [
        out / "ray" / "policies" / pole / "checkpoint_manager_snapshot.json" for pole in poles
    ]
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and thread.is_alive():
        if all(snapshot.is_file() for snapshot in snapshots):
            break  # every run holds a registered checkpoint (iteration 2 or later)
        time.sleep(0.2)
    workers = train_workers_of(os.getpid())  # the cluster this process started
    assert workers, "no training worker to kill"
    newest = checkpoint_steps(out, "policies")
    os.kill(workers[0], signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive() and not errors, errors
    policies = Manifest.load(RunDir(out)).data["policies"]
    assert sorted(policies) == poles
    resumed = {pole: r["metrics"]["resumed_from_step"] for pole, r in policies.items()}
    assert all(r["metrics"]["steps"] == 6 for r in policies.values())
    assert any(step >= 2 for step in resumed.values()), resumed
    # A restarted run resumes from the newest checkpoint it had when the worker died, so it
    # repeats fewer iterations than the checkpoint interval.
    for pole, step in resumed.items():
        if step:
            assert step >= newest.get(pole, 0), (pole, step, newest)
    for record in policies.values():
        path = RunDir(out).resolve(record["path"])
        history = json.loads(Path(path).parent.joinpath("metrics.json").read_text())
        assert [int(m["step"]) for m in history["history"]] == list(range(1, 7))


def test_merge_command_exports_the_soup_as_adapter_and_model(policy_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from psoups_ray.__main__ import main

    out, manifest = policy_run
    base = manifest.rundir.resolve(manifest.data["base"]["model_path"])
    policy_dir = manifest.rundir.resolve(manifest.data["policies"]["P3A"]["path"])
    assert main(["merge", "--run", str(out), "--combo", "p3a", "--out", str(tmp_path / "a")]) == 0
    code = main(
        [
            "merge",
            "--run",
            str(out),
            "--combo",
            "P3A",
            "--export",
            "model",
            "--out",
            str(tmp_path / "m"),
        ]
    )
    assert code == 0
    ids = torch.tensor([[5, 17, 40, 3, 9]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), policy_dir)
        reference = expected(input_ids=ids).logits
        soup = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "a")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
        assert torch.allclose(soup(input_ids=ids).logits, reference, atol=1e-5)
        assert torch.allclose(merged(input_ids=ids).logits, reference, atol=1e-4)
    capsys.readouterr()
    for args, message in [
        (["--combo", "P3A+P3B"], "P3A"),  # two poles of one dimension
        (["--combo", "P9Z"], "unknown pole"),
        (["--combo", "P3A", "--weights", "P3B=1"], "not in the combination"),
        (["--combo", "P3A", "--weights", "P3A=-1"], "--allow-negative"),
    ]:
        code = main(["merge", "--run", str(out), "--out", str(tmp_path / "x"), *args])
        assert code == 2 and message in capsys.readouterr().err, args
    code = main(["merge", "--run", str(out), "--combo", "P3A", "--out", str(tmp_path / "a")])
    assert code == 2 and "not empty" in capsys.readouterr().err
