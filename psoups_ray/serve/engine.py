"""The serving engine: one loaded base with every pole policy mixed in, decoding batches
whose rows each have their own soup weights and sampling settings.

No Ray here (the Serve deployments wrap it). :meth:`SoupEngine.stream` decodes a batch
token by token with a KV cache and yields, per step, each row's new text, so the same
loop serves streaming and non-streaming requests. Every row samples from its own seeded
generator, so a request's output does not depend on what it was batched with.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from psoups_ray.artifacts import RunArtifacts
from psoups_ray.config import MAX_SOUP_WEIGHT
from psoups_ray.errors import PsoupsError
from psoups_ray.runtime.sampling import SampleRequest, SamplingParams, StepOutput

BASE_MODEL = "base"
MODEL_PREFIX = "psoups:"


class TokenStep(NamedTuple):
    """One token of a response (or of an echoed prompt) with its log-probabilities."""

    token_id: int
    logprob: float | None  # None: the first prompt token, which has no context
    top: list[tuple[int, float]]  # the most likely (token, logprob) at that position


@dataclass(frozen=True)
class GenerationJob:
    """One row to decode: the formatted prompt, the soup weights over the engine's poles."""

    prompt: str
    weights: tuple[float, ...]
    params: SamplingParams
    prompt_ids: tuple[int, ...] | None = None  # the prompt sent as token ids


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
    source: str  # "base" | "baseline" | "tuned" | "uniform" | "given"


class SoupCatalog:
    """The run's preference space, poles with policies and tuned weights: enough to
    validate and resolve requests without loading a model (the ingress uses this)."""

    def __init__(self, run: str):
        self.run = RunArtifacts.load(run)
        self.space = self.run.space
        self.base = self.run.base  # fails here when the base stage has not run
        self.policies = self.run.trained_policies()
        self.poles = list(self.policies)
        self.baselines = list(self.run.data.get("baselines") or {})
        self.adapter_names = [*self.poles, *self.baselines]
        """Every adapter the engine mixes, in the order of a soup's weight vector: the pole
        policies, then the baselines (served whole, as ``psoups:<name>``)."""
        self.tuned = self.run.tuned_weights
        self.sampling = self.run.config.evaluate.generation
        """A request's sampling settings left out: the run's evaluate.generation, the
        distribution its soups were tuned and evaluated under."""

    def model_ids(self) -> list[str]:
        """``psoups:base``, every pole, every tuned combination."""
        names = [
            BASE_MODEL, *self.poles, *self.baselines,
            *(key for key in self.tuned if key not in self.poles),
        ]  # fmt: skip
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
            return Soup(BASE_MODEL, self.vector({}), "base")
        if target.lower() in self.baselines:
            return Soup(target.lower(), self.vector({target.lower(): 1.0}), "baseline")
        return self._combination(target)

    def vector(self, weights: dict[str, float]) -> tuple[float, ...]:
        """``{adapter: weight}`` as the engine's weight vector (absent adapters weigh 0)."""
        return tuple(float(weights.get(name, 0.0)) for name in self.adapter_names)

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
        return Soup(key, self.vector(chosen), source)

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
        return Soup(label, self.vector(canonical), "given")


class SoupEngine:
    """Base + mixed pole policies, loaded once; batched decoding with per-row weights."""

    def __init__(
        self, run: str, device: str = "auto", dtype: str | None = None, strategy: str = "mixing"
    ):
        from psoups_ray.runtime.loading import LoadedModels

        if strategy not in ("mixing", "merged"):
            raise PsoupsError(f"strategy must be 'mixing' or 'merged', got {strategy!r}")
        self.catalog = SoupCatalog(run)
        self.strategy = strategy
        # mixing: every policy lives in the model, weighted per row; merged: the model is
        # the plain base and each soup is a merged copy (see merged_model).
        models = self.catalog.run.model_set(self.catalog.baselines, rewards=False, dtype=dtype)
        self.loaded = LoadedModels(models, device, mix=strategy == "mixing")
        self.device = self.loaded.device
        self.tokenizer = self.loaded.tokenizer
        self.model = self.loaded.model
        self.adapters = self.loaded.policies
        self.mixer = self.loaded.mixer
        self.max_context = self.loaded.max_context
        self.sampler = self.loaded.sampler

    @property
    def poles(self) -> list[str]:
        return self.catalog.poles

    def merged_model(self, weights: Sequence[float]) -> torch.nn.Module:
        """A copy of the base with the ``delta`` soup merged into its weights (``merged``
        strategy): W' = W0 + sum_i w_i s_i B_i A_i. The copy costs a full model's memory."""
        from psoups_ray.runtime.merge import merge_into_model

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
        """Decode ``jobs`` together (:meth:`psoups_ray.runtime.sampling.Sampler.stream`);
        yield one :class:`StepOutput` per job per step until every job has finished.

        ``model``: decode with this (merged) model instead, ignoring the jobs' weights.
        """
        if model is None and self.mixer is None and any(any(job.weights) for job in jobs):
            raise PsoupsError("a merged-strategy engine needs the merged model for a soup")
        requests = [self.request_of(job) for job in jobs]
        yield from self.sampler.stream(requests, model, dtype=self.catalog.sampling.dtype)

    def request_of(self, job: GenerationJob) -> SampleRequest:
        """The sampler's request for ``job``: its prompt's tokens, settings and weights."""
        (ids,) = (
            [job.prompt_ids] if job.prompt_ids is not None else self.sampler.encode([job.prompt])
        )
        return SampleRequest(ids, job.params, job.weights if self.mixer is not None else None)

    def generate(self, jobs: Sequence[GenerationJob]) -> list[dict[str, Any]]:
        """Decode to the end; per job: text, finish_reason, token counts."""
        final: list[StepOutput | None] = [None] * len(jobs)
        for outputs in self.stream(jobs):
            for index, out in enumerate(outputs):
                if out.finished and final[index] is None:
                    final[index] = out
        return [
            {
                "text": out.final_text,
                "finish_reason": out.finish_reason,
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens,
            }
            for out in final
        ]
