"""Length-sorted micro-batches: the same training step as the whole batch in one pass."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig

from psoups_ray.base import sft
from psoups_ray.base.model import build_tiny_model
from psoups_ray.base.stage import prepare_tiny_sft
from psoups_ray.config import load_config
from psoups_ray.rewards.train import LengthSortedRewardTrainer, lora_config
from psoups_ray.rundir import RunDir
from psoups_ray.runtime.loading import load_tokenizer
from psoups_ray.runtime.rewards import score_right_padded
from psoups_ray.training import length_sorted_groups, select_rows, train_from


def test_groups_sort_by_length_and_rows_keep_their_tensors():
    assert length_sorted_groups([3, 9, 1, 7, 5], 2) == [[1, 3], [4, 0], [2]]
    inputs = {
        "input_ids": torch.arange(12).reshape(3, 4),  # (B, L)
        "attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]),
        "margin": torch.tensor([0.1, 0.2, 0.3]),  # (B,)
        "use_cache": False,
    }
    rows = [2, 0]
    part = select_rows(inputs, rows)
    assert part["input_ids"].tolist() == [[8, 9], [0, 1]]
    assert part["attention_mask"].tolist() == [[1, 0], [1, 1]]
    assert part["margin"].tolist() == pytest.approx([0.3, 0.1])
    assert part["use_cache"] is False


class CountingSFTTrainer(sft.LengthSortedSFTTrainer):
    passes: list[int]

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.passes.append(inputs["input_ids"].shape[0])
        return super().compute_loss(model, inputs, *args, **kwargs)


def _sft_weights(tmp_path, micro_batch_size):
    config = load_config("tiny", ["base.sft.num_examples=48", "base.sft.batch_size=12"])
    config.base.sft.micro_batch_size = micro_batch_size
    rundir = RunDir(str(tmp_path / "run"))
    job = prepare_tiny_sft(config, rundir)
    tokenizer = load_tokenizer(str(rundir.local_dir(job.tokenizer_relpath)))
    rows = [json.loads(line) for line in rundir.read_text(job.data_relpath).splitlines()]
    args = sft._training_args(job, str(tmp_path / "out"))
    # SGD: the update is the gradient itself (Adam's first step would hide its scale).
    args.optim, args.learning_rate, args.max_steps, args.save_strategy = "sgd", 0.5, 2, "no"
    args.lr_scheduler_type, args.warmup_steps = "constant", 0
    trainer = CountingSFTTrainer(
        model=build_tiny_model(config.base.tiny, tokenizer, seed=0),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.micro_batch_size = micro_batch_size
    trainer.passes = []
    output = trainer.train()
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return weights, output.training_loss, trainer.passes


def test_sft_micro_batches_take_the_same_steps_as_whole_batches(tmp_path):
    whole, whole_loss, whole_passes = _sft_weights(tmp_path / "whole", None)
    micro, micro_loss, micro_passes = _sft_weights(tmp_path / "micro", 5)
    assert whole_passes == [12, 12]
    assert micro_passes == [5, 5, 2, 5, 5, 2]
    assert micro_loss == pytest.approx(whole_loss, rel=1e-5)
    initial = build_tiny_model(
        load_config("tiny").base.tiny,
        load_tokenizer(str(tmp_path / "whole" / "run" / "base" / "tokenizer")),
        seed=0,
    ).state_dict()
    for name, weight in whole.items():
        moved = (weight - initial[name]).abs().max()
        assert moved > 0, name  # every parameter trained
        torch.testing.assert_close(micro[name], weight, rtol=1e-5, atol=1e-6 * float(moved) + 1e-7)


def test_a_run_resumed_from_its_last_checkpoint_trains_no_further(tmp_path):
    """Resumed from its last step's checkpoint, a run only loads it (transformers' Trainer
    would take one step past max_steps); from an earlier one it trains the steps left."""
    # Four batches an epoch, three steps: the epoch is not over at the last checkpoint.
    config = load_config("tiny", ["base.sft.num_examples=48", "base.sft.batch_size=12"])
    rundir = RunDir(str(tmp_path / "run"))
    job = prepare_tiny_sft(config, rundir)
    tokenizer = load_tokenizer(str(rundir.local_dir(job.tokenizer_relpath)))
    rows = Dataset.from_list(
        [json.loads(line) for line in rundir.read_text(job.data_relpath).splitlines()]
    )

    def trainer(out: str, seed: int) -> CountingSFTTrainer:
        args = sft._training_args(job, str(tmp_path / out))
        args.max_steps, args.save_strategy, args.save_steps, args.logging_steps = 3, "steps", 1, 1
        args.save_total_limit = None  # keep checkpoint-2 too
        made = CountingSFTTrainer(
            model=build_tiny_model(config.base.tiny, tokenizer, seed=seed),
            args=args,
            train_dataset=rows,
            processing_class=tokenizer,
        )
        made.passes = []
        return made

    first = trainer("first", seed=0)
    first.train()
    trained = {n: p.detach().clone() for n, p in first.model.named_parameters()}
    losses = [entry["loss"] for entry in first.state.log_history if "loss" in entry]

    finished = trainer("finished", seed=1)  # other initial weights: the checkpoint's must win
    output = train_from(finished, str(tmp_path / "first" / "checkpoint-3"), 3)
    assert finished.passes == [] and finished.state.global_step == output.global_step == 3
    assert output.training_loss == pytest.approx(sum(losses) / len(losses))
    for name, weight in finished.model.named_parameters():
        torch.testing.assert_close(weight, trained[name])

    resumed = trainer("resumed", seed=1)
    output = train_from(resumed, str(tmp_path / "first" / "checkpoint-2"), 3)
    assert resumed.passes == [12] and output.global_step == 3
    assert train_from(trainer("fresh", seed=0), None, 3).global_step == 3


class CountingRewardTrainer(LengthSortedRewardTrainer):
    passes: list[int]

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.passes.append(inputs["input_ids"].shape[0])
        return super().compute_loss(model, inputs, *args, **kwargs)


def _reward_weights(tmp_path, micro_batch_size):
    config = load_config("tiny", ["base.sft.num_examples=40"])
    rundir = RunDir(str(tmp_path / "run"))
    job = prepare_tiny_sft(config, rundir)
    tokenizer = load_tokenizer(str(rundir.local_dir(job.tokenizer_relpath)))
    build_tiny_model(config.base.tiny, tokenizer, seed=0).save_pretrained(tmp_path / "base")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    examples = [json.loads(line) for line in rundir.read_text(job.data_relpath).splitlines()]
    pairs = [
        {"prompt": a["prompt"], "chosen": a["completion"], "rejected": b["completion"]}
        for a, b in zip(examples[::2], examples[1::2], strict=True)
    ]
    spec = config.rewards
    args = RewardConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=10,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        report_to="none",
        center_rewards_coefficient=0.1,
        seed=0,
    )
    torch.manual_seed(0)  # the score head and the adapter start the same
    trainer = CountingRewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
        peft_config=lora_config(spec.lora, config.base.tiny.num_layers),
    )
    trainer.micro_batch_size = micro_batch_size
    trainer.passes = []
    output = trainer.train()
    weights = {
        n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad
    }
    return weights, output.training_loss, trainer.passes


def test_reward_micro_batches_take_the_same_steps_as_whole_batches(tmp_path):
    whole, whole_loss, whole_passes = _reward_weights(tmp_path / "whole", None)
    micro, micro_loss, micro_passes = _reward_weights(tmp_path / "micro", 4)
    assert whole_passes == [20, 20]  # 10 chosen, then their 10 rejected responses
    assert micro_passes == [8, 8, 4, 8, 8, 4]
    assert micro_loss == pytest.approx(whole_loss, rel=1e-5)
    assert whole.keys() == micro.keys() and any("score" in name for name in whole)
    for name, weight in whole.items():
        torch.testing.assert_close(micro[name], weight, rtol=1e-5, atol=1e-6)


def test_reward_scoring_batches_texts_of_similar_length_and_keeps_their_order(tmp_path):
    config = load_config("tiny", ["base.sft.num_examples=12"])
    rundir = RunDir(str(tmp_path / "run"))
    job = prepare_tiny_sft(config, rundir)
    tokenizer = load_tokenizer(str(rundir.local_dir(job.tokenizer_relpath)))
    texts = [
        json.loads(line)["completion"] for line in rundir.read_text(job.data_relpath).splitlines()
    ]
    widths = []

    def score(input_ids, attention_mask):  # (b, L) -> (b,): the last real token's id + length
        widths.append(input_ids.shape[1])
        assert bool(attention_mask[:, -1].any())  # no column of padding only
        last = attention_mask.sum(dim=1) - 1
        return input_ids[torch.arange(len(input_ids)), last] + 1000.0 * attention_mask.sum(dim=1)

    scores = score_right_padded(tokenizer, texts, 5, score, max_length=40)
    expected = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=40)["input_ids"]
        expected.append(ids[-1] + 1000.0 * len(ids))
    assert scores.tolist() == expected
    assert widths == sorted(widths, reverse=True) and len(widths) == 3
