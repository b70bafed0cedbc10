"""Supervised fine-tuning of the base with TRL's SFTTrainer.

:func:`run_sft` is callable without Ray (one process, used by unit tests and
notebooks); :func:`sft_train_loop` is the Ray Train per-worker entry point
around it: it adds Ray's checkpoint reporting and resumes from the last
checkpoint Ray Train restored after a failure.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from psoups_ray import progress
from psoups_ray.base.model import build_tiny_model
from psoups_ray.config import BaseConfig
from psoups_ray.progress import log
from psoups_ray.rundir import RunDir, local_reference
from psoups_ray.runtime.loading import load_causal_lm, load_options, load_tokenizer
from psoups_ray.runtime.sampling import Sampler, sample_texts
from psoups_ray.scratch import scratch_directory
from psoups_ray.training import (
    MicroBatchMixin,
    ProgressCallback,
    checkpoint_step,
    length_sorted_groups,
    restore_ray_checkpoint,
    select_rows,
    train_from,
    trainer_kwargs,
)


@dataclass(frozen=True)
class SFTJob:
    """Everything one SFT run needs; artifacts are addressed inside ``run_location``."""

    run_location: str
    base: BaseConfig
    seed: int
    tokenizer_relpath: str  # tokenizer directory in the run dir
    data_relpath: str  # JSONL of {"prompt", "completion"} rows (prompts already formatted)
    output_relpath: str  # where the fine-tuned model + tokenizer go
    metrics_relpath: str  # JSON written by rank 0 at the end
    init_from: str | None = None  # model reference to fine-tune; None -> a fresh tiny model
    sample_prompts: tuple[str, ...] = ()  # formatted prompts to sample after training
    label: str = "base"


class LengthSortedSFTTrainer(MicroBatchMixin, SFTTrainer):
    """TRL's SFTTrainer, each step's batch run as length-sorted micro-batches of
    ``micro_batch_size`` rows (:class:`psoups_ray.training.MicroBatchMixin`).

    TRL's loss is the sum of the token losses over the batch's count of completion
    tokens (``num_items_in_batch``), so the micro-batches' losses add up to the batch's.
    """

    def micro_batches(self, inputs, num_items_in_batch):
        if num_items_in_batch is None or "attention_mask" not in inputs:
            return None  # per-pass token means would not add up; padding-free batches
        attention_mask = inputs["attention_mask"]  # (B, L), right-padded
        groups = length_sorted_groups(attention_mask.sum(dim=1).tolist(), self.micro_batch_size)
        return [(select_rows(inputs, rows), 1.0) for rows in groups]


def _training_args(job: SFTJob, output_dir: str) -> SFTConfig:
    sft = job.base.sft
    return SFTConfig(
        output_dir=output_dir,
        max_steps=sft.steps,
        per_device_train_batch_size=sft.batch_size,
        gradient_accumulation_steps=sft.gradient_accumulation_steps,
        learning_rate=sft.learning_rate,
        warmup_steps=sft.warmup_ratio,
        weight_decay=sft.weight_decay,
        max_length=sft.max_length,
        completion_only_loss=True,
        **trainer_kwargs(
            use_gpu=sft.resources.use_gpu,
            dtype=job.base.dtype,
            seed=job.seed,
            logging_steps=sft.logging_steps,
            checkpoint_every=sft.checkpoint_every,
        ),
    )


def run_sft(job: SFTJob, *, under_ray: bool = False) -> dict[str, Any]:
    """Fine-tune, save the model to the run dir (rank 0), return (and write) metrics."""
    rundir = RunDir(job.run_location)
    rank, world_size = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()

    tokenizer = load_tokenizer(
        str(rundir.local_dir(job.tokenizer_relpath)),
        trust_remote_code=load_options(job.base)["trust_remote_code"],
    )
    if job.init_from is None:
        model = build_tiny_model(job.base.tiny, tokenizer, seed=job.seed)
    else:
        model = load_causal_lm(
            local_reference(job.init_from),
            job.base.dtype,
            job.base.revision,
            job.base.trust_remote_code,
        )
    lines = rundir.read_text(job.data_relpath).splitlines()
    dataset = Dataset.from_list([json.loads(line) for line in lines if line.strip()])

    with scratch_directory(job.label) as scratch:
        workdir = str(scratch)
        resume_from = restore_ray_checkpoint(workdir) if under_ray else None
        if resume_from and rank == 0:
            log(f"[{job.label}] resuming from checkpoint {Path(resume_from).name}")
        callbacks: list[TrainerCallback] = [ProgressCallback(job.label)]
        if under_ray:
            from ray.train.huggingface.transformers import RayTrainReportCallback

            callbacks.append(RayTrainReportCallback())
        trainer = LengthSortedSFTTrainer(
            model=model,
            args=_training_args(job, workdir),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        trainer.micro_batch_size = job.base.sft.micro_batch_size
        trainer.remove_callback(PrinterCallback)  # our progress line replaces its raw dicts
        if under_ray:
            from ray.train.huggingface.transformers import prepare_trainer

            trainer = prepare_trainer(trainer)
        started = time.monotonic()
        output = train_from(trainer, resume_from, job.base.sft.steps)
        train_seconds = time.monotonic() - started

        final_dir = Path(workdir, "final")
        trainer.save_model(str(final_dir))  # every rank: DeepSpeed/FSDP gather inside
        metrics: dict[str, Any] = {
            "train_loss": float(output.training_loss),
            "steps": int(trainer.state.global_step),
            "resumed": bool(resume_from),
            "resumed_from_step": checkpoint_step(resume_from),
            "train_seconds": round(train_seconds, 2),
            "num_workers": world_size,
            "num_parameters": sum(p.numel() for p in trainer.model.parameters()),
        }
        if rank == 0:
            tokenizer.save_pretrained(str(final_dir))
            # The Trainer also pickles its arguments there; artifacts hold no pickles.
            Path(final_dir, "training_args.bin").unlink(missing_ok=True)
            rundir.upload_dir(final_dir, job.output_relpath)
            if job.sample_prompts:
                metrics["samples"] = _sample(trainer.model, tokenizer, job)
            rundir.write_json(job.metrics_relpath, metrics)
            log(f"[{job.label}] saved model to {rundir.uri(job.output_relpath)}")
        return metrics


def _sample(model, tokenizer, job: SFTJob) -> list[str]:
    def on_sampled(done: int, total: int) -> None:
        progress.update(job.label, done, total, "sample", "held-out prompts")

    sampler = Sampler(model, tokenizer)
    return sample_texts(sampler, job.sample_prompts, job.base.sample, job.seed, on_sampled)


def sft_train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train per-worker entry point: ``loop_config = {"job": SFTJob}``."""
    run_sft(loop_config["job"], under_ray=True)
