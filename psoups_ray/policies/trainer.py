"""PPO for a LoRA policy: rollouts, per-token KL-penalised rewards, GAE, clipped updates.

One :meth:`PPOTrainer.step` = sample a rollout batch from the policy, score it, then
``ppo_epochs`` passes of clipped policy and value updates over shuffled minibatches
(Schulman et al. 2017; the RLHF recipe of Ziegler et al. 2019 and Ouyang et al. 2022).
It runs without Ray; under Ray Train several workers each sample their own rollouts and
average gradients (one all-reduce per optimizer step), and statistics such as advantage
whitening and the KL controller use every worker's data.

The models come from :class:`psoups_ray.policies.models.SharedBasePPOModels` (or anything with
the same methods); the reward of a response is a callable, so one trainer serves a pole's
policy, P-MORL and the single-reward baseline. Rollouts are sampled by the runtime's
sampler (its fast decoder runs the policy's LoRA unmerged; ``policies.generation.merged``
merges it into the base for models only transformers' forward decodes), and every forward
pass drops the columns that are padding in every row of its minibatch (:func:`trim_padding`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from psoups_ray.config import PolicyConfig
from psoups_ray.policies.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from psoups_ray.prompting import format_prompt
from psoups_ray.runtime.batching import left_padded
from psoups_ray.runtime.sampling import Sampler, SampleRequest, SamplingParams
from psoups_ray.seeding import derive_seed


@dataclass(frozen=True)
class Query:
    """One episode's input: the instruction, what is appended to it, what rewards it."""

    prompt: str  # the raw instruction
    preference_prompt: str | None  # appended to the instruction in the policy's input
    poles: tuple[str, ...]  # the reward is the mean of these poles' normalised rewards


RewardFn = Callable[[Sequence[Query], Sequence[str]], torch.Tensor]
"""(queries, response texts) -> normalised scores, shape (B,)."""


@dataclass
class RolloutSample:
    """Sampled responses to a batch of queries. Q = query length, T = response length."""

    encoded: dict[str, torch.Tensor]  # input_ids, attention_mask: (B, Q), left-padded
    responses: torch.Tensor  # (B, T) sampled tokens, right-padded
    mask: torch.Tensor  # (B, T) 1 on sampled tokens (up to and including EOS)
    texts: list[str]  # decoded responses
    ended: torch.Tensor  # (B,) bool: the response ended with EOS (not cut at T)


@dataclass
class Rollout:
    """A scored rollout batch. L = query length Q + response length T."""

    input_ids: torch.Tensor  # (B, L) left-padded queries, then right-padded responses
    attention_mask: torch.Tensor  # (B, L) 0 on padding and on tokens after EOS
    query_length: int  # Q
    mask: torch.Tensor  # (B, T) 1 on response tokens up to and including EOS
    logprobs: torch.Tensor  # (B, T) log pi_old(token)
    ref_logprobs: torch.Tensor  # (B, T) log pi_ref(token)
    values: torch.Tensor  # (B, T) V_old(state before token)
    scores: torch.Tensor  # (B,) reward-model score after normalisation and shaping
    kl: torch.Tensor  # (B, T) per-token KL estimate
    advantages: torch.Tensor  # (B, T)
    returns: torch.Tensor  # (B, T)
    texts: list[str]  # decoded responses
    stats: dict[str, float]  # rollout statistics (means over this worker's batch)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def average_gradients(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Data parallelism: average every worker's gradients with one flat all-reduce."""
    world_size = _world_size()
    if world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    offset = 0
    for parameter, grad in zip(parameters, grads, strict=True):
        count = grad.numel()
        parameter.grad = flat[offset : offset + count].view_as(grad).clone()
        offset += count


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average scalar statistics over the data-parallel workers (one all-reduce)."""
    world_size = _world_size()
    if world_size == 1 or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return {k: float(v) / world_size for k, v in zip(keys, tensor.tolist(), strict=True)}


def trim_padding(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor, query_length: int
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Drop the columns that are padding in every row of a (mini)batch.

    ``input_ids``/``attention_mask`` (B, Q + T) are queries then responses, ``mask`` (B, T)
    the response tokens. Drops the left padding every query shares and the positions after
    the longest response; returns ``(input_ids, attention_mask)`` (B, Q' + T'), Q' and T'
    (per-token tensors keep their first T' columns). No row attended to a dropped column
    and positions count attended tokens only, so the kept positions' outputs are unchanged.
    """
    used = attention_mask[:, :query_length].bool().any(dim=0)  # (Q,)
    first = int(used.int().argmax())  # the first column some query uses
    has_token = mask.bool().any(dim=0)  # (T,)
    kept = int(has_token.nonzero().max()) + 1 if bool(has_token.any()) else 1
    end = query_length + kept
    return input_ids[:, first:end], attention_mask[:, first:end], query_length - first, kept


class PPOTrainer:
    """PPO on :class:`SharedBasePPOModels` with the settings of ``spec``.

    Args:
        models: policy/critic/reference/reward roles (see :mod:`psoups_ray.policies.models`).
        tokenizer: the base's tokenizer.
        spec: the ``policies`` config section.
        reward_fn: scores (queries, responses); already normalised per pole.
        device: where tensors live.
        seed: seeds sampling (combined with the step and the worker's rank).
    """

    def __init__(
        self,
        models,
        tokenizer,
        spec: PolicyConfig,
        reward_fn: RewardFn,
        device: torch.device | str = "cpu",
        seed: int = 0,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.models = models
        self.tokenizer = tokenizer
        self.spec = spec
        self.reward_fn = reward_fn
        self.device = torch.device(device)
        self.seed = seed
        self.autocast_dtype = autocast_dtype
        self.actor_optimizer = torch.optim.AdamW(
            models.policy_parameters(), lr=spec.learning_rate, weight_decay=0.0
        )
        self.critic_optimizer = torch.optim.AdamW(
            models.critic_parameters(), lr=spec.critic_learning_rate, weight_decay=0.0
        )
        self.kl_controller = (
            AdaptiveKLController(spec.kl_coef, spec.target_kl, spec.kl_horizon)
            if spec.target_kl is not None
            else FixedKLController(spec.kl_coef)
        )
        self.score_moments = RunningMoments()
        self.steps_done = 0
        self._sampler: Sampler | None = None

    @property
    def sampler(self) -> Sampler:
        """The runtime's decode loop over the policy's causal LM (built on first use)."""
        if self._sampler is None:
            self._sampler = Sampler(self.models.peft.get_base_model(), self.tokenizer)
        return self._sampler

    # -- sampling ------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def encode_queries(self, queries: Sequence[Query]) -> list[tuple[int, ...]]:
        """Each query's tokens, its last ``max_prompt_length`` kept."""
        texts = [format_prompt(self.tokenizer, q.prompt, q.preference_prompt) for q in queries]
        return self.sampler.encode(texts, max_length=self.spec.max_prompt_length)

    def sample(
        self,
        queries: Sequence[Query],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        reference: bool = False,
        top_k: int = 0,
        dtype: str = "auto",
    ) -> RolloutSample:
        """Responses to ``queries`` from the policy (or the reference), the full tempered
        distribution unless ``top_k``/``top_p`` cut it, decoded in ``dtype``
        (:func:`~psoups_ray.runtime.decoder.resolve_dtype`); row i draws with seed
        ``(seed, i)``. The PPO ratio's log-probabilities are recomputed by the training
        forward, never taken from the sampler."""
        prompts = self.encode_queries(queries)
        requests = [
            SampleRequest(
                ids,
                SamplingParams(max_new_tokens, temperature, top_k, top_p, derive_seed(seed, index)),
            )  # fmt: skip
            for index, ids in enumerate(prompts)
        ]
        merged = self.spec.generation.merged and not reference
        with self._autocast(), self.models.sampling(reference, merged) as model:
            completions = self.sampler.complete(requests, len(requests), model=model, dtype=dtype)
        input_ids, attention_mask = left_padded(prompts, self.sampler.pad_token_id, self.device)
        width = max(len(c.token_ids) for c in completions)
        responses = torch.full((len(queries), width), self.sampler.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(queries), width))
        for row, completion in enumerate(completions):
            responses[row, : len(completion.token_ids)] = torch.tensor(completion.token_ids)
            mask[row, : len(completion.token_ids)] = 1.0
        return RolloutSample(
            encoded={"input_ids": input_ids, "attention_mask": attention_mask},
            responses=responses.to(self.device),
            mask=mask.to(self.device),
            texts=[completion.text for completion in completions],
            ended=torch.tensor([c.finish_reason == "stop" for c in completions]).to(self.device),
        )

    @staticmethod
    def join(
        encoded: dict[str, torch.Tensor], responses: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(input_ids, attention_mask, query_length) of queries followed by responses:
        (B, Q + T) each; tokens after a response's EOS are not attended."""
        input_ids = torch.cat([encoded["input_ids"], responses], dim=1)
        attention_mask = torch.cat([encoded["attention_mask"], mask.long()], dim=1)
        return input_ids, attention_mask, encoded["input_ids"].shape[1]

    def rollout_length(self, step: int) -> int:
        """max_new_tokens of a step's rollouts: fixed, or drawn from ``length_range``."""
        generation = self.spec.generation
        if generation.length_range is None:
            return generation.max_new_tokens
        low, high = generation.length_range
        return random.Random(derive_seed(self.seed, "length", step)).randint(low, high)

    # -- rollout -------------------------------------------------------------------
    def _per_token_in_chunks(self, function, input_ids, attention_mask, mask, query_length):
        """``function(ids, attention_mask, query_length)`` -> per-token tensor(s) (b, T'),
        on chunks of ``minibatch_size`` rows of similar response length (sorted longest
        first), each trimmed of its padding (:func:`trim_padding`); returned as (B, T) in
        the rows' order, zero past each chunk's T'. A row's outputs do not depend on the
        rows it shares a chunk with."""
        batch, width = mask.shape
        order = torch.argsort(mask.sum(dim=1), descending=True, stable=True)  # (B,)
        joined: list[torch.Tensor] | None = None
        for start in range(0, batch, self.spec.minibatch_size):
            rows = order[start : start + self.spec.minibatch_size]
            ids, am, q, kept = trim_padding(
                input_ids[rows], attention_mask[rows], mask[rows], query_length
            )
            output = function(ids, am, q)
            parts = output if isinstance(output, tuple) else (output,)
            if joined is None:
                joined = [t.new_zeros((batch, width)) for t in parts]
            for result, part in zip(joined, parts, strict=True):
                result[rows, :kept] = part
        return tuple(joined) if isinstance(output, tuple) else joined[0]

    @torch.no_grad()
    def rollout(self, queries: Sequence[Query], step: int, rank: int = 0) -> Rollout:
        """Sample, score and compute advantages for one batch of queries."""
        spec, generation = self.spec, self.spec.generation
        sampled = self.sample(
            queries,
            self.rollout_length(step),
            generation.temperature,
            generation.top_p,
            seed=derive_seed(self.seed, "rollout", step, rank),
            dtype=generation.dtype,
        )
        mask, texts, has_eos = sampled.mask, sampled.texts, sampled.ended  # (B, T), B, (B,)
        input_ids, attention_mask, query_length = self.join(
            sampled.encoded, sampled.responses, mask
        )

        with self._autocast():
            logprobs, entropy = self._per_token_in_chunks(
                lambda ids, am, q: self.models.policy_logprobs(
                    ids, am, q, generation.temperature, with_entropy=True
                ),
                input_ids, attention_mask, mask, query_length,
            )  # fmt: skip
            ref_logprobs = self._per_token_in_chunks(
                lambda ids, am, q: self.models.reference_logprobs(
                    ids, am, q, generation.temperature
                ),
                input_ids, attention_mask, mask, query_length,
            )  # fmt: skip
            values = self._per_token_in_chunks(
                self.models.values, input_ids, attention_mask, mask, query_length
            )
        raw_scores = self.reward_fn(queries, texts).to(self.device).float()  # (B,)

        scores = raw_scores
        if spec.reward_normalization == "running":
            self.score_moments.update(raw_scores, across_ranks=True)
            scores = (raw_scores - self.score_moments.mean) / max(self.score_moments.std, 1e-6)
        scores = scores * spec.reward_scale
        if spec.reward_clip is not None:
            scores = scores.clamp(-spec.reward_clip, spec.reward_clip)
        if spec.missing_eos_penalty is not None:
            scores = scores - spec.missing_eos_penalty * (~has_eos).float()

        kl = kl_penalty(logprobs, ref_logprobs, spec.kl_estimator) * mask  # (B, T)
        rewards = token_rewards(scores, kl, self.kl_controller.value, mask)
        values = values * mask
        advantages, returns = gae(rewards, values, mask, spec.gamma, spec.lam)
        if spec.whiten_advantages:
            advantages = masked_whiten(advantages, mask, across_ranks=True)
        lengths = mask.sum(dim=1)
        stats = {
            "reward": float(raw_scores.mean()),
            "score": float(scores.mean()),
            "kl": float(kl.sum(dim=1).mean()),
            "entropy": float(masked_mean(entropy, mask)),
            "response_length": float(lengths.mean()),
            "eos_fraction": float(has_eos.float().mean()),
            "value_mean": float(masked_mean(values, mask)),
            "return_mean": float(masked_mean(returns, mask)),
        }
        return Rollout(
            input_ids=input_ids,
            attention_mask=attention_mask,
            query_length=query_length,
            mask=mask,
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            values=values,
            scores=scores,
            kl=kl,
            advantages=advantages,
            returns=returns,
            texts=texts,
            stats=stats,
        )

    # -- update --------------------------------------------------------------------
    def _optimizer_step(self, loss, optimizer, parameters) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(parameters)
        norm = torch.nn.utils.clip_grad_norm_(parameters, self.spec.max_grad_norm)
        optimizer.step()
        return float(norm)

    def update(self, rollout: Rollout, step: int) -> dict[str, float]:
        """``ppo_epochs`` passes of clipped policy and value updates over minibatches.

        Stops early (every worker together) once the mean approximate KL between the
        rollout policy and the updated one passes ``stop_kl``.
        """
        spec = self.spec
        totals: dict[str, float] = {}
        updates = 0
        stopped_early = False
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "minibatch", step))
        for _ in range(spec.ppo_epochs):
            order = torch.randperm(len(rollout), generator=generator)
            for start in range(0, len(rollout), spec.minibatch_size):
                index = order[start : start + spec.minibatch_size].to(self.device)
                ids, am, query_length, kept = trim_padding(
                    rollout.input_ids[index],
                    rollout.attention_mask[index],
                    rollout.mask[index],
                    rollout.query_length,
                )
                mask, old_logprobs, advantages, old_values, returns = (
                    tensor[index, :kept]  # (b, T')
                    for tensor in (
                        rollout.mask, rollout.logprobs, rollout.advantages, rollout.values,
                        rollout.returns,
                    )
                )  # fmt: skip
                with self._autocast():
                    logprobs, entropy = self.models.policy_logprobs(
                        ids,
                        am,
                        query_length,
                        spec.generation.temperature,
                        with_entropy=spec.entropy_coef > 0,
                    )
                    pg_loss, pg_stats = policy_loss(
                        logprobs,
                        old_logprobs,
                        advantages,
                        mask,
                        spec.clip_range,
                    )
                    loss = pg_loss
                    if entropy is not None:
                        loss = loss - spec.entropy_coef * masked_mean(entropy, mask)
                actor_norm = self._optimizer_step(
                    loss, self.actor_optimizer, self.models.policy_parameters()
                )
                with self._autocast():
                    values = self.models.values(ids, am, query_length)
                    vf_loss, vf_stats = value_loss(
                        values,
                        old_values,
                        returns,
                        mask,
                        spec.value_clip_range,
                    )
                critic_norm = self._optimizer_step(
                    vf_loss, self.critic_optimizer, self.models.critic_parameters()
                )
                batch_stats = {
                    "policy_loss": float(pg_loss.detach()),
                    "value_loss": float(vf_loss.detach()),
                    "clip_fraction": float(pg_stats["clip_fraction"]),
                    "approx_kl": float(pg_stats["approx_kl"]),
                    "value_clip_fraction": float(vf_stats["value_clip_fraction"]),
                    "policy_grad_norm": actor_norm,
                    "value_grad_norm": critic_norm,
                }
                for key, value in batch_stats.items():
                    totals[key] = totals.get(key, 0.0) + value
                updates += 1
                if spec.stop_kl is not None:
                    approx_kl = mean_across_ranks({"kl": batch_stats["approx_kl"]})["kl"]
                    if approx_kl > spec.stop_kl:
                        stopped_early = True
                        break
            if stopped_early:
                break
        metrics = {key: value / max(updates, 1) for key, value in totals.items()}
        metrics["minibatch_updates"] = float(updates)
        metrics["stopped_early"] = float(stopped_early)
        return metrics

    def step(self, queries: Sequence[Query], rank: int = 0) -> dict[str, float]:
        """One PPO iteration; returns its metrics averaged over the workers."""
        started = time.monotonic()
        step = self.steps_done
        rollout = self.rollout(queries, step, rank)
        rollout_seconds = time.monotonic() - started
        metrics = {**rollout.stats, **self.update(rollout, step)}
        metrics["kl_coef"] = self.kl_controller.value
        metrics = mean_across_ranks(metrics)
        # Ziegler et al.'s controller reads the per-sequence KL of the batch just sampled.
        self.kl_controller.update(metrics["kl"], len(queries) * _world_size())
        self.steps_done += 1
        metrics["rollout_seconds"] = rollout_seconds
        metrics["step_seconds"] = time.monotonic() - started
        metrics["step"] = float(self.steps_done)
        return metrics

    # -- checkpoints ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "models": self.models.trainable_state(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "kl_controller": self.kl_controller.state_dict(),
            "score_moments": self.score_moments.state_dict(),
            "steps_done": self.steps_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.models.load_trainable_state(state["models"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.score_moments.load_state_dict(state["score_moments"])
        self.steps_done = int(state["steps_done"])
