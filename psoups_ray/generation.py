"""Batched sampling from a causal LM, shared by every stage that generates text.

:func:`sample_tokens` is the decoding loop: a KV cache, temperature, top-k and nucleus
sampling, each row stopping at its EOS. It draws from torch's global generator exactly as
``transformers``' ``generate(do_sample=True)`` does with those settings (same processors,
same order, one ``multinomial`` per step), so a seed gives the same tokens, but without
``generate``'s per-step machinery: on a small model that machinery, not the model, was
most of a decoding step (``bench/generation.py``). Rows that have finished leave the
batch the model computes (:func:`sample_tokens`, ``compact``), so a batch whose responses
differ in length does not pay for its longest one on every row. Settings a model's own generation
config may carry beyond these (repetition penalty and the like) are not applied: PPO's
log-probabilities assume the plain tempered distribution.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache, DynamicLayer

from psoups_ray.config import GenerationSpec
from psoups_ray.progress import log
from psoups_ray.prompting import adds_special_tokens

DEFAULT_TOP_K = 50  # transformers' default when a model's generation config sets none


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


def drop_finished_rows(cache, still: torch.Tensor) -> torch.Tensor | None:
    """Once a quarter or more of the rows ``cache`` holds have finished, drop them from it.

    ``still``: (rows,) bool, the rows still decoding (at least one). Returns the indices of
    the rows kept, in order, for the caller to narrow its own per-row state with; None when
    too few have finished and nothing was dropped. The cache must be able to drop rows
    (:func:`can_select_rows`).
    """
    if int((~still).sum()) * 4 < len(still):
        return None
    keep = still.nonzero().squeeze(1)
    for layer in cache.layers:
        layer.select_rows(keep)
    return keep


def _grown(buffer: torch.Tensor, filled: int, size: int) -> torch.Tensor:
    """``buffer`` (B, H, L, D) with room for ``size`` positions, its first ``filled`` kept."""
    grown = buffer.new_empty((*buffer.shape[:2], size, buffer.shape[-1]))
    grown[:, :, :filled] = buffer[:, :, :filled]
    return grown


def default_top_k(model: nn.Module) -> int:
    """The top-k cut ``generate`` would apply to ``model`` (its generation config's, else
    transformers' default of 50)."""
    config = getattr(model, "generation_config", None)
    top_k = getattr(config, "top_k", None)
    return DEFAULT_TOP_K if top_k is None else int(top_k)


# Logits processors ``generate`` would take from a model's generation config, with the value
# at which each does nothing. sample_tokens applies none of them.
_NEUTRAL_SETTINGS: dict[str, tuple[object, ...]] = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "min_p": (None, 0.0),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "bad_words_ids": (None, []),
    "suppress_tokens": (None, []),
    "begin_suppress_tokens": (None, []),
    "sequence_bias": (None, {}),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
}


def ignored_generation_settings(model: nn.Module) -> dict[str, object]:
    """Settings of ``model``'s generation config that ``generate`` would apply and
    :func:`sample_tokens` does not (e.g. a repetition penalty), by name."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    ignored = {}
    for name, neutral in _NEUTRAL_SETTINGS.items():
        value = getattr(config, name, None)
        if not any(value == candidate for candidate in neutral):
            ignored[name] = value
    return ignored


def sampling_probabilities(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Next-token distribution after temperature, then top-k, then nucleus (top-p)
    filtering, as transformers' warpers compute it: (B, V) float logits -> (B, V)."""
    scores = logits / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k)[0][..., -1, None]  # (B, 1)
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(scores, descending=False)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -1:] = False  # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return scores.softmax(dim=-1)


@torch.no_grad()
def sample_tokens(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None,
    compact: bool = True,
    on_compact: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Sample continuations of left-padded prompts: (B, L) -> new tokens (B, T).

    T <= ``max_new_tokens``: decoding stops when every row has emitted an EOS; a finished
    row continues with ``pad_token_id`` (EOS when there is none). ``top_k=0`` and
    ``top_p=1`` sample the full tempered distribution. Uses torch's global generator.

    ``compact``: once a quarter of the rows the model computes have finished, they leave
    that batch (their keys and values are dropped from the cache), so later steps cost
    what the rows still decoding cost. The tokens are the same: the step's draw is made
    for the whole batch, and a ``multinomial`` draw of one row does not depend on the
    other rows' probabilities (it takes one exponential variate per entry of the (B, V)
    table, whatever the values). Models whose cache cannot drop rows (other layer kinds,
    remote code) decode every row to the end. ``on_compact(index)``: called with the rows
    kept (indices into the batch computed so far, in order) for callers holding per-row
    state of their own, such as a soup's per-row mixing weights.
    """
    from psoups_ray.rl.models import position_ids_for

    if eos_token_id is None:
        eos = []
    else:
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    eos_ids = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    cache_kwarg = cache_argument(model)
    keeps_last = "logits_to_keep" in inspect.signature(model.forward).parameters
    batch = input_ids.shape[0]
    mask = torch.cat(
        [attention_mask, attention_mask.new_ones(batch, max_new_tokens)], dim=1
    )  # (B, L + max_new_tokens): sliced as decoding proceeds
    positions = position_ids_for(attention_mask)  # (B, L)
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    # Keys and values grow in place in one buffer per layer; a model that takes no Cache
    # objects makes its own on the first call.
    cache = preallocated_cache(model, input_ids.shape[1] + max_new_tokens)
    compact = compact and bool(eos) and can_select_rows(cache)
    rows = torch.arange(batch, device=input_ids.device)  # the rows the model computes
    inputs = input_ids
    chosen: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        length = input_ids.shape[1] + step
        output = model(
            input_ids=inputs,
            attention_mask=mask[:, :length],
            position_ids=positions,
            use_cache=True,
            **({cache_kwarg: cache} if cache is not None else {}),
            **({"logits_to_keep": 1} if keeps_last else {}),
        )
        if cache is None:
            cache = returned_cache(output)
        logits = output.logits[:, -1, :].to(dtype=torch.float32)  # (b, V)
        probs = sampling_probabilities(logits, temperature, top_k, top_p)
        if len(rows) < batch:  # rows that left: any distribution, their token is padding
            computed = probs
            probs = computed.new_zeros((batch, computed.shape[1]))
            probs[:, pad] = 1.0
            probs[rows] = computed
        tokens = torch.multinomial(probs, num_samples=1).squeeze(1)  # (B,)
        tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
        chosen.append(tokens)
        if eos:
            unfinished &= ~torch.isin(tokens, eos_ids)
            if not bool(unfinished.any()):
                break
        positions = positions[:, -1:] + 1
        keep = drop_finished_rows(cache, unfinished[rows]) if compact else None
        if keep is not None:
            rows, mask, positions = rows[keep], mask[keep], positions[keep]
            if on_compact is not None:
                on_compact(keep)
        inputs = tokens[rows].unsqueeze(1)  # (b, 1)
    return torch.stack(chosen, dim=1)  # (B, T)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    spec: GenerationSpec,
    seed: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
    on_compact: Callable[[torch.Tensor], None] | None = None,
) -> list[str]:
    """Sample one response per (already formatted) prompt; returns the decoded responses.

    Sampling: ``spec``'s temperature and top-p, and the model's top-k (:func:`default_top_k`).
    ``on_batch(done, total)`` is called after each batch, for progress display;
    ``on_compact``: see :func:`sample_tokens`.
    """
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    top_k = default_top_k(model)
    ignored = ignored_generation_settings(model)
    if ignored:
        _warn_once(
            "the model's generation config sets "
            + ", ".join(f"{name}={value!r}" for name, value in sorted(ignored.items()))
            + "; psoups samples with temperature, top-k and top-p only (PPO's log-"
            "probabilities assume that distribution), so these are not applied"
        )
    responses: list[str] = []
    try:
        for start in range(0, len(prompts), spec.batch_size):
            batch = list(prompts[start : start + spec.batch_size])
            encoded = tokenizer(
                batch,
                return_tensors="pt",
                padding=True,
                add_special_tokens=adds_special_tokens(tokenizer),
            ).to(device)
            new_tokens = sample_tokens(
                model,
                encoded["input_ids"],
                encoded["attention_mask"],
                max_new_tokens=spec.max_new_tokens,
                temperature=spec.temperature,
                top_p=spec.top_p,
                top_k=top_k,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                on_compact=on_compact,
            )  # (batch, new_tokens)
            responses.extend(
                text.strip()
                for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            )
            if on_batch is not None:
                on_batch(len(responses), len(prompts))
    finally:
        tokenizer.padding_side = padding_side
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return responses


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log(f"warning: {message}")
