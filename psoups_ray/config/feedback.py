"""``feedback``: pairwise preference data per pole, and the OpenAI-compatible judge."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from psoups_ray.config.common import GenerationSpec, ScalingSpec, StrictModel


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
    programmatic text judges (:mod:`psoups_ray.judges.text`: readability, content
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
