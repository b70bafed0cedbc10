"""Pairwise win rates with ties counted as half, and bootstrap confidence intervals.

An *outcome* is system A's result against system B on one prompt: 1 (A wins), 0.5 (tie)
or 0 (B wins); a judge that asks several questions per pair (one per criterion) gives
their mean. The win rate is the mean outcome. Its confidence interval is the percentile
bootstrap over prompts: prompts are resampled with replacement, and across combinations
the same resampled prompts are used for every combination (the combinations share their
prompts, so their outcomes are not independent).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def reward_outcome(score_a: float, score_b: float, tie_threshold: float) -> float:
    """1 / 0.5 / 0: A's reward beats B's by at least ``tie_threshold``, or not by that
    much either way, or B's beats A's."""
    if abs(score_a - score_b) < tie_threshold:
        return 0.5
    return 1.0 if score_a > score_b else 0.0


def share_outcome(share_a: float, share_b: float) -> float:
    """1 / 0.5 / 0 by the share of requested poles each response exhibits (ties equal)."""
    if share_a == share_b:
        return 0.5
    return 1.0 if share_a > share_b else 0.0


@dataclass(frozen=True)
class WinRate:
    """A win rate over ``n`` prompts with its bootstrap interval."""

    win_rate: float
    ci_low: float
    ci_high: float
    wins: float  # outcomes of 1 (fractional outcomes of multi-question judges count 0)
    ties: float  # outcomes of exactly 0.5
    losses: float  # outcomes of 0
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {key: round(value, 4) if isinstance(value, float) else value
                for key, value in asdict(self).items()}  # fmt: skip


def win_rates(
    outcomes: np.ndarray, samples: int, confidence: float, seed: int
) -> tuple[list[WinRate], WinRate]:
    """Win rate of each row of ``outcomes`` (combinations, prompts) and of all of them.

    Every bootstrap resample draws one set of prompt indices, applied to every combination.
    """
    outcomes = np.asarray(outcomes, dtype=np.float64)
    if outcomes.ndim != 2 or outcomes.shape[1] == 0:
        raise ValueError(f"outcomes must be (combinations, prompts), got {outcomes.shape}")
    num_prompts = outcomes.shape[1]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, num_prompts, size=(samples, num_prompts))  # (samples, prompts)
    resampled = outcomes[:, picks].mean(axis=2)  # (combinations, samples)
    tail = (1.0 - confidence) / 2 * 100

    def summarize(rows: np.ndarray, boot: np.ndarray) -> WinRate:
        low, high = np.percentile(boot, [tail, 100 - tail])
        return WinRate(
            win_rate=float(rows.mean()),
            ci_low=float(low),
            ci_high=float(high),
            wins=float((rows == 1.0).sum()),
            ties=float((rows == 0.5).sum()),
            losses=float((rows == 0.0).sum()),
            n=int(rows.size),
        )

    per_row = [summarize(outcomes[i], resampled[i]) for i in range(outcomes.shape[0])]
    overall = summarize(outcomes, resampled.mean(axis=0))
    return per_row, overall
