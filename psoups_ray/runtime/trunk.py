"""The frozen trunk of a base shared by adapters that adapt only its top layers.

When every adapter on a base (policy, critic, reward models) changes only the top decoder
layers (``lora.top_layers``), the layers below them compute the same hidden states for every
role: :class:`TrunkCache` runs a batch through them once and each role runs only the top
layers, with whatever adapter is active.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from peft import PeftModel
from torch import nn


class _TrunkDone(Exception):
    """Stops a forward pass once the trunk's output has been captured."""


class TrunkCache:
    """Hidden states of a backbone's frozen bottom layers, computed once per distinct batch.

    ``first_adapted``: the lowest layer any adapter changes (0: nothing to share, every call
    is a plain forward pass). :meth:`hidden` returns the backbone's last hidden state (after
    the final norm) like ``backbone(...).last_hidden_state``: the trunk (layers below
    ``first_adapted``, without gradients: nothing below them trains) comes from the cache when
    the same ids, mask and positions were seen among the last ``capacity`` batches; the top
    layers run with whatever adapter is active, with gradients when enabled. The inputs of
    layer ``first_adapted`` are captured as the model passes them (causal mask, rotary
    embeddings), so the top layers see exactly what a full pass would give them.
    """

    def __init__(self, backbone: nn.Module, first_adapted: int, capacity: int = 8):
        layers = getattr(backbone, "layers", None)
        usable = layers is not None and hasattr(backbone, "norm") and 0 < first_adapted
        self.backbone = backbone
        self.first_adapted = first_adapted if usable and first_adapted < len(layers) else 0
        self.capacity = capacity
        self._entries: OrderedDict[int, tuple[tuple[torch.Tensor, ...], Any]] = OrderedDict()
        self._next_key = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.first_adapted > 0

    def clear(self) -> None:
        self._entries.clear()

    def hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """The last hidden state: (B, L, H)."""
        if not self.enabled:
            return self.backbone(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            ).last_hidden_state
        hidden, layer_kwargs = self._trunk(input_ids, attention_mask, position_ids)
        for layer in self.backbone.layers[self.first_adapted :]:
            output = layer(hidden, **layer_kwargs)
            hidden = output[0] if isinstance(output, tuple) else output
        return self.backbone.norm(hidden)

    def _trunk(self, input_ids, attention_mask, position_ids):
        inputs = (input_ids, attention_mask, position_ids)
        for key, (seen, result) in self._entries.items():
            if all(_same(a, b) for a, b in zip(inputs, seen, strict=True)):
                self._entries.move_to_end(key)
                self.hits += 1
                return result
        self.misses += 1
        captured: dict[str, Any] = {}

        def capture(module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            captured["kwargs"] = kwargs
            raise _TrunkDone

        handle = self.backbone.layers[self.first_adapted].register_forward_pre_hook(
            capture, with_kwargs=True
        )
        try:
            with torch.no_grad():
                self.backbone(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=False,
                )
        except _TrunkDone:
            pass
        finally:
            handle.remove()
        result = (captured["hidden"], captured["kwargs"])
        self._entries[self._next_key] = (tuple(_detached(x) for x in inputs), result)
        self._next_key += 1
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return result


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a, b))


def _detached(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().clone()


def first_adapted_layer(peft: PeftModel) -> int:
    """The lowest decoder layer any of ``peft``'s adapters changes (0 when some adapter has
    no ``layers_to_transform``, i.e. adapts every layer, or changes anything else)."""
    lowest = None
    for config in peft.peft_config.values():
        layers = getattr(config, "layers_to_transform", None)
        if not layers or getattr(config, "modules_to_save", None):
            return 0
        layers = [layers] if isinstance(layers, int) else list(layers)
        lowest = min(layers) if lowest is None else min(lowest, *layers)
    return lowest or 0
