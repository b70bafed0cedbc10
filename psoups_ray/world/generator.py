"""A seeded generator of the tiny world: instruction prompts and responses with chosen poles.

A response is assembled from independent parts, one dimension each:

- P1 (expertise) picks the register of every content sentence: short everyday words with an
  analogy (P1A) or dense latinate jargon (P1B).
- P2 (informativeness) picks how many content sentences there are: one or two (P2A), or four
  to five including two background sentences opened by a cue such as "For context," (P2B).
- P3 (style) wraps the content in warm markers ("Great question!", "Hope this helps :)") for
  P3A or curt ones ("Obviously.", "Figure it out yourself.") for P3B.

Because each part is drawn on its own, the three poles vary independently, which is what the
SFT data, the pairwise feedback and the checkers in :mod:`psoups_ray.world.checkers` rely on.
Every random choice goes through a ``random.Random`` passed in or seeded from arguments.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from psoups_ray.world.topics import CATEGORY_BY_NAME, TOPICS, Category, Topic

__all__ = ["WORLD_POLES", "PreferencePair", "TinyWorld", "Topic", "WorldExample"]

WORLD_POLES: dict[str, tuple[str, str]] = {
    "P1": ("P1A", "P1B"),
    "P2": ("P2A", "P2B"),
    "P3": ("P3A", "P3B"),
}
_DIMENSION_OF_POLE: dict[str, str] = {
    pole_id: dimension_id for dimension_id, poles in WORLD_POLES.items() for pole_id in poles
}


@dataclass(frozen=True)
class WorldExample:
    """One SFT example: a prompt, the poles its response was written with, the response."""

    prompt: str
    poles: dict[str, str]
    response: str


@dataclass(frozen=True)
class PreferencePair:
    """Pairwise feedback for one pole: ``chosen`` exhibits ``pole``, ``rejected`` its opposite."""

    prompt: str
    pole: str
    chosen: str
    rejected: str


# --- sentence templates ----------------------------------------------------------------------
# Slots: {s} subject, {S} subject capitalised, {gist}, {analogy}, {tech}, {it} them/it,
# {field} the category's discipline, {fact} a category background clause.

_SIMPLE_CORE = (
    "{S} {gist}.",
    "Well, {s} {gist}.",
    "Simply put, {s} {gist}.",
    "In a nutshell, {s} {gist}.",
)
_SIMPLE_ANALOGY = (
    "Think of {it} like {analogy}.",
    "It is kind of like {analogy}.",
    "You can think of {it} like {analogy}.",
    "It is a bit like {analogy}.",
)
_SIMPLE_INLINE = "{S} {gist}, kind of like {analogy}."
_SIMPLE_DETAILS = (
    "People learn more about {it} by looking closely and trying things out.",
    "There is still a lot we do not know about {it}, so people keep looking.",
)
_SIMPLE_BACKGROUND_CUES = (
    "Some background: {fact}.",
    "For context, {fact}.",
    "It also helps to know that {fact}.",
    "Here is some background: {fact}.",
)
_SIMPLE_BACKGROUND_MORE = (
    "Today, we have new tools to learn even more about {it}.",
    "Over time, people found out more by looking closely and asking good questions.",
    "Bit by bit, people learned more and more.",
)

_TECH_CORE = (
    "Mechanistically, the phenomenology of {s} is characterized by {tech}.",
    "Formally, {s} can be conceptualized as a manifestation of {tech}.",
    "The observable behavior of {s} is fundamentally governed by {tech}.",
    "From a theoretical standpoint, {s} can most parsimoniously be interpreted through {tech}.",
)
_TECH_DETAILS = (
    "Consequently, deterministic parameterizations remain approximations of fundamentally "
    "stochastic, multiscale dynamics.",
    "These mechanisms are nonlinearly coupled, precluding straightforward reductionist "
    "interpretation.",
    "Rigorous quantification requires probabilistic modelling of heterogeneous, nonstationary "
    "observational datasets.",
)
_TECH_BACKGROUND_CUED = (
    "Historically, systematic investigation of {s} originated within classical {field}, "
    "subsequently formalized through quantitative frameworks.",
    "For context, contemporary understanding of {s} derives from decades of interdisciplinary "
    "{field} research.",
    "Some background: theoretical characterization of {s} evolved alongside increasingly "
    "precise instrumentation.",
    "It also helps to know that early interpretations of {s} were predominantly qualitative "
    "and phenomenological.",
)
_TECH_BACKGROUND_MORE = (
    "Subsequent methodological innovations enabled increasingly rigorous, statistically "
    "principled inference.",
    "Contemporary research emphasizes mechanistic modelling constrained by high-resolution "
    "empirical observation.",
)

_FRIENDLY_OPENERS = (
    "Great question!",
    "Ooh, I love this one!",
    "Hi there, my friend!",
    "Happy to help!",
    "What a fun question!",
)
_FRIENDLY_CLOSERS = (
    "Hope this helps!",
    "Hope that helps, my friend :)",
    "Have fun learning more!",
    "Keep asking great questions :)",
    "Cheers, and stay curious!",
)
_FRIENDLY_ASIDES = ("Pretty cool, right?", "Who knew, right? :)", "How cool is that?")
_UNFRIENDLY_OPENERS = ("Obviously.", "Ugh, fine.", "Seriously? Fine.", "This is basic stuff.")
_UNFRIENDLY_CLOSERS = (
    "Figure it out yourself.",
    "Whatever.",
    "Don't waste my time.",
    "Look it up next time.",
    "Now stop asking.",
)
_UNFRIENDLY_ASIDES = ("Pay attention.", "Try to keep up.", "Not that you care.")


def _render(template: str, topic: Topic, category: Category, fact: str = "") -> str:
    """Fill a template's slots for one topic."""
    subject = topic.subject
    return template.format(
        s=subject,
        S=subject[0].upper() + subject[1:],
        gist=topic.gist,
        analogy=topic.analogy,
        tech=topic.technical,
        it=topic.pronoun,
        field=category.field,
        fact=fact,
    )


def _content_sentences(
    topic: Topic, expertise: str, informative: bool, rng: random.Random
) -> list[str]:
    """The content of a response: its register from P1, its length and background from P2."""
    category = CATEGORY_BY_NAME[topic.category]
    if expertise == "P1A":
        if not informative and rng.random() < 0.3:
            return [_render(_SIMPLE_INLINE, topic, category)]
        core = [rng.choice(_SIMPLE_CORE), rng.choice(_SIMPLE_ANALOGY)]
        details = [*category.simple_details, *_SIMPLE_DETAILS]
        cued, more = _SIMPLE_BACKGROUND_CUES, _SIMPLE_BACKGROUND_MORE
    else:
        core = [rng.choice(_TECH_CORE)]
        details = [*category.technical_details, *_TECH_DETAILS]
        if not informative and rng.random() < 0.5:
            core.append(rng.choice(details))
        cued, more = _TECH_BACKGROUND_CUED, _TECH_BACKGROUND_MORE
    if not informative:
        return [_render(template, topic, category) for template in core]
    background = [rng.choice(cued), rng.choice(more)]
    # 4-5 content sentences: the core, two background sentences and details up to the drawn
    # length; jargon costs ~3 BPE tokens a word, so P1B stays at 4 to fit a tiny LM's context.
    num_sentences = rng.randint(4, 5) if expertise == "P1A" else 4
    num_details = num_sentences - len(core) - len(background)
    extra = rng.sample(details, num_details)
    if rng.random() < 0.5:
        templates = [*core, *background, *extra]
    else:
        templates = [*core, *extra, *background]
    fact = rng.choice(category.simple_background)
    return [_render(template, topic, category, fact) for template in templates]


def _styled(content: list[str], friendly: bool, rng: random.Random, mixed: bool = False) -> str:
    """Wrap content sentences in friendly (P3A) or unfriendly (P3B) markers.

    ``mixed``: the closer comes from the other style (markers of both: neither pole).
    """
    if friendly:
        openers, closers, asides = _FRIENDLY_OPENERS, _FRIENDLY_CLOSERS, _FRIENDLY_ASIDES
    else:
        openers, closers, asides = _UNFRIENDLY_OPENERS, _UNFRIENDLY_CLOSERS, _UNFRIENDLY_ASIDES
    if mixed:
        closers = _UNFRIENDLY_CLOSERS if friendly else _FRIENDLY_CLOSERS
    sentences = list(content)
    if len(sentences) >= 3 and rng.random() < 0.5:
        sentences.insert(rng.randint(2, len(sentences) - 1), rng.choice(asides))
    return " ".join([rng.choice(openers), *sentences, rng.choice(closers)])


def _validated_poles(poles: Mapping[str, str]) -> dict[str, str]:
    """Check that ``poles`` names exactly one known pole for every dimension."""
    problems = []
    for dimension_id in poles:
        if dimension_id not in WORLD_POLES:
            problems.append(f"unknown dimension {dimension_id!r} (allowed: {sorted(WORLD_POLES)})")
    for dimension_id, allowed in WORLD_POLES.items():
        if dimension_id not in poles:
            problems.append(f"missing dimension {dimension_id!r} (choose one of {list(allowed)})")
        elif poles[dimension_id] not in allowed:
            problems.append(
                f"pole {poles[dimension_id]!r} for {dimension_id} is not one of {list(allowed)}"
            )
    if problems:
        raise ValueError("invalid poles: " + "; ".join(problems))
    return {dimension_id: poles[dimension_id] for dimension_id in WORLD_POLES}


def _random_poles(rng: random.Random) -> dict[str, str]:
    """One pole per dimension, each drawn uniformly and independently."""
    return {dimension_id: rng.choice(poles) for dimension_id, poles in WORLD_POLES.items()}


class TinyWorld:
    """The tiny instruction world: a few hundred prompts and a responder with chosen poles.

    Prompts are every (subject, question template) pair of the catalogue in
    :mod:`psoups_ray.world.topics`, shuffled by ``seed``; the first ``num_eval_prompts`` are
    held out for evaluation, the rest are for training.
    """

    def __init__(self, seed: int = 0, num_eval_prompts: int = 64) -> None:
        self.seed = seed
        self.topics: list[Topic] = list(TOPICS)
        self._topic_by_prompt: dict[str, Topic] = {}
        for topic in self.topics:
            category = CATEGORY_BY_NAME[topic.category]
            for question in category.questions:
                prompt = question.format(
                    s=topic.subject,
                    be="are" if topic.plural else "is",
                    do="do" if topic.plural else "does",
                )
                if prompt in self._topic_by_prompt:
                    raise ValueError(f"duplicate prompt {prompt!r} in the world catalogue")
                self._topic_by_prompt[prompt] = topic
        prompts = list(self._topic_by_prompt)
        if not 1 <= num_eval_prompts < len(prompts):
            raise ValueError(
                f"num_eval_prompts={num_eval_prompts} must be in [1, {len(prompts) - 1}] "
                f"(the world has {len(prompts)} prompts)"
            )
        random.Random(seed).shuffle(prompts)
        self.eval_prompts: list[str] = prompts[:num_eval_prompts]
        self.train_prompts: list[str] = prompts[num_eval_prompts:]

    @property
    def prompts(self) -> list[str]:
        """All prompts, training ones first."""
        return [*self.train_prompts, *self.eval_prompts]

    def topic_of(self, prompt: str) -> Topic:
        """The topic a prompt asks about; ValueError for a prompt not in this world."""
        try:
            return self._topic_by_prompt[prompt]
        except KeyError:
            raise ValueError(
                f"unknown prompt {prompt!r}: not one of the {len(self._topic_by_prompt)} "
                "prompts of the tiny world (see TinyWorld.train_prompts / eval_prompts)"
            ) from None

    def respond(
        self, prompt: str, poles: Mapping[str, str], rng: random.Random, mixed_style: bool = False
    ) -> str:
        """A response to ``prompt`` that exhibits ``poles`` (one pole for each of P1, P2, P3).

        ``mixed_style``: open in the P3 pole's style but close in the other one, so the
        response shows neither P3 pole (a hard negative for style reward models).
        """
        chosen = _validated_poles(poles)
        topic = self.topic_of(prompt)
        content = _content_sentences(topic, chosen["P1"], chosen["P2"] == "P2B", rng)
        return _styled(content, chosen["P3"] == "P3A", rng, mixed=mixed_style)

    def sft_examples(self, n: int, seed: int) -> list[WorldExample]:
        """``n`` examples over the training prompts, every pole drawn uniformly per dimension."""
        _check_count(n)
        rng = random.Random(seed)
        examples = []
        for _ in range(n):
            prompt = rng.choice(self.train_prompts)
            poles = _random_poles(rng)
            examples.append(WorldExample(prompt, poles, self.respond(prompt, poles, rng)))
        return examples

    def preference_pairs(
        self, pole: str, n: int, seed: int, prompts: Sequence[str] | None = None
    ) -> list[PreferencePair]:
        """``n`` pairs where ``chosen`` exhibits ``pole`` and ``rejected`` does not.

        ``rejected`` exhibits the opposite pole, except that for a style pole (P3) every
        fourth pair's rejected response mixes friendly and unfriendly markers (neither pole):
        a reward model that only saw clean opposites scores such mixtures arbitrarily, and a
        policy trained against it learns to mix. Even-indexed pairs share the other two
        dimensions' poles (ceteris paribus); odd-indexed pairs draw them independently for
        each response, so the reward cannot lean on them.
        """
        if pole not in _DIMENSION_OF_POLE:
            raise ValueError(f"unknown pole {pole!r} (allowed: {sorted(_DIMENSION_OF_POLE)})")
        _check_count(n)
        prompt_pool = list(self.train_prompts if prompts is None else prompts)
        if n > 0 and not prompt_pool:
            raise ValueError("preference_pairs needs at least one prompt")
        for prompt in prompt_pool:
            self.topic_of(prompt)
        dimension_id = _DIMENSION_OF_POLE[pole]
        opposite = next(other for other in WORLD_POLES[dimension_id] if other != pole)
        rng = random.Random(seed)
        pairs = []
        for index in range(n):
            prompt = rng.choice(prompt_pool)
            chosen_poles = _random_poles(rng)
            rejected_poles = dict(chosen_poles) if index % 2 == 0 else _random_poles(rng)
            chosen_poles[dimension_id], rejected_poles[dimension_id] = pole, opposite
            chosen = self.respond(prompt, chosen_poles, rng)
            mixed = dimension_id == "P3" and index % 4 == 3
            if mixed:  # either style may open: the policy must not learn one safe order
                rejected_poles[dimension_id] = rng.choice([pole, opposite])
            rejected = self.respond(prompt, rejected_poles, rng, mixed_style=mixed)
            pairs.append(PreferencePair(prompt, pole, chosen, rejected))
        return pairs

    def corpus(self, seed: int, n: int) -> list[str]:
        """Texts to train a tokenizer on: every prompt, then ``n`` responses with random poles."""
        _check_count(n)
        rng = random.Random(seed)
        prompts = self.prompts
        responses = [self.respond(rng.choice(prompts), _random_poles(rng), rng) for _ in range(n)]
        return [*prompts, *responses]


def _check_count(n: int) -> None:
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
