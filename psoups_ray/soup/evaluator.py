"""Measure soups: generate with any weights over the pole policies, score with the pole
reward models. One loaded base serves everything.

The base model is loaded once; every pole's reward adapter is attached to it through
PEFT (with its score head), and every pole's policy adapter is mixed into the same
linear layers by :mod:`psoups_ray.soup.mixing`. Generating with a soup = reward adapters
disabled + mixing weights set, per row; scoring = one reward adapter enabled, no mixing
weights. A request is a list of :class:`SoupQuery`; all their rows (query x prompt) are
generated in mixed batches.

:class:`SoupEvaluator` needs no Ray; :func:`evaluator_actor_class` wraps it as the
long-lived Ray actor that tune trials and Pareto sweeps call (the model stays loaded
across trials). What the actors are given and the pool that lends them are in
:mod:`psoups_ray.soup.pool`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from psoups_ray.config import GenerationSpec
from psoups_ray.errors import PsoupsError
from psoups_ray.rundir import local_reference
from psoups_ray.soup.pool import SoupModels, SoupQuery


class SoupEvaluator:
    """A run's base, pole policies (mixed) and reward models, loaded once."""

    def __init__(self, models: SoupModels, device: torch.device | str = "cpu"):
        from peft import get_peft_model

        from psoups_ray.base.model import load_causal_lm, load_options, load_tokenizer
        from psoups_ray.rl.models import (
            load_reward_weights,
            read_reward_adapter,
            reward_lora_config,
        )
        from psoups_ray.soup.adapters import read_lora_adapter
        from psoups_ray.soup.mixing import attach_mixing

        self.models = models
        self.device = torch.device(device)
        options = load_options(models.base)
        self.tokenizer = load_tokenizer(local_reference(models.tokenizer_path), **options)
        base = load_causal_lm(local_reference(models.base_model_path), models.base.dtype, **options)
        base.requires_grad_(False)
        self.rewards = {
            pole: read_reward_adapter(pole, local_reference(path))
            for pole, path in models.reward_paths.items()
        }
        self._adapter_of: dict[str, str] = {}  # pole -> attached reward adapter name
        self._heads: dict[str, torch.nn.Linear] = {}
        by_directory: dict[str, str] = {}
        self.peft = None
        for pole, adapter in self.rewards.items():
            if adapter.directory not in by_directory:
                name = f"reward_{len(by_directory)}"
                config = reward_lora_config(adapter.directory)
                if self.peft is None:
                    self.peft = get_peft_model(base, config, adapter_name=name)
                else:
                    self.peft.add_adapter(name, config)
                self._heads[name] = load_reward_weights(self.peft, name, adapter.directory)
                by_directory[adapter.directory] = name
            self._adapter_of[pole] = by_directory[adapter.directory]
        self.lm = self.peft.get_base_model()  # the causal LM, PEFT layers inside
        policies = [
            read_lora_adapter(local_reference(path), name)
            for name, path in {**models.policy_paths, **models.baseline_paths}.items()
        ]
        self.mixer = attach_mixing(self.lm, policies)
        self.peft.to(self.device)
        for head in self._heads.values():
            head.to(self.device)
        self.peft.eval()

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

        Rows are (query, prompt) pairs in batches of ``spec.batch_size``; each row mixes
        with its own query's weights. Batch k is sampled with seed ``seed + k``, so the
        same queries, prompts and seed give the same samples (tune trials compare weights
        on common random numbers).
        """
        from psoups_ray.generation import generate
        from psoups_ray.prompting import format_prompt

        rows = [(q, p) for q in range(len(queries)) for p in range(len(prompts))]
        weights = torch.tensor([self.weight_vector(query.weights) for query in queries])
        texts: list[str] = []
        with self.peft.disable_adapter():
            for batch, start in enumerate(range(0, len(rows), spec.batch_size)):
                chunk = rows[start : start + spec.batch_size]
                formatted = [
                    format_prompt(self.tokenizer, prompts[p], queries[q].preference_prompt)
                    for q, p in chunk
                ]
                with self.mixer.weights(weights[[q for q, _ in chunk]].to(self.device)):
                    texts.extend(
                        generate(
                            self.lm,
                            self.tokenizer,
                            formatted,
                            spec,
                            seed=seed + batch,
                            on_compact=self.mixer.select_rows,
                        )
                    )
        return [texts[q * len(prompts) : (q + 1) * len(prompts)] for q in range(len(queries))]

    @torch.no_grad()
    def normalized_rewards(
        self, pole: str, prompts: Sequence[str], texts: Sequence[str], batch_size: int
    ) -> torch.Tensor:
        """``pole``'s reward of each (prompt, response), standardised with the reward
        model's held-out statistics: (len(texts),)."""
        from psoups_ray.rewards.train import reward_input, score_right_padded
        from psoups_ray.rl.models import read_scores

        adapter = self.rewards[pole]
        name = self._adapter_of[pole]
        preference = self.models.preference_prompts[pole] if adapter.conditioned else None
        inputs = [
            "".join(reward_input(self.tokenizer, prompt, text, preference))
            for prompt, text in zip(prompts, texts, strict=True)
        ]
        self.peft.set_adapter(name)
        scores = score_right_padded(
            self.tokenizer,
            inputs,
            batch_size,
            lambda ids, mask: read_scores(
                self.peft.get_base_model().base_model,
                self._heads[name],
                ids.to(self.device),
                mask.to(self.device),
                self.tokenizer.pad_token_id,
            ),
            self.models.reward_max_length,
        )
        return (scores - adapter.score_mean) / adapter.score_std

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
        response length, and in the tiny world the share of responses exhibiting every
        scored pole (``success_rate``)."""
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
            if self.models.tiny_world:
                from psoups_ray.world import exhibited_poles

                wanted = set(query.scored)
                shown = [exhibited_poles(text) for text in responses]
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


def evaluator_actor_class(num_cpus: float, num_gpus: float):
    """:class:`SoupEvaluator` as a Ray actor class with these resources."""
    import ray

    @ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=1)
    class SoupEvaluatorActor:
        def __init__(self, models: SoupModels):
            from psoups_ray.training import threads_for_worker

            threads_for_worker(num_cpus)
            device = "cpu"
            if models.use_gpu and torch.cuda.is_available():
                device = "cuda"
            self.evaluator = SoupEvaluator(models, device)
            self.calls = 0
            self.busy_seconds = 0.0  # time spent serving calls (utilisation = busy / wall)

        def _serve(self, method, *arguments):
            import time

            started = time.monotonic()
            self.calls += 1
            try:
                return method(*arguments)
            finally:
                self.busy_seconds += time.monotonic() - started

        def evaluate(self, queries, prompts, spec, seed, keep_samples=0):
            return self._serve(self.evaluator.evaluate, queries, prompts, spec, seed,
                               keep_samples)  # fmt: skip

        def sample(self, queries, prompts, spec, seed, scored):
            return self._serve(self.evaluator.sample, queries, prompts, spec, seed, scored)

        def stats(self) -> dict[str, Any]:
            import os

            return {
                "pid": os.getpid(),
                "calls": self.calls,
                "busy_seconds": round(self.busy_seconds, 1),
            }

    return SoupEvaluatorActor
