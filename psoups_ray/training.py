"""Pieces every HF/TRL trainer run of the pipeline shares (SFT, reward models, ...).

One place for the trainer settings that must agree across stages (CPU vs GPU, mixed
precision, checkpoint cadence, logging) and for the Ray Train glue: progress lines and
resuming from the checkpoint Ray Train restored, and length-sorted micro-batches
(:class:`MicroBatchMixin`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerState
from transformers.trainer_utils import TrainOutput

from psoups_ray import progress


def trainer_kwargs(
    *, use_gpu: bool, dtype: str, seed: int, logging_steps: int, checkpoint_every: int
) -> dict[str, Any]:
    """``TrainingArguments`` fields shared by every trainer run.

    On CPU: ``use_cpu`` and no mixed precision (TRL configs default to bf16). On GPU:
    bf16/fp16 autocast when the base's dtype asks for it. Checkpoints every
    ``checkpoint_every`` steps, keeping the latest (Ray Train keeps its own copies).
    """
    return {
        "lr_scheduler_type": "cosine",
        "logging_steps": logging_steps,
        "save_strategy": "steps",
        "save_steps": checkpoint_every,
        "save_total_limit": 1,
        "use_cpu": not use_gpu,
        "bf16": use_gpu and dtype == "bfloat16",
        "fp16": use_gpu and dtype == "float16",
        "gradient_checkpointing": False,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": seed,
        "data_seed": seed,
        "dataloader_num_workers": 0,
        "ddp_find_unused_parameters": False,
    }


class ProgressCallback(TrainerCallback):
    """Rank 0 reports ``task``'s step / max steps, loss and learning rate every
    ``logging_steps`` (:func:`psoups_ray.progress.update`)."""

    def __init__(self, task: str):
        self.task = task

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            progress.start(self.task, "training")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        detail = f"loss {logs['loss']:.3f} lr {logs.get('learning_rate', 0):.2e}"
        progress.update(self.task, state.global_step, state.max_steps, "step", detail)


def restore_ray_checkpoint(workdir: str) -> str | None:
    """Copy the checkpoint Ray Train restored (after a failure or restart) into ``workdir``."""
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    target = Path(workdir, "resume")
    with checkpoint.as_directory() as directory:
        shutil.copytree(Path(directory, RayTrainReportCallback.CHECKPOINT_NAME), target)
    return str(target)


def checkpoint_step(checkpoint_dir: str | None) -> int:
    """Global step of a Hugging Face trainer checkpoint (0 for none): where a resumed run
    restarts, so the steps it repeats are those it had done past it."""
    if checkpoint_dir is None:
        return 0
    state = json.loads(Path(checkpoint_dir, "trainer_state.json").read_text())
    return int(state["global_step"])


def train_from(trainer: Any, resume_from: str | None, max_steps: int) -> Any:
    """``trainer.train()`` resumed from ``resume_from`` (a checkpoint or None); its
    ``TrainOutput``.

    A checkpoint of the run's last step means the run had finished: its weights and state
    are loaded and nothing is trained. (transformers' Trainer, resumed there in the middle
    of an epoch, takes one step past ``max_steps`` before it checks: a run killed after its
    last checkpoint ended one step longer than the same run left alone.)"""
    if resume_from is None or checkpoint_step(resume_from) < max_steps:
        return trainer.train(resume_from_checkpoint=resume_from)
    trainer._load_from_checkpoint(resume_from)
    trainer.state = TrainerState.load_from_json(str(Path(resume_from, "trainer_state.json")))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    mean_loss = statistics.fmean(losses) if losses else float("nan")
    return TrainOutput(trainer.state.global_step, mean_loss, {"train_loss": mean_loss})


def worker_node_id() -> str | None:
    """The Ray node this worker runs on (recorded with a run's metrics), None outside Ray."""
    import ray

    if not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def threads_for_worker(cpus_per_worker: float) -> None:
    """Give torch as many threads as the worker has CPUs (at least one).

    Ray does not cap torch's thread pool in Ray Train workers: a 0.25-CPU worker still
    starts one thread per core, and eight concurrent runs on two cores then spin against
    each other (measured here: a PPO iteration 2.7x slower).

    On a GPU, float32 matrix products use TF32 tensor cores (``"high"`` precision, 10-bit
    mantissa inputs, float32 accumulation); the CPU is unaffected.
    """
    import torch

    torch.set_num_threads(max(1, int(cpus_per_worker)))
    torch.set_float32_matmul_precision("high")


def lora_kwargs(spec: Any, num_layers: int) -> dict[str, Any]:
    """PEFT ``LoraConfig`` arguments of a :class:`~psoups_ray.config.LoraSpec` for a model
    of ``num_layers`` decoder layers (``top_layers`` -> ``layers_to_transform``)."""
    kwargs: dict[str, Any] = {
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": spec.target_modules,
    }
    if spec.top_layers is not None:
        first = max(num_layers - spec.top_layers, 0)
        kwargs["layers_to_transform"] = list(range(first, num_layers))
    return kwargs


def length_sorted_groups(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Indices of ``lengths`` sorted longest first, cut into groups of ``size`` (the last
    may be smaller): rows of similar length end up together."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + size] for start in range(0, len(order), size)]


def select_rows(inputs: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """Rows ``rows`` of every per-row tensor of a batch, (B, L) ones cut after the last
    column any of those rows attends to (``attention_mask``): only trailing padding goes.

    A tensor is per-row when its first dimension is the batch's (that of ``input_ids``) and
    per-token when its second is the batch's sequence length too; anything else is kept.
    """
    batch, length = inputs["input_ids"].shape
    index = torch.tensor(rows, device=inputs["input_ids"].device)
    used = inputs["attention_mask"][index].bool().any(dim=0).nonzero()  # attended columns
    width = int(used.max()) + 1 if len(used) else 1
    selected = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
            value = value[index]
            if value.dim() >= 2 and value.shape[1] == length:
                value = value[:, :width]
        selected[key] = value
    return selected


class MicroBatchMixin:
    """Runs each training step's batch as length-sorted micro-batches, for HF trainers.

    A batch padded to its longest row spends most of its compute on padding when lengths
    vary (the tiny world's SFT batches: 1.8x the real tokens). With ``micro_batch_size``
    set, :meth:`training_step` sorts the batch's rows by length, cuts them into groups of
    that many rows, drops each group's trailing padding columns and accumulates the
    groups' gradients, weighted so that the step's gradient and loss equal the whole
    batch's up to float rounding (the batch, the optimizer step and the schedule are
    unchanged). Only trailing padding is dropped, so positions never shift. The number of
    groups depends only on the batch size, so data-parallel ranks run the same number of
    passes (and the same collectives); all but the last skip DDP's gradient all-reduce.

    Subclasses say how a batch splits (:meth:`micro_batches`) and apply
    ``self.loss_weight`` in ``compute_loss`` where the loss is a mean over the batch. Off
    under DeepSpeed, whose engine steps its optimizer after every backward pass.
    """

    micro_batch_size: int | None = None
    loss_weight: float = 1.0

    def micro_batches(
        self, inputs: dict[str, Any], num_items_in_batch
    ) -> list[tuple[dict[str, Any], float]] | None:
        """``[(micro-batch inputs, loss weight)]``, or None to run the batch in one pass."""
        raise NotImplementedError

    def training_step(self, model, inputs, num_items_in_batch=None):
        from accelerate.utils import DistributedType

        parts = None
        if (
            self.micro_batch_size is not None
            and self.accelerator.distributed_type != DistributedType.DEEPSPEED
        ):
            parts = self.micro_batches(inputs, num_items_in_batch)
        if parts is None or len(parts) == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        total = None
        try:
            for i, (part, weight) in enumerate(parts):
                self.loss_weight = weight
                last = i == len(parts) - 1
                context = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
                with context:
                    loss = super().training_step(model, part, num_items_in_batch)
                total = loss if total is None else total + loss
        finally:
            self.loss_weight = 1.0
        return total
