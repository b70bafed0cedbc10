"""The tiny world: generator determinism and balance, and the attribute checkers."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from psoups_ray.world import (
    WORLD_POLES,
    TinyWorld,
    check_attributes,
    exhibited_poles,
    satisfies,
)

ALL_POLES = [pole for poles in WORLD_POLES.values() for pole in poles]
COMBINATIONS = [
    dict(zip(WORLD_POLES, combination, strict=True))
    for combination in itertools.product(*WORLD_POLES.values())
]


@pytest.fixture(scope="module")
def world() -> TinyWorld:
    return TinyWorld(seed=0)


def test_prompts_are_a_few_hundred_and_split_disjointly(world: TinyWorld) -> None:
    assert len(world.eval_prompts) == 64
    assert set(world.train_prompts).isdisjoint(world.eval_prompts)
    all_prompts = world.train_prompts + world.eval_prompts
    assert len(set(all_prompts)) == len(all_prompts)
    assert 200 <= len(all_prompts) <= 500
    assert len(world.topics) >= 80
    assert len(TinyWorld(seed=0, num_eval_prompts=10).eval_prompts) == 10


def test_same_seed_same_world_other_seed_differs(world: TinyWorld) -> None:
    again = TinyWorld(seed=0)
    assert again.train_prompts == world.train_prompts
    assert again.eval_prompts == world.eval_prompts
    assert again.sft_examples(50, seed=3) == world.sft_examples(50, seed=3)
    assert again.preference_pairs("P1A", 20, seed=3) == world.preference_pairs("P1A", 20, seed=3)
    assert again.corpus(seed=3, n=20) == world.corpus(seed=3, n=20)
    assert TinyWorld(seed=1).eval_prompts != world.eval_prompts
    assert world.sft_examples(50, seed=4) != world.sft_examples(50, seed=3)
    prompt, poles = world.train_prompts[0], COMBINATIONS[0]
    responses = {world.respond(prompt, poles, random.Random(seed)) for seed in range(20)}
    assert len(responses) > 1


def test_checkers_agree_with_generator_labels(world: TinyWorld) -> None:
    rng = random.Random(0)
    labelled = [
        (poles, world.respond(prompt, poles, rng))
        for prompt in world.train_prompts + world.eval_prompts
        for poles in rng.sample(COMBINATIONS, 2)
    ]
    assert len(labelled) >= 600
    for dimension_id in WORLD_POLES:
        agreement = sum(
            check_attributes(response)[dimension_id] == poles[dimension_id]
            for poles, response in labelled
        ) / len(labelled)
        assert agreement >= 0.99, (dimension_id, agreement)


def test_every_response_mentions_its_subject(world: TinyWorld) -> None:
    for example in world.sft_examples(400, seed=5):
        subject = world.topic_of(example.prompt).subject
        assert subject.lower() in example.response.lower(), (subject, example.response)


def test_p2_poles_differ_in_length(world: TinyWorld) -> None:
    words: dict[str, list[int]] = {"P2A": [], "P2B": []}
    for example in world.sft_examples(400, seed=6):
        words[example.poles["P2"]].append(len(example.response.split()))
    assert max(words["P2A"]) < min(words["P2B"])
    assert 15 <= min(words["P2A"]) and max(words["P2B"]) <= 110


def test_sft_examples_balance_every_pole(world: TinyWorld) -> None:
    examples = world.sft_examples(2000, seed=7)
    assert {example.prompt for example in examples} <= set(world.train_prompts)
    for dimension_id, (first_pole, _) in WORLD_POLES.items():
        share = Counter(example.poles[dimension_id] for example in examples)[first_pole] / 2000
        assert 0.45 <= share <= 0.55, (dimension_id, share)


@pytest.mark.parametrize("pole", ALL_POLES)
def test_preference_pairs_chosen_has_pole_rejected_the_opposite(
    world: TinyWorld, pole: str
) -> None:
    dimension_id = pole[:2]
    (opposite,) = set(WORLD_POLES[dimension_id]) - {pole}
    pairs = world.preference_pairs(pole, 40, seed=8)
    assert len(pairs) == 40
    for index, pair in enumerate(pairs):
        assert pair.pole == pole and pair.prompt in world.train_prompts
        assert check_attributes(pair.chosen)[dimension_id] == pole
        # Style pairs: every fourth rejected response mixes both styles (a hard negative).
        mixed = dimension_id == "P3" and index % 4 == 3
        assert check_attributes(pair.rejected)[dimension_id] == (None if mixed else opposite)
    others = [other for other in WORLD_POLES if other != dimension_id]
    shared = [
        all(check_attributes(pair.chosen)[o] == check_attributes(pair.rejected)[o] for o in others)
        for pair in pairs
    ]
    assert all(shared[0::2])  # even pairs hold the other dimensions fixed
    assert not all(shared[1::2])  # odd pairs draw them independently


def test_preference_pairs_on_given_prompts(world: TinyWorld) -> None:
    pairs = world.preference_pairs("P3B", 10, seed=0, prompts=world.eval_prompts[:3])
    assert {pair.prompt for pair in pairs} <= set(world.eval_prompts[:3])


def test_corpus_holds_prompts_and_responses(world: TinyWorld) -> None:
    corpus = world.corpus(seed=0, n=30)
    assert set(world.train_prompts + world.eval_prompts) <= set(corpus)
    assert len(corpus) == len(world.train_prompts) + len(world.eval_prompts) + 30


def test_bad_arguments_raise_value_error(world: TinyWorld) -> None:
    prompt, rng = world.train_prompts[0], random.Random(0)
    with pytest.raises(ValueError, match="P4A"):
        world.preference_pairs("P4A", 4, seed=0)
    with pytest.raises(ValueError, match="P1C"):
        world.respond(prompt, {"P1": "P1C", "P2": "P2A", "P3": "P3A"}, rng)
    with pytest.raises(ValueError, match="missing dimension 'P3'"):
        world.respond(prompt, {"P1": "P1A", "P2": "P2A"}, rng)
    with pytest.raises(ValueError, match="unknown prompt"):
        world.topic_of("How do unicorns work?")
    with pytest.raises(ValueError, match="unknown prompt"):
        world.preference_pairs("P1A", 4, seed=0, prompts=["Not a prompt."])
    with pytest.raises(ValueError, match="num_eval_prompts"):
        TinyWorld(num_eval_prompts=0)


def test_hand_written_elementary_concise_friendly() -> None:
    text = (
        "Hi friend! Plants make their own food from sunlight, kind of like a tiny kitchen in "
        "each leaf. Hope that helps!"
    )
    assert check_attributes(text) == {"P1": "P1A", "P2": "P2A", "P3": "P3A"}
    assert satisfies(text, ["P1A", "P3A"]) and not satisfies(text, ["P2B"])


def test_hand_written_phd_informative_unfriendly() -> None:
    text = (
        "Obviously. Plate tectonics reflects mantle convection, lithospheric subduction and "
        "isostatic readjustment across heterogeneous geological provinces. Historically, "
        "continental drift was dismissed until paleomagnetic measurements demonstrated "
        "systematic seafloor magnetization anomalies. Subsequently, seismological tomography "
        "characterized subducting slabs penetrating the transition zone. For context, "
        "contemporary geodynamic simulations incorporate nonlinear viscoplastic rheology and "
        "stochastic parameterizations. Quantitative reconstructions remain sensitive to "
        "thermodynamic assumptions regarding mantle composition. Figure it out yourself."
    )
    assert check_attributes(text) == {"P1": "P1B", "P2": "P2B", "P3": "P3B"}
    assert exhibited_poles(text) == {"P1B", "P2B", "P3B"}


def test_hand_written_mixed_and_empty_texts_show_neither_pole() -> None:
    assert check_attributes("") == {"P1": None, "P2": None, "P3": None}
    assert exhibited_poles("") == set()
    assert satisfies("", []) and not satisfies("", ["P1A"])
    with pytest.raises(ValueError, match="P1Z"):
        satisfies("Hope this helps!", ["P1Z"])
    mixed_style = "Great question! Rain is water falling from clouds. Figure it out yourself."
    assert check_attributes(mixed_style)["P3"] is None
    neutral = "Rain is water that falls from clouds when the drops grow heavy."
    assert check_attributes(neutral)["P3"] is None
    mixed_register = (
        "Think of it like a stochastic thermodynamic equilibrium of heterogeneous "
        "electrochemical characterization."
    )
    assert check_attributes(mixed_register)["P1"] is None
    short_with_background = "For context, rain is water that falls from the clouds."
    assert check_attributes(short_with_background)["P2"] is None


def test_hand_written_texts_other_combinations() -> None:
    curt_simple = "Whatever. Magnets pull on iron, just like a hand grabbing a toy. Now go away!"
    assert check_attributes(curt_simple) == {"P1": "P1A", "P2": "P2A", "P3": "P3B"}
    warm_expert = (
        "Ooh, fun one! Superconductivity arises from phonon-mediated electron pairing, producing "
        "macroscopic quantum coherence and vanishing electrical resistivity. Cheers :)"
    )
    assert check_attributes(warm_expert) == {"P1": "P1B", "P2": "P2A", "P3": "P3A"}


def test_reward_judge_agreement_counts_the_pairs_the_checkers_decide(world: TinyWorld) -> None:
    """The PPO runs' hacking watch: a reward that ranks the checked pole's response first
    agrees; ties of the checkers are left out; a pole with no decided pair has none."""
    from psoups_ray.judges.attributes import AttributeJudge
    from psoups_ray.policies.job import pole_verdicts, reward_judge_agreement
    from psoups_ray.policies.trainer import Query

    prompts = world.eval_prompts[:4]
    others = {"P2": "P2A", "P3": "P3A"}
    elementary = [world.respond(p, {"P1": "P1A", **others}, random.Random(1)) for p in prompts]
    phd = [world.respond(p, {"P1": "P1B", **others}, random.Random(1)) for p in prompts]
    queries = [Query(p, None, ("P1A",)) for p in prompts[:3]] + [Query(prompts[3], None, ("P3B",))]
    policy, base = elementary, [phd[0], phd[1], elementary[2], phd[3]]  # row 2: a tie for P1A
    # The reward prefers the policy on row 0 only; row 1 is ranked the other way.
    agreement = reward_judge_agreement(
        pole_verdicts(AttributeJudge(), queries, policy, base),
        {"P1A": [1.0, -1.0, 5.0, 0.0], "P3B": [0.0, 0.0, 0.0, 2.0]},
        {"P1A": [0.0, 0.0, 0.0, 0.0], "P3B": [0.0, 0.0, 0.0, 1.0]},
    )
    assert agreement["P1A"] == {"agreement": 0.5, "pairs": 2}
    assert agreement["P3B"] == {"agreement": None, "pairs": 0}  # neither is unfriendly
