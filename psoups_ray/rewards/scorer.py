"""Scoring (prompt, response) pairs with the run's reward models.

One frozen base is loaded once, with every reward adapter (and its score head) attached
by name; scoring a pole switches the active adapter. Scores are normalised per pole with
the held-out mean/std stored next to each adapter, so poles are comparable and a
combination's score is the mean of its poles' normalised scores. PPO, Tune, evaluation
and the feedback judge all score through this class.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from peft import PeftModel

from psoups_ray.base.model import load_options, load_tokenizer
from psoups_ray.config import BaseConfig
from psoups_ray.errors import PsoupsError
from psoups_ray.manifest import Manifest
from psoups_ray.rewards.train import (
    load_reward_base,
    read_reward_stats,
    reward_input,
    score_texts,
)
from psoups_ray.rundir import RunDir, local_reference


class RewardScorer:
    """The reward models of a run, loaded once.

    Args:
        rewards: the manifest's ``rewards`` section (pole -> {"path", "conditioned", ...}).
        base_model_path / tokenizer_path: the manifest's base references.
        preference_prompts: pole -> preference prompt (used by conditioned reward models).
    """

    def __init__(
        self,
        rewards: Mapping[str, Mapping[str, Any]],
        base_model_path: str,
        tokenizer_path: str,
        base: BaseConfig,
        preference_prompts: Mapping[str, str],
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ):
        if not rewards:
            raise PsoupsError("the run has no reward models; run the rewards stage first")
        self.batch_size = batch_size
        self.preference_prompts = dict(preference_prompts)
        self.tokenizer = load_tokenizer(local_reference(tokenizer_path), **load_options(base))
        base_model = load_reward_base(base_model_path, base)
        base_model.config.pad_token_id = self.tokenizer.pad_token_id
        self._adapter_of: dict[str, str] = {}
        self._conditioned: dict[str, bool] = {}
        self._stats: dict[str, dict[str, float]] = {}
        model = None
        loaded: dict[str, tuple[str, dict[str, Any]]] = {}  # location -> (adapter name, stats)
        for pole, record in rewards.items():
            location = record["path"]
            if location not in loaded:  # a multitask adapter serves every pole: load it once
                name = f"reward_{len(loaded)}"
                directory = local_reference(location)
                stats = read_reward_stats(directory, location)
                if model is None:
                    model = PeftModel.from_pretrained(base_model, directory, adapter_name=name)
                else:
                    model.load_adapter(directory, adapter_name=name)
                loaded[location] = name, stats
            name, stats = loaded[location]
            self._adapter_of[pole] = name
            self._conditioned[pole] = bool(stats.get("conditioned"))
            self._stats[pole] = stats[pole]
        self.model = model.to(device).eval()

    @classmethod
    def from_run(
        cls, rundir: RunDir, base: BaseConfig | None = None, device: str | torch.device = "cpu"
    ) -> RewardScorer:
        """Load the reward models a run's manifest names."""
        from psoups_ray.config import PsoupsConfig

        data = Manifest.load(rundir).data
        config = PsoupsConfig.model_validate(data["config"])
        space = config.space
        return cls(
            data["rewards"],
            data["base"]["model_path"],
            data["base"]["tokenizer_path"],
            base or config.base,
            {pole: space.pole(pole).prompt for pole in space.pole_ids},
            device=device,
        )

    @property
    def poles(self) -> list[str]:
        return list(self._adapter_of)

    def statistics(self, pole: str) -> dict[str, float]:
        return dict(self._stats[self._known(pole)])

    def _known(self, pole: str) -> str:
        if pole not in self._adapter_of:
            raise PsoupsError(f"no reward model for pole {pole!r}; known: {', '.join(self.poles)}")
        return pole

    @torch.no_grad()
    def score(
        self,
        pole: str,
        prompts: Sequence[str],
        responses: Sequence[str],
        normalize: bool = True,
    ) -> torch.Tensor:
        """Rewards of ``responses`` to the raw instructions ``prompts`` for one pole.

        Returns a float tensor of shape (batch,); normalised to the pole's held-out
        mean 0 / std 1 unless ``normalize`` is false.
        """
        self._known(pole)
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        preference = self.preference_prompts.get(pole) if self._conditioned[pole] else None
        pairs = [
            reward_input(self.tokenizer, p, r, preference)
            for p, r in zip(prompts, responses, strict=True)
        ]
        self.model.set_adapter(self._adapter_of[pole])
        scores = score_texts(
            self.model,
            self.tokenizer,
            [p for p, _ in pairs],
            [r for _, r in pairs],
            self.batch_size,
        )
        if normalize:
            stats = self._stats[pole]
            scores = (scores - stats["score_mean"]) / max(stats["score_std"], 1e-6)
        return scores

    def score_combination(
        self, poles: Iterable[str], prompts: Sequence[str], responses: Sequence[str]
    ) -> torch.Tensor:
        """Mean of the poles' normalised rewards: shape (batch,)."""
        poles = list(poles)
        if not poles:
            raise ValueError("a combination needs at least one pole")
        per_pole = torch.stack([self.score(pole, prompts, responses) for pole in poles])
        return per_pole.mean(dim=0)  # (num_poles, batch) -> (batch,)
