"""Training one reward model: base + LoRA + scalar score head, Bradley-Terry loss.

The loss is TRL's ``RewardTrainer``: -log sigmoid(r(x, y_chosen) - r(x, y_rejected))
(Bradley & Terry 1952; Ouyang et al. 2022, eq. 1). :func:`run_reward_training`
is callable without Ray; :func:`reward_train_loop` is the Ray Train per-worker
entry point around it (checkpoint reporting, resume after a failure).

After training, rank 0 scores the held-out pairs: pairwise accuracy per pole,
and each pole's score mean/std (used to normalise scores across poles) go into
``reward_stats.json`` next to the adapter, so the statistics travel with it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, TaskType
from transformers import AutoModelForSequenceClassification, PrinterCallback, TrainerCallback
from trl import RewardConfig, RewardTrainer

from psoups_ray.artifacts import BaseArtifact, RunArtifacts
from psoups_ray.config import RewardsConfig
from psoups_ray.progress import log
from psoups_ray.rundir import RunDir
from psoups_ray.runtime.loading import DTYPES, load_base_tokenizer
from psoups_ray.runtime.rewards import STATS_FILE, reward_input, score_right_padded
from psoups_ray.scratch import scratch_directory
from psoups_ray.seeding import derive_seed
from psoups_ray.training import (
    MicroBatchMixin,
    ProgressCallback,
    checkpoint_step,
    length_sorted_groups,
    lora_kwargs,
    restore_ray_checkpoint,
    select_rows,
    threads_for_worker,
    train_from,
    trainer_kwargs,
    worker_node_id,
)


@dataclass(frozen=True)
class RewardJob:
    """One reward model's run: a single pole (P-Soups) or all poles, conditioned (P-MORL)."""

    run_location: str
    name: str  # pole id, or "multitask"
    poles: tuple[str, ...]  # the poles whose feedback it learns
    conditioned: bool  # the pole's preference prompt is part of the input
    preference_prompts: dict[str, str]  # pole id -> preference prompt
    base: BaseArtifact
    rewards: RewardsConfig
    seed: int
    output_relpath: str  # adapter directory in the run dir
    metrics_relpath: str  # metrics JSON written by rank 0


class LengthSortedRewardTrainer(MicroBatchMixin, RewardTrainer):
    """TRL's RewardTrainer, each step's pairs run as length-sorted groups of
    ``micro_batch_size`` pairs (:class:`psoups_ray.training.MicroBatchMixin`).

    TRL's batch is (2B, L): the B chosen responses, then their B rejected ones. A group
    keeps both halves of its pairs; its loss (a mean over pairs) is weighted by its share
    of the batch's pairs, so the groups' losses add up to the batch's.
    """

    def micro_batches(self, inputs, num_items_in_batch):
        attention_mask = inputs["attention_mask"]  # (2B, L), right-padded
        pairs = attention_mask.shape[0] // 2
        lengths = attention_mask.sum(dim=1)
        pair_lengths = torch.maximum(lengths[:pairs], lengths[pairs:]).tolist()  # (B,)
        parts = []
        for group in length_sorted_groups(pair_lengths, self.micro_batch_size):
            rows = group + [pairs + i for i in group]
            part = select_rows(inputs, rows)
            if "margin" in inputs:  # (B,): one per pair
                part["margin"] = inputs["margin"][group]
            parts.append((part, len(group) / pairs))
        return parts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if return_outputs:
            loss, outputs = result
            return loss * self.loss_weight, outputs
        return result * self.loss_weight


def lora_config(spec, num_layers: int) -> LoraConfig:
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,  # also trains and saves the score head (modules_to_save)
        **lora_kwargs(spec, num_layers),
    )


def deepspeed_config(rewards: RewardsConfig) -> dict[str, Any] | None:
    spec = rewards.deepspeed
    if not spec.enabled:
        return None
    zero: dict[str, Any] = {"stage": spec.stage}
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }


def load_reward_base(base: BaseArtifact):
    """The base as a sequence classifier with a fresh one-output score head."""
    return AutoModelForSequenceClassification.from_pretrained(
        base.local_model(),
        num_labels=1,
        dtype="auto" if base.dtype == "auto" else DTYPES[base.dtype],
        **base.load_options(),
    )


def _rows(job: RewardJob, tokenizer, split: str) -> list[dict[str, str]]:
    rows = []
    for row in RunArtifacts.load(job.run_location).feedback(split):
        if row.pole not in job.poles:
            continue
        preference = job.preference_prompts[row.pole] if job.conditioned else None
        prompt, chosen = reward_input(tokenizer, row.prompt, row.chosen, preference)
        _, rejected = reward_input(tokenizer, row.prompt, row.rejected, preference)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "pole": row.pole})
    return rows


def run_reward_training(job: RewardJob, *, under_ray: bool = False) -> dict[str, Any]:
    """Train, save the adapter (+ score head) and its statistics (rank 0); return metrics."""
    rundir = RunDir(job.run_location)
    rank, world_size = 0, 1
    if torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    spec = job.rewards
    tokenizer = load_base_tokenizer(job.base)
    train_rows = _rows(job, tokenizer, "train")
    eval_rows = _rows(job, tokenizer, "eval")
    torch.manual_seed(derive_seed(job.seed, job.name, "init"))  # the score head's init
    model = load_reward_base(job.base)
    model.config.pad_token_id = tokenizer.pad_token_id

    with scratch_directory(f"reward-{job.name}") as scratch:
        workdir = str(scratch)
        resume_from = restore_ray_checkpoint(workdir) if under_ray else None
        if resume_from and rank == 0:
            log(f"[rewards {job.name}] resuming from checkpoint {Path(resume_from).name}")
        args = RewardConfig(
            output_dir=workdir,
            max_steps=spec.steps,
            per_device_train_batch_size=spec.batch_size,
            learning_rate=spec.learning_rate,
            warmup_steps=0.05,
            max_length=spec.max_length,
            remove_unused_columns=True,
            deepspeed=deepspeed_config(spec),
            **trainer_kwargs(
                use_gpu=spec.resources.use_gpu,
                dtype=job.base.dtype,
                seed=job.seed,
                logging_steps=spec.logging_steps,
                checkpoint_every=spec.checkpoint_every,
            ),
        )
        callbacks: list[TrainerCallback] = [ProgressCallback(f"rewards {job.name}")]
        if under_ray:
            from ray.train.huggingface.transformers import RayTrainReportCallback

            callbacks.append(RayTrainReportCallback())
        trainer = LengthSortedRewardTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(
                [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in train_rows]
            ),
            processing_class=tokenizer,
            peft_config=lora_config(spec.lora, model.config.num_hidden_layers),
            callbacks=callbacks,
        )
        trainer.micro_batch_size = spec.micro_batch_size
        trainer.remove_callback(PrinterCallback)
        if under_ray:
            from ray.train.huggingface.transformers import prepare_trainer

            trainer = prepare_trainer(trainer)
        started_at = time.time()
        output = train_from(trainer, resume_from, spec.steps)
        finished_at = time.time()

        adapter_dir = Path(workdir, "adapter")
        trainer.save_model(str(adapter_dir))  # every rank (DeepSpeed gathers inside)
        metrics: dict[str, Any] = {
            "train_loss": float(output.training_loss),
            "steps": int(trainer.state.global_step),
            "train_pairs": len(train_rows),
            "eval_pairs": len(eval_rows),
            "resumed": bool(resume_from),
            "resumed_from_step": checkpoint_step(resume_from),
            "started_at": started_at,
            "finished_at": finished_at,
            "num_workers": world_size,
            "node_id": worker_node_id(),  # rank 0's Ray node
            "deepspeed_stage": spec.deepspeed.stage if spec.deepspeed.enabled else None,
        }
        if rank == 0:
            model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
            stats = held_out_statistics(model, tokenizer, eval_rows, job.poles, spec.max_length)
            metrics["eval"] = stats
            Path(adapter_dir, "training_args.bin").unlink(missing_ok=True)
            _write_json(Path(adapter_dir, STATS_FILE), {"conditioned": job.conditioned, **stats})
            tokenizer.save_pretrained(str(adapter_dir))
            rundir.upload_dir(adapter_dir, job.output_relpath)
            rundir.write_json(job.metrics_relpath, metrics)
            accuracy = ", ".join(f"{p} {s['accuracy']:.3f}" for p, s in stats.items())
            log(f"[rewards {job.name}] held-out pairwise accuracy: {accuracy}")
        return metrics


@torch.no_grad()
def score_texts(
    model,
    tokenizer,
    prompts: list[str],
    responses: list[str],
    max_length: int | None,
    batch_size: int = 32,
) -> torch.Tensor:
    """Scalar rewards of the sequence classifier being trained for (prompt text, response
    text) pairs built by :func:`reward_input`, truncated as every stage truncates them
    (:mod:`psoups_ray.runtime.rewards`)."""
    model.eval()
    device = next(model.parameters()).device
    texts = [p + r for p, r in zip(prompts, responses, strict=True)]
    return score_right_padded(
        tokenizer,
        texts,
        batch_size,
        lambda ids, mask: model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[
            :, 0
        ],
        max_length,
    )


def held_out_statistics(
    model, tokenizer, rows: list[dict[str, str]], poles, max_length: int | None
) -> dict[str, Any]:
    """Per pole: held-out pairwise accuracy, and the score mean/std over the responses."""
    stats: dict[str, Any] = {}
    for pole in poles:
        pole_rows = [r for r in rows if r["pole"] == pole]
        prompts = [r["prompt"] for r in pole_rows]
        chosen = score_texts(
            model, tokenizer, prompts, [r["chosen"] for r in pole_rows], max_length
        )
        rejected = score_texts(
            model, tokenizer, prompts, [r["rejected"] for r in pole_rows], max_length
        )
        both = torch.cat([chosen, rejected])
        stats[pole] = {
            "accuracy": round(float((chosen > rejected).float().mean()), 4) if pole_rows else None,
            "pairs": len(pole_rows),
            "score_mean": float(both.mean()) if len(both) else 0.0,
            "score_std": float(both.std()) if len(both) > 1 else 1.0,
            "mean_margin": float((chosen - rejected).mean()) if len(pole_rows) else None,
        }
    return stats


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def reward_train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train per-worker entry point: ``loop_config = {"job": RewardJob}``."""
    job = loop_config["job"]
    threads_for_worker(job.rewards.resources.cpus_per_worker)
    run_reward_training(job, under_ray=True)
