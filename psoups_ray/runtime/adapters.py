"""LoRA adapters as plain tensors: read a PEFT adapter directory, write one back.

A LoRA adapter changes each targeted linear layer's weight by ``scale * B @ A`` with
A: (r, in), B: (out, r) and scale = alpha / r (alpha / sqrt(r) with rsLoRA). Merging and
mixing work on these tensors directly; the files stay loadable by plain PEFT.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from psoups_ray.errors import PsoupsError
from psoups_ray.rundir import missing_artifact

PREFIX = "base_model.model."
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class LoraAdapter:
    """One adapter's factors by module name (e.g. ``model.layers.0.self_attn.q_proj``)."""

    name: str
    config: dict[str, Any]  # adapter_config.json
    a: dict[str, torch.Tensor]  # module -> (r, in)
    b: dict[str, torch.Tensor]  # module -> (out, r)

    @property
    def modules(self) -> list[str]:
        return list(self.a)

    def scale(self, module: str) -> float:
        rank = self.a[module].shape[0]
        alpha = float(self.config["lora_alpha"])
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def delta(self, module: str) -> torch.Tensor:
        """The weight update of ``module``: scale * B @ A, shape (out, in)."""
        return self.scale(module) * (self.b[module].float() @ self.a[module].float())


def read_lora_adapter(directory: str | Path, name: str | None = None) -> LoraAdapter:
    """Load a PEFT LoRA adapter directory; errors name what is wrong with it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise missing_artifact(str(directory), "adapter directory")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise missing_artifact(str(path), "adapter file")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:  # bad JSON or bad UTF-8
        raise _damaged(config_path, f"not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise _damaged(config_path, "not a JSON object")
    if config.get("peft_type") != "LORA":
        raise PsoupsError(f"{directory} holds a {config.get('peft_type')} adapter, not LoRA")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise PsoupsError(f"{directory}: adapters with a {key} are not supported for souping")
    if config.get("use_dora"):
        raise PsoupsError(f"{directory}: DoRA adapters are not linear; they cannot be souped")
    try:
        weights = load_file(str(weights_path))
    except SafetensorError as exc:
        raise _damaged(weights_path, f"not readable as safetensors: {exc}") from None
    a, b = {}, {}
    for key, tensor in weights.items():
        if key.endswith(A_SUFFIX):
            a[key.removeprefix(PREFIX).removesuffix(A_SUFFIX)] = tensor
        elif key.endswith(B_SUFFIX):
            b[key.removeprefix(PREFIX).removesuffix(B_SUFFIX)] = tensor
    if not a or set(a) != set(b):
        raise PsoupsError(f"{directory}: LoRA A and B matrices do not pair up")
    return LoraAdapter(name or directory.name, config, a, b)


def _damaged(path: Path, why: str) -> PsoupsError:
    return PsoupsError(
        f"{path} is damaged ({why}); restore it, or re-run the stage that produced it with --force"
    )


def write_lora_adapter(
    directory: str | Path,
    template: dict[str, Any],
    a: dict[str, torch.Tensor],
    b: dict[str, torch.Tensor],
    rank: int,
    alpha: float,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write a PEFT adapter directory with the given factors (scale = alpha / rank)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(template)
    target_modules = sorted({module.rsplit(".", 1)[-1] for module in a})
    config.update(
        r=rank,
        lora_alpha=alpha,
        use_rslora=False,
        target_modules=target_modules,
        inference_mode=True,
        **(extra_config or {}),
    )
    tensors = {}
    for module in a:
        tensors[f"{PREFIX}{module}{A_SUFFIX}"] = a[module].contiguous()
        tensors[f"{PREFIX}{module}{B_SUFFIX}"] = b[module].contiguous()
    save_file(tensors, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory
