"""The tiny world's judge: its attribute checkers say which poles a text shows.

A response satisfies a pole when the checkers find the pole in it (from the whole text:
e.g. friendly markers present and unfriendly ones absent). This is the exact, judge-free
metric of the tiny world next to the reward models: how many of a combination's poles a
response shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psoups_ray.judges import PairToJudge, Verdict
from psoups_ray.world import data_world, exhibited_poles


class AttributeJudge:
    """The tiny world's judge: a response satisfies a pole when the checkers find it there.

    One response satisfies the pole and the other does not: that one wins; otherwise a tie.
    """

    def __init__(self) -> None:
        self.judged = 0

    def shown(self, text: str) -> set[str]:
        """The poles ``text`` shows."""
        return set(exhibited_poles(text))

    def compare(self, pole: str, prompt: str, a: str, b: str) -> Verdict:
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

    def scores(self, pole: str, prompts: Sequence[str], texts: Sequence[str]) -> list[float]:
        return [float(pole in exhibited_poles(text)) for text in texts]

    def describe(self) -> dict[str, Any]:
        return {"type": "checkers", "judged": self.judged}

    def close(self) -> None:
        pass


def attribute_judge(config) -> AttributeJudge | None:
    """The run's attribute judge: its data world's checkers (the tiny world's,
    :func:`psoups_ray.world.data_world`), None for a real model (no checker knows real text
    that well)."""
    return AttributeJudge() if data_world(config) is not None else None
