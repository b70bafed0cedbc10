"""A user's soup weights, inferred from the user's pairwise choices.

The pole reward models are a basis. For a prompt x and an answer y, φ(x, y) ∈ R^P are the
normalised scores of the P pole reward models. A user with soup weights w ∈ R^P prefers
answer a to answer b with probability

    P(a ≻ b | w) = σ(β · wᵀ(φ(x, a) − φ(x, b)))            (Bradley–Terry, linear reward)

as in LoRe / VPL / PAL's reward bases. A soup takes at most one pole per dimension (the
two poles of a dimension are alternatives: a user leans to either or to neither), and its
weights are non-negative and sum to one. The served soup's total weight is set apart
(:func:`soup_total`): in the likelihood it cannot be told from β (a user who chooses
sharply and a user who wants strong soups choose alike).

The posterior over w is kept as weighted particles: a fixed draw of soups from the prior
(every support pattern, Dirichlet(1) weights), re-weighted by the likelihood of the
choices. A user's posterior is a function of the choices alone, so a store keeps the
choices and any replica rebuilds the same posterior from them.

Active questions: of a few candidate soups' answers to one prompt, the pair whose choice
is expected to tell most about w (the mutual information between the choice and w,
Houlsby et al. 2011's BALD form: H(E[p]) − E[H(p)]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from psoups_ray.personal.spec import PersonalSpec
from psoups_ray.preferences import PreferenceSpace


def soup_total(spec: PersonalSpec, tuned_weights: dict[str, dict[str, float]]) -> float:
    """The total weight of users' soups: ``spec.total``, else the mean total of the run's
    tuned soups (how strong the tune stage found soups should be), else 1."""
    if spec.total is not None:
        return spec.total
    totals = [sum(weights.values()) for weights in tuned_weights.values()]
    return sum(totals) / len(totals) if totals else 1.0


class SoupSpace:
    """The soups a user may have: per dimension one pole or none, weights summing to one.

    Weight vectors are over :attr:`poles` (every pole of the space, in order).
    """

    def __init__(
        self, space: PreferenceSpace, total: float = 1.0, poles: Sequence[str] | None = None
    ):
        """``poles``: only these (the poles a server has policies for); default: all."""
        self.space = space
        kept = set(space.pole_ids if poles is None else poles)
        self.poles: list[str] = [pole for pole in space.pole_ids if pole in kept]
        self.total = total
        self.dimensions: list[list[int]] = [
            columns
            for dimension in space.dimensions
            if (columns := [self.poles.index(p.id) for p in dimension.poles if p.id in kept])
        ]

    def sample(self, count: int, none_probability: float, generator: torch.Generator):
        """``count`` soups from the prior: (count, P), each row on the simplex."""
        dims = len(self.dimensions)
        weights = torch.zeros(count, len(self.poles))
        # Which pole of each dimension (or none); a soup leans to at least one pole.
        leans = torch.rand(count, dims, generator=generator) >= none_probability
        empty = ~leans.any(dim=1)
        forced = torch.randint(dims, (count,), generator=generator)
        leans[empty, forced[empty]] = True
        uniform = torch.rand(count, dims, generator=generator).clamp_min(1e-12)  # no log(0)
        magnitude = -torch.log(uniform)  # Exp(1): normalised below, Dirichlet(1)
        magnitude = magnitude * leans
        magnitude = magnitude / magnitude.sum(dim=1, keepdim=True)
        for d, columns in enumerate(self.dimensions):
            chosen = torch.randint(len(columns), (count,), generator=generator)
            index = torch.tensor(columns)[chosen]
            weights[torch.arange(count), index] = magnitude[:, d]
        return weights

    def grid(self, resolution: int) -> torch.Tensor:
        """Every soup whose weights are multiples of 1/``resolution``: (G, P) (66 soups for
        three two-pole dimensions at resolution 4)."""
        rows: list[list[float]] = []

        def extend(d: int, left: int, row: list[float]) -> None:
            if d == len(self.dimensions):
                if left == 0 and any(row):
                    rows.append([value / resolution for value in row])
                return
            extend(d + 1, left, row)  # neither pole of dimension d
            for column in self.dimensions[d]:
                for units in range(1, left + 1):
                    row[column] = units
                    extend(d + 1, left - units, row)
                    row[column] = 0

        extend(0, resolution, [0] * len(self.poles))
        return torch.tensor(rows)

    def project(self, weights: torch.Tensor) -> torch.Tensor:
        """Weights (P,) made a soup: per dimension the pole with the most weight keeps what
        it has over the dimension's others (a mean of leaning-A and leaning-B users leans
        less), then the whole is rescaled to sum to one. All zero stays all zero."""
        out = torch.zeros_like(weights)
        for columns in self.dimensions:
            values = weights[columns]
            top = int(values.argmax())
            out[columns[top]] = (values[top] - (values.sum() - values[top])).clamp(min=0)
        total = out.sum()
        return out / total if total > 0 else out

    def as_weights(self, weights: torch.Tensor) -> dict[str, float]:
        """``{pole: weight * total}`` of the poles a soup (P,) has: what the mixer takes."""
        return {
            pole: float(value) * self.total
            for pole, value in zip(self.poles, weights.tolist(), strict=True)
            if value > 0
        }

    def vector(self, weights: dict[str, float]) -> torch.Tensor:
        """The (P,) vector of ``{pole: weight}``, rescaled to sum to one."""
        unknown = sorted(set(weights) - set(self.poles))
        if unknown:
            raise ValueError(f"unknown poles {', '.join(unknown)} (poles: {self.poles})")
        vector = torch.tensor([float(weights.get(pole, 0.0)) for pole in self.poles])
        return vector / vector.sum() if vector.sum() > 0 else vector


@dataclass(frozen=True)
class Choice:
    """One answer preferred to another: their feature vectors φ (P,) each."""

    chosen: torch.Tensor
    rejected: torch.Tensor


class Posterior:
    """Weighted particles over a user's soup weights (see the module's docstring)."""

    def __init__(self, soups: SoupSpace, spec: PersonalSpec, particles: torch.Tensor | None = None):
        """``particles``: the prior's draw (M, P) to share between posteriors; default: drawn
        here with ``spec.seed`` (the same draw every time)."""
        self.soups = soups
        self.spec = spec
        if particles is None:
            generator = torch.Generator().manual_seed(spec.seed)
            particles = soups.sample(spec.particles, spec.none_probability, generator)
        self.particles = particles  # (M, P)
        self.log_weights = torch.zeros(len(particles))
        self.choices = 0

    def update(self, choices: Sequence[Choice]) -> Posterior:
        """Condition on ``choices`` (in place): log π_m += log σ(β w_mᵀ(φ_chosen − φ_rejected))."""
        if choices:
            differences = torch.stack([c.chosen - c.rejected for c in choices])  # (n, P)
            logits = self.spec.beta * self.particles @ differences.T  # (M, n)
            self.log_weights += torch.nn.functional.logsigmoid(logits).sum(dim=1)
            self.choices += len(choices)
        return self

    @property
    def weights(self) -> torch.Tensor:
        """Normalised particle weights (M,)."""
        return torch.softmax(self.log_weights, dim=0)

    def effective_size(self) -> float:
        """Kish's effective number of particles: how many still carry the posterior."""
        weights = self.weights
        return float(1.0 / (weights**2).sum())

    def mean(self) -> torch.Tensor:
        """Posterior mean of the weights (P,)."""
        return self.weights @ self.particles

    def estimate(self) -> torch.Tensor | None:
        """The user's soup (P,), summing to one: the posterior mean made a soup
        (:meth:`SoupSpace.project`). None before any choice (the default soup applies)."""
        if self.choices == 0:
            return None
        return self.soups.project(self.mean())

    def uncertainty(self) -> torch.Tensor:
        """Posterior standard deviation of each pole's weight (P,)."""
        mean = self.mean()
        return (self.weights @ (self.particles - mean) ** 2).sqrt()

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` soups drawn from the posterior (count, P)."""
        index = torch.multinomial(self.weights, count, replacement=True, generator=generator)
        return self.particles[index]

    def information_gain(self, features: torch.Tensor) -> torch.Tensor:
        """For answers with features (K, P), the expected information about w of asking
        the user to choose between answers i and j: (K, K), symmetric, zero diagonal."""
        differences = features[:, None, :] - features[None, :, :]  # (K, K, P)
        logits = self.spec.beta * torch.einsum("mp,ijp->mij", self.particles, differences)
        p = torch.sigmoid(logits)  # (M, K, K): P(i ≻ j | w_m)
        weights = self.weights[:, None, None]
        mean = (weights * p).sum(dim=0)
        gain = _entropy(mean) - (weights * _entropy(p)).sum(dim=0)
        return gain.clamp(min=0).fill_diagonal_(0)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Binary entropy in nats."""
    p = p.clamp(1e-7, 1 - 1e-7)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def most_informative_pair(
    posterior: Posterior, features: torch.Tensor, allowed: torch.Tensor | None = None
) -> tuple[int, int]:
    """Of K answers with features (K, P), the pair (i, j), i < j, to ask about: the one
    with the most information (the first on ties, so (0, 1) when every gain is zero); with
    ``allowed`` (K, K, bool), among the allowed pairs when there is any."""
    first, second = torch.triu_indices(len(features), len(features), offset=1)
    gains = posterior.information_gain(features)[first, second]
    if allowed is not None and allowed[first, second].any():
        gains = gains.masked_fill(~allowed[first, second], -1.0)  # gains are >= 0
    best = int(gains.argmax())
    return int(first[best]), int(second[best])


def candidate_soups(
    posterior: Posterior, count: int, generator: torch.Generator, min_distance: float = 0.25
) -> torch.Tensor:
    """``count`` soups to answer an active question with (count, P): the current estimate
    (when there is one) and posterior draws at least ``min_distance`` apart (L1), topped up
    from the prior when the posterior has narrowed."""
    found: list[torch.Tensor] = []
    estimate = posterior.estimate()
    if estimate is not None:
        found.append(estimate)
    pools = [posterior.sample(8 * count, generator)]
    pools.append(posterior.soups.sample(8 * count, posterior.spec.none_probability, generator))
    for pool in pools:
        for soup in pool:
            if len(found) == count:
                break
            if all(float((soup - other).abs().sum()) >= min_distance for other in found):
                found.append(soup)
    return torch.stack(found)


def choice_probability(weights: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor,
                       beta: float) -> float:  # fmt: skip
    """P(chosen ≻ rejected) for a user with ``weights`` (P,)."""
    return 1 / (1 + math.exp(-beta * float(weights @ (chosen - rejected))))


def best_soup(posterior: Posterior, soup_features: torch.Tensor) -> int:
    """Of S soups whose answers have mean features (S, P), the one the user is expected to
    like best: argmax_s E[w]ᵀ g_s (the utility is linear in w, so the posterior mean is
    all it needs). Unlike :meth:`Posterior.estimate`, this knows what each soup's answers
    are like: a weak pole policy gets more weight where the user wants its pole."""
    return int((soup_features @ posterior.mean()).argmax())
