"""The shipped instruction prompt set: sizes, no duplicates, disjoint splits, sane lines."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from psoups_ray.data import PROMPT_SPLITS, load_prompts
from psoups_ray.errors import PsoupsError

MIN_PROMPTS = {"train": 280, "eval": 50}
MAX_WORDS = 25


def normalised(prompt: str) -> str:
    """Lowercase with runs of whitespace collapsed: how two spellings of one prompt compare."""
    return re.sub(r"\s+", " ", prompt).strip().lower()


@pytest.mark.parametrize("split", PROMPT_SPLITS)
def test_split_has_enough_prompts(split):
    assert len(load_prompts(split)) >= MIN_PROMPTS[split]


@pytest.mark.parametrize("split", PROMPT_SPLITS)
def test_split_has_no_duplicates(split):
    prompts = [normalised(prompt) for prompt in load_prompts(split)]
    duplicates = sorted({prompt for prompt in prompts if prompts.count(prompt) > 1})
    assert duplicates == []


def test_splits_are_disjoint():
    train = {normalised(prompt) for prompt in load_prompts("train")}
    shared = [prompt for prompt in load_prompts("eval") if normalised(prompt) in train]
    assert shared == []


@pytest.mark.parametrize("split", PROMPT_SPLITS)
def test_file_has_no_blank_or_padded_lines(split):
    """Every line of the file is one instruction: no blank lines, no stray whitespace."""
    text = (resources.files("psoups_ray.data") / "prompts" / f"{split}.txt").read_text("utf-8")
    lines = text.splitlines()
    assert text.endswith("\n")
    assert [
        number for number, line in enumerate(lines, 1) if line != line.strip() or not line
    ] == []
    assert len(lines) == len(load_prompts(split))


@pytest.mark.parametrize("split", PROMPT_SPLITS)
def test_prompts_have_reasonable_lengths(split):
    """Between 3 and 25 words, a capital first letter and a closing question mark or period."""
    bad = [
        prompt
        for prompt in load_prompts(split)
        if not 3 <= len(prompt.split()) <= MAX_WORDS
        or not prompt[0].isupper()
        or prompt[-1] not in "?."
    ]
    assert bad == []


@pytest.mark.parametrize("split", PROMPT_SPLITS)
def test_most_prompts_are_questions(split):
    prompts = load_prompts(split)
    questions = sum(prompt.endswith("?") for prompt in prompts)
    assert questions >= 0.9 * len(prompts)


def test_unknown_split_names_the_shipped_splits():
    with pytest.raises(PsoupsError, match="unknown prompt split 'test'.*train, eval"):
        load_prompts("test")
