"""Readers for untrusted user files: every bad input is one DataError line, never a crash or a partial write."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amft_lib.data.ingest import (
    FieldMap,
    normalize_inline,
    normalize_multiline,
    parse_gsm8k_answer,
    read_records,
    to_math_items,
)
from amft_lib.data.prepare import PrepareConfig, run_prepare
from amft_lib.data.schema import DataError

GOOD = {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3+4 = <<3+4=7>>7\n#### 7"}


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    data = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    path.write_bytes(data)
    return path


def ingest(path: Path, fields: FieldMap | None = None, allow_extra: bool = False, max_row_bytes: int = 1 << 20):
    return to_math_items(read_records(path, max_row_bytes), fields or FieldMap(), allow_extra)


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "DataError messages are one line"
    return message


# ── the happy path ─────────────────────────────────────────────────────────────────────────────


def test_jsonl_and_parquet_read_the_same_items(tmp_path: Path) -> None:
    rows = [GOOD, {"question": "What is 2 + 2?", "answer": "4"}]
    jsonl = write_lines(tmp_path / "in.jsonl", [json.dumps(r) for r in rows])
    parquet = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    from_jsonl, from_parquet = ingest(jsonl), ingest(parquet)
    assert [(i.question, i.answer, i.solution) for i in from_jsonl] == [
        (i.question, i.answer, i.solution) for i in from_parquet
    ]
    assert from_jsonl[0].answer == "7"
    assert from_jsonl[0].solution == "3+4 = 7\n#### 7"  # calculator annotation stripped, answer line kept
    assert from_jsonl[1].solution is None
    assert from_jsonl[1].source.endswith("in.jsonl:2") and from_parquet[1].source.endswith("in.parquet:row 2")


def test_blank_lines_and_bom_are_tolerated_and_numeric_answers_accepted(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "in.jsonl", [b"\xef\xbb\xbf" + json.dumps(GOOD).encode(), "", "   ",
                                                json.dumps({"question": "q?", "answer": 12})])
    items = ingest(path)
    assert [i.answer for i in items] == ["7", "12"]
    assert items[1].line == 4


def test_field_mapping_with_solution_and_id(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "in.jsonl", [json.dumps({"problem": "p?", "final": "5", "sol": "2+3=5", "uid": "a"})])
    item = ingest(path, FieldMap(question="problem", answer="final", solution="sol", id="uid"))[0]
    assert (item.question, item.answer, item.solution, item.id) == ("p?", "5", "2+3=5", "a")


def test_normalisation_nfkc_and_whitespace() -> None:
    assert normalize_inline("  Ｔｏｍ\u00a0has\t３\r\napples\u200b? ") == "Tom has 3 apples\u200b?"
    assert normalize_inline("ﬁve\x00 cats") == "five cats"
    assert normalize_multiline("a  b \r\n\r\n\r\n\r\nc\t\td  ") == "a b\n\nc d"


def test_gsm8k_answer_parsing() -> None:
    assert parse_gsm8k_answer("x = <<2*3=6>>6\n#### 6") == ("6", "x = 6\n#### 6")
    assert parse_gsm8k_answer("#### 1,234") == ("1234", None)  # a bare answer is not a solution
    assert parse_gsm8k_answer("42") == ("42", None)
    assert parse_gsm8k_answer("a #### b #### 9")[0] == "9"  # the last marker decides


# ── one clear error per bad input ──────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("malformed.jsonl", [json.dumps(GOOD), '{"question": "q", "answer": '], "malformed.jsonl:2: malformed JSON"),
        ("notobj.jsonl", ["[1, 2]"], "notobj.jsonl:1: expected a JSON object per line, got array"),
        ("nan.jsonl", ['{"question": "q", "answer": NaN}'], "nan.jsonl:1: malformed JSON"),
        ("deep.jsonl", ["[" * 100_000 + "]" * 100_000], "deep.jsonl:1:"),
        ("bigint.jsonl", ['{"question": "q", "answer": ' + "9" * 5000 + "}"], "bigint.jsonl:1: malformed JSON"),
        ("missing.jsonl", [json.dumps({"question": "q"})], "missing.jsonl:1: missing field(s) 'answer'"),
        ("extra.jsonl", [json.dumps({**GOOD, "label": 1})], "extra.jsonl:1: unexpected field(s) 'label'"),
        ("type.jsonl", [json.dumps({"question": ["q"], "answer": "1"})],
         "type.jsonl:1: field 'question' must be a string, got array"),
        ("bool.jsonl", [json.dumps({"question": "q", "answer": True})], "field 'answer' must be a string, got boolean"),
        ("null.jsonl", [json.dumps({"question": None, "answer": "1"})], "null.jsonl:1: field 'question' is null"),
        ("surrogate.jsonl", ['{"question": "\\ud800", "answer": "1"}'],
         "surrogate.jsonl:1: field 'question' contains invalid Unicode"),
        ("empty.jsonl", [], "empty.jsonl: empty file"),
        ("blank.jsonl", ["", "  "], "blank.jsonl: empty file"),
        ("latin1.jsonl", [json.dumps(GOOD), b'{"question": "caf\xe9", "answer": "1"}'],
         "latin1.jsonl:2: not valid UTF-8 (byte 0xe9"),
        ("data.csv", ["a,b"], "unsupported input format '.csv'"),
    ],
)
def test_bad_jsonl_inputs(tmp_path: Path, name: str, content: list, fragment: str) -> None:
    path = write_lines(tmp_path / name, content) if content else tmp_path / name
    if not content:
        path.write_bytes(b"")
    assert fragment in error_of(ingest, path)


def test_huge_row_is_rejected_before_parsing(tmp_path: Path) -> None:
    big = json.dumps({"question": "q" * 10_000_000, "answer": "1"})
    jsonl = write_lines(tmp_path / "big.jsonl", [json.dumps(GOOD), big])
    assert "big.jsonl:2: row is larger than max_row_bytes=1048576" in error_of(ingest, jsonl)
    parquet = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {"question": "q" * 10_000_000, "answer": "1"}]), parquet)
    assert "big.parquet:row 2: row is larger than max_row_bytes" in error_of(ingest, parquet)
    assert len(ingest(jsonl, max_row_bytes=20_000_000)) == 2  # the limit is a setting, not a wall


def test_bad_parquet_inputs(tmp_path: Path) -> None:
    fake = tmp_path / "fake.parquet"
    fake.write_text("this is not parquet\n")
    assert "fake.parquet: not a readable parquet file" in error_of(ingest, fake)
    good = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([GOOD] * 3), good)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.getvalue()[:-20])
    assert "not a readable parquet file" in error_of(ingest, truncated)
    empty_rows = tmp_path / "norows.parquet"
    pq.write_table(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), empty_rows)
    assert "norows.parquet: empty file" in error_of(ingest, empty_rows)
    typed = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"question": [1, 2], "answer": ["1", "2"]}), typed)
    assert "typed.parquet:row 1: field 'question' must be a string, got number" in error_of(ingest, typed)
    (tmp_path / "empty.parquet").write_bytes(b"")
    assert "empty file" in error_of(ingest, tmp_path / "empty.parquet")
    assert "no such file" in error_of(ingest, tmp_path / "absent.parquet")
    (tmp_path / "dir.parquet").mkdir()
    assert "not a regular file" in error_of(ingest, tmp_path / "dir.parquet")


def test_bad_input_leaves_no_output_and_cli_prints_one_line(tmp_path: Path, capsys) -> None:

    from amft_lib import cli

    bad = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), "{oops"])
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        run_prepare(PrepareConfig(task="math", input=str(bad), out_dir=str(out)))
    assert not out.exists()
    assert cli.main(["data", "prepare", "--task", "math", "--input", str(bad), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "bad.jsonl:2" in err
    assert not out.exists()


# ── fuzz: arbitrary bytes and JSON never raise anything but DataError, never leave files ───────

_FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
_records = st.dictionaries(
    st.sampled_from(["question", "answer", "solution", "id", "other"]), _json_values, max_size=5
) | _json_values


def _prepare_or_data_error(path: Path, out: Path, **extra) -> None:
    cfg = PrepareConfig(task="math", input=str(path), out_dir=str(out), split_fractions={"train": 1.0}, **extra)
    try:
        run_prepare(cfg)
    except DataError:
        assert not out.exists(), "a failed prepare must not create its output directory"
        return
    assert (out / "card.json").exists()


@_FUZZ
@given(data=st.binary(max_size=400))
def test_fuzz_arbitrary_bytes(tmp_path: Path, data: bytes) -> None:
    for suffix in (".jsonl", ".parquet"):
        path = tmp_path / f"fuzz{suffix}"
        path.write_bytes(data)
        out = tmp_path / f"out{suffix}"
        _prepare_or_data_error(path, out)
        if out.exists():
            import shutil

            shutil.rmtree(out)


@_FUZZ
@given(records=st.lists(_records, min_size=0, max_size=5), allow_extra=st.booleans())
def test_fuzz_arbitrary_json_lines(tmp_path: Path, records: list, allow_extra: bool) -> None:
    import shutil

    path = write_lines(tmp_path / "fuzz.jsonl", [json.dumps(r) for r in records])
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    _prepare_or_data_error(path, out, allow_extra_fields=allow_extra, solution_field=None)


_VALID_PARQUET = io.BytesIO()
pq.write_table(pa.Table.from_pylist([GOOD, {"question": "2+2?", "answer": "4"}]), _VALID_PARQUET)


@_FUZZ
@given(position=st.integers(min_value=0, max_value=len(_VALID_PARQUET.getvalue()) - 1),
       patch=st.binary(min_size=1, max_size=8))
def test_fuzz_corrupted_parquet(tmp_path: Path, position: int, patch: bytes) -> None:
    data = bytearray(_VALID_PARQUET.getvalue())
    data[position : position + len(patch)] = patch
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(bytes(data))
    with contextlib.suppress(DataError):  # DataError or success; anything else fails the test
        ingest(path)
