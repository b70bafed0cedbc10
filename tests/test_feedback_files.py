"""Feedback files: every accepted format reads the same rows; every bad file, a clear error."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from psoups_ray.artifacts import PreferenceRow, load_feedback
from psoups_ray.config import FeedbackFileSpec, load_config
from psoups_ray.errors import PsoupsError
from psoups_ray.feedback import run_feedback_stage
from psoups_ray.feedback.files import read_feedback_files
from psoups_ray.preferences import PreferenceSpace
from psoups_ray.rundir import RunDir

SPACE = PreferenceSpace.default()
COLUMNS = ["prompt", "pole", "chosen", "rejected"]


def standard_rows() -> list[dict[str, str]]:
    """Two prompts per pole; texts with commas, quotes and a newline (CSV quoting)."""
    rows = []
    for pole in SPACE.pole_ids:
        for index in range(2):
            rows.append(
                {
                    "prompt": f"Why is the sky blue, part {index}?",
                    "pole": pole,
                    "chosen": f'A "{pole}" answer,\nwith two lines ({index}).',
                    "rejected": f"Another answer for {pole} ({index}).",
                }
            )
    return rows


def expected(rows: list[dict[str, str]]) -> list[PreferenceRow]:
    return [PreferenceRow(**{column: row[column] for column in COLUMNS}) for row in rows]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_csv(path: Path, rows: list[dict], columns: list[str] = COLUMNS) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_dataset(path: Path, rows: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def read(*specs: FeedbackFileSpec) -> list[PreferenceRow]:
    return read_feedback_files(list(specs), SPACE)


def problems_of(*specs: FeedbackFileSpec) -> str:
    with pytest.raises(PsoupsError) as info:
        read(*specs)
    assert "Traceback" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize(
    "writer,name",
    [
        (write_jsonl, "pairs.jsonl"),
        (write_csv, "pairs.csv"),
        (write_parquet, "pairs.parquet"),
        (write_dataset, "pairs_dataset"),
    ],
)
def test_every_format_reads_the_same_rows(tmp_path, writer, name):
    rows = standard_rows()
    path = writer(tmp_path / name, rows)
    assert read(FeedbackFileSpec(path=str(path))) == expected(rows)


@pytest.mark.parametrize(
    "writer,name", [(write_jsonl, "pairs.jsonl"), (write_parquet, "pairs.parquet"),
                    (write_dataset, "pairs_dataset")],
)  # fmt: skip
def test_files_given_by_uri_read_through_pyarrow_like_the_run_directory(tmp_path, writer, name):
    """A ``file://`` URI takes the path of ``s3://`` and ``gs://`` ones (pyarrow.fs: a file
    downloaded to a scratch copy that is removed after reading)."""
    rows = standard_rows()
    path = writer(tmp_path / name, rows)
    assert read(FeedbackFileSpec(path=f"file://{path}")) == expected(rows)
    missing = problems_of(FeedbackFileSpec(path=f"file://{tmp_path}/absent.jsonl"))
    assert "absent.jsonl: does not exist (feedback.files[0].path)" in missing
    assert "cannot open" in problems_of(FeedbackFileSpec(path="nosuchscheme://bucket/x.jsonl"))


def test_json_array_and_pole_case_are_accepted(tmp_path):
    rows = standard_rows()
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{**row, "pole": row["pole"].lower()} for row in rows]))
    assert read(FeedbackFileSpec(path=str(path))) == expected(rows)


def test_dataset_dict_directory_reads_every_split(tmp_path):
    import datasets

    rows = standard_rows()
    half = len(rows) // 2
    path = tmp_path / "dataset_dict"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:half]),
            "test": datasets.Dataset.from_list(rows[half:]),
        }
    ).save_to_disk(str(path))
    assert read(FeedbackFileSpec(path=str(path))) == expected(rows)


@pytest.mark.parametrize("writer,suffix", [(write_jsonl, ".jsonl"), (write_csv, ".csv")])
def test_paper_format_with_the_files_pole(tmp_path, writer, suffix):
    paper = [
        {"user_input": f"Explain tides ({i}).", "completion_a": f"Good {i}", "completion_b": "Bad"}
        for i in range(3)
    ]
    columns = ["user_input", "completion_a", "completion_b"]
    path = tmp_path / f"P2A{suffix}"
    if writer is write_csv:
        write_csv(path, paper, columns)
    else:
        writer(path, paper)
    assert read(FeedbackFileSpec(path=str(path), pole="P2A")) == [
        PreferenceRow(f"Explain tides ({i}).", "P2A", f"Good {i}", "Bad") for i in range(3)
    ]


def test_missing_column_names_found_and_expected_columns(tmp_path):
    path = write_jsonl(
        tmp_path / "no_rejected.jsonl", [{"prompt": "q", "pole": "P1A", "chosen": "x"}]
    )
    message = problems_of(FeedbackFileSpec(path=str(path)))
    assert "no_rejected.jsonl: missing column(s) rejected" in message
    assert "found columns: prompt, pole, chosen" in message
    assert "prompt, pole, chosen, rejected" in message
    assert "user_input, completion_a (preferred), completion_b" in message


def test_paper_format_missing_column_names_the_paper_columns(tmp_path):
    path = write_jsonl(tmp_path / "paper.jsonl", [{"user_input": "q", "completion_a": "x"}])
    message = problems_of(FeedbackFileSpec(path=str(path), pole="P1A"))
    assert "missing column(s) completion_b" in message


def test_row_problems_name_file_row_and_field(tmp_path):
    rows = standard_rows()
    rows[1]["chosen"] = "   "  # line 2: empty
    rows[2]["rejected"] = rows[2]["chosen"]  # line 3: identical
    rows[3]["pole"] = "P9Z"  # line 4: unknown pole
    rows[4]["prompt"] = 17  # line 5: not a string
    del rows[5]["rejected"]  # line 6: missing field
    jsonl = write_jsonl(tmp_path / "bad.jsonl", rows)
    message = problems_of(FeedbackFileSpec(path=str(jsonl)))
    assert "bad.jsonl: line 2: field 'chosen' is empty" in message
    assert "bad.jsonl: line 3: fields 'chosen' and 'rejected' are identical" in message
    assert "bad.jsonl: line 4: field 'pole' is 'P9Z', not a pole" in message
    assert "known poles: P1A, P1B, P2A, P2B, P3A, P3B" in message
    assert "bad.jsonl: line 5: field 'prompt' must be a string, got int" in message
    assert "bad.jsonl: line 6: field 'rejected' is missing" in message
    assert "5 problem(s)" in message


def test_csv_and_parquet_rows_are_numbered_as_users_count(tmp_path):
    rows = standard_rows()
    rows[0]["chosen"] = rows[0]["rejected"]
    rows[2]["pole"] = ""
    csv_path = write_csv(tmp_path / "bad.csv", rows)
    message = problems_of(FeedbackFileSpec(path=str(csv_path)))
    assert "bad.csv: row 1 (line 2): fields 'chosen' and 'rejected' are identical" in message
    # Row 2's chosen text spans lines 3-4, so row 3 starts on line 5.
    assert "bad.csv: row 3 (line 5): field 'pole' is empty" in message

    parquet = write_parquet(tmp_path / "bad.parquet", rows)
    message = problems_of(FeedbackFileSpec(path=str(parquet)))
    assert "bad.parquet: row 1: fields 'chosen' and 'rejected' are identical" in message
    assert "bad.parquet: row 3: field 'pole' is empty" in message


def test_file_without_pole_column_needs_the_files_pole(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "pole"} for row in standard_rows()]
    path = write_parquet(tmp_path / "nopole.parquet", rows)
    message = problems_of(FeedbackFileSpec(path=str(path)))
    assert "nopole.parquet: has no 'pole' column and feedback.files[0].pole is not set" in message
    assert read(FeedbackFileSpec(path=str(path), pole="P3B"))[0].pole == "P3B"


def test_pole_column_must_agree_with_the_files_pole(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", standard_rows()[:3])
    message = problems_of(FeedbackFileSpec(path=str(path), pole="P1A"))
    assert "mixed.jsonl: line 3: field 'pole' is 'P1B' but the file's pole" in message


@pytest.mark.parametrize(
    "name,content,what",
    [
        ("corrupt.parquet", b"PAR1 this is not parquet at all", "cannot be read as Parquet"),
        ("binary.jsonl", b"\xff\xfe\x00garbage\x80", "is not UTF-8 text"),
        ("garbage.jsonl", b"this is not json\nnor this\n", "is not JSON lines"),
        ("broken.json", b'[{"prompt": "q",', "is not valid JSON"),
        ("empty.csv", b"", "is empty"),
        ("quotes.csv", b'prompt,pole,chosen,rejected\n"q"x,P1A,a,b\n', "cannot be read as CSV"),
        ("pairs.xlsx", b"PK\x03\x04", "unsupported file type '.xlsx'"),
    ],
)
def test_unreadable_files_name_the_file_and_the_accepted_formats(tmp_path, name, content, what):
    path = tmp_path / name
    path.write_bytes(content)
    message = problems_of(FeedbackFileSpec(path=str(path)))
    assert f"{name}: {what}" in message
    assert "accepted formats: JSONL" in message and "save_to_disk" in message


def test_directory_that_is_not_a_dataset(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("hi")
    message = problems_of(FeedbackFileSpec(path=str(folder)))
    assert "folder: is a directory but not one saved by datasets' save_to_disk" in message


def test_problems_of_all_files_are_listed_once_and_capped(tmp_path):
    rows = standard_rows() * 3
    for row in rows:
        row["chosen"] = ""
    many = write_jsonl(tmp_path / "many.jsonl", rows)
    missing = tmp_path / "missing.jsonl"
    message = problems_of(FeedbackFileSpec(path=str(many)), FeedbackFileSpec(path=str(missing)))
    assert f"{len(rows) + 1} problem(s)" in message
    assert f"and {len(rows) + 1 - 20} more" in message
    assert message.count("\n  - ") == 20
    # the missing file is beyond the first 20 lines but counted; listed first when alone:
    assert "missing.jsonl: does not exist" in problems_of(FeedbackFileSpec(path=str(missing)))


def test_files_stage_splits_by_prompt_with_every_pole_on_both_sides(tmp_path):
    rows = []
    for pole in SPACE.pole_ids:
        for prompt_index in range(6):
            for pair_index in range(3):
                rows.append(
                    {
                        "prompt": f"Question {prompt_index}?",
                        "pole": pole,
                        "chosen": f"good {pole} {prompt_index} {pair_index}",
                        "rejected": f"bad {pole} {prompt_index} {pair_index}",
                    }
                )
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = load_config(
        None,
        [
            "feedback.source=files",
            f"feedback.files=[{{path: {path}}}]",
            "feedback.eval_fraction=0.2",
        ],
    )
    rundir = RunDir(tmp_path / "run")
    section = run_feedback_stage(config, rundir)
    train, eval_rows = load_feedback(rundir, "train"), load_feedback(rundir, "eval")
    assert sorted(train + eval_rows, key=str) == sorted(expected(rows), key=str)
    for pole in SPACE.pole_ids:
        train_prompts = {r.prompt for r in train if r.pole == pole}
        eval_prompts = {r.prompt for r in eval_rows if r.pole == pole}
        assert train_prompts and eval_prompts and not train_prompts & eval_prompts
        assert section["counts"][pole] == {"train": 15, "eval": 3}  # 18 pairs, 20% held out
    assert section["source"] == "files" and section["files"] == [str(path)]


def test_files_stage_refuses_a_pole_without_enough_prompts(tmp_path):
    rows = standard_rows()
    rows = [row for row in rows if row["pole"] != "P2B"] + [
        {"prompt": "Only one?", "pole": "P2B", "chosen": "a", "rejected": "b"}
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = load_config(None, ["feedback.source=files", f"feedback.files=[{{path: {path}}}]"])
    with pytest.raises(PsoupsError, match=r"pole P2B has 1 pair\(s\) on 1 distinct prompt"):
        run_feedback_stage(config, RunDir(tmp_path / "run"))
