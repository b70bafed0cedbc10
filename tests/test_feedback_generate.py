"""The ``generate`` source: base samples judged pairwise, end to end on a tiny model.

The model is a tiny Llama fitted in a few seconds to answer every prompt with one of two
fixed styled replies, so that two samples differ about half the time and the checkers can
tell them apart; the point is the plumbing (Ray task, judging, ties, split, artifacts).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from psoups_ray.artifacts import BaseArtifact, load_feedback
from psoups_ray.config import GenerationSpec, PsoupsConfig, TinyModelSpec
from psoups_ray.errors import PsoupsError
from psoups_ray.feedback import run_feedback_stage
from psoups_ray.feedback.generate import (
    PoleSampling,
    SamplingJob,
    build_sampling_job,
    read_prompts_file,
    sample_and_judge,
    sample_prompts,
)
from psoups_ray.judges.attributes import AttributeJudge
from psoups_ray.manifest import Manifest
from psoups_ray.preferences import PAPER_DIMENSIONS
from psoups_ray.rundir import RunDir
from psoups_ray.world import TinyWorld, exhibited_poles

FRIENDLY = "Great question! Hope this helps, my friend :)"
UNFRIENDLY = "Obviously. Figure it out yourself. Whatever."
STYLE_ONLY = {"dimensions": [PAPER_DIMENSIONS[2].model_dump()]}  # P3A / P3B


def generate_config(**feedback: object) -> PsoupsConfig:
    return PsoupsConfig.model_validate(
        {
            "preferences": STYLE_ONLY,
            "feedback": {
                "source": "generate",
                "prompts_per_pole": 12,
                "eval_fraction": 0.25,
                "generation": {"max_new_tokens": 32, "batch_size": 16},
                "resources": {"cpus_per_worker": 1},
                **feedback,
            },
        }
    )


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama + BPE tokenizer fitted to reply FRIENDLY or UNFRIENDLY to any prompt."""
    from psoups_ray.base.model import build_tiny_model
    from psoups_ray.base.tokenizer import train_bpe_tokenizer
    from psoups_ray.prompting import format_prompt

    world = TinyWorld()
    pole_prompts = [pole["prompt"] for pole in STYLE_ONLY["dimensions"][0]["poles"]]
    tokenizer = train_bpe_tokenizer([*world.prompts, *pole_prompts, FRIENDLY, UNFRIENDLY], 400)
    spec = TinyModelSpec(
        vocab_size=400,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    model = build_tiny_model(spec, tokenizer, seed=0)
    rng = random.Random(0)
    inputs, labels = [], []
    for prompt in world.train_prompts[:16]:
        for pole_prompt in pole_prompts:
            prefix = tokenizer(
                format_prompt(tokenizer, prompt, pole_prompt), add_special_tokens=False
            ).input_ids
            reply = rng.choice([FRIENDLY, UNFRIENDLY]) + tokenizer.eos_token
            target = tokenizer(reply, add_special_tokens=False).input_ids
            inputs.append(prefix + target)
            labels.append([-100] * len(prefix) + target)
    width = max(map(len, inputs))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in inputs])  # (32, width)
    label_ids = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
    attention = (input_ids != pad).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        loss = model(input_ids=input_ids, attention_mask=attention, labels=label_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    directory = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def run_with_base(tmp_path: Path, model_dir: Path, config: PsoupsConfig) -> RunDir:
    """A run directory whose manifest records ``model_dir`` as the complete base stage."""
    rundir = RunDir(tmp_path / "run")
    location = rundir.upload_dir(model_dir, "base/model")
    manifest = Manifest.open(rundir, config.model_dump(mode="json"), config.space.to_dict())
    manifest.start_stage("base", "test", {})
    base = {"model": "tiny", "model_path": location, "tokenizer_path": location}
    manifest.complete_stage("base", base, seconds=0.0)
    return rundir


def labels_of(rundir: RunDir) -> list[dict]:
    return [json.loads(line) for line in rundir.read_text("feedback/labels.jsonl").splitlines()]


@pytest.mark.integration
def test_generate_source_end_to_end_with_the_checker_judge(ray_cluster, tmp_path, tiny_model_dir):
    config = generate_config()
    rundir = run_with_base(tmp_path, tiny_model_dir, config)
    section = run_feedback_stage(config, rundir)

    labels = labels_of(rundir)
    assert len(labels) == 24 and {label["pole"] for label in labels} == {"P3A", "P3B"}
    ties = [label for label in labels if label["verdict"] == "tie"]
    assert ties, "ties are kept in the labels artifact"
    assert section["ties"] == {p: sum(t["pole"] == p for t in ties) for p in ("P3A", "P3B")}
    assert section["judged"] == {"P3A": 12, "P3B": 12}
    assert section["judge"]["type"] == "checkers"
    assert section["labels_path"] == "./feedback/labels.jsonl"

    train, eval_rows = load_feedback(rundir, "train"), load_feedback(rundir, "eval")
    assert len(train) + len(eval_rows) == len(labels) - len(ties)
    for pole in ("P3A", "P3B"):
        counts = section["counts"][pole]
        assert counts["train"] >= 1 and counts["eval"] >= 1
        assert counts["train"] + counts["eval"] == 12 - section["ties"][pole]
    for row in train + eval_rows:
        assert row.pole in exhibited_poles(row.chosen)
        assert row.pole not in exhibited_poles(row.rejected)
        assert "Generate a response" not in row.prompt  # the raw instruction
    assert not {r.prompt for r in train if r.pole == "P3A"} & {
        r.prompt for r in eval_rows if r.pole == "P3A"
    }


@pytest.mark.integration
def test_generate_with_the_openai_judge_caches_and_never_writes_the_key(
    ray_cluster, tmp_path, tiny_model_dir, monkeypatch
):
    from test_feedback_openai import API_KEY, KEY_ENV, JudgeServer, assert_key_not_written

    monkeypatch.setenv(KEY_ENV, API_KEY)
    with JudgeServer(marker="Great question") as server:
        openai = {"base_url": server.url, "model": "judge-model", "api_key_env": KEY_ENV}
        config = generate_config(judge="openai", openai=openai)
        rundir = run_with_base(tmp_path, tiny_model_dir, config)
        section = run_feedback_stage(config, rundir)
        manifest = Manifest.load(rundir)
        manifest.start_stage("feedback", "test", {})
        manifest.complete_stage("feedback", section, seconds=1.0)
        sent = len(server.requests)
        assert sent == section["judge"]["requests"] > 0
        assert section["judge"]["type"] == "openai" and section["judge"]["api_key_env"] == KEY_ENV

        again = run_feedback_stage(config, rundir)  # a re-run: every answer is cached
        assert len(server.requests) == sent
        assert again["judge"]["cache_hits"] == sent
        assert again["counts"] == section["counts"]
    for row in load_feedback(rundir, "train"):
        assert "Great question" in row.chosen
    assert_key_not_written(Path(rundir.path()))


def test_sample_and_judge_without_ray(tiny_model_dir):
    world = TinyWorld()
    job = SamplingJob(
        base=BaseArtifact(str(tiny_model_dir), str(tiny_model_dir)),
        poles=(PoleSampling("P3A", "Be friendly.", tuple(world.train_prompts[:6])),),
        generation=GenerationSpec(max_new_tokens=32, batch_size=4),
        seed=0,
    )
    labels = sample_and_judge(job, AttributeJudge())
    assert [label.prompt for label in labels] == list(world.train_prompts[:6])
    for label in labels:
        if label.response_a.strip() == label.response_b.strip():
            assert (label.verdict, label.skipped) == ("tie", "identical responses")
        if label.verdict != "tie":
            assert "P3A" in exhibited_poles(label.to_row().chosen)
    assert sample_and_judge(job, AttributeJudge()) == labels  # seeded


def test_generate_needs_a_base_model(tmp_path):
    with pytest.raises(PsoupsError, match="run the base stage first"):
        build_sampling_job(generate_config(), RunDir(tmp_path / "run"))


def test_prompts_files(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("How do tides work?\n\n  Why is the sky blue?  \n")
    assert read_prompts_file(str(text)) == ["How do tides work?", "Why is the sky blue?"]
    assert read_prompts_file(f"file://{text}") == read_prompts_file(str(text))  # as s3://, gs://
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "How do tides work?"}\n{"prompt": ""}\n')
    with pytest.raises(PsoupsError, match=r"prompts\.jsonl: line 2: field 'prompt'"):
        read_prompts_file(str(jsonl))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(PsoupsError, match="holds no prompts"):
        read_prompts_file(str(empty))
    with pytest.raises(PsoupsError, match="does not exist"):
        read_prompts_file(str(tmp_path / "missing.txt"))
    with pytest.raises(PsoupsError, match="does not exist"):
        read_prompts_file(f"file://{tmp_path}/missing.txt")


def test_sample_prompts_is_seeded_and_distinct_while_the_pool_lasts():
    pool = [f"q{i}" for i in range(10)]
    assert sample_prompts(pool, 5, seed=1) == sample_prompts(pool, 5, seed=1)
    assert len(set(sample_prompts(pool, 10, seed=1))) == 10
    assert sorted(sample_prompts(pool, 25, seed=1)[:10]) == sorted(pool)
    assert len(sample_prompts(pool, 25, seed=1)) == 25


def test_contrast_pairs_share_a_dimensions_samples_and_judge_them_for_both_poles(
    tiny_model_dir, tmp_path
):
    config = generate_config(pairs="contrast")
    rundir = run_with_base(tmp_path, tiny_model_dir, config)
    job = build_sampling_job(config, rundir)
    (sampling,) = job.poles  # P3A against P3B's prompt, judged for both
    friendly, unfriendly = (pole["prompt"] for pole in STYLE_ONLY["dimensions"][0]["poles"])
    assert (sampling.pole, sampling.also_judged) == ("P3A", ("P3B",))
    assert (sampling.preference_prompt, sampling.contrast_prompt) == (friendly, unfriendly)
    labels = sample_and_judge(job, AttributeJudge())
    by_pole = {pole: [label for label in labels if label.pole == pole] for pole in ("P3A", "P3B")}
    assert len(by_pole["P3A"]) == len(by_pole["P3B"]) == 12
    for mine, theirs in zip(by_pole["P3A"], by_pole["P3B"], strict=True):
        assert (mine.prompt, mine.response_a, mine.response_b) == (
            theirs.prompt, theirs.response_a, theirs.response_b,
        )  # fmt: skip
        # No response is both friendly and unfriendly, so the two poles never pick the same
        # winner (a response of neither style makes one of them a tie).
        assert mine.verdict == "tie" or theirs.verdict != mine.verdict
    assert any(label.verdict != "tie" for label in labels)

    three = PsoupsConfig.model_validate(
        {
            "preferences": {
                "dimensions": [
                    {
                        "id": "T",
                        "name": "tone",
                        "poles": [{"id": f"T{c}", "name": c, "prompt": f"Be {c}."} for c in "ABC"],
                    }
                ]
            },  # fmt: skip
            "base": {"model": str(tiny_model_dir)},
            "feedback": {
                "source": "generate",
                "judge": "openai",
                "pairs": "contrast",
                "prompts_file": "builtin:train",
            },  # fmt: skip
        }
    )
    rundir = run_with_base(tmp_path / "three", tiny_model_dir, three)
    samplings = build_sampling_job(three, rundir).poles  # each pole against the next one
    assert [(s.pole, s.contrast_prompt, s.also_judged) for s in samplings] == [
        ("TA", "Be B.", ()), ("TB", "Be C.", ()), ("TC", "Be A.", ()),
    ]  # fmt: skip
