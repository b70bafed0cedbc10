"""Reward models: one Bradley-Terry reward model per pole, trained on Ray Train."""

from psoups_ray.rewards.scorer import RewardScorer
from psoups_ray.rewards.stage import run_rewards_stage

__all__ = ["RewardScorer", "run_rewards_stage"]
