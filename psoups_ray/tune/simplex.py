"""Weights on the probability simplex: a cube parametrisation for Optuna, and grids.

Optuna samples independent numbers in [0, 1]; :func:`from_cube` maps N-1 of them onto the
N-simplex by stick-breaking with Beta(1, N-k) quantiles, a bijection that takes the
uniform distribution on the cube to the uniform distribution on the simplex (so TPE's
prior covers the simplex evenly and no direction is redundant).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence


def from_cube(u: Sequence[float]) -> list[float]:
    """N-1 numbers in [0, 1] -> N non-negative weights summing to 1."""
    n = len(u) + 1
    weights, remaining = [], 1.0
    for k, value in enumerate(u):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"cube coordinate {k} must be in [0, 1], got {value}")
        share = 1.0 - (1.0 - value) ** (1.0 / (n - 1 - k))  # Beta(1, n-1-k) quantile
        weights.append(remaining * share)
        remaining -= weights[-1]
    weights.append(max(remaining, 0.0))
    return weights


def to_cube(weights: Sequence[float]) -> list[float]:
    """The inverse of :func:`from_cube` (for seeding a search with known weights)."""
    n = len(weights)
    total = float(sum(weights))
    if n < 2 or total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"need >= 2 non-negative weights with a positive sum, got {weights}")
    u, remaining = [], 1.0
    for k, weight in enumerate(weights[:-1]):
        share = (weight / total) / remaining if remaining > 1e-12 else 0.0
        share = min(max(share, 0.0), 1.0)
        u.append(1.0 - (1.0 - share) ** (n - 1 - k))
        remaining -= weight / total
    return u


def simplex_grid(n: int, resolution: int) -> list[list[float]]:
    """Every weight vector of ``n`` multiples of 1/``resolution`` summing to 1
    (C(resolution + n - 1, n - 1) points, the corners included)."""
    if n < 1 or resolution < 1:
        raise ValueError(f"need n >= 1 and resolution >= 1, got n={n}, resolution={resolution}")
    points = []
    for cuts in itertools.combinations(range(resolution + n - 1), n - 1):
        # stars and bars: the gaps between n-1 bars among resolution stars
        edges = (-1, *cuts, resolution + n - 1)
        points.append([(edges[i + 1] - edges[i] - 1) / resolution for i in range(n)])
    return points
