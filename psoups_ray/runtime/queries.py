"""What the soup evaluators are given, without torch: where a run's models are
(:class:`SoupModels`) and one soup to measure (:class:`SoupQuery`).

Every Tune trial runs in its own Ray worker process and needs only these, so this module
imports neither torch nor transformers: a trial process starts in about a second instead of
paying several CPU-seconds of imports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from psoups_ray.artifacts import ModelSet, RunArtifacts
from psoups_ray.judges.attributes import AttributeJudge, attribute_judge


@dataclass(frozen=True)
class SoupModels:
    """What the evaluator actors load (a :class:`~psoups_ray.artifacts.ModelSet`: the base,
    every pole policy, the baselines, every reward model) and how they measure; picklable
    for Ray."""

    models: ModelSet
    attributes: AttributeJudge | None  # also measure which poles the responses show
    use_gpu: bool = False

    @classmethod
    def from_run(
        cls,
        run: RunArtifacts,
        reward_max_length: int,
        use_gpu: bool,
        baselines: Sequence[str] = (),
    ) -> SoupModels:
        return cls(
            models=run.model_set(list(baselines), reward_max_length=reward_max_length),
            attributes=attribute_judge(run.config),
            use_gpu=use_gpu,
        )

    @property
    def poles(self) -> list[str]:
        """The pole policies (the baselines come after them in the weight vector)."""
        return list(self.models.rewards)


@dataclass(frozen=True)
class SoupQuery:
    """One soup to measure: its weights, the poles whose rewards count, its query prompt."""

    weights: dict[str, float]  # pole -> weight; poles left out weigh 0
    scored: tuple[str, ...]  # the poles whose rewards are measured (the combination)
    preference_prompt: str | None = None  # appended to every prompt (prompted policies)
