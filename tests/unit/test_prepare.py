"""`run_prepare`: sizes, dedup, split by canonical key, contamination, determinism, atomic writes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from amft_lib.config import ConfigError
from amft_lib.data import prepare as prepare_mod
from amft_lib.data.prepare import (
    PrepareConfig,
    assign_split,
    remove_contamination,
    run_prepare,
)
from amft_lib.data.schema import ARROW_SCHEMA, CARD_NAME, DataError, read_card, sha256_file
from amft_lib.tasks import get_task

SMALL = {"train_size": 60, "val_size": 12, "test_id_size": 12, "test_ood_size": 12}
WORDS = ["apple", "pear", "river", "stone", "cloud", "lamp", "garden", "window", "paper", "orange", "silver",
         "market", "train", "bridge", "candle", "forest", "tiger", "pencil", "island", "rocket", "violin", "meadow"]


def gp(out: Path, **kw) -> prepare_mod.PrepareResult:
    return run_prepare(PrepareConfig(out_dir=str(out), **{**SMALL, **kw}))


def math_rows(n: int, seed: int = 0) -> list[dict]:
    """Distinct synthetic word problems; 12 random words each, so no two share a 13-gram by accident."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(12))
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        rows.append({"question": f"Item {i}: {words}. What is {a} plus {b}?",
                     "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_split_rows(result: prepare_mod.PrepareResult) -> list[dict]:
    rows = []
    for path in result.files.values():
        rows += pq.read_table(path).to_pylist()
    return rows


def keys_by_split(rows: list[dict]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for row in rows:
        key = get_task(row["task"]).canonical_key(row["answer"], row["prompt"])
        out.setdefault(row["split"], set()).add(key)
    return out


# ── General Points ─────────────────────────────────────────────────────────────────────────────


def test_general_points_sizes_schema_and_card(tmp_path: Path) -> None:
    result = gp(tmp_path / "gp")
    assert result.rows == {"train": 60, "val": 12, "test_id": 12, "test_ood": 12}
    rows = read_split_rows(result)
    assert len({r["id"] for r in rows}) == len(rows)
    for split, path in result.files.items():
        table = pq.read_table(path)
        assert table.schema.equals(ARROW_SCHEMA)
        assert set(table.column("split").to_pylist()) == {split}
        assert sha256_file(path) == result.card.splits[split].sha256
    card = read_card(tmp_path / "gp")
    assert card.task == "general_points" and card.source == "generated"
    assert card.generator["config"]["seed"] == 1234 and "out_dir" not in card.generator["config"]
    assert card.dropped["contamination_key"] == 0
    rules = {json.loads(r["answer"])["rule"] for r in rows if r["split"] == "test_ood"}
    assert rules == {"face_ranks"}
    assert {json.loads(r["answer"])["rule"] for r in rows if r["split"] != "test_ood"} == {"face10"}


def test_general_points_no_key_in_two_splits(tmp_path: Path) -> None:
    keys = keys_by_split(read_split_rows(gp(tmp_path / "gp", train_size=200, val_size=40, test_id_size=40)))
    splits = sorted(keys)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not keys[a] & keys[b], f"{a} and {b} share canonical keys"


def test_general_points_hands_per_split_follow_split_fractions_not_row_quotas(tmp_path: Path) -> None:
    # A train quota 40x the eval quotas must not squeeze the eval splits into a sliver of the hands:
    # the key hash gives val and test_id their split_fractions share whatever the row counts.
    small = keys_by_split(read_split_rows(gp(tmp_path / "a", train_size=100, val_size=40, test_id_size=40)))
    big = keys_by_split(read_split_rows(gp(tmp_path / "b", train_size=1600, val_size=40, test_id_size=40)))
    for split in ("val", "test_id"):
        assert len(big[split]) >= 0.8 * len(small[split]) and len(big[split]) >= 15, (split, len(big[split]))
    assert len(big["train"]) > 300  # most of the ~566 ID hands, each in many card orders
    with pytest.raises(ConfigError, match="gives no hands to val"):
        gp(tmp_path / "c", val_size=5, split_fractions={"train": 0.9, "test_id": 0.1})


def test_general_points_byte_identical_across_runs_and_seed_matters(tmp_path: Path) -> None:
    first, second, other = gp(tmp_path / "a"), gp(tmp_path / "b"), gp(tmp_path / "c", seed=7)
    for split in first.files:
        assert sha256_file(first.files[split]) == sha256_file(second.files[split])
    assert (tmp_path / "a" / CARD_NAME).read_bytes() == (tmp_path / "b" / CARD_NAME).read_bytes()
    assert sha256_file(first.files["train"]) != sha256_file(other.files["train"])


# ── ingested math ──────────────────────────────────────────────────────────────────────────────


def test_math_ingest_dedup_and_drop_counts(tmp_path: Path) -> None:
    base = math_rows(30)
    rows = [
        *base,
        base[0],  # exact duplicate
        {**base[1], "question": "  " + base[1]["question"].replace(" ", "  ") + " "},  # same after whitespace
        {**base[2], "question": base[2]["question"].upper(), "answer": "#### 5"},  # same key, other answer
        {"question": "How many?", "answer": "#### many"},  # not a number
        {"question": "   ", "answer": "#### 3"},  # empty question
        {"question": "Ｗｈａｔ is ２ + ２?", "answer": "２ + ２ = 4\n#### ４"},  # full-width: NFKC
    ]
    result = run_prepare(PrepareConfig(task="math", input=str(write_jsonl(tmp_path / "in.jsonl", rows)),
                                       out_dir=str(tmp_path / "out"), split_fractions={"train": 1.0}))
    card = result.card
    assert card.dropped == {"bad_answer": 1, "contamination_key": 0, "contamination_ngram": 0,
                            "duplicate_exact": 1, "duplicate_key": 1, "duplicate_normalized": 1,
                            "empty_question": 1}
    assert card.notes["input_rows"] == len(rows) and card.inputs[0]["file"] == "in.jsonl"
    out = {r["prompt"]: r for r in read_split_rows(result)}
    assert len(out) == 31
    nfkc = out["What is 2 + 2?"]
    assert nfkc["answer"] == "4" and nfkc["demonstration"] == "2 + 2 = 4\n#### 4"
    assert card.notes["demonstrations_removed"] == 0
    first = out[base[0]["question"]]
    assert first["demonstration"].endswith("#### " + first["answer"]) and "<<" not in first["demonstration"]
    assert json.loads(first["meta"]) == {"source": "in.jsonl:1"}


def test_math_split_fractions_no_leakage_and_determinism(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", math_rows(1000))
    cfg = {"task": "math", "input": str(src), "split_fractions": {"train": 0.7, "val": 0.1, "test_id": 0.2}}
    a = run_prepare(PrepareConfig(out_dir=str(tmp_path / "a"), **cfg))
    b = run_prepare(PrepareConfig(out_dir=str(tmp_path / "b"), **cfg))
    assert {s: sha256_file(p) for s, p in a.files.items()} == {s: sha256_file(p) for s, p in b.files.items()}
    assert (tmp_path / "a" / CARD_NAME).read_bytes() == (tmp_path / "b" / CARD_NAME).read_bytes()
    counts = a.rows
    assert sum(counts.values()) == 1000
    assert abs(counts["train"] / 1000 - 0.7) < 0.05 and abs(counts["test_id"] / 1000 - 0.2) < 0.05
    keys = keys_by_split(read_split_rows(a))
    assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test_id"])
    assert not (keys["val"] & keys["test_id"])


def test_assign_split_is_a_function_of_seed_and_key() -> None:
    fractions = {"train": 0.5, "val": 0.5}
    assert assign_split(1, "k", fractions) == assign_split(1, "k", dict(reversed(fractions.items())))
    assert len({assign_split(seed, "k", fractions) for seed in range(40)}) == 2


def test_remove_contamination_by_key_and_ngram() -> None:
    shared = "one two three four five six seven eight nine ten eleven twelve thirteen"
    rows = [
        {"split": "val", "_key": "k1", "prompt": f"Eval question: {shared} fourteen?"},
        {"split": "train", "_key": "k1", "prompt": "totally different text"},  # same key
        {"split": "train", "_key": "k2", "prompt": f"Before, {shared}!"},  # 13-gram overlap
        {"split": "train", "_key": "k3", "prompt": "one two three four five six seven eight nine ten eleven twelve"},
    ]
    kept, counts = remove_contamination(rows, ngram_n=13)
    assert counts == {"contamination_key": 1, "contamination_ngram": 1}
    assert [r["_key"] for r in kept] == ["k1", "k3"]  # eval untouched; a 12-gram overlap is allowed
    kept, counts = remove_contamination(rows, ngram_n=0)
    assert counts == {"contamination_key": 1} and len(kept) == 3


def test_ngram_contamination_is_removed_from_train_and_counted(tmp_path: Path) -> None:
    rows = math_rows(200, seed=3)
    # Pick an eval row and a train row as the seeded hash split assigns them, then make the train
    # question quote 13 words of the eval question.
    fr = {"train": 0.8, "val": 0.2}
    task = get_task("math")
    split_of = [assign_split(1234, task.canonical_key("", r["question"]), fr) for r in rows]
    val_i, train_i = split_of.index("val"), split_of.index("train")
    quote = " ".join(rows[val_i]["question"].split()[2:15])
    rows[train_i] = {**rows[train_i], "question": rows[train_i]["question"] + " Note: " + quote}
    result = run_prepare(PrepareConfig(task="math", input=str(write_jsonl(tmp_path / "in.jsonl", rows)),
                                       out_dir=str(tmp_path / "out"), split_fractions=fr))
    assert result.card.dropped["contamination_ngram"] == 1
    assert rows[train_i]["question"] not in {r["prompt"] for r in read_split_rows(result)}


def test_field_mapping_ids_and_duplicate_ids(tmp_path: Path) -> None:
    rows = [{"uid": f"q{i}", "problem": r["question"], "final": "#### 7", "work": "3+4=7"}
            for i, r in enumerate(math_rows(5))]
    rows[4]["work"] = "3+4=8"  # a wrong worked solution: the row stays for RL, its demonstration goes
    common = {"task": "math", "question_field": "problem", "answer_field": "final", "solution_field": "work",
              "id_field": "uid", "split_fractions": {"train": 1.0}}
    result = run_prepare(PrepareConfig(input=str(write_jsonl(tmp_path / "a.jsonl", rows)),
                                       out_dir=str(tmp_path / "a"), **common))
    assert sorted(r["id"] for r in read_split_rows(result)) == [f"q{i}" for i in range(5)]
    demos = {r["id"]: r["demonstration"] for r in read_split_rows(result)}
    assert demos == {"q0": "3+4=7", "q1": "3+4=7", "q2": "3+4=7", "q3": "3+4=7", "q4": None}
    assert result.card.notes["demonstrations_removed"] == 1
    rows[3]["uid"] = "q1"
    with pytest.raises(DataError, match=r"b.jsonl:4: duplicate id 'q1' \(first at .*b.jsonl:2\)"):
        run_prepare(PrepareConfig(input=str(write_jsonl(tmp_path / "b.jsonl", rows)),
                                  out_dir=str(tmp_path / "b"), **common))
    assert not (tmp_path / "b").exists()


# ── atomic, all-or-nothing writes ──────────────────────────────────────────────────────────────


def test_failed_write_keeps_the_previous_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "gp"
    gp(out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    calls = {"n": 0}
    real_write = prepare_mod.write_parquet

    def flaky(table, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        real_write(table, path)

    monkeypatch.setattr(prepare_mod, "write_parquet", flaky)
    with pytest.raises(OSError, match="disk full"):
        gp(out, seed=99)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp dir left, old files intact


def test_rerun_replaces_stale_splits(tmp_path: Path) -> None:
    out = tmp_path / "gp"
    gp(out)
    gp(out, test_ood_size=0)
    assert not (out / "test_ood.parquet").exists()
    assert "test_ood" not in read_card(out).splits


# ── config and CLI ─────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"task": "chess"}, "task='chess'"),
        ({"task": "math"}, "needs input=PATH"),
        ({"input": "x.jsonl"}, "general_points' is generated"),
        ({"train_size": -1}, "train_size=-1"),
        ({"task": "math", "input": "x", "split_fractions": {"train": 0.5, "dev": 0.5}}, "unknown split(s) ['dev']"),
        ({"task": "math", "input": "x", "split_fractions": {"train": 0.5}}, "must sum to 1"),
        ({"max_row_bytes": 0}, "max_row_bytes=0"),
        ({"ngram_n": -2}, "ngram_n=-2"),
    ],
)
def test_config_errors_name_the_value(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        PrepareConfig(**kwargs)
    assert fragment in str(info.value)


def test_bad_rule_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="id_rule='face11'"):
        gp(tmp_path / "x", id_rule="face11")


def test_cli_prepare(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from amft_lib import cli  # the boundary: a user error is one line and exit 2

    src = write_jsonl(tmp_path / "in.jsonl", math_rows(20))
    assert cli.main(["data", "prepare", "--task", "math", "--input", str(src), "--out-dir",
                     str(tmp_path / "out"), "--split-fractions", "train=0.5,val=0.5", "--seed", "3"]) == 0
    assert "prepared math:" in capsys.readouterr().out
    card = read_card(tmp_path / "out")
    assert card.generator["config"]["split_fractions"] == {"train": 0.5, "val": 0.5}
    assert sum(info.rows for info in card.splits.values()) == 20
    assert cli.main(["data", "prepare", "--split-fractions", "train=0.5"]) == 2
    assert capsys.readouterr().err.startswith("error: split_fractions")
    assert Counter(p.suffix for p in (tmp_path / "out").iterdir()) == Counter({".parquet": 2, ".json": 1})


def test_package_exports_resolve_lazily() -> None:
    import amft_lib.data as data

    assert data.run_prepare is run_prepare and data.DataError is DataError
    with pytest.raises(AttributeError):
        _ = data.no_such_name
