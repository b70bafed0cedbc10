"""Scoring (prompt, response) pairs with a run's reward models, from a notebook or script.

:class:`RewardScorer` loads the run's base once with every reward adapter attached by the
runtime's :class:`~psoups_ray.runtime.rewards.RewardBank`, the same bank (and so the same
truncation, score position and normalisation) PPO's reward, tune and evaluate score with.
Scores are normalised per pole with the held-out mean/std stored next to each adapter, so
poles are comparable and a combination's score is the mean of its poles' normalised scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from psoups_ray.artifacts import AdapterArtifact, BaseArtifact, RunArtifacts
from psoups_ray.errors import PsoupsError
from psoups_ray.rundir import RunDir
from psoups_ray.runtime.loading import load_base_model, load_base_tokenizer
from psoups_ray.runtime.rewards import RewardBank, read_reward_adapter


class RewardScorer:
    """The reward models of a run, loaded once.

    Args:
        base: the run's base model.
        rewards: the reward adapters by pole.
        preference_prompts: pole -> preference prompt (used by conditioned reward models).
        max_length: the reward models' ``rewards.max_length`` (longer texts keep their
            first tokens, as in training and every stage).
    """

    def __init__(
        self,
        base: BaseArtifact,
        rewards: Mapping[str, AdapterArtifact],
        preference_prompts: Mapping[str, str],
        max_length: int | None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ):
        if not rewards:
            raise PsoupsError("the run has no reward models; run the rewards stage first")
        self.tokenizer = load_base_tokenizer(base)
        model = load_base_model(base, device=device)
        adapters = {
            pole: read_reward_adapter(pole, artifact.local_dir())
            for pole, artifact in rewards.items()
        }
        self.bank = RewardBank(
            model, adapters, self.tokenizer, preference_prompts, max_length, batch_size
        )
        self.bank.peft.eval()

    @classmethod
    def from_run(cls, run: str | RunDir, device: str | torch.device = "cpu") -> RewardScorer:
        """Load the reward models a run's manifest names."""
        artifacts = RunArtifacts.load(run)
        space = artifacts.space
        return cls(
            artifacts.base,
            artifacts.rewards(),
            {pole: space.pole(pole).prompt for pole in space.pole_ids},
            artifacts.config.rewards.max_length,
            device=device,
        )

    @property
    def poles(self) -> list[str]:
        return self.bank.poles

    def statistics(self, pole: str) -> dict[str, float]:
        return self.bank.statistics(pole)

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
        return self.bank.score(pole, prompts, responses, normalize)

    def score_combination(
        self, poles: Iterable[str], prompts: Sequence[str], responses: Sequence[str]
    ) -> torch.Tensor:
        """Mean of the poles' normalised rewards: shape (batch,)."""
        poles = tuple(poles)
        if not poles:
            raise PsoupsError("a combination needs at least one pole")
        return self.bank.mean_scores([poles] * len(responses), prompts, responses)
