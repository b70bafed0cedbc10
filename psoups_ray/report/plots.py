"""The report's PNG plots (matplotlib, Agg): PPO reward curves, Pareto fronts, win rates."""

from __future__ import annotations

import io
import math
from typing import Any


def _pyplot():
    """pyplot on the Agg backend (no display on cluster nodes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    _pyplot().close(figure)
    return buffer.getvalue()


def _smooth(values: list[float], window: int = 3) -> list[float]:
    """Trailing moving average (the curves are noisy at a few dozen rollouts a step)."""
    return [
        sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
        for i in range(len(values))
    ]


def reward_curves(histories: dict[str, list[dict[str, Any]]]) -> bytes:
    """Per PPO step: the rollout reward (normalised) and the KL to the reference, one line
    per pole policy and baseline. ``histories[name]`` is that run's per-step metrics."""
    plt = _pyplot()
    figure, (rewards, kls) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for name, history in histories.items():
        steps = [int(row["step"]) for row in history]
        style = "--" if not name.startswith("P") else "-"
        rewards.plot(steps, _smooth([row["reward"] for row in history]), style, label=name)
        kls.plot(steps, [row.get("kl", 0.0) for row in history], style, label=name)
    rewards.set_title("PPO rollout reward per step (moving average of 3)")
    rewards.set_xlabel("PPO step")
    rewards.set_ylabel("normalised reward of the run's poles")
    kls.set_title("KL to the reference per step")
    kls.set_xlabel("PPO step")
    kls.set_ylabel("KL (sum over response tokens)")
    for axes in (rewards, kls):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return _png(figure)


def pareto_grid(fronts: dict[str, dict[str, Any]]) -> bytes:
    """Every pair's front (reward of pole a vs pole b as the weight moves), in one grid."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    columns = min(4, len(fronts))
    rows = math.ceil(len(fronts) / columns)
    figure, grid = plt.subplots(
        rows, columns, figsize=(3.4 * columns, 3.1 * rows), dpi=110, squeeze=False
    )
    for axes, front in zip(grid.flat, fronts.values(), strict=False):
        line = [p for p in front["points"] if p["kind"] == "interpolation"]
        xs, ys = [p["reward_a"] for p in line], [p["reward_b"] for p in line]
        axes.plot(xs, ys, color="0.6", linewidth=1, zorder=1)
        axes.scatter(xs, ys, c=[p["weight_a"] for p in line], cmap="viridis", s=16,
                     vmin=0, vmax=1, zorder=2)  # fmt: skip
        for kind, marker, color in (("uniform", "o", "tab:blue"), ("tuned", "s", "tab:red")):
            marked = [p for p in front["points"] if p["kind"] == kind]
            axes.scatter([p["reward_a"] for p in marked], [p["reward_b"] for p in marked],
                         marker=marker, s=22, color=color, edgecolor="black", zorder=3,
                         label=f"{kind} soups")  # fmt: skip
        axes.set_title(f"{front['a']} vs {front['b']}", fontsize=9)
        axes.set_xlabel(f"reward {front['a']}", fontsize=8)
        axes.set_ylabel(f"reward {front['b']}", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.xaxis.set_major_locator(MaxNLocator(5))
        axes.yaxis.set_major_locator(MaxNLocator(5))
        axes.grid(alpha=0.3)
    for axes in list(grid.flat)[len(fronts) :]:
        axes.axis("off")
    handles, labels = grid.flat[0].get_legend_handles_labels()
    figure.suptitle(
        "Pareto fronts: normalised rewards as the weight moves from pole b (purple end) "
        "to pole a (yellow end)",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    figure.legend(handles, labels, loc="upper right", fontsize=8, ncol=2)
    return _png(figure)


def win_rate_heatmap(
    table: dict[str, Any], opponents: list[str], combinations: list[str], title: str
) -> bytes:
    """Rows = combinations (+ overall), columns = opponents; cells = win rate (%)."""
    plt = _pyplot()
    rows = [*combinations, "overall"]
    values = [
        [
            table[other]["overall"] if key == "overall" else table[other]["combinations"][key]
            for other in opponents
        ]
        for key in rows
    ]
    figure, axes = plt.subplots(figsize=(1.5 * len(opponents) + 3, 0.45 * len(rows) + 1.6),
                                dpi=110)  # fmt: skip
    grid = [[cell["win_rate"] * 100 for cell in row] for row in values]
    image = axes.imshow(grid, cmap="RdBu", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(values):
        for j, cell in enumerate(row):
            axes.text(j, i, f"{cell['win_rate']:.0%}", ha="center", va="center", fontsize=8,
                      color="white" if abs(cell["win_rate"] - 0.5) > 0.3 else "black")  # fmt: skip
    axes.set_xticks(range(len(opponents)), [f"vs {o}" for o in opponents], fontsize=8)
    axes.set_yticks(range(len(rows)), rows, fontsize=8)
    axes.axhline(len(rows) - 1.5, color="black", linewidth=1)
    figure.colorbar(image, ax=axes, label="win rate % (ties count half)")
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    return _png(figure)
