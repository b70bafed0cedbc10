"""The feedback stage: pairwise preference data per pole, ``(prompt, pole, chosen, rejected)``.

Sources (``feedback.source``):

- ``world``: the tiny world's generator; train pairs on the world's training prompts, eval
  pairs on its held-out prompts.
- ``files``: the user's files (:mod:`psoups_ray.feedback.files`), split by prompt.
- ``generate``: two samples per prompt from the base, judged pairwise
  (:mod:`psoups_ray.feedback.generate`); ties are kept in ``feedback/labels.jsonl`` but are
  not training pairs. Split by prompt.

Artifacts: ``feedback/train.jsonl``, ``feedback/eval.jsonl`` (rows ``{prompt, pole, chosen,
rejected}``, read back with :func:`~psoups_ray.feedback.rows.load_feedback`), and for
``generate`` ``feedback/labels.jsonl`` and ``feedback/judge_cache.jsonl`` (LLM judge).
"""

from __future__ import annotations

from collections import Counter
from pathlib import PurePosixPath
from typing import Any

from psoups_ray.artifacts import EVAL_PATH, TRAIN_PATH, PreferenceRow
from psoups_ray.config import PsoupsConfig
from psoups_ray.errors import ConfigError, PsoupsError, StorageError
from psoups_ray.feedback.files import (
    CSV_SUFFIXES,
    JSON_SUFFIXES,
    PARQUET_SUFFIXES,
    read_feedback_files,
)
from psoups_ray.feedback.rows import (
    LABELS_PATH,
    count_by_pole,
    rows_to_jsonl,
    split_by_prompt,
    write_prompt_splits,
    write_rows,
)
from psoups_ray.judges.openai import openai_judge_problems
from psoups_ray.progress import log
from psoups_ray.rundir import RunDir, data_kind
from psoups_ray.seeding import derive_seed
from psoups_ray.world import data_world

Rows = list[PreferenceRow]


def run_feedback_stage(config: PsoupsConfig, rundir: RunDir) -> dict[str, Any]:
    """Produce the train/eval pairs of every pole; returns the manifest's ``feedback`` section."""
    check_feedback_config(config)
    source = config.feedback.source
    details: dict[str, Any] = {}
    if source == "world":
        train, eval_rows = world_feedback(config)
    elif source == "files":
        train, eval_rows, details = _files_feedback(config)
    elif source == "generate":
        train, eval_rows, details = _generated_feedback(config, rundir)
    else:  # "auto" is resolved by the config validator
        raise PsoupsError(f"feedback.source {source!r} was not resolved to world/files/generate")
    counts = count_by_pole(train, eval_rows, config.space.pole_ids)
    summary = ", ".join(f"{pole} {c['train']}/{c['eval']}" for pole, c in counts.items())
    log(f"feedback: train/eval pairs per pole: {summary}")
    return {
        "source": source,
        "train_path": write_rows(rundir, TRAIN_PATH, train),
        "eval_path": write_rows(rundir, EVAL_PATH, eval_rows),
        "prompts_path": write_prompt_splits(rundir, train, eval_rows),
        "counts": counts,
        **details,
    }


# --- checks before any work --------------------------------------------------------------------


def world_eval_pairs(config: PsoupsConfig) -> int:
    """Eval pairs per pole of the ``world`` source: ``max(2, round(pairs * eval_fraction))``."""
    feedback = config.feedback
    return max(2, round(feedback.pairs_per_pole * feedback.eval_fraction))


def check_feedback_config(config: PsoupsConfig) -> None:
    """Raise :class:`ConfigError` for every feedback problem visible before any work runs."""
    feedback = config.feedback
    problems: list[str] = []
    if feedback.source == "world":
        n_eval = world_eval_pairs(config)
        if feedback.pairs_per_pole - n_eval < 1:
            problems.append(
                f"feedback.pairs_per_pole: {feedback.pairs_per_pole} pairs leave no training "
                f"pair after the {n_eval} eval pairs per pole; use at least {n_eval + 1}"
            )
    elif feedback.source == "files":
        problems.extend(_file_problems(config))
    elif feedback.source == "generate":
        problems.extend(_generate_problems(config))
    if problems:
        raise ConfigError(problems)


def _file_problems(config: PsoupsConfig) -> list[str]:
    accepted = (*JSON_SUFFIXES, *PARQUET_SUFFIXES, *CSV_SUFFIXES)
    problems = []
    for index, spec in enumerate(config.feedback.files):
        path = PurePosixPath(spec.path)
        key = f"feedback.files[{index}].path"
        try:
            kind = data_kind(spec.path)
        except StorageError as exc:  # a name too long for the file system, a NUL, a bad URI
            problems.append(f"{key}: {exc}")
            continue
        if kind == "missing":
            problems.append(f"{key}: {spec.path} does not exist")
        elif kind == "file" and path.suffix.lower() not in accepted:
            problems.append(
                f"{key}: {spec.path} has an unsupported suffix {path.suffix or '(none)'!r}; "
                f"accepted: {', '.join(accepted)} or a directory saved by datasets' save_to_disk"
            )
    return problems


def _prompts_file_problem(key: str, path: str) -> str | None:
    from psoups_ray.data import PROMPT_SPLITS
    from psoups_ray.feedback.generate import BUILTIN_PREFIX

    if path.startswith(BUILTIN_PREFIX):
        if path[len(BUILTIN_PREFIX) :] in PROMPT_SPLITS:
            return None
        names = ", ".join(BUILTIN_PREFIX + split for split in PROMPT_SPLITS)
        return f"{key}: unknown built-in prompt set {path!r}; built-in sets: {names}"
    try:
        found = data_kind(path) == "file"
    except StorageError:  # a name too long for the file system, a NUL, a bad URI
        found = False
    return None if found else f"{key}: {path} does not exist"


def _generate_problems(config: PsoupsConfig) -> list[str]:
    feedback = config.feedback
    problems = []
    for key, path in (
        ("feedback.prompts_file", feedback.prompts_file),
        ("feedback.eval_prompts_file", feedback.eval_prompts_file),
    ):
        problem = _prompts_file_problem(key, path) if path else None
        if problem:
            problems.append(problem)
    if not feedback.prompts_file and data_world(config) is None:
        problems.append(
            "feedback.prompts_file: required for source 'generate' with a real base model "
            "(a .txt with one instruction per line, JSONL with a 'prompt' field, or "
            "builtin:train for the instructions shipped with psoups_ray)"
        )
    if feedback.judge == "openai":
        problems.extend(
            openai_judge_problems(feedback.openai, "feedback.openai", config.space.pole_ids)
        )
    if feedback.judge == "text":
        from psoups_ray.judges.text import text_judge_problems

        problems.extend(text_judge_problems("feedback.judge"))
    if feedback.eval_prompts_file and feedback.prompts_per_pole < 3:
        problems.append(
            "feedback.prompts_per_pole: with feedback.eval_prompts_file at least 3 (2 of each "
            f"pole's pairs are held out); got {feedback.prompts_per_pole}"
        )
    return problems


# --- sources -------------------------------------------------------------------------------------


def world_feedback(config: PsoupsConfig) -> tuple[Rows, Rows]:
    """The tiny world's pairs: train on its training prompts, eval on its held-out prompts."""
    from psoups_ray.world import TinyWorld

    world = TinyWorld(seed=config.world.seed, num_eval_prompts=config.world.num_eval_prompts)
    n_eval = world_eval_pairs(config)
    n_train = config.feedback.pairs_per_pole - n_eval
    train: Rows = []
    eval_rows: Rows = []
    for pole in config.space.pole_ids:
        for rows, n, split, prompts in (
            (train, n_train, "train", world.train_prompts),
            (eval_rows, n_eval, "eval", world.eval_prompts),
        ):
            seed = derive_seed(config.seed, "world", pole, split)
            pairs = world.preference_pairs(pole, n, seed=seed, prompts=prompts)
            rows.extend(PreferenceRow(p.prompt, p.pole, p.chosen, p.rejected) for p in pairs)
    return train, eval_rows


def _files_feedback(config: PsoupsConfig) -> tuple[Rows, Rows, dict[str, Any]]:
    feedback = config.feedback
    rows = read_feedback_files(feedback.files, config.space)
    log(f"feedback: read {len(rows)} valid pairs from {len(feedback.files)} file(s)")
    train, eval_rows = split_by_prompt(
        rows, config.space.pole_ids, feedback.eval_fraction, config.seed
    )
    return train, eval_rows, {"files": [spec.path for spec in feedback.files]}


def split_held_out(
    pairs: Rows, pole_ids: list[str], held_out: set[str], context: str
) -> tuple[Rows, Rows]:
    """Pairs on the held-out prompts are the eval split, the rest train; every pole needs
    at least one of each."""
    train = [row for row in pairs if row.prompt not in held_out]
    eval_rows = [row for row in pairs if row.prompt in held_out]
    empty = [
        f"{pole} ({split})"
        for pole in pole_ids
        for split, rows in (("train", train), ("eval", eval_rows))
        if not any(row.pole == pole for row in rows)
    ]
    if empty:
        raise PsoupsError(f"feedback: no preference pairs left for {', '.join(empty)}; {context}")
    return train, eval_rows


def _generated_feedback(config: PsoupsConfig, rundir: RunDir) -> tuple[Rows, Rows, dict[str, Any]]:
    from psoups_ray.feedback.generate import (
        MIN_JUDGE_BATCH,
        build_sampling_job,
        judge_responses,
        make_judge,
        run_sampling_task,
    )

    feedback = config.feedback
    job = build_sampling_job(config, rundir)
    judge = make_judge(config, rundir)  # before sampling: a missing API key fails first
    try:
        log(
            f"feedback: sampling 2 responses x {feedback.prompts_per_pole} prompts for "
            f"{len(job.poles)} pole(s) in a Ray task"
        )
        responses = run_sampling_task(job, feedback.resources)
        log(f"feedback: judging the pairs with the {feedback.judge} judge")
        concurrency = feedback.openai.concurrency if feedback.judge == "openai" else 1
        batch_size = max(MIN_JUDGE_BATCH, 8 * concurrency)
        labels = judge_responses(job.poles, responses, judge, batch_size)
    finally:
        judge.close()
    rundir.write_text(LABELS_PATH, rows_to_jsonl(label.to_dict() for label in labels))

    pole_ids = config.space.pole_ids
    judged = Counter(label.pole for label in labels)
    ties = Counter(label.pole for label in labels if label.verdict == "tie")
    skipped = Counter(label.pole for label in labels if label.skipped)
    tie_summary = ", ".join(f"{pole} {ties[pole]}/{judged[pole]}" for pole in pole_ids)
    log(f"feedback: ties (dropped) per pole: {tie_summary}")
    pairs = [label.to_row() for label in labels if label.verdict != "tie"]
    context = (
        f"ties dropped (ties/judged) per pole: {tie_summary}; see {rundir.uri(LABELS_PATH)}. "
        "Raise feedback.prompts_per_pole or use a stronger base"
    )
    if job.held_out:
        train, eval_rows = split_held_out(pairs, pole_ids, set(job.held_out), context)
    else:
        train, eval_rows = split_by_prompt(
            pairs, pole_ids, feedback.eval_fraction, config.seed, context=context
        )
    details = {
        "labels_path": rundir.locate(LABELS_PATH),
        "judged": {pole: judged[pole] for pole in pole_ids},
        "ties": {pole: ties[pole] for pole in pole_ids},
        "skipped": {pole: skipped[pole] for pole in pole_ids},
        "judge": judge.describe(),
    }
    return train, eval_rows, details
