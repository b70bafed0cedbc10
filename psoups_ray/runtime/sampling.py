"""The one decode loop: PPO rollouts, feedback sampling, tune, evaluate and serving call it.

:class:`Sampler` decodes a batch of :class:`SampleRequest` rows with a KV cache. Each row
has its own prompt, soup weights (when the model mixes adapters,
:mod:`psoups_ray.runtime.mixing`) and :class:`SamplingParams`: temperature (0: greedy),
top-k, top-p, stop strings, max tokens and a seed. A row draws from its own generator
seeded with its seed, so its tokens never depend on its batch-mates: the same soup,
prompt, seed and settings give the same text in a tune trial, in the evaluation and in an
HTTP request. Rows that have finished (EOS, a stop string, their own ``max_tokens``) leave
the batch the model computes, so a short row batched with a long one stops costing
compute when it ends. :meth:`Sampler.stream` yields every row's new text at every step
(serving); :meth:`Sampler.complete` runs requests to the end in batches.

The distribution is the tempered softmax, cut by top-k then top-p exactly as transformers'
logits warpers cut it (:func:`sampling_probabilities`); a row's token is drawn by inverting
its cumulative distribution at one uniform number per step from its generator. Settings a
model's own generation config may carry beyond these (repetition penalty and the like) are
not applied: PPO's log-probabilities assume the plain tempered distribution.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from psoups_ray import progress
from psoups_ray.config import GenerationSpec
from psoups_ray.errors import PsoupsError
from psoups_ray.progress import log
from psoups_ray.runtime.batching import left_padded, position_ids_for
from psoups_ray.runtime.cache import GenericDecoding, finished_enough
from psoups_ray.runtime.decoder import FastDecoder, decoder_for, resolve_dtype
from psoups_ray.runtime.logits import (
    RowSettings,
    TokenHistory,
    apply_penalties,
    sample_next,
    token_logprobs,
)
from psoups_ray.runtime.text import RowText, final_text
from psoups_ray.seeding import derive_seed

MAX_LOGPROBS = 20  # the most top log-probabilities a token reports (OpenAI's limit)


@dataclass(frozen=True)
class SamplingParams:
    """How one row samples (the OpenAI / vLLM meaning of each field)."""

    max_tokens: int
    temperature: float = 1.0
    """0: greedy."""
    top_k: int = 0
    """Keep the k most likely tokens; 0: no cut."""
    top_p: float = 1.0
    """Keep the most likely tokens whose probabilities add up to top_p; 1: no cut."""
    seed: int | None = None
    """Seeds the row's own generator; None: a random seed."""
    stop: tuple[str, ...] = ()
    """The text ends before the first of these (not included)."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; 0: no cut."""
    repetition_penalty: float = 1.0
    """Divide (multiply, when negative) the logits of tokens already in the prompt or the
    output by this; 1: none."""
    frequency_penalty: float = 0.0
    """Subtract this times a token's count in the output from its logit."""
    presence_penalty: float = 0.0
    """Subtract this from the logit of every token the output holds."""
    min_tokens: int = 0
    """EOS cannot end the response before this many tokens."""
    ignore_eos: bool = False
    """Decode to max_tokens (or a stop string) whatever EOS the model samples."""
    logprobs: int | None = None
    """Report each sampled token's log-probability and this many most likely tokens'
    (0: the sampled token's only); None: none."""

    def __post_init__(self):
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (-2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be in [0, max_tokens], got {self.min_tokens}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"),
        ]  # fmt: skip
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise PsoupsError("; ".join(problems))

    @classmethod
    def from_spec(cls, spec: GenerationSpec, seed: int | None) -> SamplingParams:
        """A config section's sampling settings (``*.generation``) with this row's seed."""
        return cls(
            max_tokens=spec.max_new_tokens,
            temperature=spec.temperature,
            top_k=spec.top_k,
            top_p=spec.top_p,
            seed=seed,
        )


@dataclass(frozen=True)
class SampleRequest:
    """One row to decode: its prompt's tokens, settings and soup weights (one per adapter
    the sampler's mixer holds; None: the model as it is, no adapter mixed in)."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    weights: tuple[float, ...] | None = None


@dataclass
class StepOutput:
    """What one row produced in one decoding step."""

    text: str  # new text since the previous step (may be empty)
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_id: int | None = None  # the token sampled at this step (None once finished)
    final_text: str | None = None  # the whole text, once finished
    logprob: float | None = None  # the sampled token's log-probability (params.logprobs)
    top_logprobs: list[tuple[int, float]] | None = None  # the most likely (token, logprob)


@dataclass
class Completion:
    """A finished row."""

    text: str
    token_ids: list[int]  # every sampled token, the EOS that ended it included
    finish_reason: str
    prompt_tokens: int


def row_seed(seed: int, index: int) -> int:
    """The seed of row ``index`` of a batch of prompts sampled with ``seed`` (a stage's
    rows carry it in their records, so a request with it reproduces the row)."""
    return derive_seed(seed, "row", index)


def row_uniforms(seed: int | None, steps: int) -> torch.Tensor:
    """The uniform numbers a row draws its tokens with, one per step: (steps,). From a
    generator of its own, seeded with ``seed`` (a random one when None)."""
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else random.getrandbits(63))
    return torch.rand(steps, generator=generator, dtype=torch.float64)


@dataclass
class _Row:
    request: SampleRequest
    text: RowText | None  # None: the text is decoded once, when the row finishes
    ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    final: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Sampler:
    """The decode loop over ``model`` (a causal LM), with ``mixer`` when its linear layers
    mix adapters per row (:func:`psoups_ray.runtime.mixing.attach_mixing`).

    ``tokenizer`` None: tokens only (benchmarks), no texts; EOS and padding come from the
    model's generation config. ``fast``: decode with the fast decoder where it reproduces
    the model (:mod:`psoups_ray.runtime.decoder`); False: always transformers' forward,
    the reference the fast path is tested against."""

    def __init__(self, model: nn.Module, tokenizer, mixer=None, fast: bool = True):
        self.model = model
        self.fast = fast
        self.tokenizer = tokenizer
        self.mixer = mixer
        self.eos_ids = eos_token_ids(model, tokenizer)
        warn_ignored_settings(model)
        pad = getattr(tokenizer if tokenizer is not None else model.generation_config,
                      "pad_token_id", None)  # fmt: skip
        self.pad_token_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(
        self, prompts: Sequence[str], max_length: int | None = None
    ) -> list[tuple[int, ...]]:
        """Token ids of formatted prompts (:func:`psoups_ray.prompting.format_prompt`);
        ``max_length`` keeps each prompt's last tokens."""
        from psoups_ray.prompting import adds_special_tokens

        encoded = self.tokenizer(
            list(prompts), add_special_tokens=adds_special_tokens(self.tokenizer)
        )["input_ids"]
        if max_length is not None:
            encoded = [ids[-max_length:] for ids in encoded]
        return [tuple(ids) for ids in encoded]

    def complete(
        self,
        requests: Sequence[SampleRequest],
        batch_size: int,
        on_batch: Callable[[int, int], None] | None = None,
        model: nn.Module | None = None,
        dtype: str = "auto",
    ) -> list[Completion]:
        """Decode every request to its end, ``batch_size`` rows at a time (prompts of
        similar length together); results in request order. ``on_batch(done, total)``
        after each batch; ``dtype`` as :meth:`stream`'s."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt_ids))
        results: list[Completion | None] = [None] * len(requests)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids: list[list[int]] = [[] for _ in chunk]
            last: list[StepOutput | None] = [None] * len(chunk)
            batch = [requests[i] for i in chunk]
            for outputs in self.stream(batch, model, text=False, dtype=dtype):
                for slot, out in enumerate(outputs):
                    if out.token_id is not None:
                        ids[slot].append(out.token_id)
                    last[slot] = out
            for slot, index in enumerate(chunk):
                out = last[slot]
                results[index] = Completion(
                    out.final_text, ids[slot], out.finish_reason, out.prompt_tokens
                )
            if on_batch is not None:
                on_batch(min(start + batch_size, len(order)), len(order))
        return results

    def stream(
        self,
        requests: Sequence[SampleRequest],
        model: nn.Module | None = None,
        text: bool = True,
        dtype: str = "auto",
    ) -> Iterator[list[StepOutput]]:
        """Decode ``requests`` together; yield one :class:`StepOutput` per request per step
        until every request has finished (a finished request's later outputs are empty and
        finished).

        ``model``: decode with this model (e.g. a soup merged into a copy of the base)
        instead, ignoring the requests' weights. ``text``: decode each row's text at every
        step (streaming); otherwise only rows with stop strings do, and the others are
        decoded once when they finish. ``dtype``: ``float32``, ``bfloat16`` or ``auto``
        (:func:`~psoups_ray.runtime.decoder.resolve_dtype`: bfloat16 where the hardware
        computes it natively); the logits and the draw are float32 whatever it is.
        """
        if not requests:
            return
        model = model if model is not None else self.model
        device = self.device
        if self.tokenizer is None:
            if any(r.params.stop for r in requests):
                raise PsoupsError("stop strings need a sampler with a tokenizer")
            text = False
        rows = [
            _Row(r, RowText(self.tokenizer, r.params.stop) if text or r.params.stop else None)
            for r in requests
        ]
        input_ids, attention = left_padded([r.prompt_ids for r in requests], self.pad_token_id,
                                           device)  # fmt: skip
        steps = max(r.params.max_tokens for r in requests)
        uniforms = torch.stack([row_uniforms(r.params.seed, steps) for r in requests]).to(device)
        settings = RowSettings.of([r.params for r in requests], device)
        history = None  # the tokens each row has seen, only for rows with penalties
        top = max((r.params.logprobs or 0 for r in requests), default=0)
        with_logprobs = any(r.params.logprobs is not None for r in requests)
        eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=device)
        mixing = self._mixing(requests, model)
        live = torch.arange(len(rows), device=device)  # the rows the model computes
        with torch.no_grad(), mixing, _evaluating(model):
            decoding = self._decoding(model, dtype)
            positions = position_ids_for(attention)
            raw = decoding.prefill(input_ids, attention, positions, input_ids.shape[1] + steps)
            for step in range(steps):
                computed = live.tolist()
                logits = raw  # (b, V) float32
                if settings.penalized:
                    if history is None:
                        history = TokenHistory([requests[i].prompt_ids for i in computed],
                                               raw.shape[-1], device)  # fmt: skip
                    logits = apply_penalties(logits, settings, history)
                early = [len(rows[i].ids) < rows[i].request.params.min_tokens for i in computed]
                if any(early) and len(eos):  # EOS cannot end these rows yet
                    blocked = torch.tensor(early, device=device).unsqueeze(1)
                    logits = logits.index_put(
                        (torch.arange(len(computed), device=device)[:, None], eos[None, :]),
                        torch.where(blocked, -float("inf"), logits[:, eos]),
                    )
                tokens = sample_next(logits, settings, uniforms[live, step])
                if history is not None:
                    history.add(tokens)
                scored = token_logprobs(raw, tokens, top) if with_logprobs else None
                outputs = [self._finished(row) for row in rows]
                for position, token in enumerate(tokens.tolist()):
                    row = rows[computed[position]]
                    if row.done:
                        tokens[position] = self.pad_token_id
                        continue
                    out = self._advance(row, token)
                    if scored is not None and row.request.params.logprobs is not None:
                        out.logprob = float(scored[0][position])
                        wanted = row.request.params.logprobs
                        out.top_logprobs = list(
                            zip(scored[2][position, :wanted].tolist(),
                                scored[1][position, :wanted].tolist(), strict=True)
                        )  # fmt: skip
                    outputs[computed[position]] = out
                yield outputs
                if all(row.done for row in rows):
                    return
                positions = positions[:, -1:] + 1
                still = torch.tensor([not rows[i].done for i in computed], device=device)
                if decoding.can_select_rows and finished_enough(still):
                    keep = still.nonzero().squeeze(1)
                    decoding.select_rows(keep)
                    positions, tokens = positions[keep], tokens[keep]
                    settings, live = settings.select(keep), live[keep]
                    if history is not None:
                        history.select(keep)
                    if self.mixer is not None and model is self.model:
                        self.mixer.select_rows(keep)
                raw = decoding.step(tokens, positions)

    def _decoding(self, model: nn.Module, dtype: str):
        """How ``model`` decodes a batch: the fast decoder where it reproduces the model
        (:mod:`psoups_ray.runtime.decoder`), transformers' forward otherwise."""
        device = self.device
        model_dtype = next(model.parameters()).dtype
        wanted = resolve_dtype(dtype, device, model_dtype)
        decoder = decoder_for(model) if self.fast else "the sampler was asked for the generic path"
        if isinstance(decoder, str):
            if wanted != model_dtype:
                raise PsoupsError(
                    f"cannot decode in {wanted} (only the fast decoder can, and {decoder}); "
                    f"use generation dtype float32 or the model's own dtype ({model_dtype})"
                )
            _note_generic(decoder)
            return GenericDecoding(model)
        return FastDecoding(decoder, wanted)

    @torch.no_grad()
    def prompt_logprobs(
        self, requests: Sequence[SampleRequest], top: int = 0, model: nn.Module | None = None
    ) -> list[list[tuple[float | None, list[tuple[int, float]]]]]:
        """The model's log-probability of every prompt token given the tokens before it,
        with the ``top`` most likely tokens at each position: per request, one
        ``(logprob, [(token, logprob), ...])`` per prompt token (the first has no context:
        ``None`` and no alternatives). One forward pass, with each row's soup weights (or
        with ``model`` instead, as :meth:`stream`)."""
        model = model if model is not None else self.model
        input_ids, attention = left_padded([r.prompt_ids for r in requests], self.pad_token_id,
                                           self.device)  # fmt: skip
        with self._mixing(requests, model), _evaluating(model):
            logits = model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=position_ids_for(attention),
                use_cache=False,
            ).logits.float()  # fmt: skip  (B, L, V)
        logprobs = logits[:, :-1].log_softmax(dim=-1)  # position i predicts token i + 1
        chosen = logprobs.gather(2, input_ids[:, 1:].unsqueeze(2)).squeeze(2)  # (B, L - 1)
        values, ids = logprobs.topk(top, dim=-1) if top else (None, None)
        results = []
        for row, request in enumerate(requests):
            start = input_ids.shape[1] - len(request.prompt_ids)  # the row's first real token
            tokens: list[tuple[float | None, list[tuple[int, float]]]] = [(None, [])]
            for position in range(start, input_ids.shape[1] - 1):
                alternatives = (
                    list(
                        zip(
                            ids[row, position].tolist(), values[row, position].tolist(), strict=True
                        )
                    )  # fmt: skip
                    if top
                    else []
                )
                tokens.append((float(chosen[row, position]), alternatives))
            results.append(tokens if request.prompt_ids else [])
        return results

    # -- helpers ---------------------------------------------------------------------
    def _mixing(self, requests: Sequence[SampleRequest], model: nn.Module):
        """The mixer's per-row weights for the batch (none when no row has weights)."""
        weighted = [r.weights for r in requests if r.weights is not None]
        if not weighted or model is not self.model:
            return contextlib.nullcontext()
        if self.mixer is None:
            raise PsoupsError("soup weights were given, but this model mixes no adapters")
        width = len(self.mixer.adapter_names)
        rows = [r.weights if r.weights is not None else (0.0,) * width for r in requests]
        return self.mixer.weights(torch.tensor(rows, dtype=torch.float32, device=self.device))

    def _advance(self, row: _Row, token: int) -> StepOutput:
        params = row.request.params
        row.ids.append(token)
        ended = token in self.eos_ids and not params.ignore_eos
        if ended:
            row.finish_reason = "stop"
        elif row.text is not None and row.text.add(token):
            row.finish_reason = "stop"  # a stop string
        elif len(row.ids) >= params.max_tokens:
            row.finish_reason = "length"
        if not row.done:
            delta = row.text.delta() if row.text is not None else ""
            return StepOutput(delta, False, None, len(row.request.prompt_ids), len(row.ids), token)
        text_ids = row.ids[:-1] if ended else row.ids
        row.final, stopped = "", False
        if self.tokenizer is not None:
            row.final, stopped = final_text(self.tokenizer, text_ids, params.stop)
        if stopped:
            row.finish_reason = "stop"
        delta = row.text.finish(row.final) if row.text is not None else ""
        return StepOutput(delta, True, row.finish_reason, len(row.request.prompt_ids),
                          len(row.ids), token, row.final)  # fmt: skip

    @staticmethod
    def _finished(row: _Row) -> StepOutput:
        """What a row reports once it has finished (or before, as a placeholder)."""
        return StepOutput("", row.done, row.finish_reason, len(row.request.prompt_ids),
                          len(row.ids), None, row.final)  # fmt: skip


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (no dropout while sampling), its mode restored after."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def sample_texts(
    sampler: Sampler,
    prompts: Sequence[str],
    spec: GenerationSpec,
    seed: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[str]:
    """One response per formatted prompt with ``spec``'s settings, prompt i sampled with
    :func:`row_seed` ``(seed, i)``; ``on_batch(done, total)`` after each batch."""
    requests = [
        SampleRequest(ids, SamplingParams.from_spec(spec, row_seed(seed, index)))
        for index, ids in enumerate(sampler.encode(prompts))
    ]
    return [c.text for c in sampler.complete(requests, spec.batch_size, on_batch, dtype=spec.dtype)]


class FastDecoding:
    """A batch decoded by a :class:`~psoups_ray.runtime.decoder.FastDecoder` in ``dtype``,
    with :class:`~psoups_ray.runtime.cache.GenericDecoding`'s interface."""

    can_select_rows = True

    def __init__(self, decoder: FastDecoder, dtype: torch.dtype):
        self.decoder = decoder
        self.dtype = dtype

    def prefill(self, input_ids, attention_mask, position_ids, capacity: int) -> torch.Tensor:
        return self.decoder.prefill(input_ids, attention_mask, position_ids, capacity, self.dtype)

    def step(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.step(tokens, position_ids)

    def select_rows(self, keep: torch.Tensor) -> None:
        self.decoder.select_rows(keep)


_generic_noted: set[str] = set()


def _note_generic(reason: str) -> None:
    """Say once per process and reason that a model decodes on the generic path."""
    if reason not in _generic_noted:
        _generic_noted.add(reason)
        progress.note(f"sampler: transformers' forward decodes this model ({reason})")


# Logits processors ``generate`` would take from a model's generation config, with the value
# at which each does nothing. The sampler applies none of them.
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
    :class:`Sampler` does not (e.g. a repetition penalty), by name."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    ignored = {}
    for name, neutral in _NEUTRAL_SETTINGS.items():
        value = getattr(config, name, None)
        if not any(value == candidate for candidate in neutral):
            ignored[name] = value
    return ignored


_warned: set[str] = set()


def warn_ignored_settings(model: nn.Module) -> None:
    """Say once per process when ``model``'s generation config sets what the sampler does
    not apply (a repetition penalty, say): users of ``generate`` would expect it."""
    ignored = ignored_generation_settings(model)
    if not ignored:
        return
    message = (
        "the model's generation config sets "
        + ", ".join(f"{name}={value!r}" for name, value in sorted(ignored.items()))
        + "; psoups samples with temperature, top-k and top-p only (PPO's log-"
        "probabilities assume that distribution), so these are not applied"
    )
    if message not in _warned:
        _warned.add(message)
        log(f"warning: {message}")


def eos_token_ids(model: nn.Module, tokenizer) -> frozenset[int]:
    """The tokens that end a response: the tokenizer's EOS and any the model's generation
    config names (chat models often end a turn with a token of their own)."""
    ids: set[int] = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(int(i) for i in ([configured] if isinstance(configured, int) else configured))
    return frozenset(ids)
