"""PPO's arithmetic pinned on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from psoups_ray.policies.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    entropy_from_logits,
    gae,
    gather_logprobs,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)


def test_gae_and_returns_match_a_hand_computed_example():
    # Row 0: two response tokens, then padding whose (huge) rewards/values must not leak in.
    # Row 1: gamma = lambda = 1 would make A_t = rewards-to-go - V_t; here gamma 0.9, lam 0.8.
    rewards = torch.tensor([[0.5, 1.0, 9.0], [0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.4, 7.0], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # Row 0: delta_1 = 1.0 + 0 - 0.4 = 0.6; delta_0 = 0.5 + 0.9 * 0.4 - 0.2 = 0.66;
    #        A_0 = 0.66 + 0.72 * 0.6 = 1.092.
    # Row 1: delta_2 = 1 - 0.5 = 0.5; delta_1 = 0 + 0.45 - 0.5 = -0.05; delta_0 = -0.05;
    #        A_1 = -0.05 + 0.72 * 0.5 = 0.31; A_0 = -0.05 + 0.72 * 0.31 = 0.1732.
    expected = torch.tensor([[1.092, 0.6, 0.0], [0.1732, 0.31, 0.5]])
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(returns, (expected + values) * mask, atol=1e-6)
    assert returns[0, 2] == 0.0


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert torch.allclose(advantages, torch.tensor([[0.5, 0.5, 0.5]]))
    assert torch.allclose(returns, torch.ones(1, 3))


def test_token_rewards_put_the_score_on_the_last_response_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    rewards = token_rewards(torch.tensor([1.0, -2.0]), kl, kl_coef=0.5, mask=mask)
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.9, 0.0], [-2.2, 0.0, 0.0]]))


@pytest.mark.parametrize(
    ("ratio", "advantage", "expected_loss", "clipped", "has_gradient"),
    [
        (1.1, 1.0, -1.1, False, True),  # inside the clip range: plain surrogate
        (1.2, 1.0, -1.2, False, True),  # at the edge: still the unclipped value
        (1.5, 1.0, -1.2, True, False),  # beyond, positive advantage: capped, no gradient
        (0.5, 1.0, -0.5, False, True),  # below, positive advantage: pessimistic = unclipped
        (0.5, -1.0, 0.8, True, False),  # below, negative advantage: capped at 1 - eps
        (1.5, -1.0, 1.5, False, True),  # above, negative advantage: unclipped is worse
    ],
)
def test_clipped_surrogate_at_and_beyond_the_clip_range(
    ratio, advantage, expected_loss, clipped, has_gradient
):
    old = torch.zeros(1, 1)
    new = torch.full((1, 1), math.log(ratio), requires_grad=True)
    loss, stats = policy_loss(new, old, torch.full((1, 1), advantage), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    assert stats["clip_fraction"].item() == (1.0 if clipped else 0.0)
    loss.backward()
    assert (new.grad.abs().item() > 0) == has_gradient


def test_policy_loss_ignores_masked_tokens():
    new = torch.tensor([[0.0, 5.0]])
    old = torch.zeros(1, 2)
    advantages = torch.tensor([[2.0, 100.0]])
    loss, stats = policy_loss(new, old, advantages, torch.tensor([[1.0, 0.0]]), 0.2)
    assert loss.item() == pytest.approx(-2.0)
    assert stats["approx_kl"].item() == pytest.approx(0.0)


def test_value_loss_is_clipped_around_the_old_values():
    old = torch.tensor([[1.0]])
    returns = torch.tensor([[3.0]])
    values = torch.tensor([[2.0]], requires_grad=True)
    # Unclipped error (2-3)^2 = 1; clipped value 1.2 gives (1.2-3)^2 = 3.24: the max wins.
    loss, stats = value_loss(values, old, returns, torch.ones(1, 1), clip_range=0.2)
    assert loss.item() == pytest.approx(0.5 * 3.24)
    assert stats["value_clip_fraction"].item() == 1.0
    loss.backward()
    assert values.grad.item() == 0.0  # the clipped branch does not move V
    plain, _ = value_loss(values, old, returns, torch.ones(1, 1), clip_range=None)
    assert plain.item() == pytest.approx(0.5)


def test_kl_estimators():
    logprobs = torch.tensor([math.log(0.5), math.log(0.25)])
    ref = torch.tensor([math.log(0.25), math.log(0.5)])
    k1 = kl_penalty(logprobs, ref, "k1")
    assert torch.allclose(k1, torch.tensor([math.log(2), -math.log(2)]))
    k3 = kl_penalty(logprobs, ref, "k3")
    # r = q/p: 0.5 -> (0.5 - 1) + log 2; 2 -> (2 - 1) - log 2. Both >= 0.
    assert torch.allclose(k3, torch.tensor([-0.5 + math.log(2), 1 - math.log(2)]))
    assert (k3 >= 0).all()
    assert torch.equal(kl_penalty(ref, ref, "k3"), torch.zeros(2))
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(logprobs, ref, "k2")


def test_k1_and_k3_are_unbiased_estimates_of_the_true_kl():
    torch.manual_seed(0)
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.4, 0.4, 0.2])
    true_kl = float((p * (p / q).log()).sum())
    tokens = torch.multinomial(p, 200_000, replacement=True)
    for estimator in ("k1", "k3"):
        estimate = kl_penalty(p.log()[tokens], q.log()[tokens], estimator).mean()
        assert estimate.item() == pytest.approx(true_kl, abs=0.01), estimator


def test_whitening_uses_only_masked_positions():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    assert masked_var(values, mask).item() == pytest.approx(1.0)
    whitened = masked_whiten(values, mask)
    assert torch.allclose(whitened, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-4)
    kept = masked_whiten(values, mask, shift_mean=False)
    assert torch.allclose(kept, torch.tensor([[1.0, 2.0, 3.0, 0.0]]), atol=1e-4)


def test_logprobs_and_entropy_from_logits():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    assert gather_logprobs(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.25))
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert entropy_from_logits(logits).item() == pytest.approx(expected)


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 32)
    assert fixed.value == 0.1
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=100)
    adaptive.update(12.0, 10)  # error clipped to +0.2: beta *= 1 + 0.2 * 10 / 100
    assert adaptive.value == pytest.approx(0.102)
    adaptive.update(3.0, 10)  # error -0.5 clipped to -0.2
    assert adaptive.value == pytest.approx(0.102 * 0.98)
    restored = AdaptiveKLController(0.5, 6.0, 100)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value


def test_running_moments_match_the_moments_of_everything_seen():
    torch.manual_seed(0)
    batches = [torch.randn(17) * 3 + 1, torch.randn(40) - 2, torch.randn(5)]
    moments = RunningMoments()
    for batch in batches:
        moments.update(batch)
    everything = torch.cat(batches)
    assert moments.mean == pytest.approx(float(everything.mean()), abs=1e-5)
    assert moments.std == pytest.approx(float(everything.std(unbiased=False)), abs=1e-5)
