"""amft_lib.dataset's integrity rules (read_rows, the loader of every stage) and the pure checks beside it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from amft_lib.data.schema import DataError, find_control_character, row_control_character, sha256_file
from amft_lib.dataset import check_column_types, check_prompt_lengths, model_context, read_rows


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from amft_lib.data.prepare import PrepareConfig, run_prepare

    out = tmp_path_factory.mktemp("ds") / "gp"
    run_prepare(PrepareConfig(out_dir=str(out), train_size=12, val_size=4, test_id_size=4, test_ood_size=4))
    return out


def test_read_rows_reads_what_the_card_lists(prepared: Path) -> None:
    splits = read_rows(prepared)
    card = json.loads((prepared / "card.json").read_text())
    assert {s: len(rows) for s, rows in splits.items()} == {s: i["rows"] for s, i in card["splits"].items()}


def test_one_flipped_byte_is_refused(prepared: Path, tmp_path: Path) -> None:
    """Same length, same parquet footer, one byte of data changed: only the hash can tell."""
    copy = tmp_path / "gp"
    shutil.copytree(prepared, copy)
    data = bytearray((copy / "train.parquet").read_bytes())
    data[len(data) // 3] ^= 0x01
    (copy / "train.parquet").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train\.parquet: sha256 differs from card\.json"):
        read_rows(copy)


def test_missing_card_file_named(prepared: Path, tmp_path: Path) -> None:
    copy = tmp_path / "gp"
    shutil.copytree(prepared, copy)
    (copy / "val.parquet").unlink()
    with pytest.raises(DataError, match=r"val\.parquet: listed in card\.json but missing"):
        read_rows(copy)


def test_folder_without_card_reads_with_a_warning(prepared: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    copy = tmp_path / "nocard"
    copy.mkdir()
    shutil.copy(prepared / "train.parquet", copy / "train.parquet")
    with caplog.at_level(logging.WARNING, logger="amft_lib.dataset"):
        splits = read_rows(copy)
    assert list(splits) == ["train"] and "without an integrity check" in caplog.text


def test_duplicate_id_across_files(prepared: Path, tmp_path: Path) -> None:
    """The same id in two split files (what concatenating two datasets does) is refused, naming both places."""
    train_rows = pq.read_table(prepared / "train.parquet").to_pylist()
    val_rows = pq.read_table(prepared / "val.parquet").to_pylist()
    val_rows[2]["id"] = train_rows[5]["id"]
    single = tmp_path / "one.parquet"
    pq.write_table(pa.Table.from_pylist(train_rows + val_rows), single)
    with pytest.raises(DataError, match=rf"one\.parquet: row {len(train_rows) + 3}: duplicate id .* "
                                        r"\(first at one\.parquet row 6\)"):
        read_rows(single)


@pytest.mark.parametrize(("schema", "message"), [
    (pa.schema([("id", pa.string()), ("task", pa.string()), ("prompt", pa.int64()), ("answer", pa.string()),
                ("split", pa.string())]), "column 'prompt' has type int64"),
    (pa.schema([("id", pa.string()), ("task", pa.string()), ("prompt", pa.string()),
                ("answer", pa.struct([("a", pa.int64())])), ("split", pa.string())]),
     "column 'answer' has type struct"),
    (pa.schema([("id", pa.string()), ("task", pa.string()), ("prompt", pa.string()), ("answer", pa.string()),
                ("split", pa.string()), ("demonstration", pa.list_(pa.string()))]),
     "column 'demonstration' has type list"),
    (pa.schema([("id", pa.string()), ("task", pa.string()), ("answer", pa.string()), ("split", pa.string())]),
     "no column 'prompt'"),
])
def test_column_types(schema: pa.Schema, message: str) -> None:
    with pytest.raises(DataError, match=rf"^f\.parquet: {message}"):
        check_column_types(schema, "f.parquet")


def test_column_types_accept_the_contract_and_null_optionals() -> None:
    from amft_lib.data.schema import ARROW_SCHEMA

    check_column_types(ARROW_SCHEMA, "f")
    check_column_types(pa.schema([(c, pa.large_string()) for c in ("id", "task", "prompt", "answer", "split")]
                                 + [("demonstration", pa.null())]), "f")


def test_prompt_length_rule_hand_worked() -> None:
    """context 20, reserve 8 → a prompt may be at most 12 tokens (here: characters)."""
    rows = [{"id": "a", "split": "train", "prompt": "x" * 12}, {"id": "b", "split": "val", "prompt": "y" * 13},
            {"id": "c", "split": "val", "prompt": "z" * 30}]
    def count(prompts: list[str]) -> list[int]:
        return [len(p) for p in prompts]

    assert check_prompt_lengths(rows[:1], count, 20, 8, "d") == 12
    with pytest.raises(DataError, match=r"^d: row 'b' \(split val\): prompt is 13 tokens; with 8 new tokens that "
                                        r"exceeds the model's context of 20 \(2 such prompt\(s\)\)"):
        check_prompt_lengths(rows, count, 20, 8, "d")


def test_model_context_reads_common_config_names() -> None:
    class Cfg:
        n_positions = 1024

    assert model_context(Cfg()) == 1024
    assert model_context(object()) is None


@pytest.mark.parametrize(("text", "found"), [
    ("plain text\twith tab\nand newline\r\n", None),
    ("nul\x00here", "U+0000 at 3"),
    ("\x1b[2Jclear", "U+001B at 0"),
    ("del\x7f", "U+007F at 3"),
    ("c1\x85", "U+0085 at 2"),
    ("unicode é ü 24", None),
])
def test_find_control_character(text: str, found: str | None) -> None:
    assert find_control_character(text) == found


def test_row_control_character_names_the_column() -> None:
    assert row_control_character({"id": "a", "prompt": "ok", "answer": "x\x07"}) == "answer: U+0007 at 1"
    assert row_control_character({"id": "a", "prompt": "ok", "demonstration": None}) is None


def test_resigned_card_over_good_rows_is_accepted(prepared: Path, tmp_path: Path) -> None:
    """The check is the hash, not the file time or name: rewriting a split with the same rows and updating the
    card (what prepare does) is accepted."""
    copy = tmp_path / "gp"
    shutil.copytree(prepared, copy)
    rows = pq.read_table(copy / "val.parquet").to_pylist()
    pq.write_table(pa.Table.from_pylist(rows[::-1]), copy / "val.parquet")
    card = json.loads((copy / "card.json").read_text())
    card["splits"]["val"]["sha256"] = sha256_file(copy / "val.parquet")
    (copy / "card.json").write_text(json.dumps(card))
    assert [r["id"] for r in read_rows(copy)["val"]] == [r["id"] for r in rows[::-1]]


def test_prepare_reports_control_characters(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two of 60 input questions hold NUL and ESC: prepare counts them in the card notes and warns, naming the
    first input line; normalisation removed them, so no prepared row holds one."""
    from amft_lib.data.prepare import PrepareConfig, run_prepare

    rows = [{"question": f"Item {i}: how many apples are {i} plus {i + 1}?" + {3: "\x00", 7: "\x1b[2J"}.get(i, ""),
             "answer": f"#### {2 * i + 1}"} for i in range(60)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="amft_lib.data.prepare"):
        result = run_prepare(PrepareConfig(out_dir=str(tmp_path / "ds"), task="math", input=str(src), ngram_n=0))
    assert result.card.notes["control_character_rows"] == 2
    assert "in.jsonl:4: prompt: U+0000" in caplog.text
    prepared = [r for split in read_rows(tmp_path / "ds").values() for r in split]
    assert len(prepared) == 60 and not [r for r in prepared if row_control_character(r)]
