"""Pairwise preference rows, their train/eval split and their JSONL artifacts.

A :class:`PreferenceRow` is one ``(prompt, pole, chosen, rejected)`` pair: ``prompt`` is the
raw user instruction (no preference prompt, no chat template), ``chosen`` satisfies ``pole``
better than ``rejected``. The feedback stage writes ``feedback/train.jsonl`` and
``feedback/eval.jsonl``; later stages read them back with :func:`load_feedback`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from psoups_ray.artifacts import FEEDBACK_DIR, PROMPTS_PATH, PreferenceRow
from psoups_ray.errors import PsoupsError
from psoups_ray.rundir import RunDir
from psoups_ray.seeding import derive_seed

LABELS_PATH = f"{FEEDBACK_DIR}/labels.jsonl"


def count_by_pole(
    train: Sequence[PreferenceRow], eval_rows: Sequence[PreferenceRow], pole_ids: Sequence[str]
) -> dict[str, dict[str, int]]:
    """``{pole: {"train": n, "eval": m}}`` for every pole of the space, in space order."""
    train_counts = Counter(row.pole for row in train)
    eval_counts = Counter(row.pole for row in eval_rows)
    return {pole: {"train": train_counts[pole], "eval": eval_counts[pole]} for pole in pole_ids}


def split_by_prompt(
    rows: Sequence[PreferenceRow],
    pole_ids: Sequence[str],
    eval_fraction: float,
    seed: int,
    context: str = "",
) -> tuple[list[PreferenceRow], list[PreferenceRow]]:
    """Split each pole's rows into (train, eval) by prompt: a prompt's pairs stay together.

    Prompts are ordered by a seeded hash, the same order for every pole, and each pole walks
    that order, holding a prompt out for eval when that brings its held-out pairs closer to
    ``eval_fraction`` of its pairs; so a prompt tends to land on the same side for every pole.
    Every pole ends with at least one pair on each side; a pole that cannot (fewer than two
    distinct prompts) is an error.
    ``context`` is appended to such an error (e.g. how many ties were dropped).
    """
    by_pole: dict[str, dict[str, list[PreferenceRow]]] = {pole: {} for pole in pole_ids}
    for row in rows:
        if row.pole not in by_pole:
            raise ValueError(f"row for pole {row.pole!r}, not one of {list(pole_ids)}")
        by_pole[row.pole].setdefault(row.prompt, []).append(row)
    problems = []
    for pole, groups in by_pole.items():
        if len(groups) < 2:
            pairs = sum(len(group) for group in groups.values())
            problems.append(
                f"pole {pole} has {pairs} pair(s) on {len(groups)} distinct prompt(s); a "
                "train/eval split by prompt needs pairs on at least 2 distinct prompts"
            )
    if problems:
        raise PsoupsError(
            "not enough feedback to split into train and eval:\n  "
            + "\n  ".join(problems)
            + (f"\n{context}" if context else "")
        )

    train: list[PreferenceRow] = []
    eval_rows: list[PreferenceRow] = []
    for groups in by_pole.values():
        prompts = sorted(groups, key=lambda prompt: (derive_seed(seed, "split", prompt), prompt))
        total = sum(len(group) for group in groups.values())
        target = eval_fraction * total
        held_out = 0
        for prompt in prompts:
            size = len(groups[prompt])
            closer = abs(held_out + size - target) < abs(held_out - target)
            if (held_out == 0 or closer) and held_out + size < total:
                eval_rows.extend(groups[prompt])
                held_out += size
            else:
                train.extend(groups[prompt])
    return train, eval_rows


def rows_to_jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_rows(rundir: RunDir, relpath: str, rows: Iterable[PreferenceRow]) -> str:
    """Write rows as JSONL (atomically); returns the file's location."""
    rundir.write_text(relpath, rows_to_jsonl(row.to_dict() for row in rows))
    return rundir.locate(relpath)


def write_prompt_splits(rundir: RunDir, train: Sequence[PreferenceRow],
                        eval_rows: Sequence[PreferenceRow]) -> str:  # fmt: skip
    """The distinct prompts of each split, in order (``train``; ``held_out``: those of
    the eval pairs, which later stages measure, tune and evaluate on); returns the file's
    location."""
    splits = {
        "train": list(dict.fromkeys(row.prompt for row in train)),
        "held_out": list(dict.fromkeys(row.prompt for row in eval_rows)),
    }
    rundir.write_json(PROMPTS_PATH, splits)
    return rundir.locate(PROMPTS_PATH)
