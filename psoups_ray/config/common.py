"""Pieces every section uses: the strict base model, resources, sampling, LoRA shapes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TINY_MODEL = "tiny"
DecodeDtype = Literal["auto", "float32", "bfloat16"]
MAX_SOUP_WEIGHT = 10.0
"""Largest weight a soup may give one pole (tuning and serving). Weights mix pole policies;
far beyond 1 the output is noise, and from about 1e24 the logits overflow."""


class StrictModel(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )


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


class GenerationSpec(StrictModel):
    """Sampling settings."""

    max_new_tokens: int = Field(default=192, ge=1)
    """Longest response, in tokens."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature."""
    top_k: int = Field(default=0, ge=0)
    """Sample among the k most likely tokens only; 0: no cut (the OpenAI API's and
    ``psoups serve``'s default, so what is tuned and evaluated is what is served)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    batch_size: int = Field(default=32, ge=1)
    """Prompts generated for in one batch (a row's text does not depend on its batch)."""
    dtype: DecodeDtype = "auto"
    """Weights and activations while decoding (logits and sampling stay float32): ``auto``
    takes bfloat16 where the hardware computes it natively (a CUDA GPU with bfloat16, a CPU
    with AMX or AVX-512 BF16) and the model's own dtype elsewhere."""


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


class EvaluatorResources(StrictModel):
    """Resources of one long-lived soup evaluator actor (base + every adapter loaded)."""

    cpus: float = Field(default=1.0, gt=0)
    """CPUs reserved per evaluator (torch uses that many threads)."""
    use_gpu: bool = False
    """Give each evaluator ``gpus`` GPUs and generate on them."""
    gpus: float = Field(default=1.0, gt=0)
    """GPUs per evaluator when ``use_gpu`` is true (fractions share a GPU)."""
