"""Souping LoRA policies: weighted merges of adapters trained on one base.

Methods (DESIGN.md, "Soups"):

- ``delta`` (default): the exact weighted sum of the adapters' updates,
  sum_i w_i * s_i * B_i @ A_i. As an adapter it is written as one LoRA whose factors are
  the adapters' factors stacked (rank = sum of ranks), the same result as PEFT's ``cat``.
- ``factor``: A = sum_i w_i A_i and B = sum_i w_i B_i separately (what the paper's code did
  with uniform weights). Not the weighted sum of updates; needs equal ranks, scales and
  target modules.
- ``ties``, ``dare_linear``, ``dare_ties``, ``svd``: PEFT's ``add_weighted_adapter``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from psoups_ray.artifacts import BaseArtifact
from psoups_ray.errors import PsoupsError
from psoups_ray.runtime.adapters import LoraAdapter, read_lora_adapter, write_lora_adapter
from psoups_ray.runtime.loading import load_base_model

MergeMethod = Literal["delta", "factor", "ties", "dare_linear", "dare_ties", "svd"]
PEFT_METHODS = ("ties", "dare_linear", "dare_ties", "svd")


def check_weights(
    names: Sequence[str], weights: Sequence[float], allow_negative: bool = False
) -> list[float]:
    """Validate merge weights (one per adapter); returns them as floats."""
    if len(weights) != len(names):
        raise PsoupsError(f"{len(weights)} weights for {len(names)} adapters ({', '.join(names)})")
    values = [float(w) for w in weights]
    bad = [f"{n}={w}" for n, w in zip(names, values, strict=True) if not math.isfinite(w)]
    if bad:
        raise PsoupsError(f"merge weights must be finite numbers: {', '.join(bad)}")
    negative = [f"{n}={w}" for n, w in zip(names, values, strict=True) if w < 0]
    if negative and not allow_negative:
        raise PsoupsError(
            f"negative merge weights {', '.join(negative)}; pass --allow-negative to "
            "extrapolate away from a policy on purpose"
        )
    if all(w == 0 for w in values):
        raise PsoupsError("merge weights are all zero: that soup is just the base model")
    return values


def delta_soup(adapters: Sequence[LoraAdapter], weights: Sequence[float]):
    """Exact LoRA factors of sum_i w_i s_i B_i A_i: (A, B, rank, alpha) with scale 1.

    Every module gets rank sum(r_i); adapters that do not target a module add zero blocks.
    """
    modules = sorted({m for adapter in adapters for m in adapter.modules})
    ranks = [max(a.shape[0] for a in adapter.a.values()) for adapter in adapters]
    total_rank = sum(ranks)
    merged_a, merged_b = {}, {}
    for module in modules:
        a_blocks, b_blocks = [], []
        reference = next(adapter for adapter in adapters if module in adapter.a)
        in_features = reference.a[module].shape[1]
        out_features = reference.b[module].shape[0]
        for adapter, weight, rank in zip(adapters, weights, ranks, strict=True):
            if module in adapter.a and adapter.a[module].shape[0] == rank:
                a_blocks.append(weight * adapter.scale(module) * adapter.a[module].float())
                b_blocks.append(adapter.b[module].float())
            elif module in adapter.a:
                raise PsoupsError(f"adapter {adapter.name} has mixed ranks; cannot stack it")
            else:
                a_blocks.append(torch.zeros(rank, in_features))
                b_blocks.append(torch.zeros(out_features, rank))
        merged_a[module] = torch.cat(a_blocks, dim=0)  # (sum r, in)
        merged_b[module] = torch.cat(b_blocks, dim=1)  # (out, sum r)
    return merged_a, merged_b, total_rank, float(total_rank)  # alpha = rank: scale 1


def factor_soup(adapters: Sequence[LoraAdapter], weights: Sequence[float]):
    """A = sum w_i A_i, B = sum w_i B_i: (A, B, rank, alpha). Needs matching adapters."""
    first = adapters[0]
    for adapter in adapters[1:]:
        if set(adapter.modules) != set(first.modules):
            raise PsoupsError(
                f"factor averaging needs the same target modules: {first.name} and "
                f"{adapter.name} differ; use --method delta"
            )
        for module in first.modules:
            if adapter.a[module].shape != first.a[module].shape:
                raise PsoupsError(
                    f"factor averaging needs equal ranks: {first.name} and {adapter.name} "
                    f"differ at {module}; use --method delta"
                )
            if not math.isclose(adapter.scale(module), first.scale(module)):
                raise PsoupsError(
                    f"factor averaging needs equal LoRA scales (alpha / r): {first.name} and "
                    f"{adapter.name} differ; use --method delta"
                )
    merged_a = {
        m: sum(w * ad.a[m].float() for ad, w in zip(adapters, weights, strict=True))
        for m in first.modules
    }
    merged_b = {
        m: sum(w * ad.b[m].float() for ad, w in zip(adapters, weights, strict=True))
        for m in first.modules
    }
    rank = first.a[first.modules[0]].shape[0]
    return merged_a, merged_b, rank, float(first.config["lora_alpha"])


def merge_adapters(
    adapter_dirs: Sequence[str | Path],
    names: Sequence[str],
    weights: Sequence[float],
    method: MergeMethod,
    out: str | Path,
    base: BaseArtifact | None = None,
    density: float = 0.5,
    allow_negative: bool = False,
) -> Path:
    """Write the soup of ``adapter_dirs`` as one PEFT adapter directory ``out``.

    ``base``: the run's base, which PEFT's methods load (:func:`load_base_model`).
    """
    weights = check_weights(names, weights, allow_negative)
    adapters = [read_lora_adapter(d, name) for d, name in zip(adapter_dirs, names, strict=True)]
    if method in ("delta", "factor"):
        soup = delta_soup if method == "delta" else factor_soup
        a, b, rank, alpha = soup(adapters, weights)
        return write_lora_adapter(out, adapters[0].config, a, b, rank, alpha)
    if method not in PEFT_METHODS:
        raise PsoupsError(f"unknown merge method {method!r}; use delta, factor or {PEFT_METHODS}")
    if base is None:
        raise PsoupsError(f"merge method {method!r} needs the base model")
    return _peft_weighted(adapter_dirs, names, weights, method, out, base, density)


def _peft_weighted(adapter_dirs, names, weights, method, out, base, density) -> Path:
    from peft import PeftModel

    model = PeftModel.from_pretrained(
        load_base_model(base), str(adapter_dirs[0]), adapter_name=names[0]
    )
    for directory, name in zip(adapter_dirs[1:], names[1:], strict=True):
        model.load_adapter(str(directory), adapter_name=name)
    kwargs = {"density": density} if method != "svd" else {}
    model.add_weighted_adapter(
        list(names), list(weights), "soup", combination_type=method, **kwargs
    )
    for name in names:
        model.delete_adapter(name)
    model.save_pretrained(str(out), selected_adapters=["soup"])
    saved = Path(out, "soup")  # PEFT writes non-default adapters into a subfolder
    if saved.is_dir():
        for item in saved.iterdir():
            item.replace(Path(out, item.name))
        saved.rmdir()
    return Path(out)


@torch.no_grad()
def merge_into_model(model: torch.nn.Module, adapters: Sequence[LoraAdapter], weights) -> None:
    """Add the ``delta`` soup into ``model``'s weights in place (W += sum w_i s_i B_i A_i)."""
    modules = dict(model.named_modules())
    for adapter, weight in zip(adapters, weights, strict=True):
        for module in adapter.modules:
            if module not in modules:
                raise PsoupsError(f"adapter {adapter.name} targets {module}, not in the model")
            layer = modules[module]
            layer.weight += (weight * adapter.delta(module)).to(
                layer.weight.device, layer.weight.dtype
            )
