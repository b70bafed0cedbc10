"""Evaluation: win rates of P-Soups against the baselines, per combination, by judge."""

from psoups_ray.evaluate.stage import run_evaluate_stage
from psoups_ray.evaluate.winrates import WinRate, reward_outcome, share_outcome, win_rates

__all__ = ["WinRate", "reward_outcome", "run_evaluate_stage", "share_outcome", "win_rates"]
