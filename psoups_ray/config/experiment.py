"""The whole experiment: every section, and the checks across them."""

from __future__ import annotations

import hashlib
import json

from pydantic import Field, model_validator

from psoups_ray.config.base import BaseConfig, WorldConfig
from psoups_ray.config.cluster import RayConfig
from psoups_ray.config.common import StrictModel
from psoups_ray.config.evaluate import EvaluateConfig
from psoups_ray.config.feedback import FeedbackConfig
from psoups_ray.config.policies import PolicyConfig
from psoups_ray.config.rewards import RewardsConfig
from psoups_ray.config.tune import TuneConfig
from psoups_ray.errors import PsoupsError
from psoups_ray.preferences import PreferenceSpace, PreferenceSpaceSpec


class PsoupsConfig(StrictModel):
    """A whole P-Soups experiment."""

    name: str = Field(default="tiny", min_length=1)
    """Name of the experiment (used in run names)."""
    seed: int = 0
    """Global seed for training and sampling."""
    preferences: PreferenceSpaceSpec = Field(default_factory=PreferenceSpaceSpec)
    """Preference dimensions, poles and the combinations to evaluate."""
    world: WorldConfig = Field(default_factory=WorldConfig)
    """Tiny world settings."""
    base: BaseConfig = Field(default_factory=BaseConfig)
    """Base model stage."""
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    """Feedback stage."""
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    """Reward-model stage."""
    policies: PolicyConfig = Field(default_factory=PolicyConfig)
    """PPO policy stage (and baselines)."""
    tune: TuneConfig = Field(default_factory=TuneConfig)
    """Soup weight search and Pareto fronts."""
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    """Win rates of P-Soups against the baselines, and the judges."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """Ray cluster connection."""

    @model_validator(mode="after")
    def _cross_checks(self) -> PsoupsConfig:
        if self.base.is_tiny:
            from psoups_ray.world import WORLD_POLES

            supported = {pole for poles in WORLD_POLES.values() for pole in poles}
            unsupported = [p for p in self.space.pole_ids if p not in supported]
            if unsupported:
                raise ValueError(
                    f"base.model 'tiny' only knows the poles {sorted(supported)}; the "
                    f"preference space declares {unsupported}. Use a real model for other poles."
                )
            if self.base.num_sample_prompts > self.world.num_eval_prompts:
                raise ValueError(
                    f"base.num_sample_prompts ({self.base.num_sample_prompts}) exceeds "
                    f"world.num_eval_prompts ({self.world.num_eval_prompts})"
                )
            policies = self.policies
            for length_key, length in (
                ("base.sft.max_length", self.base.sft.max_length),
                ("rewards.max_length", self.rewards.max_length),
                (
                    "policies.max_prompt_length + policies.generation.max_new_tokens",
                    policies.max_prompt_length + policies.generation.max_new_tokens,
                ),
                (
                    "policies.max_prompt_length + tune.generation.max_new_tokens",
                    policies.max_prompt_length + self.tune.generation.max_new_tokens,
                ),
                (
                    "policies.max_prompt_length + evaluate.generation.max_new_tokens",
                    policies.max_prompt_length + self.evaluate.generation.max_new_tokens,
                ),
            ):
                if length > self.base.tiny.max_position_embeddings:
                    raise ValueError(
                        f"{length_key} ({length}) exceeds base.tiny.max_position_embeddings "
                        f"({self.base.tiny.max_position_embeddings})"
                    )
            if self.feedback.source == "auto":
                self.feedback.source = "world"
            if self.feedback.judge == "auto":
                self.feedback.judge = "checkers"
        else:
            if self.feedback.source == "auto":
                self.feedback.source = "generate"
            if self.feedback.judge == "auto":
                self.feedback.judge = "openai"
            if self.feedback.source == "world":
                raise ValueError(
                    "feedback.source 'world' needs base.model 'tiny'; for a real model use "
                    "'files' or 'generate'"
                )
            if self.feedback.source == "generate" and self.feedback.judge == "checkers":
                raise ValueError(
                    "feedback.judge 'checkers' only understands the tiny world; for a real "
                    "model use judge 'openai' or 'text'"
                )
        if self.base.is_tiny and self.base.gguf_file:
            raise ValueError("base.gguf_file needs a real base.model (a directory, hub id or "
                             "package:<module> holding the file), not 'tiny'")  # fmt: skip
        if self.uses_text_judge:
            from psoups_ray.judges.text import DEFAULT_POLE_RULES

            unknown = [pole for pole in self.space.pole_ids if pole not in DEFAULT_POLE_RULES]
            if unknown:
                raise ValueError(
                    f"the text judges score the poles {', '.join(DEFAULT_POLE_RULES)} of the "
                    f"paper's space; the preference space declares {', '.join(unknown)}. Use "
                    "feedback.judge 'openai' (and evaluate.llm_judge) for other poles"
                )
        for index, text in enumerate(self.tune.combinations or []):
            try:
                self.space.parse(text)
            except PsoupsError as exc:
                raise ValueError(f"tune.combinations[{index}]: {exc}") from None
        pole_ids = set(self.space.pole_ids)
        for index, spec in enumerate(self.feedback.files):
            if spec.pole is not None and spec.pole not in pole_ids:
                raise ValueError(
                    f"feedback.files[{index}].pole {spec.pole!r} is not a pole of the "
                    f"preference space ({', '.join(sorted(pole_ids))})"
                )
        return self

    @property
    def uses_text_judge(self) -> bool:
        """The programmatic text judges label feedback or judge the evaluation."""
        return self.feedback.judge == "text" or self.evaluate.text_judge

    @property
    def space(self) -> PreferenceSpace:
        return PreferenceSpace.from_spec(self.preferences)

    def section_fingerprint(self, *sections: str) -> str:
        """Stable hash of some top-level sections: tells whether a stage's inputs changed."""
        dumped = self.model_dump(mode="json")
        payload = json.dumps({s: dumped[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
