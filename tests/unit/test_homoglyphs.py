"""Homoglyph copies (Cyrillic/Greek look-alikes of Latin letters) are one question: `data prepare`
deduplicates them, and the validation gate fails when a copy sits in train and its original in an
eval split."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq

from amft_lib.confusables import skeleton
from amft_lib.data.prepare import PrepareConfig, run_prepare
from amft_lib.data.schema import ARROW_SCHEMA
from amft_lib.data.validate import ValidateConfig, run_validate
from amft_lib.tasks.math import normalize_question

# Latin → a look-alike from another script (Cyrillic а е о р с х у, Greek ο ν)
LOOKALIKE = {"a": "\u0430", "e": "\u0435", "o": "\u043e", "p": "\u0440", "c": "\u0441", "x": "\u0445",
             "y": "\u0443", "A": "\u0391", "O": "\u039f", "v": "\u03bd"}
WORDS = ("apple", "pear", "coin", "box", "cart", "yard", "crate", "ocean", "pony", "cave", "type", "oxen",
         "year", "copy", "vapor", "space")


def disguise(text: str) -> str:
    return "".join(LOOKALIKE.get(ch, ch) for ch in text)


def questions(n: int) -> list[dict]:
    rng = random.Random(7)
    rows = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(10))
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        rows.append({"question": f"Problem {i}: {words}. A pony eats {a} apples and {b} pears; how many?",
                     "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    return rows


def test_skeleton_folds_lookalikes_and_keeps_ascii() -> None:
    text = "What is the capacity of a cargo box?"
    assert disguise(text) != text
    assert skeleton(disguise(text)) == skeleton(text) == text.lower()
    assert normalize_question(disguise(text)) == normalize_question(text)
    assert skeleton("10 apples") == "10 apples"  # ASCII is its own skeleton (no 0→O, 1→l)
    assert skeleton("ｆｕｌｌ ｗｉｄｔｈ") == "full width"  # NFKC still applies
    assert skeleton("naïve café") == "naïve café"  # real accented letters are not look-alikes


def test_prepare_drops_homoglyph_copies(tmp_path: Path) -> None:
    originals = questions(400)
    copies = [{"question": disguise(r["question"]), "answer": r["answer"]} for r in originals]
    rows = [r for pair in zip(originals, copies, strict=True) for r in pair]
    assert all(c["question"] != o["question"] for c, o in zip(copies, originals, strict=True))
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    result = run_prepare(PrepareConfig(out_dir=str(tmp_path / "out"), task="math", input=str(src)))
    assert sum(result.rows.values()) == 400
    assert result.card.dropped.get("duplicate_key") == 400
    kept = [row for path in result.files.values() for row in pq.read_table(path).to_pylist()]
    assert {r["prompt"] for r in kept} == {r["question"] for r in originals}  # the first copy (original) wins


def test_gate_fails_when_copies_straddle_splits(tmp_path: Path) -> None:
    originals = questions(60)
    rows = []
    for i, r in enumerate(originals):
        split = "train" if i < 40 else ("val" if i < 50 else "test_id")
        rows.append({"id": f"q{i}", "task": "math", "prompt": r["question"], "answer": r["answer"].split("#### ")[1],
                     "demonstration": r["answer"], "split": split, "meta": "{}"})
    # disguised copies of three eval questions go into train
    for i in (45, 52, 58):
        rows.append({**rows[i], "id": f"copy{i}", "prompt": disguise(rows[i]["prompt"]), "split": "train"})
    path = tmp_path / "data.parquet"
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows, schema=ARROW_SCHEMA), path)
    result = run_validate(ValidateConfig(dataset=str(path), out_dir=str(tmp_path / "report"), task="math",
                                         min_rows={"train": 1}, split_fractions={"train": [0.5, 0.95]}))
    assert not result.passed
    overlap = [f for f in result.failures if f.check == "no_train_eval_overlap"]
    assert overlap and overlap[0].unexpected_count == 6  # each copy and its original
    assert {f.check for f in result.failures} == {"no_train_eval_overlap"}
