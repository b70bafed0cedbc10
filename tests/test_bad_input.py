"""Hostile input is a clear error, never a traceback: property tests (hypothesis) over
combination strings, config overrides and feedback files.

Each property: the input either works, or raises the module's own error whose message names
what is wrong (the key, the file, the row), short enough to read whatever the input's size.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from psoups_ray.config import FeedbackFileSpec, PsoupsConfig, apply_override, load_config
from psoups_ray.errors import PsoupsError
from psoups_ray.feedback.files import read_feedback_files
from psoups_ray.manifest import flatten
from psoups_ray.preferences import CombinationError, PreferenceSpace

SPACE = PreferenceSpace.default()
BOUNDED = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
LONGEST_MESSAGE = 2000  # characters a one-problem message may take, whatever the input


def huge(piece: str) -> st.SearchStrategy[str]:
    """``piece`` repeated into a string of up to ~200k characters."""
    return st.integers(10_000, 200_000).map(lambda size: piece * (size // len(piece) + 1))


# --- combination strings ------------------------------------------------------------------------

COMBINATION_PIECES = ["P1A", "p2b", "P3B", "P1B", "P9Z", "P1", "A", "+", " ", "\t", "\n",
                      "\u00a0", "\uff0b", "P\u0131A", "\U0001f600", ""]  # fmt: skip
COMBINATION_TEXT = st.one_of(
    st.text(),
    st.lists(st.sampled_from(COMBINATION_PIECES), max_size=12).map("".join),
    huge("P1A+"),
    huge("x"),
    huge("+"),
)


@settings(BOUNDED, max_examples=100)
@given(text=COMBINATION_TEXT)
@example(text="P1A+" * 100_000 + "P2B")
@example(text="\u0000")
def test_any_text_parses_to_a_valid_combination_or_a_short_clear_error(text):
    try:
        combination = SPACE.parse(text)
    except CombinationError as error:
        assert 0 < len(str(error)) < LONGEST_MESSAGE
        return
    assert all(pole in SPACE.pole_ids for pole in combination)
    dimensions = [SPACE.dimension_of(pole).id for pole in combination]
    assert dimensions == [d.id for d in SPACE.dimensions if d.id in dimensions]  # one each, ordered
    assert SPACE.parse(str(combination)) == combination  # canonical: parses to itself


@BOUNDED
@given(data=st.data())
def test_any_spelling_of_a_valid_combination_parses_to_its_canonical_form(data):
    chosen = [
        data.draw(st.sampled_from([None, *(pole.id for pole in dimension.poles)]))
        for dimension in SPACE.dimensions
    ]
    poles = [pole for pole in chosen if pole is not None]
    if not poles:
        poles = [SPACE.pole_ids[0]]
    spelled = []
    for pole in data.draw(st.permutations(poles)):
        upper = data.draw(st.lists(st.booleans(), min_size=len(pole), max_size=len(pole)))
        cased = "".join(c.upper() if up else c.lower() for c, up in zip(pole, upper, strict=True))
        space = st.sampled_from(["", " ", "\t", "\u00a0", "  "])
        spelled.append(data.draw(space) + cased + data.draw(space))
    assert SPACE.parse("+".join(spelled)) == SPACE.combination(poles)


@pytest.mark.parametrize("value", [None, 17, ["P1A"], b"P1A"])
def test_non_text_is_a_combination_error(value):
    with pytest.raises(CombinationError):
        SPACE.parse(value)
    with pytest.raises(CombinationError, match="unknown pole"):
        SPACE.combination([value])


# --- config overrides -----------------------------------------------------------------------------

CONFIG_KEYS = sorted(flatten(load_config().model_dump(mode="json")))
SECTIONS = sorted({key.split(".")[0] for key in CONFIG_KEYS})
YAML_TRAPS = [
    "", " ", "~", "null", "true", "[]", "{}", "[a, b]", "{a: 1}", "'quoted'", '"x', "- a",
    "a: b", "|", ">-", "*undefined", "&a [*a]", "%YAML 1.1", "---", "...", "\x00", "\ud800",
    "{[1]: 2}", "? [a]: b", "!!binary aGk=", "!!python/object:os.system x", "!!set [1]",
    "2001-13-01", "2001-02-30 25:61:00", "!!timestamp x", "!!int 0x", "!!float abc", "0x",
    "1e400", "-1e400", ".nan", ".inf", "9" * 5000, "[" * 3000, "{a: " * 2000, "P1A+P2B",
    "[{path: x.jsonl, pole: P9Z}]", "=", "a=b=c",
]  # fmt: skip
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
OVERRIDE_KEYS = st.one_of(
    st.sampled_from(CONFIG_KEYS),
    st.sampled_from(SECTIONS),
    st.tuples(st.sampled_from(CONFIG_KEYS + SECTIONS), st.text(max_size=6)).map(".".join),
    st.lists(st.text(max_size=6), min_size=1, max_size=4).map(".".join),
)
OVERRIDE_VALUES = st.one_of(
    st.sampled_from(YAML_TRAPS),
    st.text(max_size=30),
    st.integers().map(str),
    st.integers(10**18, 10**40).map(str),
    st.floats().map(repr),
    JSON_VALUES.map(json.dumps),
    huge("y"),
)
OVERRIDES = st.one_of(
    st.tuples(OVERRIDE_KEYS, OVERRIDE_VALUES).map("=".join),
    st.text(max_size=40),  # often no '=' at all
)


def names_the_key(message: str, override: str) -> bool:
    """Whether ``message`` names the override's key, a section of it, or its malformed shape."""
    key, sep, _ = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        return "must look like section.key=value" in message or "empty part" in message
    parts = key.split(".")
    prefixes = [".".join(parts[:length]) for length in range(1, len(parts) + 1)]
    return any(p in message or repr(p)[1:-1] in message for p in prefixes)


@BOUNDED
@given(override=OVERRIDES)
@example(override="base.sft.steps=" + "9" * 5000)  # over Python's int-parsing limit
@example(override="seed=2001-13-01")  # a YAML date that is no date
@example(override="name=!!timestamp x")
@example(override="base.model=" + "[" * 3000)  # nested past the recursion limit
@example(override="preferences.dimensions=[]")
def test_any_override_loads_or_is_a_config_error_naming_the_key(override):
    try:
        config = load_config(None, [override])
    except PsoupsError as error:
        message = str(error)
        assert names_the_key(message, override), message
        assert "Traceback" not in message
        return
    assert isinstance(config, PsoupsConfig)


@BOUNDED
@given(overrides=st.lists(OVERRIDES, max_size=5))
def test_many_bad_overrides_are_one_error_listing_problems(overrides):
    try:
        load_config(None, overrides)
    except PsoupsError as error:
        assert "problem(s)" in str(error)


@BOUNDED
@given(override=OVERRIDES, data=st.dictionaries(st.sampled_from(SECTIONS), JSON_VALUES))
def test_apply_override_returns_a_problem_instead_of_raising(override, data):
    problem = apply_override(data, override)
    assert problem is None or (isinstance(problem, str) and problem)


# --- serve configs (psoups serve --config) -------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


@st.composite
def serve_configs_of_any_shape(draw) -> Any:
    """The shipped serve config with one value somewhere replaced by a value of any type
    (or the whole document replaced)."""
    import yaml

    data = yaml.safe_load((REPO / "serve_configs" / "tiny.yaml").read_text())
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON_VALUES)
    node, path = data, []
    while isinstance(node, (dict, list)) and node and draw(st.booleans()):
        key = draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
        path.append(key)
        node = node[key]
    if not path:
        return data
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = draw(JSON_VALUES)
    return data


@BOUNDED
@given(data=serve_configs_of_any_shape())
@example(data=42)
@example(data={"applications": "psoups"})
@example(data={"applications": [{"import_path": "psoups_ray.serve.app:build_app",
                                 "deployments": [{"num_replicas": 2}]}]})  # fmt: skip
def test_any_serve_config_reads_or_is_a_clear_error(tmp_path_factory, data):
    import yaml

    from psoups_ray.serve.launch import read_serve_config

    path = tmp_path_factory.mktemp("serve") / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        args, deployments = read_serve_config(str(path))
    except PsoupsError as error:
        assert str(path) in str(error) and "Traceback" not in str(error)
        return
    assert isinstance(args, dict) and isinstance(deployments, dict)


def test_every_shipped_serve_config_has_valid_args_and_known_deployments():
    from psoups_ray.serve.args import ServeArgs
    from psoups_ray.serve.launch import read_serve_config

    files = sorted((REPO / "serve_configs").glob("*.yaml"))
    assert len(files) >= 2
    for path in files:
        args, deployments = read_serve_config(str(path))
        settings = ServeArgs.model_validate(args)
        assert settings.personal.enabled, path.name
        assert set(deployments) == {"SoupModel", "Ingress", "PreferenceScorer"}, path.name


def test_a_serve_config_with_a_key_twice_is_refused(tmp_path):
    from psoups_ray.serve.launch import read_serve_config

    args, deployments = read_serve_config(str(REPO / "serve_configs" / "tiny.yaml"))
    assert args["strategy"] == "mixing" and set(deployments) == {
        "SoupModel",
        "Ingress",
        "PreferenceScorer",
    }
    text = (REPO / "serve_configs" / "tiny.yaml").read_text()
    twice = tmp_path / "twice.yaml"
    twice.write_text(text.replace("      device: cpu\n", "      device: cpu\n      device: cuda\n"))
    with pytest.raises(PsoupsError, match="key 'device' a second time"):
        read_serve_config(str(twice))


# --- feedback files -------------------------------------------------------------------------------

FEEDBACK_COLUMNS = ["prompt", "pole", "chosen", "rejected", "user_input", "completion_a",
                    "completion_b"]  # fmt: skip
GOOD_TEXT = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=20)
TEXTS = st.one_of(
    st.text(min_size=1, max_size=20),
    st.sampled_from([" ", "", "\ud800", "a\udfffb", "\x00", "same"]),
    huge("z"),
)
POLES = st.one_of(st.sampled_from([*SPACE.pole_ids, "p1a", " P2B ", "P9Z", ""]), JSON_VALUES)
CELLS = st.one_of(TEXTS, TEXTS, JSON_VALUES)  # mostly text, sometimes anything


@st.composite
def rows_of_any_shape(draw) -> list[Any]:
    """Valid rows, a quarter of them mutated: a field dropped or replaced by a value of any
    type, an extra field; one in ten no object at all."""
    rows = []
    for _ in range(draw(st.integers(0, 6))):
        text = draw(GOOD_TEXT)
        row: Any = {
            "prompt": text,
            "pole": draw(st.sampled_from(SPACE.pole_ids)),
            "chosen": f"good {text}",
            "rejected": f"bad {text}",
        }
        mutated = draw(st.integers(0, 3)) == 0
        columns = st.sampled_from([*FEEDBACK_COLUMNS, "extra"])
        for column in draw(st.lists(columns, min_size=1, max_size=2)) if mutated else []:
            if draw(st.booleans()):
                row.pop(column, None)
            else:
                row[column] = draw(POLES if column == "pole" else CELLS)
        if draw(st.integers(0, 9)) == 0:
            row = draw(JSON_VALUES)
        rows.append(row)
    return rows


@st.composite
def typed_rows(draw) -> list[dict[str, Any]]:
    """Rows a columnar file can hold: valid rows, some columns of another type, nulls."""
    rows = [row for row in draw(rows_of_any_shape()) if isinstance(row, dict)]
    other_types = [
        st.integers(-(2**63), 2**63 - 1),
        st.floats(),
        st.booleans(),
        st.lists(st.integers(0, 9), max_size=3),
        st.fixed_dictionaries({"nested": st.text(max_size=5)}),
    ]
    columns = dict.fromkeys(column for row in rows for column in row)
    for column in columns:
        retyped = draw(st.integers(0, 4)) == 0  # else the column keeps its strings
        kind = draw(st.sampled_from(other_types)) if retyped else None
        for row in rows:
            if kind is not None or not isinstance(row.get(column), str):
                row[column] = draw(st.none() | (GOOD_TEXT if kind is None else kind))
    return rows


def csv_cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def write_jsonl(path: Path, rows: list[Any], junk: list[str], ascii_only: bool) -> None:
    lines = [json.dumps(row, ensure_ascii=ascii_only) for row in rows] + junk
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")


def write_csv(path: Path, rows: list[Any], extra_header: list[str]) -> None:
    """The rows' keys as the header (plus ``extra_header``); a non-object row as one cell."""
    header = [*dict.fromkeys(key for row in rows if isinstance(row, dict) for key in row)]
    header += extra_header
    with path.open("w", newline="", encoding="utf-8", errors="surrogatepass") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            if isinstance(row, dict):
                writer.writerow([csv_cell(row.get(column, "")) for column in header])
            else:
                writer.writerow([csv_cell(row)])


def write_columnar(path: Path, rows: list[dict[str, Any]]) -> bool:
    """Write ``rows`` as Parquet (or a ``datasets`` directory); False if the writer cannot."""
    try:
        if path.suffix == ".parquet":
            pq.write_table(pa.Table.from_pylist(rows), path)
        else:
            import datasets

            datasets.Dataset.from_list(rows).save_to_disk(str(path))
    except Exception:  # rows the writer itself refuses are no test of the reader
        event("the writer refused the rows")
        return False
    return True


def check_read(path: Path, pole: str | None = None) -> None:
    """Reading ``path`` gives valid rows or one error whose every problem names the file."""
    try:
        rows = read_feedback_files([FeedbackFileSpec(path=str(path), pole=pole)], SPACE)
    except PsoupsError as error:
        event("a clear error")
        lines = str(error).splitlines()
        assert lines[0].startswith("feedback.files: "), lines[0]
        named = (f"  - {path}: ", f"  - {str(path)!r}: ", "  ... and ")  # control chars: repr
        for line in lines[1:]:
            assert line.startswith(named) and len(line) < LONGEST_MESSAGE, line
        return
    event("rows read")
    for row in rows:
        assert row.pole in SPACE.pole_ids
        for text in (row.prompt, row.chosen, row.rejected):
            assert isinstance(text, str) and text.strip()
            text.encode("utf-8")  # writable to the run directory
        assert row.chosen.strip() != row.rejected.strip()


@BOUNDED
@given(
    rows=rows_of_any_shape(),
    junk=st.lists(st.one_of(st.text(max_size=20), st.just("[" * 5000), st.just("9" * 5000))),
    pole=st.sampled_from([None, None, "P1A"]),
    as_array=st.booleans(),
    ascii_only=st.booleans(),
)
def test_json_rows_of_any_shape_read_or_name_file_row_and_field(
    tmp_path_factory, rows, junk, pole, as_array, ascii_only
):
    path = tmp_path_factory.mktemp("json") / ("pairs.json" if as_array else "pairs.jsonl")
    if as_array:
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        write_jsonl(path, rows, junk, ascii_only)
    check_read(path, pole)


@BOUNDED
@given(
    rows=rows_of_any_shape(),
    extra_header=st.lists(st.sampled_from(["", "extra", "prompt"]) | st.text(max_size=8)),
    pole=st.sampled_from([None, None, "P2B"]),
)
def test_csv_rows_of_any_shape_read_or_name_file_row_and_field(
    tmp_path_factory, rows, extra_header, pole
):
    path = tmp_path_factory.mktemp("csv") / "pairs.csv"
    write_csv(path, rows, extra_header)
    check_read(path, pole)


@BOUNDED
@given(rows=typed_rows(), pole=st.sampled_from([None, None, "P3A"]))
def test_parquet_columns_of_any_type_read_or_name_file_row_and_field(tmp_path_factory, rows, pole):
    path = tmp_path_factory.mktemp("parquet") / "pairs.parquet"
    if write_columnar(path, rows):
        check_read(path, pole)


@settings(BOUNDED, max_examples=10)
@given(rows=typed_rows())
def test_dataset_directories_of_any_type_read_or_name_file_row_and_field(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("dataset") / "pairs_dataset"
    if write_columnar(path, rows):
        check_read(path)


@BOUNDED
@given(name=st.one_of(st.text(max_size=30), st.integers(250, 400).map(lambda n: "n" * n + ".csv")))
def test_any_file_name_is_read_or_named_in_the_error(tmp_path_factory, name):
    folder = tmp_path_factory.mktemp("names")
    check_read(folder / name.lstrip("/"))


def test_lone_surrogates_and_deep_nesting_are_row_problems(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        '{"prompt": "q\\ud800", "pole": "P1A", "chosen": "a", "rejected": "b"}\n'
        + "[" * 100_000
        + "\n"
        + "9" * 5000
        + "\n"
    )
    with pytest.raises(PsoupsError) as info:
        read_feedback_files([FeedbackFileSpec(path=str(path))], SPACE)
    message = str(info.value)
    assert "line 1: field 'prompt' is not valid Unicode: an unpaired surrogate at character 2" in (
        message
    )
    assert "line 2: not valid JSON (nested too deeply)" in message
    assert "line 3: not valid JSON (Exceeds the limit (4300 digits)" in message


def test_line_separators_inside_json_strings_stay_in_the_text(tmp_path):
    row = {"prompt": "one\u2028two\x85three", "pole": "P1A", "chosen": "c", "rejected": "d"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    [read] = read_feedback_files([FeedbackFileSpec(path=str(path))], SPACE)
    assert read.prompt == row["prompt"]
