"""The ``PreferenceScorer`` deployment: the run's pole reward models on one loaded base,
giving personal soups their features, φ(prompt, answer) = every pole's normalised reward
(:class:`~psoups_ray.runtime.rewards.RewardBank`, the bank that PPO, tune and evaluate
score with). Deployed with personal soups only; the ingress calls it for each choice and
each active question.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from psoups_ray.serve.args import ServeArgs
from psoups_ray.serve.model import limit_torch_threads


class _PreferenceScorer:
    def __init__(self, args: dict[str, Any]):
        from psoups_ray.artifacts import RunArtifacts
        from psoups_ray.runtime.loading import LoadedModels

        settings = ServeArgs.model_validate(args)
        limit_torch_threads()
        run = RunArtifacts.load(settings.run)
        models = run.model_set(
            reward_max_length=run.config.rewards.max_length, dtype=settings.dtype, policies=False
        )
        self.loaded = LoadedModels(models, settings.device, mix=False)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="psoups-score")

    def _features(self, poles: list[str], prompt: str, texts: list[str]) -> list[list[float]]:
        bank = self.loaded.rewards
        columns = [bank.score(pole, [prompt] * len(texts), texts).tolist() for pole in poles]
        return [list(row) for row in zip(*columns, strict=True)]

    async def features(self, poles: list[str], prompt: str, texts: list[str]) -> list[list[float]]:
        """(len(texts), len(poles)): each pole's normalised reward of each answer to
        ``prompt`` (the raw instruction)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._features, poles, prompt, texts)


PreferenceScorer = serve.deployment(
    name="PreferenceScorer", max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.25}
)(_PreferenceScorer)
