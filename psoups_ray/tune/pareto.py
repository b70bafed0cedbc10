"""Pareto fronts: for two poles a and b of different dimensions, the soup w*a + (1-w)*b
for w = 0, 1/(k-1), ..., 1 (Rewarded Soups), measured by both poles' reward models and
plotted as reward(a) against reward(b), with the combinations' uniform and tuned soups
that contain both poles marked."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from psoups_ray.preferences import PreferenceSpace
from psoups_ray.runtime.queries import SoupQuery


@dataclass(frozen=True)
class ParetoPair:
    a: str
    b: str

    @property
    def key(self) -> str:
        return f"{self.a}-{self.b}"


def pareto_pairs(space: PreferenceSpace) -> list[ParetoPair]:
    """Every pair of poles from different dimensions, in canonical order."""
    return [
        ParetoPair(a.id, b.id)
        for first, second in itertools.combinations(space.dimensions, 2)
        for a in first.poles
        for b in second.poles
    ]


def interpolation_weights(points: int) -> list[float]:
    return [round(i / (points - 1), 10) for i in range(points)]


def pareto_queries(
    space: PreferenceSpace,
    pair: ParetoPair,
    points: int,
    soups: dict[str, dict[str, dict[str, float]]],
    prompted: bool,
) -> tuple[list[SoupQuery], list[dict[str, Any]]]:
    """The queries of one pair's sweep and what each one is: the interpolation points,
    then every soup in ``soups`` (``{combination: {label: weights}}``) holding both poles."""
    scored = (pair.a, pair.b)
    prompt = space.preference_prompt(space.combination(scored)) if prompted else None
    queries, labels = [], []
    for w in interpolation_weights(points):
        queries.append(SoupQuery({pair.a: w, pair.b: 1.0 - w}, scored, prompt))
        labels.append({"kind": "interpolation", "weight_a": w})
    for combo, by_label in soups.items():
        poles = combo.split("+")
        if pair.a not in poles or pair.b not in poles:
            continue
        combo_prompt = space.preference_prompt(space.parse(combo)) if prompted else None
        for label, weights in by_label.items():
            queries.append(SoupQuery(dict(weights), scored, combo_prompt))
            labels.append({"kind": label, "combination": combo, "weights": dict(weights)})
    return queries, labels


def front_points(
    pair: ParetoPair, labels: list[dict[str, Any]], results: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    points = []
    for label, result in zip(labels, results, strict=True):
        point = {
            **label,
            "reward_a": result["rewards"][pair.a],
            "reward_b": result["rewards"][pair.b],
        }
        if "success_rate" in result:
            point["success_rate"] = result["success_rate"]
        points.append(point)
    return points


def plot_front(pair: ParetoPair, points: list[dict[str, Any]], path: str) -> None:
    """reward(a) vs reward(b): the interpolation as a line coloured by w, soups marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    line = [p for p in points if p["kind"] == "interpolation"]
    figure, axes = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    xs, ys = [p["reward_a"] for p in line], [p["reward_b"] for p in line]
    axes.plot(xs, ys, color="0.6", linewidth=1, zorder=1)
    dots = axes.scatter(
        xs, ys, c=[p["weight_a"] for p in line], cmap="viridis", s=28, zorder=2, vmin=0, vmax=1
    )
    figure.colorbar(dots, ax=axes, label=f"weight of {pair.a} (1 - weight of {pair.b})")
    for p in line:
        if p["weight_a"] in (0.0, 1.0):
            axes.annotate(
                f"{pair.a if p['weight_a'] == 1.0 else pair.b} only",
                (p["reward_a"], p["reward_b"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    middle = min(line, key=lambda p: abs(p["weight_a"] - 0.5))
    axes.scatter(
        [middle["reward_a"]], [middle["reward_b"]], marker="*", s=140, color="tab:orange",
        edgecolor="black", zorder=3, label=f"uniform {pair.a}+{pair.b}",
    )  # fmt: skip
    styles = {"uniform": ("o", "tab:blue"), "tuned": ("s", "tab:red")}
    for kind, (marker, color) in styles.items():
        marked = [p for p in points if p["kind"] == kind]
        if not marked:
            continue
        axes.scatter(
            [p["reward_a"] for p in marked], [p["reward_b"] for p in marked], marker=marker,
            s=40, color=color, edgecolor="black", zorder=3, label=f"{kind} soups of combinations",
        )  # fmt: skip
        for p in marked:
            axes.annotate(
                p["combination"], (p["reward_a"], p["reward_b"]), textcoords="offset points",
                xytext=(4, -9), fontsize=6, color=color,
            )  # fmt: skip
    axes.set_xlabel(f"normalised reward {pair.a}")
    axes.set_ylabel(f"normalised reward {pair.b}")
    axes.set_title(f"Pareto front {pair.a} vs {pair.b}")
    axes.grid(alpha=0.3)
    axes.margins(0.12)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
