import pytest

from psoups_ray.preferences import (
    Combination,
    CombinationError,
    DimensionSpec,
    PoleSpec,
    PreferenceSpace,
    PreferenceSpaceSpec,
)


@pytest.fixture
def space() -> PreferenceSpace:
    return PreferenceSpace.default()


def test_default_space_is_the_papers(space):
    assert [d.name for d in space.dimensions] == ["expertise", "informativeness", "style"]
    assert space.pole_ids == ["P1A", "P1B", "P2A", "P2B", "P3A", "P3B"]
    assert space.pole("P1A").prompt == (
        "Generate a response that can be easily understood by an elementary school student."
    )
    assert space.pole("P3B").prompt == "Generate a response in an unfriendly manner."


def test_parse_canonicalises_order_case_and_spaces(space):
    assert space.parse("P3A+P1A+P2B") == Combination(("P1A", "P2B", "P3A"))
    assert space.parse(" p2b + P1a ") == Combination(("P1A", "P2B"))
    assert str(space.parse("P3B+P1B")) == "P1B+P3B"
    assert space.parse("P1A+P2B") == space.combination(["P2B", "P1A"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("P1A+P1B", "both belong to dimension 'P1'"),
        ("P1A+P9Z", "unknown pole 'P9Z'; known poles: P1A, P1B"),
        ("P1A+P1A", "appears twice"),
        ("", "empty combination"),
        ("P1A++P2B", "empty pole"),
        ("+", "empty pole"),
    ],
)
def test_parse_rejects_bad_combinations(space, text, message):
    with pytest.raises(CombinationError, match=message.replace("+", r"\+")):
        space.parse(text)


def test_full_combinations_are_the_eight_of_the_paper(space):
    combos = [str(c) for c in space.full_combinations()]
    assert len(combos) == 8
    assert combos[0] == "P1A+P2A+P3A" and combos[-1] == "P1B+P2B+P3B"


def test_preference_prompt_joins_in_canonical_order(space):
    prompt = space.preference_prompt(space.parse("P3A+P1B"))
    assert prompt.startswith("Generate a response that only a PhD")
    assert prompt.endswith("like a close friend.")


def test_opposite_poles(space):
    assert space.opposite_poles("P2A") == ["P2B"]


def test_user_declared_space_with_three_poles():
    spec = PreferenceSpaceSpec(
        dimensions=[
            DimensionSpec(
                id="tone",
                name="tone",
                poles=[
                    PoleSpec(id="formal", name="formal", prompt="Be formal."),
                    PoleSpec(id="casual", name="casual", prompt="Be casual."),
                    PoleSpec(id="sassy", name="sassy", prompt="Be sassy."),
                ],
            ),
            DimensionSpec(
                id="len",
                name="length",
                poles=[
                    PoleSpec(id="short", name="short", prompt="Be short."),
                    PoleSpec(id="long", name="long", prompt="Be long."),
                ],
            ),
        ],
        combinations=["long+sassy"],
    )
    space = PreferenceSpace.from_spec(spec)
    assert str(space.parse("long+sassy")) == "sassy+long"
    assert len(space.full_combinations()) == 6


def test_duplicate_pole_ids_rejected():
    with pytest.raises(ValueError, match="declared twice"):
        PreferenceSpaceSpec(
            dimensions=[
                DimensionSpec(
                    id="D1",
                    name="a",
                    poles=[
                        PoleSpec(id="X", name="x", prompt="x"),
                        PoleSpec(id="Y", name="y", prompt="y"),
                    ],
                ),
                DimensionSpec(
                    id="D2",
                    name="b",
                    poles=[
                        PoleSpec(id="X", name="x", prompt="x"),
                        PoleSpec(id="Z", name="z", prompt="z"),
                    ],
                ),
            ]
        )
