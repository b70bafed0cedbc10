"""``policies``: one PPO LoRA policy per pole, and the baselines."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from psoups_ray.config.common import (
    DecodeDtype,
    GenerationSpec,
    LoraSpec,
    ScalingSpec,
    StrictModel,
)


class RolloutGenerationSpec(StrictModel):
    """How PPO samples its rollouts."""

    max_new_tokens: int = Field(default=192, ge=1)
    """Longest response, in tokens (as ``base.sample``: truncated rollouts are scored cut)."""
    length_range: tuple[int, int] | None = None
    """``[min, max]``: each rollout batch draws its response length limit uniformly from
    this range (the paper's ``LengthSampler``); max <= ``max_new_tokens``. Empty: always
    ``max_new_tokens``."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature; the PPO log-probabilities use the same temperature."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling mass (1: sample the full distribution, as PPO's ratios assume)."""
    merged: bool = False
    """Sample with the policy's LoRA merged into the base weights, a copy of the adapted
    layers' base weights held meanwhile to restore them exactly. Only models the sampler's
    fast decoder does not take gain from it (transformers' forward pays PEFT's per-layer
    adapter overhead); the fast decoder runs the adapter unmerged at little cost."""
    dtype: DecodeDtype = "auto"
    """Weights and activations while sampling rollouts (``generation.dtype``'s meaning).
    The PPO ratio's log-probabilities are recomputed by the training forward whatever it
    is."""

    @model_validator(mode="after")
    def _range_is_ordered(self) -> RolloutGenerationSpec:
        if self.length_range is not None:
            low, high = self.length_range
            if not 1 <= low <= high <= self.max_new_tokens:
                raise ValueError(
                    f"length_range {list(self.length_range)} must be [min, max] with "
                    f"1 <= min <= max <= max_new_tokens ({self.max_new_tokens})"
                )
        return self


class PolicyConfig(StrictModel):
    """PPO policies: one LoRA policy per pole (P-Soups) plus the baselines, on Ray Train.

    Policy, critic (LoRA + value head), reference (adapters disabled) and reward models
    (the rewards stage's adapters) share one frozen copy of the base."""

    lora: LoraSpec = Field(default_factory=LoraSpec)
    """The policy adapter's shape (the critic's too when ``critic_init`` is ``fresh``)."""
    steps: int = Field(default=16, ge=1)
    """PPO iterations: each samples ``rollout_batch_size`` queries per worker and updates."""
    rollout_batch_size: int = Field(default=32, ge=1)
    """Queries sampled per iteration per worker."""
    baseline_steps: int | None = Field(default=None, ge=1)
    """PPO iterations of each baseline run (``pmorl``, ``rlhf``); empty: ``steps``, one
    pole's budget. For baselines trained with the compute of all the pole runs together,
    give ``steps`` times the number of poles. The report states every run's episodes."""
    minibatch_size: int = Field(default=16, ge=1)
    """Rollouts per optimizer step (must divide ``rollout_batch_size``)."""
    ppo_epochs: int = Field(default=4, ge=1)
    """Passes over each rollout batch."""
    learning_rate: float = Field(default=1e-3, gt=0, le=1)
    """Policy adapter learning rate (AdamW, constant)."""
    critic_learning_rate: float = Field(default=1e-3, gt=0, le=1)
    """Critic adapter and value head learning rate."""
    gamma: float = Field(default=1.0, ge=0, le=1)
    """Discount factor of GAE."""
    lam: float = Field(default=0.95, ge=0, le=1)
    """lambda of GAE."""
    clip_range: float = Field(default=0.2, gt=0)
    """epsilon of the clipped surrogate: ratios outside [1 - eps, 1 + eps] stop the gradient."""
    value_clip_range: float | None = Field(default=0.2, gt=0)
    """Clip new values to old +- this in the value loss; empty: no clipping."""
    kl_coef: float = Field(default=0.05, ge=0)
    """beta of the per-token KL penalty to the reference (initial value when adaptive)."""
    target_kl: float | None = Field(default=None, gt=0)
    """Per-sequence KL the adaptive controller steers toward; empty: ``kl_coef`` is fixed."""
    kl_horizon: int = Field(default=10000, ge=1)
    """Horizon of the adaptive KL controller, in episodes."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimate in the penalty: ``k1`` = log p - log q, ``k3`` = non-negative."""
    stop_kl: float | None = Field(default=None, gt=0)
    """End an iteration's PPO epochs early once the mean per-token KL between the rollout
    policy and the updated policy exceeds this; empty: never."""
    whiten_advantages: bool = True
    """Standardise advantages over the rollout batch (every worker's)."""
    reward_normalization: Literal["held_out", "running"] = "held_out"
    """``held_out``: scores standardised with the reward model's held-out statistics (which
    also makes poles comparable); ``running``: additionally standardised with the running
    mean/std of the scores seen during training."""
    reward_scale: float = Field(default=1.0, gt=0)
    """Multiply normalised scores by this."""
    reward_clip: float | None = Field(default=5.0, gt=0)
    """Clip normalised scores to +- this; empty: no clipping."""
    missing_eos_penalty: float | None = Field(default=None, ge=0)
    """Subtract this from the score of responses cut at ``max_new_tokens`` (no EOS)."""
    entropy_coef: float = Field(default=0.0, ge=0)
    """Entropy bonus in the policy loss."""
    max_grad_norm: float = Field(default=1.0, gt=0)
    """Clip each optimizer step's gradient norm (policy and critic separately)."""
    max_prompt_length: int = Field(default=128, ge=1)
    """Longest query in tokens (longer ones keep their end)."""
    critic_init: Literal["reward", "fresh"] = "reward"
    """``reward``: the critic starts as a copy of the pole's reward adapter and score head
    (InstructGPT); ``fresh``: a new adapter and a small random value head. Runs rewarded by several
    poles (the baselines) always start fresh."""
    prompted: bool = False
    """Append the pole's preference prompt to training queries (the paper trains without)."""
    generation: RolloutGenerationSpec = Field(default_factory=RolloutGenerationSpec)
    """Rollout sampling."""
    baselines: list[Literal["pmorl", "rlhf"]] = Field(default_factory=lambda: ["pmorl", "rlhf"])
    """Baselines trained next to the pole policies: ``pmorl`` (one policy, a random
    combination's preference prompts in each query, rewarded by the mean of that
    combination's normalised rewards) and ``rlhf`` (one policy, unprompted, rewarded by the
    mean of every pole's normalised reward)."""
    num_eval_prompts: int = Field(default=64, ge=1)
    """Held-out prompts each finished run samples to measure its reward, KL and (tiny world)
    attribute rates against the base."""
    eval_generation: GenerationSpec = Field(default_factory=GenerationSpec)
    """Sampling for that measurement (the same as ``base.sample`` by default)."""
    checkpoint_every: int = Field(default=10, ge=1)
    """Save a checkpoint through Ray Train every N iterations (and after the last)."""
    logging_steps: int = Field(default=1, ge=1)
    """Print a progress line every N iterations."""
    resources: ScalingSpec = Field(
        default_factory=lambda: ScalingSpec(num_workers=1, cpus_per_worker=0.5)
    )
    """Resources of each run (runs for all poles and baselines launch together and queue
    when the cluster is full)."""

    @model_validator(mode="after")
    def _batches_fit(self) -> PolicyConfig:
        if self.rollout_batch_size % self.minibatch_size:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) must divide rollout_batch_size "
                f"({self.rollout_batch_size})"
            )
        return self
