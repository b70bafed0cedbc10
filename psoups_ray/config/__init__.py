"""Typed configuration: pydantic models, YAML files, dotted ``--set`` overrides.

One module per section (:mod:`~psoups_ray.config.base`, :mod:`~psoups_ray.config.feedback`,
:mod:`~psoups_ray.config.rewards`, :mod:`~psoups_ray.config.policies`,
:mod:`~psoups_ray.config.tune`, :mod:`~psoups_ray.config.evaluate`,
:mod:`~psoups_ray.config.cluster`), the experiment that holds them
(:mod:`~psoups_ray.config.experiment`) and the loading of files
(:mod:`~psoups_ray.config.files`). Every field is documented once, in the docstring under
it; that text is what ``psoups config --explain`` prints. A bad key, type or value fails
before any work starts, with every problem listed (key, given value, what is allowed).
"""

from psoups_ray.config.base import BaseConfig, SFTSpec, TinyModelSpec, WorldConfig
from psoups_ray.config.cluster import RayConfig
from psoups_ray.config.common import (
    MAX_SOUP_WEIGHT,
    TINY_MODEL,
    DeepSpeedSpec,
    EvaluatorResources,
    GenerationSpec,
    LoraSpec,
    ScalingSpec,
    StrictModel,
)
from psoups_ray.config.evaluate import SOUP_SYSTEMS, EvaluateConfig, EvaluatedSystem
from psoups_ray.config.experiment import PsoupsConfig
from psoups_ray.config.feedback import FeedbackConfig, FeedbackFileSpec, OpenAIJudgeSpec
from psoups_ray.config.files import (
    BUILTIN_CONFIGS_PACKAGE,
    SMOKE_TEST_OVERRIDES,
    apply_override,
    builtin_config_names,
    explain,
    load_config,
    safe_load_yaml,
)
from psoups_ray.config.policies import PolicyConfig, RolloutGenerationSpec
from psoups_ray.config.rewards import RewardsConfig
from psoups_ray.config.tune import TuneConfig

__all__ = [
    "BUILTIN_CONFIGS_PACKAGE",
    "MAX_SOUP_WEIGHT",
    "SMOKE_TEST_OVERRIDES",
    "SOUP_SYSTEMS",
    "TINY_MODEL",
    "BaseConfig",
    "DeepSpeedSpec",
    "EvaluateConfig",
    "EvaluatedSystem",
    "EvaluatorResources",
    "FeedbackConfig",
    "FeedbackFileSpec",
    "GenerationSpec",
    "LoraSpec",
    "OpenAIJudgeSpec",
    "PolicyConfig",
    "PsoupsConfig",
    "RayConfig",
    "RewardsConfig",
    "RolloutGenerationSpec",
    "SFTSpec",
    "ScalingSpec",
    "StrictModel",
    "TinyModelSpec",
    "TuneConfig",
    "WorldConfig",
    "apply_override",
    "builtin_config_names",
    "explain",
    "load_config",
    "safe_load_yaml",
]
