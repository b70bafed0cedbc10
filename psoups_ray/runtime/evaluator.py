"""Measure soups: generate with any weights over the pole policies, score with the pole
reward models. One loaded base serves everything.

The base model is loaded once; every pole's reward adapter is attached to it through
PEFT (with its score head), and every pole's policy adapter is mixed into the same
linear layers by :mod:`psoups_ray.runtime.mixing`. Generating with a soup = reward adapters
disabled + mixing weights set, per row; scoring = one reward adapter enabled, no mixing
weights. A request is a list of :class:`SoupQuery`; all their rows (query x prompt) are
generated in mixed batches.

:class:`SoupEvaluator` needs no Ray; :func:`psoups_ray.runtime.pool.evaluator_actor_class`
wraps it as the long-lived Ray actor that tune trials and Pareto sweeps call (the model
stays loaded across trials).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from psoups_ray.config import GenerationSpec
from psoups_ray.errors import PsoupsError
from psoups_ray.runtime.queries import SoupModels, SoupQuery
from psoups_ray.runtime.sampling import SampleRequest, SamplingParams, row_seed


class SoupEvaluator:
    """A run's base, pole policies (mixed) and reward models, loaded once."""

    def __init__(self, models: SoupModels, device: torch.device | str = "cpu"):
        from psoups_ray.runtime.loading import LoadedModels

        self.models = models
        self.loaded = LoadedModels(models.models, device)
        self.tokenizer = self.loaded.tokenizer
        self.rewards = self.loaded.rewards
        self.mixer = self.loaded.mixer
        self.sampler = self.loaded.sampler

    @property
    def poles(self) -> list[str]:
        """Names of the mixable adapters: every pole, then the loaded baselines."""
        return self.mixer.adapter_names

    def weight_vector(self, weights: dict[str, float]) -> list[float]:
        unknown = sorted(set(weights) - set(self.poles))
        if unknown:
            raise PsoupsError(f"no policy for {', '.join(unknown)} (poles: {self.poles})")
        return [float(weights.get(pole, 0.0)) for pole in self.poles]

    @torch.no_grad()
    def generate(
        self,
        queries: Sequence[SoupQuery],
        prompts: Sequence[str],
        spec: GenerationSpec,
        seed: int,
    ) -> list[list[str]]:
        """Responses of every soup to every prompt: ``[query][prompt]``.

        Rows are (query, prompt) pairs, each mixing with its own query's weights, decoded
        in batches of ``spec.batch_size``. Prompt p is sampled with the seed
        :func:`row_seed` ``(seed, p)`` whatever the query, so the same prompts and seed give
        the same samples, and soups are compared on common random numbers (a tune trial's
        weights, an evaluation's systems).
        """
        from psoups_ray.prompting import format_prompt

        requests = []
        for query in queries:
            weights = tuple(self.weight_vector(query.weights))
            formatted = [format_prompt(self.tokenizer, p, query.preference_prompt) for p in prompts]
            for index, ids in enumerate(self.sampler.encode(formatted)):
                params = SamplingParams.from_spec(spec, row_seed(seed, index))
                requests.append(SampleRequest(ids, params, weights))
        with self.loaded.generating():  # the reward adapters off: only the mixed soup counts
            completions = self.sampler.complete(requests, spec.batch_size, dtype=spec.dtype)
        texts = [completion.text for completion in completions]
        return [texts[q * len(prompts) : (q + 1) * len(prompts)] for q in range(len(queries))]

    def normalized_rewards(
        self, pole: str, prompts: Sequence[str], texts: Sequence[str], batch_size: int
    ) -> torch.Tensor:
        """``pole``'s reward of each (prompt, response), standardised with the reward
        model's held-out statistics (:meth:`RewardBank.score`): (len(texts),)."""
        return self.rewards.score(pole, prompts, texts, batch_size=batch_size)

    def sample(
        self,
        queries: Sequence[SoupQuery],
        prompts: Sequence[str],
        spec: GenerationSpec,
        seed: int,
        scored: Sequence[str],
    ) -> list[dict[str, Any]]:
        """Per query: its responses (one per prompt) and, for each pole in ``scored``, the
        normalised reward of every response (``rewards[pole]``, a list like the responses)."""
        if not prompts:
            raise PsoupsError("no prompts to sample")
        texts = self.generate(queries, prompts, spec, seed)
        return [
            {
                "responses": responses,
                "rewards": {
                    pole: self.normalized_rewards(
                        pole, prompts, responses, spec.batch_size
                    ).tolist()
                    for pole in scored
                },
            }
            for responses in texts
        ]

    def evaluate(
        self,
        queries: Sequence[SoupQuery],
        prompts: Sequence[str],
        spec: GenerationSpec,
        seed: int,
        keep_samples: int = 0,
    ) -> list[dict[str, Any]]:
        """Per query: mean normalised reward of each scored pole, their mean (``mean_reward``),
        response length, and with an attribute judge (the tiny world's) the share of
        responses showing every scored pole (``success_rate``) and each pole's share."""
        if not prompts:
            raise PsoupsError("no prompts to evaluate soups on")
        texts = self.generate(queries, prompts, spec, seed)
        results = []
        for query, responses in zip(queries, texts, strict=True):
            rewards = {
                pole: float(
                    self.normalized_rewards(pole, prompts, responses, spec.batch_size).mean()
                )
                for pole in query.scored
            }
            result: dict[str, Any] = {
                "weights": {pole: float(w) for pole, w in query.weights.items()},
                "rewards": rewards,
                "mean_reward": sum(rewards.values()) / len(rewards),
                "response_words": sum(len(t.split()) for t in responses) / len(responses),
            }
            if self.models.attributes is not None:
                wanted = set(query.scored)
                shown = [self.models.attributes.shown(text) for text in responses]
                result["success_rate"] = sum(wanted <= s for s in shown) / len(shown)
                result["target_rates"] = {
                    pole: sum(pole in s for s in shown) / len(shown) for pole in query.scored
                }
            if keep_samples:
                result["samples"] = [
                    {"prompt": p, "response": r}
                    for p, r in list(zip(prompts, responses, strict=True))[:keep_samples]
                ]
            results.append(result)
        return results
