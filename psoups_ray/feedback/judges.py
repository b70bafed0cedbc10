"""Pairwise judges: which of two responses better satisfies a pole.

A judge answers ``"a"``, ``"b"`` or ``"tie"`` for one ``(pole, prompt, a, b)`` question
(:meth:`PairwiseJudge.compare`) or for a batch of them (:meth:`PairwiseJudge.compare_batch`,
where a judge behind a network can work concurrently). :class:`CheckerJudge` uses the tiny
world's attribute checkers; :class:`~psoups_ray.feedback.openai_judge.OpenAIJudge` asks an
LLM behind any OpenAI-compatible endpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, Protocol

Verdict = Literal["a", "b", "tie"]
VERDICTS: tuple[Verdict, ...] = ("a", "b", "tie")


class PairToJudge(NamedTuple):
    """One question for a judge: two responses to ``prompt`` (the raw instruction)."""

    prompt: str
    a: str
    b: str


class PairwiseJudge(Protocol):
    """Says which of two responses better satisfies a pole."""

    def compare(self, pole: str, prompt: str, a: str, b: str) -> Verdict:
        """``"a"`` or ``"b"`` for the better response, ``"tie"`` when neither is."""
        ...

    def compare_batch(self, pole: str, pairs: Sequence[PairToJudge]) -> list[Verdict]:
        """One verdict per pair, in order."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the manifest records about the judge (never a secret)."""
        ...

    def close(self) -> None:
        """Release connections and persist any cache."""
        ...


class CheckerJudge:
    """The tiny world's judge: a response satisfies a pole when the checkers find it there.

    One response satisfies the pole and the other does not: that one wins; otherwise a tie.
    """

    def __init__(self) -> None:
        self.judged = 0

    def compare(self, pole: str, prompt: str, a: str, b: str) -> Verdict:
        from psoups_ray.world import exhibited_poles

        self.judged += 1
        a_satisfies = pole in exhibited_poles(a)
        b_satisfies = pole in exhibited_poles(b)
        if a_satisfies and not b_satisfies:
            return "a"
        if b_satisfies and not a_satisfies:
            return "b"
        return "tie"

    def compare_batch(self, pole: str, pairs: Sequence[PairToJudge]) -> list[Verdict]:
        return [self.compare(pole, pair.prompt, pair.a, pair.b) for pair in pairs]

    def describe(self) -> dict[str, Any]:
        return {"type": "checkers", "judged": self.judged}

    def close(self) -> None:
        pass
