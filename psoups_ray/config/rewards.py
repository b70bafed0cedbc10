"""``rewards``: one Bradley-Terry reward model per pole (or one multitask model)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from psoups_ray.config.common import DeepSpeedSpec, LoraSpec, ScalingSpec, StrictModel


class RewardsConfig(StrictModel):
    """Reward models: base + LoRA + scalar score head, Bradley-Terry loss (TRL RewardTrainer)."""

    mode: Literal["per_pole", "multitask"] = "per_pole"
    """``per_pole``: one reward model per pole (P-Soups); ``multitask``: one model for all
    poles with the pole's preference prompt in the input (the P-MORL setting)."""
    lora: LoraSpec = Field(default_factory=LoraSpec)
    """Adapter shape; the score head is trained in full."""
    steps: int = Field(default=60, ge=1)
    """Optimizer steps per run."""
    batch_size: int = Field(default=16, ge=1)
    """Pairs per step per worker."""
    micro_batch_size: int | None = Field(default=None, ge=1)
    """Run each step's pairs as groups of this many pairs sorted by length, each padded
    only to its own longest response, and accumulate their gradients: the same step up to
    float rounding, with less compute spent on padding. Empty: one pass per batch.
    Ignored under DeepSpeed."""
    learning_rate: float = Field(default=2e-3, gt=0, le=1)
    """Peak learning rate."""
    max_length: int = Field(default=256, ge=8)
    """Longest tokenised prompt + response; longer pairs are truncated."""
    checkpoint_every: int = Field(default=50, ge=1)
    """Save a checkpoint to the run's storage every N steps."""
    logging_steps: int = Field(default=20, ge=1)
    """Print the loss every N steps."""
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    """Optional DeepSpeed ZeRO."""
    resources: ScalingSpec = Field(
        default_factory=lambda: ScalingSpec(num_workers=1, cpus_per_worker=0.5)
    )
    """Resources of each pole's Ray Train run (runs for all poles are launched together and
    queue when the cluster is full)."""
