"""The world source, the split by prompt, the artifacts and the checks before any work."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from psoups_ray.artifacts import PreferenceRow, load_feedback
from psoups_ray.config import load_config
from psoups_ray.errors import ConfigError, PsoupsError, StorageError
from psoups_ray.feedback import check_feedback_config, run_feedback_stage
from psoups_ray.feedback.rows import split_by_prompt
from psoups_ray.feedback.stage import world_feedback
from psoups_ray.rundir import RunDir
from psoups_ray.world import TinyWorld, exhibited_poles

POLES = ["P1A", "P1B", "P2A", "P2B", "P3A", "P3B"]


def world_config(*overrides: str):
    return load_config(None, ["feedback.pairs_per_pole=20", *overrides])


def test_world_source_counts_and_disjoint_prompts():
    config = world_config()
    train, eval_rows = world_feedback(config)
    world = TinyWorld(seed=config.world.seed, num_eval_prompts=config.world.num_eval_prompts)
    for pole in POLES:
        assert sum(r.pole == pole for r in train) == 18
        assert sum(r.pole == pole for r in eval_rows) == 2  # max(2, round(20 * 0.1))
    assert {r.prompt for r in train} <= set(world.train_prompts)
    assert {r.prompt for r in eval_rows} <= set(world.eval_prompts)
    assert not {r.prompt for r in train} & {r.prompt for r in eval_rows}
    # chosen exhibits the pole (the world's pairs are correct by construction)
    assert all(r.pole in exhibited_poles(r.chosen) for r in train[:30])


def test_world_source_is_deterministic_from_the_seed():
    assert world_feedback(world_config()) == world_feedback(world_config())
    assert world_feedback(world_config("seed=1")) != world_feedback(world_config())


def test_world_eval_share_follows_eval_fraction():
    train, eval_rows = world_feedback(world_config("feedback.eval_fraction=0.25"))
    assert sum(r.pole == "P3A" for r in eval_rows) == 5
    assert sum(r.pole == "P3A" for r in train) == 15


def test_world_stage_writes_artifacts_and_section(tmp_path):
    rundir = RunDir(tmp_path / "run")
    section = run_feedback_stage(world_config(), rundir)
    assert section["source"] == "world"
    assert section["counts"] == {pole: {"train": 18, "eval": 2} for pole in POLES}
    assert section["train_path"] == "./feedback/train.jsonl"  # relative: the run can move
    assert rundir.resolve(section["train_path"]) == str(tmp_path / "run/feedback/train.jsonl")
    first = json.loads(Path(rundir.resolve(section["train_path"])).read_text().splitlines()[0])
    assert set(first) == {"prompt", "pole", "chosen", "rejected"}
    assert "Generate a response" not in first["prompt"]  # the raw instruction only
    assert load_feedback(rundir, "train") == world_feedback(world_config())[0]
    assert len(load_feedback(rundir, "eval")) == 12


def test_load_feedback_errors(tmp_path):
    rundir = RunDir(tmp_path / "empty")
    with pytest.raises(StorageError, match="run the feedback stage first"):
        load_feedback(rundir, "train")
    with pytest.raises(ValueError, match="split must be"):
        load_feedback(rundir, "test")  # type: ignore[arg-type]
    rundir.write_text("feedback/eval.jsonl", '{"prompt": "q"}\n')
    with pytest.raises(StorageError, match="line 1 is not a feedback row"):
        load_feedback(rundir, "eval")


def _rows(sizes: dict[str, list[int]]) -> list[PreferenceRow]:
    """``{pole: [pairs of prompt 0, pairs of prompt 1, ...]}`` -> rows."""
    return [
        PreferenceRow(f"prompt {i}", pole, f"good {pole} {i} {k}", f"bad {pole} {i} {k}")
        for pole, per_prompt in sizes.items()
        for i, n in enumerate(per_prompt)
        for k in range(n)
    ]


def test_split_keeps_prompts_together_and_every_pole_on_both_sides():
    rng = random.Random(0)
    sizes = {pole: [rng.randint(1, 4) for _ in range(rng.randint(2, 30))] for pole in POLES}
    rows = _rows(sizes)
    train, eval_rows = split_by_prompt(rows, POLES, eval_fraction=0.1, seed=3)
    assert sorted(train + eval_rows, key=str) == sorted(rows, key=str)
    for pole in POLES:
        train_prompts = {r.prompt for r in train if r.pole == pole}
        eval_prompts = {r.prompt for r in eval_rows if r.pole == pole}
        assert train_prompts and eval_prompts and not train_prompts & eval_prompts
    assert split_by_prompt(rows, POLES, 0.1, seed=3) == (train, eval_rows)
    assert split_by_prompt(rows, POLES, 0.1, seed=4) != (train, eval_rows)


def test_split_holds_out_about_the_eval_fraction():
    rows = _rows({"P1A": [1] * 100})
    _, eval_rows = split_by_prompt(rows, ["P1A"], eval_fraction=0.2, seed=0)
    assert len(eval_rows) == 20


def test_split_names_each_pole_without_two_prompts():
    rows = _rows({"P1A": [3, 2], "P1B": [4], "P2A": []})
    with pytest.raises(PsoupsError) as info:
        split_by_prompt(rows, ["P1A", "P1B", "P2A"], 0.1, seed=0, context="extra context")
    message = str(info.value)
    assert "pole P1B has 4 pair(s) on 1 distinct prompt(s)" in message
    assert "pole P2A has 0 pair(s) on 0 distinct prompt(s)" in message
    assert "P1A" not in message and message.endswith("extra context")


def test_check_feedback_config_lists_every_problem(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="feedback.pairs_per_pole: 2 pairs leave no training"):
        check_feedback_config(load_config(None, ["feedback.pairs_per_pole=2"]))

    missing = tmp_path / "nope.jsonl"
    text = tmp_path / "pairs.txt"
    text.write_text("x")
    config = load_config(
        None,
        ["feedback.source=files", f"feedback.files=[{{path: {missing}}}, {{path: {text}}}]"],
    )
    with pytest.raises(ConfigError) as info:
        check_feedback_config(config)
    assert f"feedback.files[0].path: {missing} does not exist" in str(info.value)
    assert "feedback.files[1].path" in str(info.value) and "'.txt'" in str(info.value)

    monkeypatch.delenv("PSOUPS_NO_SUCH_KEY", raising=False)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    real = load_config(
        None,
        [
            f"base.model={model_dir}",
            "feedback.openai.api_key_env=PSOUPS_NO_SUCH_KEY",
            "feedback.openai.criteria={P9Z: be nice}",
            "feedback.openai.base_url=localhost:8000/v1",
        ],
    )
    assert (real.feedback.source, real.feedback.judge) == ("generate", "openai")
    with pytest.raises(ConfigError) as info:
        check_feedback_config(real)
    message = str(info.value)
    assert "4 problem(s)" in message
    assert "feedback.prompts_file: required for source 'generate' with a real base" in message
    assert "the environment variable PSOUPS_NO_SUCH_KEY is not set" in message
    assert "feedback.openai.criteria: 'P9Z' is not a pole" in message
    assert "must start with http:// or https://" in message

    prompts = tmp_path / "prompts.txt"
    with pytest.raises(ConfigError, match=f"feedback.prompts_file: {prompts} does not exist"):
        check_feedback_config(
            load_config(None, ["feedback.source=generate", f"feedback.prompts_file={prompts}"])
        )
    check_feedback_config(load_config(None, []))  # the tiny default is fine
