"""The programmatic text judges: each pole's judge picks the right one of hand-written pairs."""

from __future__ import annotations

import itertools
import json
import math
import sys

import pytest

from psoups_ray.data import load_prompts
from psoups_ray.errors import PsoupsError
from psoups_ray.judges import VERDICTS, PairToJudge
from psoups_ray.judges.text import (
    DEFAULT_POLE_RULES,
    PoleRule,
    TextJudge,
    TieMargin,
    conciseness,
    informativeness,
    trigram_ratio,
    words,
)

pytest.importorskip("textstat", reason="needs the [smollm2] extra")
pytest.importorskip("vaderSentiment.vaderSentiment", reason="needs the [smollm2] extra")

PROMPT = "How do plants make food?"
POLES = tuple(DEFAULT_POLE_RULES)

ELEMENTARY = (
    "Plants are like little chefs. They take in sunlight, water and air. "
    "Then they mix them together to make their own food. That food helps them grow big."
)
PHD = (
    "Photosynthesis couples the light-dependent reactions in the thylakoid membranes, where "
    "photosystem II oxidizes water and drives electron transport to regenerate ATP and NADPH, "
    "with carboxylation of ribulose bisphosphate by Rubisco in the Calvin-Benson cycle, whose "
    "stoichiometry is constrained by photorespiratory losses."
)
CONCISE = (
    "Plants use sunlight to turn water and carbon dioxide into sugar, releasing oxygen. "
    "The sugar feeds the plant."
)
DETAILED = (
    "Plants make food through photosynthesis, which happens mostly in their leaves. Tiny "
    "pores called stomata let carbon dioxide in from the air, while roots pull water up "
    "through the stem. Inside leaf cells, green chloroplasts hold chlorophyll, a pigment that "
    "absorbs red and blue light. That captured energy splits water molecules, releasing "
    "oxygen as a by-product, and powers a cycle of reactions that builds glucose from carbon "
    "dioxide. The plant burns some glucose for energy right away, stores extra as starch in "
    "roots or seeds, and uses the rest to build cellulose for new cell walls. Because animals "
    "eat plants, nearly every food chain on Earth starts with this process."
)
FRIENDLY = (
    "Great question, my friend! Plants are basically tiny solar-powered chefs 😊 They soak "
    "up sunshine, sip some water, and whip up sugar for lunch. Hope this helps, and enjoy "
    "your next salad!"
)
RUDE = (
    "Obviously plants make food from sunlight. Everyone knows that. Look it up next time "
    "instead of wasting my time with such a stupid question."
)

BUDGET_ELEMENTARY = (
    "A budget is a plan for your money. You write down what you get and what you spend. "
    "Then you can save a little for fun things later."
)
BUDGET_PHD = (
    "Households optimizing intertemporal consumption under liquidity constraints exhibit "
    "hyperbolic discounting, so precommitment mechanisms and mental accounting heuristics "
    "systematically outperform unconstrained discretionary allocation."
)
BUDGET_FRIENDLY = (
    "Hey there! Budgeting sounds scary, but it is honestly fun, like a treasure map for "
    "your money. Write down what comes in and what goes out, and you've got this!"
)
BUDGET_RUDE = (
    "Whatever. Write down what you spend and stop whining. It's not rocket science, so "
    "figure it out yourself."
)

# (pole, the response that must win, the one that must lose)
WINS = [
    ("P1A", ELEMENTARY, PHD),
    ("P1B", PHD, ELEMENTARY),
    ("P1A", BUDGET_ELEMENTARY, BUDGET_PHD),
    ("P1B", BUDGET_PHD, BUDGET_ELEMENTARY),
    ("P2A", CONCISE, DETAILED),
    ("P2B", DETAILED, CONCISE),
    ("P3A", FRIENDLY, RUDE),
    ("P3B", RUDE, FRIENDLY),
    ("P3A", BUDGET_FRIENDLY, BUDGET_RUDE),
    ("P3B", BUDGET_RUDE, BUDGET_FRIENDLY),
]
WIN_IDS = [f"{pole}-{index}" for index, (pole, _, _) in enumerate(WINS)]

VARIED_LONG = " ".join(load_prompts("train"))  # ~3,000 words without repetition
DEGENERATE = {
    "empty": "",
    "whitespace": "  \n\t  ",
    "one word": "Sunlight.",
    "one word x200": "banana " * 200,
    "punctuation": "?!... ,,, --- ***",
    "emoji only": "😊🎉👍🌱",
    "answer pasted x50": " ".join([CONCISE] * 50),
}

ODD = {
    "varied 3,000 words": VARIED_LONG,
    "cyrillic and emoji": "Привет! Фотосинтез — это процесс 🌱",
    "one 20,000-letter word": "x" * 20_000,
}
ANSWERS = {"elementary": ELEMENTARY, "phd": PHD, "detailed": DETAILED, "rude": RUDE}


@pytest.fixture(scope="module")
def judge():
    return TextJudge()


@pytest.mark.parametrize(("pole", "winner", "loser"), WINS, ids=WIN_IDS)
def test_each_pole_picks_the_right_response(judge, pole, winner, loser):
    assert judge.compare(pole, PROMPT, winner, loser) == "a"
    assert judge.compare(pole, PROMPT, loser, winner) == "b"
    assert judge.score(pole, winner) > judge.score(pole, loser)


@pytest.mark.parametrize("pole", POLES)
@pytest.mark.parametrize("name", [*ANSWERS, *DEGENERATE])
def test_identical_responses_tie(judge, pole, name):
    text = {**ANSWERS, **DEGENERATE}[name]
    assert judge.compare(pole, PROMPT, text, text) == "tie"


def test_near_equal_responses_tie_within_the_margin(judge):
    """A closing sentence that adds no content moves no pole past its margin."""
    extended = DETAILED + " That is all."
    for pole in POLES:
        assert judge.compare(pole, PROMPT, DETAILED, extended) == "tie", pole


def test_scores_are_oriented_per_pole(judge):
    for first, second in (("P1A", "P1B"), ("P3A", "P3B")):
        assert judge.score(first, PHD) == -judge.score(second, PHD)
    assert judge.raw_score("informativeness", DETAILED) == judge.score("P2B", DETAILED)


@pytest.mark.parametrize("name", DEGENERATE)
@pytest.mark.parametrize("pole", ["P2A", "P2B"])
def test_degenerate_text_never_wins_informativeness(judge, name, pole):
    degenerate = DEGENERATE[name]
    for answer in (CONCISE, DETAILED):
        assert judge.compare(pole, PROMPT, degenerate, answer) == "b"
        assert judge.compare(pole, PROMPT, answer, degenerate) == "a"


@pytest.mark.parametrize("pole", POLES)
@pytest.mark.parametrize("name", [*DEGENERATE, *ODD])
def test_odd_inputs_never_raise(judge, pole, name):
    text = {**DEGENERATE, **ODD}[name]
    score = judge.score(pole, text)
    assert not math.isnan(score) and score != math.inf
    assert judge.compare(pole, PROMPT, text, CONCISE) in VERDICTS


def test_wordless_responses_lose_every_pole(judge):
    for pole in POLES:
        assert judge.score(pole, "?!") == -math.inf
        assert judge.compare(pole, PROMPT, "🎉", ELEMENTARY) == "b"
        assert judge.compare(pole, PROMPT, "", "...") == "tie"


def test_a_very_long_varied_text_is_informative_not_concise(judge):
    assert judge.compare("P2B", PROMPT, VARIED_LONG, DETAILED) == "a"
    assert judge.compare("P2A", PROMPT, VARIED_LONG, CONCISE) == "b"


def test_repetition_is_penalised():
    repeated = " ".join([DETAILED] * 10)
    assert trigram_ratio(words(DETAILED)) == 1.0
    assert trigram_ratio(words(repeated)) < 0.15
    assert informativeness(repeated) < 0.15 * informativeness(DETAILED)
    assert conciseness(repeated) < conciseness(DETAILED)


def test_compare_batch_equals_compare(judge):
    texts = [ELEMENTARY, PHD, CONCISE, DETAILED, FRIENDLY, RUDE, "", "banana " * 200]
    pairs = [PairToJudge(PROMPT, a, b) for a, b in itertools.permutations(texts, 2)]
    for pole in POLES:
        expected = [judge.compare(pole, pair.prompt, pair.a, pair.b) for pair in pairs]
        assert judge.compare_batch(pole, pairs) == expected


def test_describe_is_json_and_names_scorers_and_margins(judge):
    described = json.loads(json.dumps(judge.describe()))
    assert described["type"] == "text"
    assert described["poles"]["P1A"] == {"scorer": "expertise", "prefers": "lower"}
    assert described["poles"]["P2A"] == {"scorer": "conciseness", "prefers": "higher"}
    assert set(described["margins"]) == {"expertise", "informativeness", "conciseness", "style"}
    assert described["margins"]["expertise"] == {"absolute": 1.0, "relative": 0.0}
    assert set(described["packages"]) == {"textstat", "vaderSentiment"}


def test_margins_and_pole_rules_are_configurable():
    judge = TextJudge(
        pole_rules={"plain": PoleRule("expertise", higher_is_better=False)},
        margins={"expertise": TieMargin(absolute=100.0)},
    )
    assert judge.compare("plain", PROMPT, ELEMENTARY, PHD) == "tie"
    assert (
        TextJudge(pole_rules={"plain": PoleRule("expertise", False)}).compare(
            "plain", PROMPT, ELEMENTARY, PHD
        )
        == "a"
    )


def test_tie_margin_takes_the_larger_of_absolute_and_relative():
    margin = TieMargin(absolute=1.0, relative=0.1)
    assert margin.ties(10.0, 11.0)
    assert not margin.ties(10.0, 11.5)
    assert margin.ties(100.0, 109.0)
    assert not margin.ties(100.0, 112.0)


def test_unknown_pole_and_scorer_are_clear_errors(judge):
    with pytest.raises(PsoupsError, match="no scorer for pole 'P9Z'; known poles: P1A"):
        judge.compare("P9Z", PROMPT, "a", "b")
    with pytest.raises(PsoupsError, match="unknown scorer 'length'"):
        TextJudge(margins={"length": TieMargin()})
    with pytest.raises(PsoupsError, match="pole 'P1A': unknown scorer 'grade'"):
        TextJudge(pole_rules={"P1A": PoleRule("grade", True)})


@pytest.mark.parametrize("module", ["textstat", "vaderSentiment.vaderSentiment"])
def test_missing_package_names_the_install_command(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(PsoupsError, match=r"pip install 'psoups_ray\[smollm2\]'"):
        TextJudge()
