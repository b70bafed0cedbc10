"""What the decode loop does to one step's logits, row by row: penalties, the tempered and
cut distribution, the draw, and log-probabilities.

Every setting is per row (:class:`RowSettings`), so one batch holds requests with
different settings. The order is vLLM's and transformers': repetition, frequency and
presence penalties on the raw logits, then temperature, top-k, top-p and min-p; the
log-probabilities a request asks for are the model's own (raw logits, log-softmax).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch


@dataclass(frozen=True)
class Uses:
    """Which steps some row of a batch needs (the others cost nothing): known from the
    rows' settings when the batch starts, so a decoding step asks no tensor."""

    temperature: bool = True  # a temperature other than 0 and 1
    top_k: bool = True
    top_p: bool = True
    min_p: bool = True
    penalties: bool = True
    greedy: bool = True  # a row with temperature 0

    @classmethod
    def of(cls, params: Sequence) -> Uses:
        return cls(
            temperature=any(p.temperature not in (0, 1) for p in params),
            top_k=any(p.top_k > 0 for p in params),
            top_p=any(p.top_p < 1 for p in params),
            min_p=any(p.min_p > 0 for p in params),
            penalties=any(
                p.repetition_penalty != 1 or p.frequency_penalty or p.presence_penalty
                for p in params
            ),
            greedy=any(p.temperature == 0 for p in params),
        )


@dataclass
class RowSettings:
    """Per-row sampling settings of a batch, as tensors: (B,) each."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    uses: Uses = field(default_factory=Uses)

    @classmethod
    def of(cls, params: Sequence, device: torch.device) -> RowSettings:
        """From each row's :class:`~psoups_ray.runtime.sampling.SamplingParams`."""
        tensors = {
            f.name: torch.tensor([getattr(p, f.name) for p in params], device=device)
            for f in fields(cls)
            if f.name != "uses"
        }
        return cls(**tensors, uses=Uses.of(params))

    def select(self, keep: torch.Tensor) -> RowSettings:
        """The rows ``keep`` (the others left the batch; what they used may stay on)."""
        return RowSettings(**{
            f.name: getattr(self, f.name)[keep] if f.name != "uses" else self.uses
            for f in fields(self)
        })  # fmt: skip

    @property
    def penalized(self) -> bool:
        return self.uses.penalties


class TokenHistory:
    """Which tokens each row has seen (its prompt and its output) and how often it sampled
    each, for the penalties: (B, V) tensors, kept only for batches that use them."""

    def __init__(self, prompts: Sequence[Sequence[int]], vocab: int, device: torch.device):
        self.seen = torch.zeros((len(prompts), vocab), dtype=torch.bool, device=device)
        for row, ids in enumerate(prompts):
            if ids:
                self.seen[row, torch.tensor(list(ids), device=device)] = True
        self.counts = torch.zeros((len(prompts), vocab), device=device)

    def add(self, tokens: torch.Tensor) -> None:
        """Each row's newly sampled token: (B,)."""
        rows = torch.arange(len(tokens), device=tokens.device)
        self.seen[rows, tokens] = True
        self.counts[rows, tokens] += 1

    def select(self, keep: torch.Tensor) -> None:
        self.seen, self.counts = self.seen[keep], self.counts[keep]


def apply_penalties(
    logits: torch.Tensor, settings: RowSettings, history: TokenHistory
) -> torch.Tensor:
    """Penalised logits: (B, V) -> (B, V). Repetition (transformers' and vLLM's meaning:
    the logit of a token seen in the prompt or output is divided by the penalty when
    positive, multiplied when negative); frequency and presence (OpenAI's: minus
    ``frequency * count + presence * [count > 0]`` over the output)."""
    penalty = settings.repetition_penalty.unsqueeze(1)  # (B, 1)
    repeated = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits = torch.where(history.seen, repeated, logits)
    counts = history.counts
    return (
        logits
        - settings.frequency_penalty.unsqueeze(1) * counts
        - settings.presence_penalty.unsqueeze(1) * (counts > 0)
    )


def sampling_probabilities(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor | None = None,
    uses: Uses | None = None,
) -> torch.Tensor:
    """Next-token distributions after temperature, then top-k, top-p and min-p, as
    transformers' warpers compute them, with per-row settings: (B, V) float logits, (B,)
    settings -> (B, V). ``top_k`` 0, ``top_p`` 1 and ``min_p`` 0 leave the distribution
    whole; a row with temperature 0 gets the temperature-1 distribution (it decodes
    greedily anyway). ``uses``: the steps some row needs (default: all, each checked)."""
    uses = uses or Uses()
    vocab = logits.shape[-1]
    scores = logits
    if uses.temperature:
        scores = logits / torch.where(temperature > 0, temperature, 1.0).unsqueeze(1)
    cut = (top_k > 0) & (top_k < vocab) if uses.top_k else None
    if cut is not None and bool(cut.any()):
        k = torch.where(cut, top_k, 1)
        top = torch.topk(scores, int(k.max()), dim=-1).values  # (B, k_max), descending
        kth = top.gather(1, (k - 1).unsqueeze(1))  # (B, 1)
        kth = torch.where(cut.unsqueeze(1), kth, -float("inf"))
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if uses.top_p and bool((top_p < 1).any()):
        ascending, order = torch.sort(scores, descending=False)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p).unsqueeze(1)
        drop[:, -1:] = False  # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    probs = scores.softmax(dim=-1)
    if uses.min_p and min_p is not None and bool((min_p > 0).any()):
        floor = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values  # (B, 1)
        probs = probs.masked_fill(probs < floor, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_next(
    logits: torch.Tensor, settings: RowSettings, uniforms: torch.Tensor
) -> torch.Tensor:
    """One token per row: (B, V) float logits, the rows' settings and a uniform number in
    [0, 1) per row -> (B,). The token is the inverse of the row's cumulative distribution
    at its uniform number; temperature 0 (and a row whose logits overflowed, which must not
    fail its batch) takes the most likely token."""
    probs = sampling_probabilities(
        logits, settings.temperature, settings.top_k, settings.top_p, settings.min_p,
        settings.uses,
    )  # fmt: skip
    cdf = probs.cumsum(dim=-1)  # (B, V), non-decreasing
    total = cdf[:, -1]  # (B,): not finite when any of the row's probabilities is not
    target = (uniforms.to(cdf.dtype) * total).unsqueeze(1)  # (B, 1)
    drawn = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)
    # right=True never lands on a token of probability 0 but at the very top of the range,
    # where rounding can leave the target at the total: take the most likely token there.
    usable = (probs.gather(1, drawn.unsqueeze(1)).squeeze(1) > 0) & torch.isfinite(total)
    if settings.uses.greedy:
        usable &= settings.temperature > 0
    if bool(usable.all()):
        return drawn
    return torch.where(usable, drawn, logits.argmax(dim=-1))


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's log-probability of each row's token and its ``top`` most likely tokens:
    (B, V) raw logits, (B,) tokens -> (B,), (B, top) log-probabilities, (B, top) ids."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    values, ids = (
        logprobs.topk(top, dim=-1) if top > 0 else (logprobs[:, :0], tokens[:, None][:, :0])
    )
    return chosen, values, ids
