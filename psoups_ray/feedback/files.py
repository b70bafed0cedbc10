"""User feedback files: JSONL, JSON, Parquet, CSV or a ``datasets`` directory.

Two layouts are accepted: ``prompt, pole, chosen, rejected`` (``pole`` may be left out when
the file's :class:`~psoups_ray.config.FeedbackFileSpec` names it), or the paper's released
format ``user_input, completion_a`` (the preferred response) ``, completion_b``. Every row of
every file is checked before anything is returned, and all problems are reported at once,
each naming the file, the row (1-based, as a user counts) and the field.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psoups_ray.artifacts import PreferenceRow
from psoups_ray.config import FeedbackFileSpec
from psoups_ray.errors import PsoupsError, StorageError
from psoups_ray.preferences import CombinationError, PreferenceSpace
from psoups_ray.rundir import data_kind, local_data

ACCEPTED_FORMATS = (
    "JSONL (.jsonl, or .json holding JSON lines or one array of objects), Parquet "
    "(.parquet, .pq), CSV with a header row (.csv), or a directory saved by datasets' "
    "save_to_disk"
)
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)
MAX_LISTED_PROBLEMS = 20
MAX_LISTED_COLUMNS = 20

STANDARD_COLUMNS = ("prompt", "chosen", "rejected")
PAPER_COLUMNS = ("user_input", "completion_a", "completion_b")
POLE_COLUMN = "pole"


@dataclass(frozen=True)
class _Layout:
    """Which of a file's columns hold the prompt, the chosen and the rejected response."""

    prompt: str
    chosen: str
    rejected: str


STANDARD = _Layout(*STANDARD_COLUMNS)
PAPER = _Layout(*PAPER_COLUMNS)


@dataclass
class _Table:
    """A file's rows as read, before validation: ``(where, values)`` per row."""

    columns: list[str] = field(default_factory=list)
    rows: list[tuple[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # rows that could not even be parsed

    def add(self, where: str, values: Any) -> None:
        if isinstance(values, Mapping):  # new columns in first-seen order (a dict as a set)
            known = dict.fromkeys(self.columns)
            known.update(dict.fromkeys(str(column) for column in values))
            self.columns = list(known)
        self.rows.append((where, values))


class _Unreadable(Exception):
    """The file as a whole cannot be read in the format its name promises."""


def read_feedback_files(
    specs: Sequence[FeedbackFileSpec], space: PreferenceSpace
) -> list[PreferenceRow]:
    """Read and validate every file; raise one :class:`PsoupsError` listing all problems."""
    problems: list[str] = []
    rows: list[PreferenceRow] = []
    for index, spec in enumerate(specs):
        rows.extend(_read_file(spec, index, space, problems))
    if problems:
        raise PsoupsError(format_problems("feedback.files", problems))
    return rows


def format_problems(what: str, problems: Sequence[str]) -> str:
    """One message listing up to :data:`MAX_LISTED_PROBLEMS` problems, then how many more."""
    listed = [f"  - {problem}" for problem in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        listed.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return f"{what}: {len(problems)} problem(s):\n" + "\n".join(listed)


def _read_file(
    spec: FeedbackFileSpec, index: int, space: PreferenceSpace, problems: list[str]
) -> list[PreferenceRow]:
    name = _printable(spec.path)
    try:
        kind = data_kind(spec.path)
    except StorageError as exc:
        problems.append(f"{name}: {exc} (feedback.files[{index}].path)")
        return []
    if kind == "missing":
        problems.append(f"{name}: does not exist (feedback.files[{index}].path)")
        return []
    try:
        with local_data(spec.path) as path:
            table = _read_table(path)
    except _Unreadable as exc:
        problems.append(f"{name}: {exc}; accepted formats: {ACCEPTED_FORMATS}")
        return []
    except StorageError as exc:
        problems.append(f"{name}: {exc} (feedback.files[{index}].path)")
        return []
    problems.extend(f"{name}: {problem}" for problem in table.problems)
    if not table.rows:
        if not table.problems:
            problems.append(f"{name}: holds no rows")
        return []
    layout = _layout(table.columns)
    if layout is None:
        problems.append(f"{name}: {_missing_columns_message(table.columns)}")
        return []
    if POLE_COLUMN not in table.columns and spec.pole is None:
        problems.append(
            f"{name}: has no {POLE_COLUMN!r} column and feedback.files[{index}].pole is not "
            f"set; add a {POLE_COLUMN!r} column or name the pole of every row with "
            f"feedback.files[{index}].pole (known poles: {', '.join(space.pole_ids)})"
        )
        return []
    rows = []
    for where, values in table.rows:
        row_problems: list[str] = []
        row = _validated_row(values, layout, spec.pole, space, row_problems)
        problems.extend(f"{name}: {where}: {problem}" for problem in row_problems)
        if row is not None:
            rows.append(row)
    return rows


# --- reading ------------------------------------------------------------------------------------


def _read_table(path: Path) -> _Table:
    if path.is_dir():
        return _read_dataset_dir(path)
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return _read_json(path)
    if suffix in PARQUET_SUFFIXES:
        return _read_parquet(path)
    if suffix in CSV_SUFFIXES:
        return _read_csv(path)
    raise _Unreadable(f"unsupported file type {suffix or '(no suffix)'!r}")


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _Unreadable(f"is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise _Unreadable(f"cannot be read ({exc.strerror or exc})") from None


def _read_json(path: Path) -> _Table:
    text = _read_text(path)
    table = _Table()
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise _Unreadable(f"is not valid JSON ({_json_problem(exc)})") from None
        for number, item in enumerate(items, start=1):
            table.add(f"row {number}", item)
        return table
    parsed = failed = 0
    first_failure = ""
    # split on "\n" only: str.splitlines also breaks at U+2028 or U+0085, which JSON strings hold
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            table.add(f"line {number}", json.loads(line))
            parsed += 1
        except (ValueError, RecursionError) as exc:
            failed += 1
            first_failure = first_failure or f"line {number}: {_json_problem(exc)}"
            table.problems.append(f"line {number}: not valid JSON ({_json_problem(exc)})")
    if failed and not parsed:
        raise _Unreadable(f"is not JSON lines ({first_failure})")
    return table


def _json_problem(exc: ValueError | RecursionError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return exc.msg
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return _first_line(exc)  # e.g. an integer of more than 4300 digits


def _read_parquet(path: Path) -> _Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        arrow_table = pq.read_table(path)
        records = arrow_table.to_pylist()  # fails on values Python cannot hold (year 10000)
    except (pa.ArrowException, OSError, ValueError, OverflowError) as exc:
        raise _Unreadable(f"cannot be read as Parquet ({_first_line(exc)})") from None
    table = _Table(columns=list(arrow_table.column_names))
    for number, values in enumerate(records, start=1):
        table.add(f"row {number}", values)
    return table


def _read_csv(path: Path) -> _Table:
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    table = _Table()
    try:
        header = next(reader, None)
        if header is None:
            raise _Unreadable("is empty (a CSV file needs a header row)")
        table.columns = [column.strip() for column in header]
        number = 0
        previous_line = reader.line_num
        for record in reader:
            start_line, previous_line = previous_line + 1, reader.line_num
            if not record:
                continue
            number += 1
            where = f"row {number} (line {start_line})"
            if len(record) != len(table.columns):
                table.problems.append(
                    f"{where}: has {len(record)} value(s), the header names "
                    f"{len(table.columns)} column(s)"
                )
                continue
            table.add(where, dict(zip(table.columns, record, strict=True)))
    except csv.Error as exc:
        raise _Unreadable(f"cannot be read as CSV (line {reader.line_num}: {exc})") from None
    return table


def _read_dataset_dir(path: Path) -> _Table:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a directory it cannot read
        raise _Unreadable(
            f"is a directory but not one saved by datasets' save_to_disk ({_first_line(exc)})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded.items())
        labelled = len(splits) > 1
    else:
        splits, labelled = [("", loaded)], False
    table = _Table()
    for split_name, dataset in splits:
        table.columns = list(dict.fromkeys([*table.columns, *dataset.column_names]))
        prefix = f"split {split_name!r} " if labelled else ""
        try:
            records = dataset.to_list()
        except (ValueError, OverflowError) as exc:  # values Python cannot hold (year 10000)
            raise _Unreadable(f"cannot be read ({_first_line(exc)})") from None
        for number, values in enumerate(records, start=1):
            table.add(f"{prefix}row {number}", values)
    return table


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


# --- validation ---------------------------------------------------------------------------------


def _layout(columns: Sequence[str]) -> _Layout | None:
    for layout in (STANDARD, PAPER):
        if {layout.prompt, layout.chosen, layout.rejected} <= set(columns):
            return layout
    return None


def _missing_columns_message(columns: Sequence[str]) -> str:
    closer = PAPER_COLUMNS if set(PAPER_COLUMNS) & set(columns) else STANDARD_COLUMNS
    missing = [column for column in closer if column not in columns]
    shown = [_printable(column)[:40] for column in columns[:MAX_LISTED_COLUMNS]]
    if len(columns) > MAX_LISTED_COLUMNS:
        shown.append(f"... ({len(columns)} in all)")
    found = ", ".join(shown) or "(none)"
    return (
        f"missing column(s) {', '.join(missing)}; found columns: {found}. Expected either "
        f"prompt, pole, chosen, rejected (pole may be left out when the file's pole is set in "
        f"feedback.files), or the paper's format user_input, completion_a (preferred), "
        f"completion_b"
    )


def _text_field(values: Mapping[str, Any], column: str, problems: list[str]) -> str | None:
    """The non-empty string in ``column``, else None with a problem recorded."""
    if column not in values:
        problems.append(f"field {column!r} is missing")
        return None
    value = values[column]
    if value is None:
        problems.append(f"field {column!r} is empty (null)")
        return None
    if not isinstance(value, str):
        problems.append(
            f"field {column!r} must be a string, got {type(value).__name__} {_preview(value, 40)}"
        )
        return None
    if not value.strip():
        problems.append(f"field {column!r} is empty")
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON can spell these ("\ud800"); UTF-8 cannot
        problems.append(
            f"field {column!r} is not valid Unicode: an unpaired surrogate at character "
            f"{exc.start + 1}"
        )
        return None
    return value


def _printable(text: str) -> str:
    """``text`` as is, or its ``repr`` when it holds line breaks or other control characters."""
    return text if text.isprintable() else repr(text)


def _preview(value: Any, limit: int) -> str:
    """``repr(value)`` cut to ``limit`` characters (any value, however nested)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deeply to show>"
    return text if len(text) <= limit else text[:limit]


def _pole_field(
    values: Mapping[str, Any],
    file_pole: str | None,
    space: PreferenceSpace,
    problems: list[str],
) -> str | None:
    """The row's canonical pole id: its ``pole`` value, else the file's pole."""
    value = values.get(POLE_COLUMN)
    if value is None or (isinstance(value, str) and not value.strip()):
        if file_pole is not None:
            return space.pole(file_pole).id
        state = "is empty" if POLE_COLUMN in values else "is missing"
        problems.append(f"field {POLE_COLUMN!r} {state}")
        return None
    if _text_field(values, POLE_COLUMN, problems) is None:  # not a string
        return None
    try:
        pole_id = space.pole(value).id
    except CombinationError:
        problems.append(
            f"field {POLE_COLUMN!r} is {_preview(value, 60)}, not a pole of the preference "
            f"space (known poles: {', '.join(space.pole_ids)})"
        )
        return None
    if file_pole is not None and pole_id != space.pole(file_pole).id:
        problems.append(
            f"field {POLE_COLUMN!r} is {pole_id!r} but the file's pole in feedback.files is "
            f"{file_pole!r}"
        )
        return None
    return pole_id


def _validated_row(
    values: Any,
    layout: _Layout,
    file_pole: str | None,
    space: PreferenceSpace,
    problems: list[str],
) -> PreferenceRow | None:
    if not isinstance(values, Mapping):
        problems.append(f"expected an object with named fields, got {_preview(values, 60)}")
        return None
    prompt = _text_field(values, layout.prompt, problems)
    chosen = _text_field(values, layout.chosen, problems)
    rejected = _text_field(values, layout.rejected, problems)
    pole = _pole_field(values, file_pole, space, problems)
    if chosen is not None and rejected is not None and chosen.strip() == rejected.strip():
        problems.append(
            f"fields {layout.chosen!r} and {layout.rejected!r} are identical; a pair needs "
            "two different responses"
        )
        return None
    if prompt is None or chosen is None or rejected is None or pole is None:
        return None
    return PreferenceRow(prompt=prompt, pole=pole, chosen=chosen, rejected=rejected)
