"""Personal soups with simulated users: how many choices until a user's learned soup is as
good as the best soup for that user?

    python bench/personal_soups.py --run runs/tiny                     # a run with policies
    python bench/personal_soups.py --run RUN --out docs/results/personal
    python bench/personal_soups.py --run RUN --smoke-test              # tiny sizes (CI)

Needs a run of a world with attribute checkers (the tiny world). Simulated users have
hidden soup weights w (drawn from the prior the model uses) and choose between two answers
by the world's attribute checkers, never by the reward models the system learns with: a
user prefers a to b with probability σ(β_user · wᵀ(c(a) − c(b))), c the (P,) indicator of
the poles an answer shows. A user's utility of a soup is the mean of wᵀc over its answers
to prompts no question used.

Every soup on a grid of the simplex (step 1/--resolution, at most one pole per dimension,
at the served total weight), every full combination's named soup (its tuned weights, else
uniform) and the base answer every prompt once, with the run's evaluation sampling; the
pole reward models score each answer to a question prompt (the features φ the system
learns from) and the checkers read every answer. The simulation then asks from that bank,
snapping soups to the nearest grid soup. Per choice, the learned soup is scored for:

- ``active``: what the server does: questions from the candidate answers with the most
  expected information (the model's estimate and posterior draws), the soup its estimate;
- ``random``: two grid soups drawn at random per question, the same estimate;
- ``active+table``: active questions, the soup picked knowing every grid soup's mean
  features (``best_soup``; the server has no such table yet);
- ``named``: the user names the combination nearest their weights and gets its soup.

The best grid soup for a user is picked on one half of the utility prompts and measured on
the other, both ways round: the largest of 66 noisy measurements would overstate it (the
winner's curse); shares of that largest are printed too. With ``--out``,
``personal_soups.json`` and ``personal_soups.png`` are written there. The last line is
``RATIOS {...}``: the shares after 10 choices and the choices each strategy needs to reach
90%, all measured in this run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_SHARE = 0.9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run directory with policies and rewards")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--choices", type=int, default=20, help="questions per user")
    parser.add_argument(
        "--repeats", type=int, default=4, help="simulations of each user (other questions)"
    )
    parser.add_argument("--resolution", type=int, default=4, help="grid step 1/RESOLUTION")
    parser.add_argument("--question-prompts", type=int, default=16)
    parser.add_argument("--utility-prompts", type=int, default=96)
    parser.add_argument("--candidates", type=int, default=4, help="soups per active question")
    parser.add_argument("--user-beta", type=float, default=5.0, help="simulated users' β")
    parser.add_argument("--model-beta", type=float, default=1.0, help="the model's β")
    parser.add_argument("--max-new-tokens", type=int, help="default: the run's evaluate length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="directory for personal_soups.json and .png")
    parser.add_argument(
        "--cache", help="file keeping the generated and scored bank between runs of the bench"
    )
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, seconds")
    args = parser.parse_args()
    if args.smoke_test:
        args.users, args.choices, args.resolution, args.repeats = 4, 3, 2, 1
        args.question_prompts, args.utility_prompts, args.max_new_tokens = 2, 2, 16

    import torch

    from psoups_ray.artifacts import RunArtifacts
    from psoups_ray.errors import PsoupsError
    from psoups_ray.judges.attributes import attribute_judge
    from psoups_ray.personal.model import (
        Choice,
        PersonalSpec,
        Posterior,
        SoupSpace,
        best_soup,
        candidate_soups,
        choice_probability,
        most_informative_pair,
        soup_total,
    )

    torch.manual_seed(args.seed)
    run = RunArtifacts.load(args.run)
    config = run.config
    judge = attribute_judge(config)
    if judge is None:
        raise PsoupsError(
            "simulated users choose by the world's attribute checkers; this run's world has "
            "none (use a run of the tiny world)"
        )
    space = run.space
    spec = PersonalSpec(beta=args.model_beta, seed=args.seed)
    tuned = run.tuned_weights
    soups = SoupSpace(space, soup_total(spec, tuned))
    grid = soups.grid(args.resolution)  # (G, P), each row summing to one
    # The named soups as served: a combination's tuned weights, else uniform at the total.
    named_weights = [
        tuned.get(str(c)) or soups.as_weights(soups.vector(dict.fromkeys(c.poles, 1.0)))
        for c in space.full_combinations()
    ]
    named = torch.stack([soups.vector(weights) for weights in named_weights])  # (C, P)
    bank = [*(soups.as_weights(row) for row in grid), *named_weights, {}]  # the base last
    prompts = run.prompts("held_out")
    needed = args.question_prompts + args.utility_prompts
    if len(prompts) < needed:
        raise PsoupsError(
            f"the run has {len(prompts)} held-out prompts; --question-prompts plus "
            f"--utility-prompts is {needed}"
        )
    questions = prompts[: args.question_prompts]
    utility_prompts = prompts[args.question_prompts : needed]

    generation = config.evaluate.generation
    if args.max_new_tokens:
        generation = generation.model_copy(update={"max_new_tokens": args.max_new_tokens})
    started = time.monotonic()
    key = {
        "run": str(Path(args.run).resolve()),
        "bank": bank,
        "prompts": questions + utility_prompts,
        "generation": generation.model_dump(mode="json"),
        "seed": args.seed,
    }
    cached = torch.load(args.cache) if args.cache and Path(args.cache).is_file() else None
    if cached is not None and cached["key"] == key:
        features, shown = cached["features"], cached["shown"]
    else:
        features, shown = _generate_bank(
            run, config, bank, questions, utility_prompts, generation, args.seed, soups, judge
        )
        if args.cache:
            torch.save({"key": key, "features": features, "shown": shown}, args.cache)
    generated = time.monotonic() - started
    print(
        f"bank: {len(bank)} soups ({len(grid)} on the grid at step 1/{args.resolution}, "
        f"{len(named)} named, the base; total weight {soups.total:.2f}) x "
        f"{len(questions) + len(utility_prompts)} prompts, generated and scored in "
        f"{generated:.0f}s"
    )

    generator = torch.Generator().manual_seed(args.seed)
    users = soups.sample(args.users, spec.none_probability, generator)  # (U, P)
    # A user's utility of a soup: the mean of wᵀc over its answers to the utility prompts.
    answers = shown[:, len(questions) :]  # (soups, utility prompts, P)
    utility = users @ answers.mean(dim=1).T  # (U, soups)
    # The best grid soup's utility. The largest of 66 noisy measurements overstates it (the
    # winner's curse), so the best soup is picked on one half of the utility prompts and
    # measured on the other, both ways round; the largest is reported too.
    half = answers.shape[1] // 2
    first, second = (users @ part.mean(dim=1).T for part in (answers[:, :half], answers[:, half:]))
    rows = torch.arange(args.users)
    best = 0.5 * (
        second[rows, first[:, : len(grid)].argmax(dim=1)]
        + first[rows, second[:, : len(grid)].argmax(dim=1)]
    )  # (U,)
    largest = utility[:, : len(grid)].max(dim=1).values

    def nearest(soup: torch.Tensor) -> int:
        return int((grid - soup).abs().sum(dim=1).argmin())

    def share(user: int, soup_index: int, of: torch.Tensor = best) -> float:
        return float(utility[user, soup_index] / of[user]) if of[user] > 0 else 1.0

    table = features[: len(grid)].mean(dim=1)  # (G, P): each grid soup's mean features
    rng = random.Random(args.seed)
    prior = Posterior(soups, spec).particles  # drawn once, shared by every simulation
    # "active": what the server does (its estimate, snapped to the grid); "random": random
    # questions; "active+table": the soup picked with each grid soup's mean features known
    # (best_soup; the server has no such table yet).
    curves: dict[str, list[list[float]]] = {"active": [], "random": [], "active+table": []}
    started = time.monotonic()
    owners = [user for _ in range(args.repeats) for user in range(args.users)]
    for user in owners:
        w = users[user]
        for strategy, curve in curves.items():
            posterior = Posterior(soups, spec, prior)
            picks = []
            for _ in range(args.choices):
                question = rng.randrange(len(questions))
                if strategy.startswith("active"):
                    pool = candidate_soups(posterior, args.candidates, generator)
                    indices = list(dict.fromkeys(nearest(soup) for soup in pool))
                    while len(indices) < 2:
                        indices.append(rng.randrange(len(grid)))
                        indices = list(dict.fromkeys(indices))
                    i, j = most_informative_pair(posterior, features[indices, question])
                    a, b = indices[i], indices[j]
                else:
                    a, b = rng.sample(range(len(grid)), 2)
                p_a = choice_probability(w, shown[a, question], shown[b, question], args.user_beta)
                prefers_a = rng.random() < p_a
                chosen, rejected = (a, b) if prefers_a else (b, a)
                posterior.update([Choice(features[chosen, question], features[rejected, question])])
                if strategy == "active+table":
                    picks.append(best_soup(posterior, table))
                else:
                    picks.append(nearest(posterior.estimate()))
            curve.append(picks)
    simulated = time.monotonic() - started

    def mean_share(picks: list[int], of: torch.Tensor = best) -> float:
        """Mean share over simulations, ``picks[k]`` the soup of simulation k's user."""
        return sum(share(owners[k], pick, of) for k, pick in enumerate(picks)) / len(picks)

    base_share = mean_share([len(bank) - 1] * len(owners))
    named_picks = [len(grid) + int((named - users[u]).abs().sum(dim=1).argmin()) for u in owners]
    named_share = mean_share(named_picks)
    # curves[strategy][k][n]: the soup learned in simulation k after n + 1 choices.
    picks = {
        name: [[simulation[n] for simulation in curve] for n in range(args.choices)]
        for name, curve in curves.items()
    }
    rows = torch.tensor(owners)
    means = {name: [mean_share(p) for p in by_n] for name, by_n in picks.items()}
    of_largest = {name: [mean_share(p, largest) for p in by_n] for name, by_n in picks.items()}
    regrets = {
        name: [float((best[rows] - utility[rows, torch.tensor(p)]).mean()) for p in by_n]
        for name, by_n in picks.items()
    }
    print(
        f"{args.users} users x {args.repeats} simulations, {args.choices} choices each, user β "
        f"{args.user_beta:g}, model β "
        f"{spec.beta:g}, {spec.particles} particles ({simulated:.0f}s); share of the best "
        f"grid soup's utility (regret):"
    )
    print(f"{'choices':>7} " + " ".join(f"{name:>16}" for name in means))
    for n in range(args.choices):
        print(
            f"{n + 1:>7} " + " ".join(f"{means[s][n]:>7.3f} ({regrets[s][n]:.3f})" for s in means)
        )
    print(f"named combination: {named_share:.3f}; base: {base_share:.3f}")
    at = min(10, args.choices) - 1
    print(
        "against the largest measured grid utility (overstated by the winner's curse), after "
        f"{at + 1} choices: "
        + ", ".join(f"{name} {values[at]:.3f}" for name, values in of_largest.items())
        + f"; named {mean_share(named_picks, largest):.3f}"
    )

    def choices_to_target(values: list[float]) -> int | None:
        return next((n + 1 for n, value in enumerate(values) if value >= TARGET_SHARE), None)

    ratios = {
        "active_share_at_10": means["active"][at],
        "random_share_at_10": means["random"][at],
        "active_table_share_at_10": means["active+table"][at],
        "named_share": named_share,
        "base_share": base_share,
        "active_choices_to_90": choices_to_target(means["active"]),
        "random_choices_to_90": choices_to_target(means["random"]),
        "active_table_choices_to_90": choices_to_target(means["active+table"]),
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        summary = {
            "run": str(args.run),
            "settings": {k: v for k, v in vars(args).items() if k not in ("run", "out", "cache")},
            "bank_soups": len(bank),
            "mean_best_utility": float(best.mean()),
            "mean_largest_utility": float(largest.mean()),
            "share": means,
            "share_of_largest": of_largest,
            "regret": regrets,
            "named_share": named_share,
            "base_share": base_share,
            "ratios": ratios,
        }
        (out / "personal_soups.json").write_text(json.dumps(summary, indent=2) + "\n")
        _plot(means, named_share, base_share, out / "personal_soups.png")
        print(f"wrote {out / 'personal_soups.json'} and {out / 'personal_soups.png'}")
    print("RATIOS " + json.dumps(ratios))
    return 0


def _generate_bank(run, config, bank, questions, utility_prompts, generation, seed, soups, judge):
    """Every bank soup's answers: the features φ of the answers to the questions
    (soups, questions, P) and the poles every answer shows (soups, prompts, P)."""
    import torch

    from psoups_ray.runtime.evaluator import SoupEvaluator
    from psoups_ray.runtime.queries import SoupModels, SoupQuery

    evaluator = SoupEvaluator(SoupModels.from_run(run, config.rewards.max_length, False))
    queries = [SoupQuery(weights, ()) for weights in bank]
    texts = evaluator.generate(queries, questions + utility_prompts, generation, seed)
    question_texts = [row[: len(questions)] for row in texts]
    # φ: (soups, questions, P), the system's features of every question's answers.
    flat = [text for row in question_texts for text in row]
    flat_prompts = questions * len(bank)
    features = torch.stack(
        [
            evaluator.normalized_rewards(pole, flat_prompts, flat, generation.batch_size)
            for pole in soups.poles
        ],
        dim=-1,
    ).view(len(bank), len(questions), len(soups.poles))
    # c: (soups, prompts, P), the poles each answer shows (what users judge by).
    shown = torch.tensor(
        [
            [[float(pole in judge.shown(text)) for pole in soups.poles] for text in row]
            for row in texts
        ]
    )
    return features, shown


def _plot(means, named_share, base_share, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, values in means.items():
        axes.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=name)
    axes.axhline(named_share, linestyle="--", color="gray", label="named combination")
    axes.axhline(base_share, linestyle=":", color="black", label="base")
    axes.axhline(TARGET_SHARE, linewidth=0.5, color="red")
    axes.set_xlabel("choices")
    axes.set_ylabel("share of the best soup's utility")
    axes.set_title("Personal soups: simulated users")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
