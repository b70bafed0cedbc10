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
from dataclasses import asdict, dataclass
from typing import Any, Literal

from psoups_ray.errors import PsoupsError, StorageError
from psoups_ray.rundir import RunDir
from psoups_ray.seeding import derive_seed

FEEDBACK_DIR = "feedback"
TRAIN_PATH = f"{FEEDBACK_DIR}/train.jsonl"
EVAL_PATH = f"{FEEDBACK_DIR}/eval.jsonl"
LABELS_PATH = f"{FEEDBACK_DIR}/labels.jsonl"
JUDGE_CACHE_PATH = f"{FEEDBACK_DIR}/judge_cache.jsonl"
SPLIT_PATHS: dict[str, str] = {"train": TRAIN_PATH, "eval": EVAL_PATH}
ROW_FIELDS = ("prompt", "pole", "chosen", "rejected")

Split = Literal["train", "eval"]


@dataclass(frozen=True)
class PreferenceRow:
    """One pair of feedback for one pole: ``chosen`` satisfies ``pole`` better than ``rejected``."""

    prompt: str
    pole: str
    chosen: str
    rejected: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


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
    return rundir.uri(relpath)


def load_feedback(rundir: RunDir, split: Split) -> list[PreferenceRow]:
    """The feedback stage's ``train`` or ``eval`` pairs from a run directory."""
    if split not in SPLIT_PATHS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    relpath = SPLIT_PATHS[split]
    if not rundir.exists(relpath):
        raise StorageError(
            f"missing {rundir.uri(relpath)}; run the feedback stage first "
            f"(psoups feedback --out {rundir.location})"
        )
    rows = []
    for number, line in enumerate(rundir.read_text(relpath).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            rows.append(PreferenceRow(*(record[field] for field in ROW_FIELDS)))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise StorageError(
                f"{rundir.uri(relpath)}: line {number} is not a feedback row ({exc}); re-run "
                "the feedback stage with --force"
            ) from None
    return rows
