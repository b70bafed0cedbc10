"""The serving engine: one loaded base with every pole policy mixed in, decoding batches
whose rows each have their own soup weights and sampling settings.

No Ray here (the Serve deployments wrap it). :meth:`SoupEngine.stream` decodes a batch
token by token with a KV cache and yields, per step, each row's new text, so the same
loop serves streaming and non-streaming requests. Every row samples from its own seeded
generator, so a request's output does not depend on what it was batched with.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from psoups_ray.config import MAX_SOUP_WEIGHT
from psoups_ray.errors import PsoupsError
from psoups_ray.rundir import RunDir, local_reference

BASE_MODEL = "base"
MODEL_PREFIX = "psoups:"


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationJob:
    """One row to decode: the formatted prompt, the soup weights over the engine's poles."""

    prompt: str
    weights: tuple[float, ...]
    params: SamplingParams


@dataclass
class StepOutput:
    """What one row produced in one decoding step."""

    text: str  # new text since the previous step (may be empty)
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0


def soup_key(weights: Sequence[float]) -> str:
    """A soup's weights as a string id (Serve's multiplexed model id)."""
    return ",".join(f"{float(w):.6g}" for w in weights)


def parse_soup_key(key: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in key.split(","))
    except ValueError:
        raise PsoupsError(f"malformed soup id {key!r}") from None


@dataclass(frozen=True)
class Soup:
    """A resolved request target: label for responses and weights over the engine's poles."""

    label: str
    weights: tuple[float, ...]
    source: str  # "base" | "tuned" | "uniform" | "given"


@dataclass
class _Row:
    job: GenerationJob
    generator: torch.Generator
    prompt_tokens: int
    ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text already returned
    done: bool = False


class SoupCatalog:
    """The run's preference space, poles with policies and tuned weights: enough to
    validate and resolve requests without loading a model (the ingress uses this)."""

    def __init__(self, run: str):
        from psoups_ray.manifest import Manifest
        from psoups_ray.preferences import PreferenceSpace, PreferenceSpaceSpec

        self.rundir = RunDir(run)
        self.data = Manifest.load(self.rundir).data
        self.space = PreferenceSpace.from_spec(
            PreferenceSpaceSpec.model_validate(self.data["preferences"])
        )
        policies = self.data.get("policies") or {}
        self.poles = [pole for pole in self.space.pole_ids if pole in policies]
        if not self.poles:
            raise PsoupsError(f"{run} has no pole policies; run the policies stage first")
        self.policy_paths = {pole: policies[pole]["path"] for pole in self.poles}
        self.tuned: dict[str, dict[str, float]] = dict(self.data.get("tuned_weights") or {})
        base = self.data.get("base") or {}
        if "model_path" not in base:
            raise PsoupsError(f"{run} has no base model; run the base stage first")
        self.base_model_path = base["model_path"]
        self.tokenizer_path = base["tokenizer_path"]
        self.base_config: dict[str, Any] = (self.data.get("config") or {}).get("base") or {}
        """The run's ``base`` config section: dtype, revision, trust_remote_code."""

    def model_ids(self) -> list[str]:
        """``psoups:base``, every pole, every tuned combination."""
        names = [BASE_MODEL, *self.poles, *(key for key in self.tuned if key not in self.poles)]
        return [MODEL_PREFIX + name for name in names]

    def resolve(
        self,
        model: str | None,
        preferences: Sequence[str] | None = None,
        weights: dict[str, float] | None = None,
    ) -> Soup:
        """The soup a request asks for. ``weights`` > ``preferences`` > ``model``.

        Raises :class:`PsoupsError` naming what is wrong (the HTTP layer makes it a 400).
        """
        if weights is not None:
            return self._given(weights)
        if preferences is not None:
            if isinstance(preferences, str) or not preferences:
                raise PsoupsError("preferences must be a non-empty list of poles, e.g. ['P1A']")
            return self._combination("+".join(preferences))
        name = (model or "").strip()
        if not name.lower().startswith(MODEL_PREFIX):
            raise PsoupsError(
                f"model {model!r} is not served here; use 'psoups:base', 'psoups:<POLE>' or "
                "'psoups:<COMBINATION>' (e.g. psoups:P1A+P2B+P3A), or GET /v1/models"
            )
        target = name[len(MODEL_PREFIX) :]
        if target.lower() == BASE_MODEL:
            return Soup(BASE_MODEL, tuple(0.0 for _ in self.poles), "base")
        return self._combination(target)

    def _combination(self, text: str) -> Soup:
        combination = self.space.parse(text)  # CombinationError names the problem
        key = "+".join(combination)
        missing = [pole for pole in combination if pole not in self.poles]
        if missing:
            raise PsoupsError(f"no policy was trained for {', '.join(missing)}")
        if key in self.tuned:
            chosen, source = self.tuned[key], "tuned"
        else:
            chosen, source = {pole: 1.0 / len(combination) for pole in combination}, "uniform"
        return Soup(key, tuple(float(chosen.get(pole, 0.0)) for pole in self.poles), source)

    def _given(self, weights: dict[str, float]) -> Soup:
        if not isinstance(weights, dict) or not weights:
            raise PsoupsError("weights must be a non-empty object {POLE: weight}")
        canonical: dict[str, float] = {}
        for pole, value in weights.items():
            pole_id = str(pole).strip().upper()
            if pole_id not in self.space.pole_ids:
                raise PsoupsError(
                    f"weights: unknown pole {pole!r}; poles: {', '.join(self.space.pole_ids)}"
                )
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise PsoupsError(f"weights.{pole_id} must be a number, got {value!r}")
            if not math.isfinite(value) or not 0 <= value <= MAX_SOUP_WEIGHT:
                raise PsoupsError(
                    f"weights.{pole_id} must be a finite number >= 0 and <= {MAX_SOUP_WEIGHT:g}, "
                    f"got {value}"
                )
            canonical[pole_id] = float(value)
        combination = self.space.combination(list(canonical))  # one pole per dimension
        if sum(canonical.values()) <= 0:
            raise PsoupsError("weights must not all be zero")
        missing = [pole for pole in combination if pole not in self.poles]
        if missing:
            raise PsoupsError(f"no policy was trained for {', '.join(missing)}")
        label = "+".join(f"{pole}={canonical[pole]:g}" for pole in combination)
        return Soup(label, tuple(canonical.get(pole, 0.0) for pole in self.poles), "given")


class SoupEngine:
    """Base + mixed pole policies, loaded once; batched decoding with per-row weights."""

    def __init__(
        self, run: str, device: str = "auto", dtype: str | None = None, strategy: str = "mixing"
    ):
        from psoups_ray.base.model import load_causal_lm, load_options, load_tokenizer
        from psoups_ray.generation import cache_argument
        from psoups_ray.soup.adapters import read_lora_adapter
        from psoups_ray.soup.mixing import attach_mixing

        self.catalog = SoupCatalog(run)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        options = load_options(self.catalog.base_config)
        self.tokenizer = load_tokenizer(local_reference(self.catalog.tokenizer_path), **options)
        self.model = load_causal_lm(
            local_reference(self.catalog.base_model_path),
            dtype or self.catalog.base_config.get("dtype") or "float32",
            **options,
        )
        self.model.requires_grad_(False)
        self.adapters = [
            read_lora_adapter(local_reference(path), pole)
            for pole, path in self.catalog.policy_paths.items()
        ]
        if strategy not in ("mixing", "merged"):
            raise PsoupsError(f"strategy must be 'mixing' or 'merged', got {strategy!r}")
        self.strategy = strategy
        # mixing: every policy lives in the model, weighted per row; merged: the model is
        # the plain base and each soup is a merged copy (see merged_model).
        self.mixer = attach_mixing(self.model, self.adapters) if strategy == "mixing" else None
        self.model.to(self.device).eval()
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 4096))
        self._cache_arg = cache_argument(self.model)

    @property
    def poles(self) -> list[str]:
        return self.catalog.poles

    def merged_model(self, weights: Sequence[float]) -> torch.nn.Module:
        """A copy of the base with the ``delta`` soup merged into its weights (``merged``
        strategy): W' = W0 + sum_i w_i s_i B_i A_i. The copy costs a full model's memory."""
        from psoups_ray.soup.merge import merge_into_model

        if self.mixer is not None:
            raise PsoupsError("merged_model needs an engine built with strategy='merged'")
        model = copy.deepcopy(self.model)
        used = [(adapter, w) for adapter, w in zip(self.adapters, weights, strict=True) if w]
        if used:
            with torch.no_grad():
                merge_into_model(model, [a for a, _ in used], [w for _, w in used])
        return model.eval()

    def stream(
        self, jobs: Sequence[GenerationJob], model: torch.nn.Module | None = None
    ) -> Iterator[list[StepOutput]]:
        """Decode ``jobs`` together; yield one :class:`StepOutput` per job per step until
        every job has finished (a finished job's later outputs are empty and finished).

        ``model``: decode with this (merged) model instead, ignoring the jobs' weights.

        Once a quarter of the rows the model computes have finished (EOS, a stop string,
        their own ``max_tokens``), they leave the batch and the KV cache, as in
        :func:`psoups_ray.generation.sample_tokens`: a short request batched with a long
        one stops costing compute when it ends. Each row draws from its own generator, so
        its tokens do not depend on its batch-mates.
        """
        from psoups_ray.generation import (
            can_select_rows,
            drop_finished_rows,
            preallocated_cache,
            returned_cache,
        )
        from psoups_ray.prompting import adds_special_tokens
        from psoups_ray.rl.models import position_ids_for

        if not jobs:
            return
        tokenizer = self.tokenizer
        padding_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            encoded = tokenizer(
                [job.prompt for job in jobs],
                return_tensors="pt",
                padding=True,
                add_special_tokens=adds_special_tokens(tokenizer),
            )
        finally:
            tokenizer.padding_side = padding_side
        input_ids = encoded["input_ids"].to(self.device)  # (B, L)
        attention = encoded["attention_mask"].to(self.device)  # (B, L)
        rows = [
            _Row(job, self._generator(job.params.seed), int(attention[i].sum()))
            for i, job in enumerate(jobs)
        ]
        weights = torch.tensor([job.weights for job in jobs], dtype=torch.float32)
        temperature = torch.tensor([job.params.temperature for job in jobs], device=self.device)
        top_p = torch.tensor([job.params.top_p for job in jobs], device=self.device)
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        steps = max(job.params.max_tokens for job in jobs)
        mixer = None
        if model is None and self.mixer is not None:
            mixer = self.mixer
            soup = mixer.weights(weights.to(self.device))
        elif model is None and bool(weights.any()):
            raise PsoupsError("a merged-strategy engine needs the merged model for a soup")
        else:
            soup = contextlib.nullcontext()
        model = model if model is not None else self.model
        live = list(range(len(rows)))  # the rows the model computes (indices into jobs)
        with torch.no_grad(), soup:
            positions = position_ids_for(attention)
            cache = preallocated_cache(model, input_ids.shape[1] + steps)
            output = model(
                input_ids=input_ids, attention_mask=attention, position_ids=positions,
                use_cache=True, logits_to_keep=1,
                **({self._cache_arg: cache} if cache is not None else {}),
            )  # fmt: skip
            cache = returned_cache(output)
            compact = can_select_rows(cache)
            for _ in range(steps):
                computed = [rows[index] for index in live]
                next_ids = self._sample(
                    output.logits[:, -1, :].float(), temperature, top_p, computed
                )
                outputs = [
                    StepOutput("", True, None, row.prompt_tokens, len(row.ids)) for row in rows
                ]  # what a finished row reports
                for position, row in enumerate(computed):
                    if row.done:
                        next_ids[position] = pad
                    else:
                        outputs[live[position]] = self._advance(row, int(next_ids[position]), eos)
                yield outputs
                if all(row.done for row in rows):
                    return
                attention = torch.cat([attention, attention.new_ones(len(live), 1)], dim=1)
                positions = positions[:, -1:] + 1
                cache = returned_cache(output)
                keep = None
                if compact:
                    still = [not row.done for row in computed]
                    keep = drop_finished_rows(cache, torch.tensor(still, device=self.device))
                if keep is not None:
                    attention, positions = attention[keep], positions[keep]
                    next_ids, temperature, top_p = next_ids[keep], temperature[keep], top_p[keep]
                    if mixer is not None:
                        mixer.select_rows(keep)
                    live = [live[position] for position in keep.tolist()]
                output = model(
                    input_ids=next_ids.unsqueeze(1), attention_mask=attention,
                    position_ids=positions, use_cache=True, **{self._cache_arg: cache},
                )  # fmt: skip

    def generate(self, jobs: Sequence[GenerationJob]) -> list[dict[str, Any]]:
        """Decode to the end; per job: text, finish_reason, token counts."""
        texts = ["" for _ in jobs]
        final: list[StepOutput | None] = [None] * len(jobs)
        for outputs in self.stream(jobs):
            for index, out in enumerate(outputs):
                texts[index] += out.text
                if out.finished and final[index] is None:
                    final[index] = out
        return [
            {
                "text": text,
                "finish_reason": out.finish_reason,
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens,
            }
            for text, out in zip(texts, final, strict=True)
        ]

    # -- decoding helpers --------------------------------------------------------------
    def _generator(self, seed: int | None) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else random.getrandbits(63))
        return generator

    @staticmethod
    def _sample(logits, temperature, top_p, rows: list[_Row]) -> torch.Tensor:
        """Per-row temperature (0 = greedy) and nucleus sampling: (B, V) -> (B,).

        A row whose logits overflowed (inf or NaN) decodes greedily rather than failing the
        whole batch in ``torch.multinomial``."""
        greedy = logits.argmax(dim=-1)
        scaled = logits / temperature.clamp(min=1e-5).unsqueeze(1)
        probs = torch.softmax(scaled, dim=-1)
        sampleable = torch.isfinite(probs).all(dim=-1)  # (B,)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        beyond = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p.unsqueeze(1)
        sorted_probs = sorted_probs.masked_fill(beyond, 0.0)  # the top token always stays
        chosen = greedy.clone()
        for index, row in enumerate(rows):
            if row.done or float(temperature[index]) == 0.0 or not bool(sampleable[index]):
                continue
            pick = torch.multinomial(sorted_probs[index], 1, generator=row.generator)
            chosen[index] = order[index, pick[0]]
        return chosen

    def _advance(self, row: _Row, token: int, eos: int | None) -> StepOutput:
        params = row.job.params
        reason = None
        if eos is not None and token == eos:
            reason = "stop"
        else:
            row.ids.append(token)
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        if params.stop:
            cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
        if reason is None and len(row.ids) >= params.max_tokens:
            reason = "length"
        if reason is None and params.stop:
            # hold back a tail that might be the start of a stop string
            hold = max(len(s) for s in params.stop) - 1
            ready = max(row.emitted, len(text) - hold)
        else:
            ready = len(text)
        delta = text[row.emitted : ready]
        row.emitted = max(row.emitted, ready)
        if reason is not None:
            row.done = True
        return StepOutput(delta, row.done, reason, row.prompt_tokens, len(row.ids))
