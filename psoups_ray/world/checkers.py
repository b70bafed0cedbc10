"""Attribute checkers: which pole of each tiny-world dimension a text exhibits.

The checkers are an exact, judge-free metric next to the reward models. They are written
from general lexicons and text statistics, not from the generator's templates, and they decide
from the whole text: a text that carries markers of both poles of a dimension (the typical
degenerate output of a policy over-optimised without a KL term) exhibits neither.

All three share one analysis of the text (:func:`_analyse`): it is split into sentences, the
style markers of P3 are found and cut out, and what remains of a sentence counts as *content*
when at least :data:`MIN_CONTENT_WORDS` words are left. P1 and P2 look only at content, so
"Hope this helps!" neither lengthens a concise answer nor dilutes jargon.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from psoups_ray.world.generator import WORLD_POLES

__all__ = ["check_attributes", "exhibited_poles", "satisfies"]

_KNOWN_POLES = frozenset(pole for poles in WORLD_POLES.values() for pole in poles)

MIN_CONTENT_WORDS = 4
"""A sentence with fewer words once style markers are cut out is not content."""

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|(?<=:\))\s+|\n+")

# --- P3: style markers ---------------------------------------------------------------------------
_FRIENDLY = re.compile(
    r"\b(?:great|good|fun|fantastic|wonderful|lovely) question\b|\bgood one\b|\blove this\b"
    r"|\bhope (?:this|that|it) helps?\b|\bfriends?\b|\bbuddy\b|\bpal\b|\bhappy to help\b"
    r"|\bglad (?:to help|you asked)\b|\bhave fun\b|\bstay curious\b|\bcheers\b|\bpretty cool\b"
    r"|\bwho knew\b|\bhow cool is that\b|\bso cool\b|\bno worries\b|\benjoy\b|\bawesome\b"
    r"|\bha(?:ha)+\b|\blol\b"
    r"|\bthanks for asking\b|\bkeep asking\b|\byou've got this\b|\bhugs?\b|\bhi there\b"
    r"|\bfun fact\b|\bno pun intended\b|\bhave an? (?:nice|great|good|lovely) day\b"
    r"|:-?\)|:-?d\b|;-?\)|<3|[\U0001F600-\U0001F60D\U0001F642\U0001F917]"
)
_UNFRIENDLY = re.compile(
    r"\bobviously\b|\bfigure it out\b|\bwhatever\b|\bwaste (?:of )?my time\b|\bugh+\b"
    r"|\bseriously\b|\bbasic stuff\b|\blisten up\b|\blook it up\b|\bstop asking\b"
    r"|\bdon't ask me\b|\bpay attention\b|\btry to keep up\b|\bnot that you care\b"
    r"|\bnot my problem\b|\bshouldn't have to\b|\bas anyone knows\b|\bduh\b|\bgo away\b"
    r"|\bleave me alone\b|\bhow hard can it be\b|\bstupid\b|\bdumb\b|\bidiot\w*\b|\bannoying\b"
    r"|\bi don't care\b|\bclearly you\b|\bbugging me\b|:-?\(|-_-|\U0001F644"
)

# --- P2: background cues ----------------------------------------------------------------------
_BACKGROUND = re.compile(
    r"\bfor context\b|\bsome (?:more )?background\b|\bas background\b|\bbackground:"
    r"|\bhistorically\b|\bit (?:also )?helps to know\b|\bworth (?:knowing|noting)\b"
    r"|\bin the past,|\ba bit of history\b|\bfor reference\b|\bto give (?:some )?context\b"
    r"|\bto understand (?:this|why)\b|\bkeep in mind\b"
)

# --- P1: register -----------------------------------------------------------------------------
LONG_WORD = 9
"""Letters from which a word counts as long."""
_ANALOGY = re.compile(
    r"\bthink of (?:it|them|this|that) (?:like|as)\b|\b(?:kind|sort) of like\b"
    r"|\ba (?:little )?bit like\b|\bjust like\b|\bimagine\b|\bpretend\b|\bit'?s like\b"
    r"|\bit is like\b|\blike a (?:tiny|little|big|giant|huge)\b"
)
_JARGON_SUFFIX = re.compile(
    r"(?:ization|isation|ological|ologies|ology|ometric|ometry|ographic|istic|istically"
    r"|ically|ivity|ational|aneous|escence|iferous|tropic|genesis|genetic|lytic|morphic"
    r"|dynamic|dynamics|ification|ability|ibility|ity|ential|ular|ive|ion|ions|al|ic|ics"
    r"|ous|ously|ism|sis|yses|theses)$"
)
_JARGON_WORDS = frozenset(
    "stochastic heterogeneous homogeneous thermodynamic equilibrium equilibria nonlinear "
    "entropy enthalpy kinetics kinetic lattice lattices flux fluxes isotropic anisotropic "
    "manifold spectral quantum photon eigenvalue asymptotic canonical orthogonal covariance "
    "variance inference posterior bayesian ontology epistemic heuristic paradigm empirical "
    "empirically mechanistic multiscale phenomenology phenomenological quantitative "
    "qualitative parameterization parameterizations stationary nonstationary deterministic "
    "probabilistic formalism formalized formally heterogeneity homeostasis homeostatic "
    "metabolism metabolic physiological morphology catalytic enzymatic polymer polymerization "
    "oxidation redox ionic electrochemical ferromagnetic relativistic spacetime accretion "
    "perturbation perturbations perturbative dissipation oscillation oscillations oscillatory "
    "propagation conductance impedance attenuation modulation substrate synaptic plasticity "
    "neural microstructure macroscopic microscopic dimensionless regime observables "
    "methodological instrumentation characterization conceptualized manifestation "
    "consequently subsequently fundamentally predominantly mechanistically parsimoniously "
    "parsimonious observable theoretical hypothesis hypotheses photosynthesis chlorophyll "
    "electron molecule molecular protein enzyme nucleus neuron isotope catalyst mediated "
    "synthesis transduction receptor ligand genotype phenotype allele wavelength "
    "infrastructure architecture algorithm algorithmic semiconductor".split()
)
_COMMON_LONG_WORDS = frozenset(
    "important different something everything sometimes everyone beautiful interesting "
    "especially basically understand understood together yesterday wonderful everywhere "
    "themselves ourselves somewhere afternoon remember certainly favourite favorite "
    "delicious chocolate strawberry breakfast grandmother grandfather playground classroom "
    "butterflies butterfly snowballs snowball dinosaurs dinosaur fantastic information "
    "imagination invitation electric electricity question questions direction attention "
    "television conversation collection competition connection celebration explanation "
    "vacation community curiosity dangerous delicious fabulous marvelous ridiculous "
    "mysterious practical traditional additional professional creative expensive "
    "adventurous".split()
)


@dataclass(frozen=True)
class _Analysis:
    """What the three rules look at, computed once per text."""

    friendly: int  # friendly markers, plus "!" sentences without an unfriendly marker
    unfriendly: int  # unfriendly markers
    content_sentences: int  # sentences with >= MIN_CONTENT_WORDS words besides style markers
    content_words: list[str]  # the words of those sentences, markers cut out, lower case
    background_cues: int  # background cue phrases anywhere in the text
    analogies: int  # analogy cue phrases in the content


def _analyse(text: str) -> _Analysis:
    """Split ``text`` into sentences, count style markers and cut them out to find content."""
    friendly = unfriendly = analogies = 0
    content_sentences = 0
    content_words: list[str] = []
    for sentence in _SENTENCE_BREAK.split(text.strip().lower()):
        if not sentence:
            continue
        friendly_hits = len(_FRIENDLY.findall(sentence))
        unfriendly_hits = len(_UNFRIENDLY.findall(sentence))
        if "!" in sentence and unfriendly_hits == 0:
            friendly_hits += 1
        friendly += friendly_hits
        unfriendly += unfriendly_hits
        stripped = _UNFRIENDLY.sub(" ", _FRIENDLY.sub(" ", sentence))
        words = _WORD.findall(stripped)
        if len(words) >= MIN_CONTENT_WORDS:
            content_sentences += 1
            content_words.extend(words)
            analogies += len(_ANALOGY.findall(stripped))
    return _Analysis(
        friendly=friendly,
        unfriendly=unfriendly,
        content_sentences=content_sentences,
        content_words=content_words,
        background_cues=len(_BACKGROUND.findall(text.lower())),
        analogies=analogies,
    )


def _is_jargon(word: str) -> bool:
    if word in _JARGON_WORDS or word.removesuffix("s") in _JARGON_WORDS:
        return True
    return (
        len(word) >= LONG_WORD
        and word not in _COMMON_LONG_WORDS
        and _JARGON_SUFFIX.search(word) is not None
    )


def _expertise(analysis: _Analysis) -> str | None:
    """P1: elementary (P1A) vs PhD (P1B), from the content words.

    Rule: let ``long`` be the share of words with >= 9 letters and ``jargon`` the share of
    words in a technical lexicon or long (>= 9 letters) with a latinate suffix (-ization, -ion,
    -ity, -al, -ic, -ous, ...) and not in a list of common long words.
    P1B when jargon >= 10 %, at least two jargon words, long >= 20 % and no analogy cue
    ("think of it like", "kind of like", "imagine", ...). P1A when long <= 12 %, jargon <= 4 %
    (at most one jargon word) and either an analogy cue or a mean word length <= 4.3 letters.
    Anything in between, including analogies inside dense jargon, is neither.

    Failure modes: a short plain text naming one long subject twice ("Thunderstorms ...
    thunderstorms") can exceed 12 % long words and read as neither; technical prose written
    in short Germanic words (e.g. much of computer science) is not recognised as P1B; a plain
    text without an analogy and with slightly long words is neither; hyphenated compounds
    ("proton-proton") count as their parts, so jargon built from short parts is diluted.
    """
    words = analysis.content_words
    if not words:
        return None
    long_share = sum(len(word) >= LONG_WORD for word in words) / len(words)
    jargon = sum(_is_jargon(word) for word in words)
    jargon_share = jargon / len(words)
    mean_length = sum(len(word) for word in words) / len(words)
    if jargon >= 2 and jargon_share >= 0.10 and long_share >= 0.20 and analysis.analogies == 0:
        return "P1B"
    plain = long_share <= 0.12 and jargon <= 1 and jargon_share <= 0.04
    if plain and (analysis.analogies > 0 or mean_length <= 4.3):
        return "P1A"
    return None


def _informativeness(analysis: _Analysis) -> str | None:
    """P2: concise (P2A) vs informative (P2B), from content length and background cues.

    Rule: P2A when there are one or two content sentences, at most 45 content words and no
    background cue ("For context,", "Some background:", "Historically,", "It also helps to
    know", ...). P2B when there are at least three content sentences and 40 content words and
    either a background cue or, without one, at least four sentences and 60 words. A short
    text with a background cue, or a medium one without, is neither.

    Failure modes: one very long run-on sentence packed with background but no cue phrase is
    neither; background introduced by phrases outside the cue list is only recognised by
    length; style markers not in the P3 lexicons count as content words.
    """
    sentences, num_words = analysis.content_sentences, len(analysis.content_words)
    cues = analysis.background_cues
    if 1 <= sentences <= 2 and num_words <= 45 and cues == 0:
        return "P2A"
    if sentences >= 3 and num_words >= 40 and (cues > 0 or (sentences >= 4 and num_words >= 60)):
        return "P2B"
    return None


def _style(analysis: _Analysis) -> str | None:
    """P3: friendly (P3A) vs unfriendly (P3B), from lexicons of warm and curt markers.

    Rule: friendly markers are warm phrases ("great question", "hope this helps", "my friend",
    "cheers", "have fun", ...), smiling emoticons (":)", ":D", "<3") and sentences ending in
    "!" that hold no unfriendly marker; unfriendly markers are curt or rude phrases
    ("obviously", "whatever", "figure it out", "don't waste my time", "ugh", "look it up",
    ...) and frowning emoticons. P3A when there is a friendly marker and no unfriendly one,
    P3B the reverse; no markers, or both kinds, is neither.

    Failure modes: sarcasm ("Great question, genius.") reads as friendly; curtness carried by
    brevity or tone alone, with no marker word, is neither; a neutral "obviously" inside
    friendly prose makes the text mixed, hence neither.
    """
    if analysis.friendly > 0 and analysis.unfriendly == 0:
        return "P3A"
    if analysis.unfriendly > 0 and analysis.friendly == 0:
        return "P3B"
    return None


def check_attributes(text: str) -> dict[str, str | None]:
    """The pole each dimension (``P1``, ``P2``, ``P3``) of ``text`` exhibits, or None.

    None means the text shows neither pole of that dimension, or markers of both.
    """
    analysis = _analyse(text)
    return {
        "P1": _expertise(analysis),
        "P2": _informativeness(analysis),
        "P3": _style(analysis),
    }


def exhibited_poles(text: str) -> set[str]:
    """The pole ids :func:`check_attributes` found in ``text``."""
    return {pole for pole in check_attributes(text).values() if pole is not None}


def satisfies(text: str, poles: Iterable[str]) -> bool:
    """True iff ``text`` exhibits every pole in ``poles`` (True for no poles).

    Raises ValueError for a pole id that is not one of :data:`WORLD_POLES`.
    """
    wanted = set(poles)
    unknown = wanted - _KNOWN_POLES
    if unknown:
        raise ValueError(f"unknown pole ids {sorted(unknown)} (allowed: {sorted(_KNOWN_POLES)})")
    return wanted <= exhibited_poles(text)
