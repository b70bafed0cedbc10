"""Judges: which of two responses better satisfies a pole, and, where they can, per-pole scores.

Every judge answers ``"a"``, ``"b"`` or ``"tie"`` for one ``(pole, prompt, a, b)`` question
(:meth:`PairwiseJudge.compare`) or for a batch of them (:meth:`PairwiseJudge.compare_batch`,
where a judge behind a network can work concurrently), and gives per-pole scores where it
has them (:meth:`PairwiseJudge.scores`, None where it has none):

- :class:`~psoups_ray.judges.attributes.AttributeJudge`: the tiny world's attribute
  checkers (which poles a text shows; score 1 or 0). The tiny world plugs into every stage
  as its data and this judge (:func:`~psoups_ray.judges.attributes.attribute_judge`).
- :class:`~psoups_ray.judges.text.TextJudge`: programmatic scorers of real text.
- :class:`~psoups_ray.judges.openai.OpenAIJudge`: an LLM behind any OpenAI-compatible
  endpoint (pairwise only).
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

    def scores(self, pole: str, prompts: Sequence[str], texts: Sequence[str]) -> list[float] | None:
        """Per text, how well it satisfies ``pole`` (higher is better), or None for a judge
        that only compares."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the manifest records about the judge (never a secret)."""
        ...

    def close(self) -> None:
        """Release connections and persist any cache."""
        ...
