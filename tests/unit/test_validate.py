"""The GX gate: the good dataset passes; each crafted defect fails exactly its expectation, by name.

One GX context serves the whole session (validate.py caches it), so after the ~2.5 s import each
validation costs tens of milliseconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from amft_lib.config import ConfigError
from amft_lib.data.prepare import PrepareConfig, run_prepare
from amft_lib.data.schema import ARROW_SCHEMA, COLUMNS, DataError
from amft_lib.data.validate import ValidateConfig, load_token_counter, run_validate

LIMITS = {"min_rows": {"train": 10, "val": 2, "test_id": 2, "test_ood": 2}, "split_fractions": {"train": [0.5, 0.95]}}


@pytest.fixture(scope="module")
def gp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gp")
    run_prepare(PrepareConfig(out_dir=str(out), train_size=40, val_size=8, test_id_size=8, test_ood_size=8))
    return out


@pytest.fixture()
def gp_rows(gp_dir: Path) -> list[dict]:
    rows: list[dict] = []
    for split in ("train", "val", "test_id", "test_ood"):
        rows += pq.read_table(gp_dir / f"{split}.parquet").to_pylist()
    return rows


def validate(tmp_path: Path, data: list[dict] | pa.Table, **kw) -> object:
    table = data if isinstance(data, pa.Table) else _table(data)
    path = tmp_path / "data.parquet"
    pq.write_table(table, path)
    options = {"task": "general_points", **LIMITS, **kw}  # a file without a card names its task
    return run_validate(ValidateConfig(dataset=str(path), out_dir=str(tmp_path / "report"), **options))


NULLABLE_SCHEMA = pa.schema([f.with_nullable(True) for f in ARROW_SCHEMA])  # lets a test write a null answer


def _table(rows: list[dict]) -> pa.Table:
    if rows and set(rows[0]) == set(COLUMNS):
        return pa.Table.from_pylist(rows, schema=NULLABLE_SCHEMA)
    return pa.Table.from_pylist(rows)


def failed(result) -> set[str]:
    return {f.check for f in result.failures}


def first(rows: list[dict], split: str) -> dict:
    return next(r for r in rows if r["split"] == split)


# ── the good datasets pass ─────────────────────────────────────────────────────────────────────


def test_prepared_general_points_passes_and_writes_reports(gp_dir: Path, tmp_path: Path) -> None:
    result = run_validate(ValidateConfig(dataset=str(gp_dir), out_dir=str(tmp_path / "r"), **LIMITS))
    assert result.passed, result.failures
    assert result.task == "general_points"
    assert result.statistics["rows_per_split"] == {"test_id": 8, "test_ood": 8, "train": 40, "val": 8}
    assert result.statistics["unsuccessful_expectations"] == 0
    gx_json = json.loads(result.json_path.read_text())
    assert gx_json["success"] is True and {"results", "statistics"} <= set(gx_json)
    assert "Data validation: PASSED" in result.markdown_path.read_text()
    assert result.timings["gx_s"] > 0


def test_prepared_math_passes(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(
        json.dumps({"question": f"Problem {i}: what is {i} times 3?", "answer": f"{i} * 3 = {3 * i}\n#### {3 * i}"})
        + "\n" for i in range(60)))
    run_prepare(PrepareConfig(task="math", input=str(src), out_dir=str(tmp_path / "m")))
    result = run_validate(ValidateConfig(dataset=str(tmp_path / "m"), min_rows={"train": 10},
                                         split_fractions={"train": [0.6, 0.95]}))
    assert result.passed, result.failures
    assert result.task == "math" and result.json_path.parent == tmp_path / "m" / "validation"


def test_prepared_countdown_passes_and_a_crossing_instance_fails(tmp_path: Path) -> None:
    """The same suite covers Countdown: its verifier, keys and demonstrations; a val instance copied into
    train (in another number order, so the row differs but the key is the same) is caught as leakage."""
    out = tmp_path / "cd"
    run_prepare(PrepareConfig(task="countdown", out_dir=str(out), countdown_train_size=60, countdown_eval_size=10,
                              countdown_demo_pool=20))
    options = {**LIMITS, "split_fractions": {"train": [0.5, 0.95]}}
    result = run_validate(ValidateConfig(dataset=str(out), out_dir=str(tmp_path / "r"), **options))
    assert result.passed, result.failures
    assert result.task == "countdown"
    rows = [r for split in ("train", "val", "test_id", "test_ood") for r in pq.read_table(out / f"{split}.parquet")
            .to_pylist()]
    leak = dict(first(rows, "val"))
    answer = json.loads(leak["answer"])
    answer["numbers"] = answer["numbers"][::-1]
    rows.append({**leak, "id": "leak", "split": "train", "answer": json.dumps(answer)})
    assert failed(validate(tmp_path, rows, task="countdown")) == {"no_train_eval_overlap"}


# ── one crafted defect per expectation ─────────────────────────────────────────────────────────


def _set(split: str, column: str, value: object) -> Callable[[list[dict]], tuple[list[dict], str]]:
    def mutate(rows: list[dict]) -> tuple[list[dict], str]:
        row = first(rows, split)
        row[column] = value(row) if callable(value) else value
        return rows, row["id"]

    return mutate


def _extra_column(rows):
    return [{**r, "source": "x"} for r in rows], None


def _missing_column(rows):
    return [{k: v for k, v in r.items() if k != "meta"} for r in rows], None


def _int_prompts(rows):
    columns = {c: [r[c] for r in rows] for c in COLUMNS}
    columns["prompt"] = list(range(len(rows)))
    return pa.table(columns), None


def _duplicate_id(rows):
    rows[1]["id"] = rows[0]["id"]
    return rows, rows[0]["id"]


def _too_few_val(rows):
    vals = [r for r in rows if r["split"] == "val"]
    return [r for r in rows if r["split"] != "val"] + vals[:1], None


def _too_few_train(rows):
    train = [r for r in rows if r["split"] == "train"]
    return [r for r in rows if r["split"] != "train"] + train[:10], None


def _leak(rows):
    leaked = {**first(rows, "val"), "id": "leaked-copy", "split": "train"}
    return [*rows, leaked], "leaked-copy"


CASES = {
    "columns": _extra_column,
    "type:prompt": _int_prompts,
    "not_null:answer": _set("train", "answer", None),
    "unique_ids": _duplicate_id,
    "split_values": _set("train", "split", "dev"),
    "task_values": _set("train", "task", "math"),
    "meta_json": _set("train", "meta", "{oops"),
    "min_rows:val": _too_few_val,
    "fraction:train": _too_few_train,
    "prompt_length": _set("train", "prompt", "x" * 3000),
    "demonstration_length": _set("train", "demonstration", lambda r: " \n" * 2100 + r["demonstration"]),
    "answer_parseable": _set("train", "answer", "not json"),
    "demonstrations_verified": _set("train", "demonstration", "1+2\nAnswer: 1+2+3+4\n"),
    "no_train_eval_overlap": _leak,
}


@pytest.mark.parametrize("check", sorted(CASES))
def test_each_defect_fails_exactly_its_expectation(check: str, gp_rows: list[dict], tmp_path: Path) -> None:
    data, bad_id = CASES[check](gp_rows)
    result = validate(tmp_path, data)
    assert not result.passed
    assert failed(result) == {check}
    failure = result.failures[0]
    assert check in result.markdown_path.read_text() and check in result.html_path.read_text()
    if bad_id is not None:
        assert any(e.split(":")[0] == bad_id or e.startswith(bad_id) for e in failure.examples), failure.examples
    assert json.loads(result.json_path.read_text())["success"] is False


def test_missing_column_is_reported_once(gp_rows: list[dict], tmp_path: Path) -> None:
    result = validate(tmp_path, _missing_column(gp_rows)[0])
    assert failed(result) == {"columns"}
    assert result.failures[0].observed == {"mismatched": {"missing": ["meta"]}}


def test_custom_check_examples_carry_the_reason(gp_rows: list[dict], tmp_path: Path) -> None:
    rows, bad_id = CASES["demonstrations_verified"](gp_rows)
    failure = validate(tmp_path, rows).failures[0]
    assert failure.examples == [f"{bad_id}: wrong_numbers"] and failure.unexpected_count == 1


def test_math_suite_rejects_non_numeric_answers(tmp_path: Path) -> None:
    rows = [{"id": f"m{i}", "task": "math", "prompt": f"What is {i}+1?", "answer": str(i + 1),
             "demonstration": f"#### {i + 1}", "split": "train" if i < 12 else "val", "meta": "{}"} for i in range(16)]
    rows[0]["answer"] = "eleven"
    result = validate(tmp_path, rows, task="math", min_rows={"train": 10, "val": 2}, split_fractions={})
    assert failed(result) == {"answer_parseable"}
    assert result.failures[0].examples[0].startswith("m0: reference answer is not a number")


# ── reports, token counting, errors, CLI ───────────────────────────────────────────────────────


def test_html_report_is_self_contained(gp_rows: list[dict], tmp_path: Path) -> None:
    rows, _ = CASES["meta_json"](gp_rows)
    rows[0]["id"] = "<script>alert(1)</script>"
    text = validate(tmp_path, rows).html_path.read_text()
    assert "<script" not in text and "&lt;script&gt;" in text
    assert "http://" not in text and "https://" not in text and "<link" not in text


def test_token_counter_callable_and_tokenizer_dir(gp_rows: list[dict], tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    pq.write_table(_table(gp_rows), path)
    cfg = ValidateConfig(dataset=str(path), out_dir=str(tmp_path / "r"), task="general_points", max_prompt_tokens=5,
                         **LIMITS)
    result = run_validate(cfg, count_tokens=lambda text: len(text.split()))
    assert failed(result) == {"prompt_length"} and result.statistics["length_unit"] == "tokens"

    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "Cards:": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    assert load_token_counter(str(tmp_path / "tok"))("Cards: A 2 3 4.") == 5
    with pytest.raises(DataError, match="cannot load tokenizer"):
        load_token_counter(str(tmp_path / "nowhere"))


def test_unreadable_datasets_are_data_errors(gp_dir: Path, tmp_path: Path) -> None:
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"fake\.parquet: not a readable parquet file"):
        run_validate(ValidateConfig(dataset=str(fake)))
    with pytest.raises(DataError, match="no such dataset"):
        run_validate(ValidateConfig(dataset=str(tmp_path / "absent")))
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in gp_dir.glob("*.*"):
        (copy / p.name).write_bytes(p.read_bytes())
    (copy / "val.parquet").write_bytes((copy / "test_id.parquet").read_bytes())
    with pytest.raises(DataError, match=r"val\.parquet: sha256 differs from card\.json"):
        run_validate(ValidateConfig(dataset=str(copy)))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"task": "chess"}, "task='chess'"),
        ({"min_rows": {"dev": 1}}, "min_rows['dev']"),
        ({"split_fractions": {"train": [0.9, 0.1]}}, "split_fractions['train']=[0.9, 0.1]"),
        ({"max_prompt_tokens": 0, "min_prompt_tokens": 1}, "max_prompt_tokens=0"),
    ],
)
def test_config_errors_name_the_value(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        ValidateConfig(**kwargs)
    assert fragment in str(info.value)


def test_cli_exit_codes(gp_dir: Path, gp_rows: list[dict], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from amft_lib import cli  # the boundary: a user error is one line and exit 2

    limits = ["--min-rows", "train=10,val=2", "--split-fractions", "train=0.5:0.95"]

    def run(*argv: str) -> int:
        return cli.main(["data", "validate", *argv, *limits])

    assert run("--dataset", str(gp_dir), "--out-dir", str(tmp_path / "ok")) == 0
    assert "validation PASSED" in capsys.readouterr().out
    rows, bad_id = CASES["unique_ids"](gp_rows)
    pq.write_table(_table(rows), tmp_path / "bad.parquet")
    assert run("--dataset", str(tmp_path / "bad.parquet"), "--task", "general_points") == 1
    out = capsys.readouterr().out
    assert "validation FAILED" in out and "failed unique_ids: 2 rows" in out and bad_id in out
    (tmp_path / "junk.parquet").write_text("junk")
    assert run("--dataset", str(tmp_path / "junk.parquet")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
