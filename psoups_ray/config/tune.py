"""``tune``: the Ray Tune search of soup weights, and the Pareto fronts."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from psoups_ray.config.common import (
    MAX_SOUP_WEIGHT,
    EvaluatorResources,
    GenerationSpec,
    StrictModel,
)


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
