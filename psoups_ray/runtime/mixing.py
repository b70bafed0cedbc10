"""Exact soups in activation space, with per-row weights.

For the ``delta`` soup of N LoRA adapters with weights w, every targeted linear layer
computes W' x = W0 x + sum_i w_i * s_i * B_i (A_i x) (s_i = the adapter's scale). That is
the merged model exactly, needs no merge step, and lets one batch hold rows with
different weight vectors: row b uses w[b]. Serving and tuning use this.

    mixer = attach_mixing(model, [adapter_1, adapter_2])   # replaces targeted nn.Linear
    with mixer.weights(torch.tensor([[0.7, 0.3], [0.0, 1.0]])):   # (batch, N)
        logits = model(input_ids).logits                          # rows mix differently
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from psoups_ray.errors import PsoupsError
from psoups_ray.runtime.adapters import LoraAdapter


class _MixState:
    """The weights every mixing layer of one model reads: (batch, N) or None."""

    def __init__(self):
        self.weights: torch.Tensor | None = None  # (rows, N)
        self.broadcast = False  # one weight vector for every row
        self.active: torch.Tensor | None = None  # (N,) bool: adapters some row weighs
        self.version = 0  # bumped on every change, so layers refresh what they cache

    def set(self, weights: torch.Tensor | None, broadcast: bool) -> None:
        self.weights, self.broadcast = weights, broadcast
        self.active = None if weights is None else (weights != 0).any(dim=0)
        self.version += 1


class LoraMixingLinear(nn.Module):
    """``base(x) + sum_i w[row, i] * s_i * B_i(A_i x)`` for a frozen base linear layer.

    The adapters' factors are stacked: A = [A_1; ...; A_N] (R, in), B = [B_1 ... B_N]
    (out, R) with R = sum of ranks, so a forward pass is two matmuls whatever the number
    of adapters: (x A^T * c) B^T, where c (rows, R) repeats w[row, i] * s_i over adapter
    i's ranks. Summing over the ranks gives exactly the per-adapter sum. Ranks of adapters
    that no row weighs are left out of the matmuls (a soup of 3 of 8 adapters pays for 3).
    """

    def __init__(
        self,
        base: nn.Linear,
        factors: Sequence[tuple[torch.Tensor, torch.Tensor, float] | None],
        state: _MixState,
    ):
        super().__init__()
        self.base = base
        self.state = state
        a_parts, b_parts, owners, scales = [], [], [], []
        for index, factor in enumerate(factors):
            if factor is None:
                continue
            a, b, scale = factor
            if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                raise PsoupsError(
                    f"adapter {index} does not fit a ({base.out_features}, {base.in_features}) "
                    f"layer: A {tuple(a.shape)}, B {tuple(b.shape)}"
                )
            a_parts.append(a)
            b_parts.append(b)
            owners += [index] * a.shape[0]
            scales += [scale] * a.shape[0]
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_a = nn.Parameter(torch.cat(a_parts).to(device, dtype), requires_grad=False)
        self.lora_b = nn.Parameter(torch.cat(b_parts, dim=1).to(device, dtype), requires_grad=False)
        self.register_buffer("owner", torch.tensor(owners, device=device), persistent=False)
        self.register_buffer(
            "rank_scale", torch.tensor(scales, device=device, dtype=torch.float32), persistent=False
        )
        self._version = -1  # the state version the cached active factors below belong to
        self._active: tuple[torch.Tensor, ...] | None = None

    def _active_factors(self) -> tuple[torch.Tensor, ...] | None:
        """(A (r, in), B (out, r), owner (r,), scale (r,)) of the weighed adapters' ranks."""
        if self._version != self.state.version:
            keep = self.state.active.to(self.owner.device)[self.owner]  # (R,)
            if not bool(keep.any()):
                self._active = None
            elif bool(keep.all()):
                self._active = (self.lora_a, self.lora_b, self.owner, self.rank_scale)
            else:
                index = keep.nonzero().squeeze(1)
                self._active = (
                    self.lora_a[index], self.lora_b[:, index], self.owner[index],
                    self.rank_scale[index],
                )  # fmt: skip
            self._version = self.state.version
        return self._active

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, ..., in)
        out = self.base(x)  # (batch, ..., out)
        weights = self.state.weights
        if weights is None:
            return out
        if self.state.broadcast:
            weights = weights.expand(x.shape[0], -1)
        elif weights.shape[0] != x.shape[0]:
            raise PsoupsError(
                f"mixing weights are for {weights.shape[0]} rows but the batch has {x.shape[0]}"
            )
        active = self._active_factors()
        if active is None:
            return out
        lora_a, lora_b, owner, rank_scale = active
        coefficients = weights.to(rank_scale.device)[:, owner] * rank_scale  # (batch, r)
        extra_dims = (1,) * (x.dim() - 2)
        hidden = x @ lora_a.T  # (batch, ..., r)
        hidden = hidden * coefficients.to(hidden.dtype).view(x.shape[0], *extra_dims, -1)
        return out + hidden @ lora_b.T


class Mixer:
    """Handle on a model whose targeted layers mix N adapters."""

    def __init__(self, names: list[str], state: _MixState):
        self.adapter_names = names
        self._state = state

    @contextlib.contextmanager
    def weights(self, weights: torch.Tensor | Sequence[float]) -> Iterator[None]:
        """Use ``weights`` inside the block: (N,) for every row, or (batch, N) per row."""
        tensor = torch.as_tensor(weights, dtype=torch.float32)
        broadcast = tensor.dim() == 1
        if broadcast:
            tensor = tensor.unsqueeze(0)
        if tensor.dim() != 2 or tensor.shape[1] != len(self.adapter_names):
            raise PsoupsError(
                f"mixing weights must have {len(self.adapter_names)} columns "
                f"({', '.join(self.adapter_names)}), got shape {tuple(tensor.shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise PsoupsError("mixing weights must be finite numbers")
        previous = self._state.weights, self._state.broadcast
        self._state.set(tensor, broadcast)
        try:
            yield
        finally:
            self._state.set(*previous)

    def select_rows(self, index: torch.Tensor) -> None:
        """Inside a :meth:`weights` block with per-row weights: keep the rows ``index``
        (the batch dropped the others, e.g. finished rows during decoding)."""
        state = self._state
        if state.weights is None or state.broadcast:
            return
        state.set(state.weights[index.to(state.weights.device)], broadcast=False)


def attach_mixing(model: nn.Module, adapters: Sequence[LoraAdapter]) -> Mixer:
    """Replace every linear layer any adapter targets by a :class:`LoraMixingLinear`.

    The model's own weights are untouched (the base layer is kept inside); a single
    (N,) weight vector broadcasts to all rows. On a model PEFT has wrapped (pass
    ``peft_model.get_base_model()``), the mixing goes inside PEFT's LoRA layers.
    """
    if not adapters:
        raise PsoupsError("mixing needs at least one adapter")
    state = _MixState()
    modules = dict(model.named_modules())
    targets = sorted({module for adapter in adapters for module in adapter.modules})
    missing = [name for name in targets if name not in modules]
    if missing:
        raise PsoupsError(
            f"the adapters target modules the model does not have: {', '.join(missing[:5])}"
        )
    for name in targets:
        layer = modules[name]
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        if isinstance(getattr(layer, "base_layer", None), nn.Linear):
            # A PEFT LoRA layer (other adapters, e.g. reward models, on the same base): mix
            # inside it, so that with its adapters disabled it computes the soup, and with
            # one enabled and no mixing weights set, base + that adapter.
            parent, child, layer = layer, "base_layer", layer.base_layer
        if not isinstance(layer, nn.Linear):
            raise PsoupsError(f"{name} is a {type(layer).__name__}; only nn.Linear can mix")
        factors = [
            (adapter.a[name], adapter.b[name], adapter.scale(name)) if name in adapter.a else None
            for adapter in adapters
        ]
        setattr(parent, child, LoraMixingLinear(layer, factors, state))
    # Stale references to the replaced layers: named_modules must be rebuilt by callers.
    return Mixer([adapter.name for adapter in adapters], state)
