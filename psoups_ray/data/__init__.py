"""Data shipped with the package: an instruction prompt set for real base models.

``prompts/train.txt`` (about 300) and ``prompts/eval.txt`` (about 60, disjoint from train)
hold open questions written for this project, one per line: explanations and advice across
science, history, technology, health, cooking, money, study and work, practical how-tos, the
arts and light philosophy, so that expertise, length and tone can all vary in an answer.
"""

from __future__ import annotations

from importlib import resources

from psoups_ray.errors import PsoupsError

PROMPT_SPLITS: tuple[str, ...] = ("train", "eval")


def load_prompts(split: str) -> list[str]:
    """The shipped instructions of ``split`` (``"train"`` or ``"eval"``), in file order."""
    if split not in PROMPT_SPLITS:
        raise PsoupsError(
            f"unknown prompt split {split!r}; the shipped splits are: {', '.join(PROMPT_SPLITS)}"
        )
    text = (resources.files(__name__) / "prompts" / f"{split}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
