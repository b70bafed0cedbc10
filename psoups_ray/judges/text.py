"""Programmatic pairwise judges for real text: one numeric score per pole, no LLM.

:class:`TextJudge` scores each response on the scorer its pole names and compares the two
scores with a tie margin. Scores are oriented per pole, higher = better for that pole
(:meth:`TextJudge.score`). The scorers read surface statistics only: they never look at the
prompt and cannot tell whether a response is correct or relevant.

- ``expertise`` (P1A prefers lower, P1B higher): readability grade plus technical vocabulary,
  ``clip(mean(Coleman-Liau, ARI), 0, 20) + 20 * technical_share``. Coleman-Liau and the
  Automated Readability Index (textstat) estimate a US school grade from letters or characters
  per word and words per sentence; ``technical_share`` is the share of words of 8 or more
  letters outside an embedded list of everyday long words. Only character-based formulas are
  used: textstat's syllable counts (Flesch-Kincaid, SMOG, difficult words) need NLTK's cmudict,
  which textstat downloads on first use, impossible offline. Failure modes: a text of one or
  two sentences gets a noisy grade; lines without final punctuation are taken as sentences
  (lists, headings); short jargon and acronyms (ATP, DNA) do not count as technical, long plain
  words (``unfortunately``) can.
- ``informativeness`` (P2B prefers higher): ``distinct_content_words * trigram_ratio``, the
  number of distinct non-function words times the share of distinct word trigrams among all
  word trigrams (1 below three words). More material scores higher; repetition multiplies the
  score down (a paragraph pasted ten times keeps a tenth). Failure modes: it counts words, not
  facts: off-topic or wrong material counts as information, and lists of loose words score
  high.
- ``conciseness`` (P2A prefers higher): for a response that answers, at least
  :data:`MIN_CONTENT_WORDS` distinct content words, ``trigram_ratio / (1 + words / 50)`` in
  (0, 1]: shorter is better, repetition is penalised. Below that minimum the score is
  ``distinct_content_words / MIN_CONTENT_WORDS - 1`` in [-1, 0), below every answering
  response, so an empty, one-word or one-word-repeated response never wins. Failure modes: a
  short refusal or an off-topic sentence with four content words beats a real answer.
- ``style`` (P3A prefers higher, P3B lower): ``mean_sentence_compound + marker_balance``, in
  [-2, 2]. ``mean_sentence_compound`` is VADER's compound sentiment averaged over sentences
  (per sentence, because the compound of a whole paragraph saturates towards +-1);
  ``marker_balance = (friendly - rude) / (friendly + rude + 2)`` counts friendly markers
  (greetings, "happy to help", "hope this helps", humour words, warm emojis, any ``!``) and
  rude ones ("obviously", "whatever", insults, "google it", "not my problem", eye-roll emojis).
  Failure modes: sarcasm and polite condescension read as friendly; a neutral technical text
  with words VADER finds positive ("help", "good") reads as mildly friendly; markers are
  English phrases matched literally.

A response without a single word (empty, punctuation or emojis only) scores ``-inf`` for
every pole: it loses to any response with words, and two such responses tie.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any, NamedTuple

from psoups_ray.errors import PsoupsError
from psoups_ray.judges import PairToJudge, Verdict

INSTALL_HINT = "pip install 'psoups_ray[smollm2]'"
MIN_CONTENT_WORDS = 4
"""Distinct content words a response needs to count as answering (the ``conciseness`` floor)."""
CONCISE_WORDS = 50
"""Word count at which ``conciseness`` halves (before the repetition penalty)."""
TECHNICAL_WORD_LETTERS = 8
"""A word of at least this many letters, outside the everyday list, counts as technical."""
MAX_GRADE = 20.0
TECHNICAL_WEIGHT = 20.0


class PoleRule(NamedTuple):
    """Which scorer decides a pole, and in which direction."""

    scorer: str
    higher_is_better: bool


@dataclass(frozen=True)
class TieMargin:
    """Two scores tie when ``|a - b| <= max(absolute, relative * max(|a|, |b|))``."""

    absolute: float = 0.0
    relative: float = 0.0

    def ties(self, first: float, second: float) -> bool:
        scale = max(abs(first), abs(second))
        return abs(first - second) <= max(self.absolute, self.relative * scale)


SCORERS: tuple[str, ...] = ("expertise", "informativeness", "conciseness", "style")
DEFAULT_POLE_RULES: dict[str, PoleRule] = {
    "P1A": PoleRule("expertise", higher_is_better=False),
    "P1B": PoleRule("expertise", higher_is_better=True),
    "P2A": PoleRule("conciseness", higher_is_better=True),
    "P2B": PoleRule("informativeness", higher_is_better=True),
    "P3A": PoleRule("style", higher_is_better=True),
    "P3B": PoleRule("style", higher_is_better=False),
}
"""The paper's six poles (:data:`~psoups_ray.preferences.PAPER_DIMENSIONS`)."""
DEFAULT_MARGINS: dict[str, TieMargin] = {
    "expertise": TieMargin(absolute=1.0),  # one school grade
    "informativeness": TieMargin(relative=0.1),
    "conciseness": TieMargin(relative=0.05),  # about 0.05 * (50 + words) words: 4 at 40
    "style": TieMargin(absolute=0.1),
}

_WORD = re.compile(r"[^\W\d_]+(?:['\u2019][^\W\d_]+)*")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")
_MARKDOWN = re.compile(r"[*#`_>|]+|^\s*(?:[-+]|\d+[.)])\s+", re.MULTILINE)

_STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
    also get gets got let lets like make makes made may might must one ones really thing things
    way well yes yeah ok okay oh im i'm it's don't doesn't didn't can't won't isn't aren't
    you're you've we're they're that's there's here's let's i've i'll you'll""".split()
)
_EVERYDAY_LONG_WORDS = frozenset(
    """absolutely actually adventure airplane almost although anything anywhere attention
    backyard basically bathroom beautiful bedroom birthday brothers building business
    calendar carefully certainly children chocolate classroom clothes comfortable computer
    continue cucumber daughter delicious different dinosaur discover distance
    electric elephant everybody everyone everything everywhere exciting exercise favorite
    favourite football friendly friendship function generally grandmother grandfather
    happened happening homework hospital hundreds husband important including instance
    interest interesting internet invisible kitchen language learning listening medicine
    minutes mistakes morning mountain neighbor neighbour notebook nothing numbers obviously
    ourselves painting paragraph particular patience pictures planning playground pleasure
    possible practice probably problems question questions rainbow reading remember
    restaurant sandwich schedule scientist scientists shopping sentence something sometimes
    somewhere special standing starting straight strawberry strength students suddenly
    sunlight sunshine supposed surprise swimming teachers telephone thinking thousand
    together tomorrow treasure understand usually vacation vegetable vegetables weekend
    whatever whenever wherever yourself yesterday""".split()
)
_SUFFIXES = ("s", "es", "ed", "d", "ing", "ly")

_FRIENDLY_PHRASES = (
    "hello", "hi", "hey", "hey there", "happy to help", "glad to help", "glad you asked",
    "great question", "good question", "love this question", "hope this helps",
    "hope that helps", "you've got this", "you got this", "don't worry", "no worries",
    "friend", "buddy", "pal", "fun", "funny", "joke", "haha", "hehe", "lol", "pun",
    "laugh", "silly", "hilarious", "imagine", "awesome", "cheers", "enjoy", "thanks",
    "thank you", "please", "good luck", "have fun", "high five", "fingers crossed", "wink",
)  # fmt: skip
_RUDE_PHRASES = (
    "obviously", "whatever", "duh", "stupid", "idiot", "idiotic", "dumb", "moron",
    "clueless", "lazy", "ridiculous", "pathetic", "useless", "annoying", "ugh", "ignorant",
    "nonsense", "hopeless", "waste of time", "waste of my time", "who cares", "i don't care",
    "not my problem", "not my job", "figure it out", "google it", "look it up",
    "deal with it", "get over it", "stop asking", "stop whining", "leave me alone",
    "shut up", "everyone knows", "even a child", "not rocket science",
    "how hard can it be", "do it yourself", "if you must know", "next question",
    "bother me", "can't be bothered", "nobody cares", "no one cares", "get lost", "go away",
    "grow up", "you should already know", "boring question",
)  # fmt: skip
_FRIENDLY_EMOJIS = "😊😄😀😁😂🤣😉🙂😃😆🥳🎉👍❤💪🌟✨🙌🤗😎🍕🌈"
_RUDE_EMOJIS = "🙄😒😤😠😡🤦🖕💩😑"


def _phrase_pattern(phrases: Sequence[str]) -> re.Pattern[str]:
    """One regex matching any phrase as whole words, longest first (``my friend`` once)."""
    alternatives = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
    return re.compile(rf"(?<![\w'])(?:{alternatives})(?![\w'])")


_FRIENDLY = _phrase_pattern(_FRIENDLY_PHRASES)
_RUDE = _phrase_pattern(_RUDE_PHRASES)


# --- text statistics (pure Python) ---------------------------------------------------------------


def words(text: str) -> list[str]:
    """Lowercased words: runs of letters (any script), with inner apostrophes."""
    return [word.replace("\u2019", "'") for word in _WORD.findall(text.lower())]


def content_words(tokens: Sequence[str]) -> list[str]:
    return [word for word in tokens if word not in _STOPWORDS]


def trigram_ratio(tokens: Sequence[str]) -> float:
    """Distinct word trigrams / all word trigrams: 1 for text without repetition, ~0 for a
    loop; 1 below three words."""
    trigrams = list(zip(tokens, tokens[1:], tokens[2:], strict=False))
    return len(set(trigrams)) / len(trigrams) if trigrams else 1.0


def technical_share(tokens: Sequence[str]) -> float:
    """Share of words of :data:`TECHNICAL_WORD_LETTERS`+ letters that are not everyday words."""
    if not tokens:
        return 0.0
    technical = sum(
        len(word) >= TECHNICAL_WORD_LETTERS and not _is_everyday(word) for word in tokens
    )
    return technical / len(tokens)


def _is_everyday(word: str) -> bool:
    if word in _EVERYDAY_LONG_WORDS:
        return True
    return any(
        word.endswith(suffix) and word[: -len(suffix)] in _EVERYDAY_LONG_WORDS
        for suffix in _SUFFIXES
    )


def prose(text: str) -> str:
    """Markdown marks and list bullets removed, every line ending as a sentence."""
    lines = (_MARKDOWN.sub(" ", line).strip() for line in text.splitlines())
    return " ".join(line if line[-1] in ".!?" else f"{line}." for line in lines if line)


def informativeness(text: str) -> float:
    """``distinct_content_words * trigram_ratio`` (see the module docstring)."""
    tokens = words(text)
    return len(set(content_words(tokens))) * trigram_ratio(tokens)


def conciseness(text: str) -> float:
    """Shorter is better among answering responses; see the module docstring."""
    tokens = words(text)
    distinct = len(set(content_words(tokens)))
    if distinct < MIN_CONTENT_WORDS:
        return distinct / MIN_CONTENT_WORDS - 1.0
    return trigram_ratio(tokens) / (1.0 + len(tokens) / CONCISE_WORDS)


def marker_balance(text: str) -> float:
    """``(friendly - rude) / (friendly + rude + 2)`` over the embedded marker lists, in (-1, 1)."""
    lowered = text.lower().replace("\u2019", "'")
    friendly = len(_FRIENDLY.findall(lowered)) + int("!" in text)
    friendly += sum(text.count(emoji) for emoji in _FRIENDLY_EMOJIS)
    rude = len(_RUDE.findall(lowered)) + sum(text.count(emoji) for emoji in _RUDE_EMOJIS)
    return (friendly - rude) / (friendly + rude + 2)


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PsoupsError(
            f"the text judges need the packages textstat and vaderSentiment, and {module!r} "
            f"cannot be imported ({exc}); install them with: {INSTALL_HINT}"
        ) from None


def text_judge_problems(key: str) -> list[str]:
    """What is missing to build a :class:`TextJudge` (checked before any stage runs)."""
    missing = [
        module
        for module in ("textstat", "vaderSentiment")
        if importlib.util.find_spec(module) is None
    ]
    if not missing:
        return []
    return [
        f"{key}: the text judges need {' and '.join(missing)}, which are not installed; "
        f"install them with: {INSTALL_HINT}"
    ]


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


# --- the judge ------------------------------------------------------------------------------------


class TextJudge:
    """Judges real text per pole with the programmatic scorers of this module.

    ``pole_rules`` maps pole ids to :class:`PoleRule` (default: the paper's six poles);
    ``margins`` overrides :data:`DEFAULT_MARGINS` per scorer. Needs ``textstat`` and
    ``vaderSentiment`` (``pip install 'psoups_ray[smollm2]'``).
    """

    def __init__(
        self,
        pole_rules: Mapping[str, PoleRule] | None = None,
        margins: Mapping[str, TieMargin] | None = None,
    ) -> None:
        self.pole_rules = dict(DEFAULT_POLE_RULES if pole_rules is None else pole_rules)
        self.margins = {**DEFAULT_MARGINS, **(margins or {})}
        problems = [
            f"pole {pole!r}: unknown scorer {rule.scorer!r}"
            for pole, rule in self.pole_rules.items()
            if rule.scorer not in SCORERS
        ]
        problems += [
            f"margins: unknown scorer {name!r}" for name in self.margins if name not in SCORERS
        ]
        if problems:
            raise PsoupsError(f"text judge: {'; '.join(problems)} (scorers: {', '.join(SCORERS)})")
        self._textstat = _require("textstat")
        self._sentiment = _require("vaderSentiment.vaderSentiment").SentimentIntensityAnalyzer()
        self.judged = 0

    def raw_score(self, scorer: str, text: str) -> float:
        """The scorer's value, not oriented by any pole (see the module docstring)."""
        if scorer == "expertise":
            return self._expertise(text)
        if scorer == "informativeness":
            return informativeness(text)
        if scorer == "conciseness":
            return conciseness(text)
        if scorer == "style":
            return self._style(text)
        raise PsoupsError(f"unknown scorer {scorer!r}; scorers: {', '.join(SCORERS)}")

    def score(self, pole: str, text: str) -> float:
        """How well ``text`` satisfies ``pole``, higher = better; ``-inf`` without a word."""
        rule = self._rule(pole)
        if not words(text):
            return -math.inf
        raw = self.raw_score(rule.scorer, text)
        return raw if rule.higher_is_better else -raw

    def compare(self, pole: str, prompt: str, a: str, b: str) -> Verdict:
        """The response with the better :meth:`score`, ``"tie"`` within the scorer's margin."""
        margin = self.margins[self._rule(pole).scorer]
        self.judged += 1
        score_a, score_b = self.score(pole, a), self.score(pole, b)
        if score_a == score_b:
            return "tie"
        if math.isfinite(score_a) and math.isfinite(score_b) and margin.ties(score_a, score_b):
            return "tie"
        return "a" if score_a > score_b else "b"

    def compare_batch(self, pole: str, pairs: Sequence[PairToJudge]) -> list[Verdict]:
        return [self.compare(pole, pair.prompt, pair.a, pair.b) for pair in pairs]

    def describe(self) -> dict[str, Any]:
        return {
            "type": "text",
            "poles": {
                pole: {
                    "scorer": rule.scorer,
                    "prefers": "higher" if rule.higher_is_better else "lower",
                }
                for pole, rule in self.pole_rules.items()
            },
            "margins": {name: asdict(margin) for name, margin in self.margins.items()},
            "packages": {name: _version(name) for name in ("textstat", "vaderSentiment")},
            "judged": self.judged,
        }

    def close(self) -> None:
        pass

    def _rule(self, pole: str) -> PoleRule:
        rule = self.pole_rules.get(pole)
        if rule is None:
            raise PsoupsError(
                f"text judge: no scorer for pole {pole!r}; "
                f"known poles: {', '.join(self.pole_rules)}"
            )
        return rule

    def _expertise(self, text: str) -> float:
        """``clip(mean(Coleman-Liau, ARI), 0, 20) + 20 * technical_share``."""
        readable = prose(text)
        grades = (
            self._textstat.coleman_liau_index(readable),
            self._textstat.automated_readability_index(readable),
        )
        grade = min(max(sum(grades) / len(grades), 0.0), MAX_GRADE)
        return grade + TECHNICAL_WEIGHT * technical_share(words(text))

    def _style(self, text: str) -> float:
        """``mean_sentence_compound + marker_balance``."""
        sentences = [part for part in _SENTENCE_BREAK.split(text) if part.strip()]
        compounds = [self._sentiment.polarity_scores(part)["compound"] for part in sentences]
        mean_compound = sum(compounds) / len(compounds) if compounds else 0.0
        return mean_compound + marker_balance(text)
