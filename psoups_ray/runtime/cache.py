"""The KV cache of the decode loop: one preallocated buffer per layer, rows that can leave.

transformers' ``DynamicCache`` concatenates every layer's keys and values with the new
token's at every step; :func:`preallocated_cache` writes them into one buffer per layer
instead (:class:`GrowingLayer`), whose finished rows can leave the batch the model computes.
:class:`GenericDecoding` decodes with them through the model's own forward: the sampler's
path for models its fast decoder (:mod:`psoups_ray.runtime.decoder`) does not take.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer


def cache_argument(model: nn.Module) -> str:
    """The KV cache's keyword in ``model.forward``: ``cache`` in transformers >= 5.x's
    current models, ``past_key_values`` in older and remote-code ones."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def returned_cache(output):
    """The KV cache a forward pass with ``use_cache=True`` returned (``output.cache`` in
    transformers >= 5.x's current models, ``past_key_values`` in older ones)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def preallocated_cache(model: nn.Module, capacity: int) -> DynamicCache | None:
    """A KV cache for ``capacity`` positions that grows in place, or None where the model
    takes no transformers ``Cache`` objects (older and remote-code models: they make their
    own on the first call).

    transformers' ``DynamicCache`` concatenates every layer's keys and values with the new
    token's at every step: a fresh tensor a little larger each time, which the allocator
    cannot reuse (on CPU each is a new memory mapping whose pages the kernel zeroes). On
    the tiny base's shape, decoding took 1.3x as long with it (3.05 s against 2.32 s for
    32 prompts x 160 tokens, the same tokens). Here every
    full-attention layer writes into one buffer and attends to a view of its filled
    prefix: the same keys and values, so the same outputs. Other layer kinds (sliding
    windows, linear attention) keep transformers' own.
    """
    config = getattr(model, "config", None)
    if config is None or cache_argument(model) != "cache":
        return None
    cache = DynamicCache(config=config)
    cache.layers = [
        GrowingLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of one preallocated buffer
    (:func:`preallocated_cache`); a buffer that fills up doubles."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = max(int(capacity), 1)
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads = key_states.shape[:2]
        self._keys = key_states.new_empty((batch, heads, self.capacity, key_states.shape[-1]))
        self._values = value_states.new_empty((batch, heads, self.capacity, value_states.shape[-1]))
        self.length = 0
        self.keys, self.values = self._keys[:, :, :0], self._values[:, :, :0]
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:  # more positions than announced: grow
            size = max(end, 2 * self._keys.shape[-2])
            self._keys = _grown(self._keys, self.length, size)
            self._values = _grown(self._values, self.length, size)
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self.length = 0

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only the rows ``index`` (1-D) of the batch, in that order."""
        if not self.is_initialized:
            return
        keys = self._keys.new_empty((len(index), *self._keys.shape[1:]))
        values = self._values.new_empty((len(index), *self._values.shape[1:]))
        keys[:, :, : self.length] = self._keys[index, :, : self.length]
        values[:, :, : self.length] = self._values[index, :, : self.length]
        self._keys, self._values = keys, values
        self.keys, self.values = keys[:, :, : self.length], values[:, :, : self.length]


def can_select_rows(cache) -> bool:
    """Whether every layer of ``cache`` can drop rows (:meth:`GrowingLayer.select_rows`)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(isinstance(layer, GrowingLayer) for layer in layers)


def finished_enough(still: torch.Tensor) -> bool:
    """Whether finished rows should leave the batch now: once a quarter or more of the rows
    it holds have finished (``still``: (rows,) bool, the rows still decoding)."""
    return int((~still).sum()) * 4 >= len(still)


class GenericDecoding:
    """A batch decoded by ``model``'s own transformers forward, with the preallocated cache
    (the path of models the fast decoder does not take). :meth:`prefill` and :meth:`step`
    return the last position's float32 logits: (rows, vocab)."""

    def __init__(self, model: nn.Module):
        self.model = model
        parameters = inspect.signature(model.forward).parameters
        self.cache_argument = cache_argument(model)
        self.keeps_last = "logits_to_keep" in parameters
        self.cache = None
        self.can_select_rows = False

    def prefill(self, input_ids, attention_mask, position_ids, capacity: int) -> torch.Tensor:
        """The prompts (B, L), left-padded; room for ``capacity`` positions in all."""
        self.cache = preallocated_cache(self.model, capacity)
        self.attention = attention_mask
        logits = self._forward(input_ids, position_ids, last_only=True)
        self.can_select_rows = can_select_rows(self.cache)
        return logits

    def step(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One new token per row: (B,) tokens, (B, 1) positions."""
        self.attention = torch.cat([self.attention, self.attention.new_ones(len(tokens), 1)], 1)
        return self._forward(tokens.unsqueeze(1), position_ids)

    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep the rows ``keep`` (1-D indices) in the cache, in that order."""
        for layer in self.cache.layers:
            layer.select_rows(keep)
        self.attention = self.attention[keep]

    def _forward(self, input_ids, position_ids, last_only: bool = False) -> torch.Tensor:
        output = self.model(
            input_ids=input_ids,
            attention_mask=self.attention,
            position_ids=position_ids,
            use_cache=True,
            **({self.cache_argument: self.cache} if self.cache is not None else {}),
            **({"logits_to_keep": 1} if last_only and self.keeps_last else {}),
        )
        if self.cache is None:  # a model that takes no Cache objects made its own
            self.cache = returned_cache(output)
        return output.logits[:, -1, :].float()


def _grown(buffer: torch.Tensor, filled: int, size: int) -> torch.Tensor:
    """``buffer`` (B, H, L, D) with room for ``size`` positions, its first ``filled`` kept."""
    grown = buffer.new_empty((*buffer.shape[:2], size, buffer.shape[-1]))
    grown[:, :, :filled] = buffer[:, :, :filled]
    return grown
