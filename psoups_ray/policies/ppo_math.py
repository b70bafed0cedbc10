"""The arithmetic of PPO for language models, as plain tensor functions.

Shapes: ``B`` rollouts, ``T`` response positions. Every per-token tensor is (B, T) and
comes with a ``mask`` (B, T) that is 1 on the response's tokens (up to and including
its first EOS) and 0 on padding and anything after EOS. Nothing here knows about models,
Ray or PEFT; ``tests/test_ppo_math.py`` pins each function on hand-computed examples.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist

KLEstimator = Literal["k1", "k3"]


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor, across_ranks: bool = False):
    """Mean of ``values`` over the positions where ``mask`` is 1 (a scalar tensor).

    ``across_ranks``: over every data-parallel worker's positions (one all-reduce).
    """
    totals = torch.stack([masked_sum(values, mask), mask.sum().to(values.dtype)])
    if across_ranks:
        totals = _all_reduce_sum(totals)
    return totals[0] / totals[1].clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, across_ranks: bool = False):
    """Unbiased variance over the masked positions (Bessel-corrected, like ``torch.var``)."""
    dtype = values.dtype
    totals = torch.stack(
        [masked_sum(values, mask), masked_sum(values**2, mask), mask.sum().to(dtype)]
    )
    if across_ranks:
        totals = _all_reduce_sum(totals)
    total, total_sq, count = totals
    mean = total / count.clamp(min=1)
    var = total_sq / count.clamp(min=1) - mean**2
    return var * count / (count - 1).clamp(min=1)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, across_ranks: bool = False
) -> torch.Tensor:
    """(x - mean) / std over the masked positions; ``shift_mean=False`` keeps the mean.

    Positions outside the mask are returned as 0.
    """
    mean = masked_mean(values, mask, across_ranks)
    var = masked_var(values, mask, across_ranks)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy.

    k1 = log p - log q (unbiased, can be negative per token); k3 = (r - 1) - log r with
    r = q / p (unbiased and always >= 0; Schulman, "Approximating KL Divergence", 2020).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'")


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor
) -> torch.Tensor:
    """r_t = -beta * KL_t on every response token, plus the sequence's score on its last one.

    (Ziegler et al. 2019, eq. 2; Ouyang et al. 2022.) scores: (B,); kl, mask: (B, T).
    """
    rewards = -kl_coef * kl * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)  # index of each row's last token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = sum_l (gamma * lam)^l delta_{t+l}; the
    state after the last response token is terminal (V = 0). Returns (advantages,
    returns = advantages + values), both (B, T) and 0 outside the mask.
    """
    rewards = rewards * mask
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        # Masked positions sit after the last token: they must not leak into it.
        running = running * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated to be minimised.

    L = -E[min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)], rho = pi(a|s) / pi_old(a|s).
    Returns the loss and detached statistics: clip fraction and approximate KL(old||new).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(-log_ratio) + log_ratio, mask),  # k3
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * E[max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)].

    (The PPO2 baselines' value clipping.) ``clip_range=None`` gives the plain squared error.
    """
    unclipped = (values - returns) ** 2
    if clip_range is None:
        losses = unclipped
        clip_fraction = torch.zeros(())
    else:
        clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        clipped = (clipped_values - returns) ** 2
        losses = torch.maximum(unclipped, clipped)
        clip_fraction = masked_mean((clipped > unclipped).float().detach(), mask)
    loss = 0.5 * masked_mean(losses, mask)
    return loss, {"value_clip_fraction": clip_fraction}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's categorical distribution: (B, T, V) -> (B, T)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under ``logits``: (B, T, V), (B, T) -> (B, T)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return torch.gather(log_probs, 2, tokens.unsqueeze(-1)).squeeze(-1)


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, num_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)
    (Ziegler et al. 2019, section 2.2): drives the per-sequence KL toward ``target``."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, num_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * num_steps / self.horizon


class RunningMoments:
    """Running mean and standard deviation of a stream of scores (Chan et al.'s merge of
    batch moments), for normalising rewards across rollouts."""

    def __init__(self):
        self.mean = 0.0
        self.var = 1.0
        self.count = 1e-24

    def update(self, scores: torch.Tensor, across_ranks: bool = False) -> None:
        """Fold in a batch of scores (every worker's when ``across_ranks``)."""
        scores = scores.detach().float()
        count_tensor = torch.tensor(float(len(scores)), device=scores.device)
        totals = torch.stack([scores.sum(), (scores**2).sum(), count_tensor])
        if across_ranks:
            totals = _all_reduce_sum(totals)
        total, total_sq, count = (float(v) for v in totals)
        batch_mean = total / count
        batch_var = max(total_sq / count - batch_mean**2, 0.0)
        delta = batch_mean - self.mean
        merged = self.count + count
        self.mean += delta * count / merged
        self.var = (
            self.var * self.count + batch_var * count + delta**2 * self.count * count / merged
        ) / merged
        self.count = merged

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]
