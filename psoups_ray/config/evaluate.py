"""``evaluate``: win rates of the P-Soups variants against every other system."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from psoups_ray.config.common import EvaluatorResources, GenerationSpec, StrictModel
from psoups_ray.config.feedback import OpenAIJudgeSpec

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
