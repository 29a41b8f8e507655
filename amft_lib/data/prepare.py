"""`amft data prepare`: generate or ingest, normalise, dedup, split by canonical key, decontaminate, write.

Two sources, one output contract (DESIGN.md "Dataset"):

- generated General Points: hands from `tasks.general_points.generate_rows`; train/val/test_id
  come from the ID rule ("face10"), test_ood from the OOD rule ("face_ranks");
- generated Countdown: `tasks.countdown.generate_splits` (each instance once; see that module);
- ingested user math (JSONL or parquet, GSM8K-like): field mapping, NFKC + whitespace
  normalisation, "… #### 72" answers split into answer and worked solution.

Both then go through the same steps, in this order:

1. dedup: exact duplicates, then normalised-text duplicates, then (math) one row per canonical key;
2. split by a seeded hash of `task.canonical_key`, so every copy of a puzzle/question lands in one
   split (General Points has only ~566 distinct ID puzzles, so a split holds the same puzzle in
   several card orders, but never shares one with another split);
3. contamination: train rows whose canonical key, or (text tasks) any `ngram_n`-word n-gram of the
   prompt, also occurs in an eval split are removed from train and counted in the card;
4. write one parquet per split plus `card.json` to a temp directory, then rename into place, the
   card last, so a reader that finds a card finds a complete dataset.

Everything is deterministic in (inputs, config, seed, library versions): fixed row order (input
order, or generation order), no timestamps, stable JSON. Nothing touches `out_dir` until every
row has been computed, so bad input leaves no output at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

import amft_lib
from amft_lib.config import ConfigError
from amft_lib.data.ingest import DEFAULT_MAX_ROW_BYTES, FieldMap, read_records, to_math_items
from amft_lib.data.schema import (
    CARD_NAME,
    EVAL_SPLITS,
    SPLITS,
    DataError,
    DatasetCard,
    SplitInfo,
    dumps_json,
    rows_to_table,
    sha256_file,
    split_file_name,
    write_parquet,
)
from amft_lib.tasks import Task, get_task, known_tasks
from amft_lib.tasks.math import normalize_question

DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test_id": 0.1}
GENERATED_TASKS = ("general_points", "countdown")  # tasks whose data `prepare` generates itself
_MAX_GENERATION_ROUNDS = 40  # each round draws ~the missing rows again; ~566 ID puzzles bound the space


def _help(text: str, default: Any) -> Any:
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class PrepareConfig:
    """What `amft data prepare` builds and where it writes it."""

    out_dir: str = _help("Directory for the split parquet files and card.json (created if missing).", "data")
    task: str = _help("Task: `general_points`, `countdown` (generated) or `math` (ingested).", "general_points")
    input: str | None = _help(
        "User data file (.jsonl/.json/.ndjson or .parquet) to ingest. Empty: generate General Points.", None
    )
    seed: int = _help("Seed of the generator and of the split hash; same seed + inputs => same bytes.", 1234)

    # ── generated General Points ──
    train_size: int = _help(
        "Generated only: training rows (ID rule); the ~450 train hands come back as other card orders, each "
        "with the next of the hand's solution routes.",
        8000,
    )
    val_size: int = _help("Generated only: validation rows (ID rule).", 200)
    test_id_size: int = _help("Generated only: in-distribution test rows (ID rule).", 200)
    test_ood_size: int = _help("Generated only: out-of-distribution test rows (OOD rule).", 200)
    id_rule: str = _help("Generated only: rule of train/val/test_id (`face10`: J=Q=K=10).", "face10")
    ood_rule: str = _help("Generated only: rule of test_ood (`face_ranks`: J/Q/K = 11/12/13).", "face_ranks")

    # ── generated Countdown (task=countdown; sizes above are General Points only) ──
    countdown_train_size: int = _help(
        "Countdown only: training instances (prompts for RL; ~12,000 of the ~16,300 ID instances remain after "
        "val and test_id, fewer are written when the space runs out).",
        12000,
    )
    countdown_eval_size: int = _help(
        "Countdown only: instances in each of val, test_id and test_ood (2000 gives a standard error ≈ 0.01).", 2000
    )
    countdown_demo_pool: int = _help(
        "Countdown only: training rows that carry a demonstration (the fixed SFT pool); the rest are RL prompts.",
        2000,
    )

    # ── ingested data ──
    question_field: str = _help("Ingested only: input field holding the question (becomes `prompt`).", "question")
    answer_field: str = _help(
        "Ingested only: field holding the answer; GSM8K style '… #### 72' gives answer '72' and the whole "
        "text as the demonstration.",
        "answer",
    )
    solution_field: str | None = _help(
        "Ingested only: field holding a worked solution (the demonstration); overrides one parsed from "
        "the answer field.",
        None,
    )
    id_field: str | None = _help(
        "Ingested only: field holding a row id (must be unique). Empty: ids derive from the canonical key.", None
    )
    allow_extra_fields: bool = _help(
        "Ingested only: ignore input fields that are not mapped. Off by default so a renamed column is "
        "noticed, not silently dropped.",
        False,
    )
    split_fractions: dict[str, float] = _help(
        "Fraction of canonical keys per split (sums to 1); splits: train, val, test_id, test_ood. Generated "
        "General Points uses the train/val/test_id shares (renormalised) to divide the ID hands.",
        DEFAULT_FRACTIONS,
    )
    max_row_bytes: int = _help(
        "Largest input row accepted, in bytes (JSONL line, or a parquet row's text). A bigger row is an error.",
        DEFAULT_MAX_ROW_BYTES,
    )
    ngram_n: int = _help(
        "Ingested text only: a train row sharing any n-gram of this many words with an eval prompt counts as "
        "contamination and is removed (13 follows the GPT-3 decontamination practice). 0 disables.",
        13,
    )

    def __post_init__(self) -> None:
        if self.task not in known_tasks():
            raise ConfigError(f"task={self.task!r}: choose one of {', '.join(known_tasks())}")
        if not self.out_dir:
            raise ConfigError("out_dir is empty: name the directory the dataset goes to")
        if self.input is None and self.task not in GENERATED_TASKS:
            raise ConfigError(f"task={self.task!r} needs input=PATH (only {', '.join(GENERATED_TASKS)} are generated)")
        if self.input is not None and self.task in GENERATED_TASKS:
            raise ConfigError(f"task={self.task!r} is generated; drop input or use task='math'")
        for name in ("train_size", "val_size", "test_id_size", "test_ood_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.max_row_bytes < 1:
            raise ConfigError(f"max_row_bytes={self.max_row_bytes}: must be >= 1")
        if self.ngram_n < 0:
            raise ConfigError(f"ngram_n={self.ngram_n}: must be >= 0 (0 disables the n-gram check)")
        unknown = sorted(set(self.split_fractions) - set(SPLITS))
        if unknown:
            raise ConfigError(f"split_fractions has unknown split(s) {unknown}; splits are {', '.join(SPLITS)}")
        if any(not 0.0 <= float(v) <= 1.0 for v in self.split_fractions.values()):
            raise ConfigError(f"split_fractions={self.split_fractions}: each fraction must be in [0, 1]")
        if abs(sum(self.split_fractions.values()) - 1.0) > 1e-6:
            raise ConfigError(f"split_fractions={self.split_fractions}: fractions must sum to 1")
        if self.split_fractions.get("train", 0.0) <= 0.0:
            raise ConfigError(f"split_fractions={self.split_fractions}: train needs a fraction > 0")


@dataclass
class PrepareResult:
    """What `run_prepare` wrote: the card (counts, hashes, drops) and the paths."""

    out_dir: Path
    card_path: Path
    files: dict[str, Path]
    card: DatasetCard

    @property
    def rows(self) -> dict[str, int]:
        return {name: info.rows for name, info in self.card.splits.items()}


def run_prepare(cfg: PrepareConfig) -> PrepareResult:
    """Build the dataset described by `cfg` and write it atomically; DataError on bad input."""
    task = get_task(cfg.task)
    if cfg.input is not None:
        rows, dropped, notes, inputs = _ingest_math(cfg, task)
        source, ngram_n = "ingested", cfg.ngram_n
    else:
        generate = _generate_countdown if cfg.task == "countdown" else _generate_general_points
        rows, dropped, notes = generate(cfg, task)
        inputs, source, ngram_n = [], "generated", 0  # templated prompts share long n-grams by design
    rows, contamination = remove_contamination(rows, ngram_n)
    dropped.update(contamination)
    if not any(row["split"] == "train" for row in rows):
        raise DataError("no training rows left after dedup and decontamination; check the input and fractions")
    notes["distinct_keys"] = {s: len({r["_key"] for r in rows if r["split"] == s}) for s in SPLITS}
    card = DatasetCard(
        task=task.name,
        source=source,
        generator=_generator_record(cfg),
        splits={},
        dropped=dict(sorted(dropped.items())),
        notes=notes,
        inputs=inputs,
    )
    return write_dataset(Path(cfg.out_dir), rows, card)


# ---------------------------------------------------------------------------------------------
# Split assignment and contamination


def hash_unit(seed: int, key: str) -> float:
    """A uniform number in [0, 1) from (seed, key): the split decision for every copy of `key`."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(seed: int, key: str, fractions: dict[str, float]) -> str:
    """Bucket `key` by cumulative fractions, in the fixed SPLITS order (so dict order never matters)."""
    u = hash_unit(seed, key)
    edge = 0.0
    last = "train"
    for name in SPLITS:
        share = float(fractions.get(name, 0.0))
        if share <= 0.0:
            continue
        edge += share
        last = name
        if u < edge:
            return name
    return last  # float rounding at the top edge


def word_ngrams(text: str, n: int) -> set[str]:
    """The set of n-word shingles of the normalised text (empty when it is shorter than n words)."""
    words = normalize_question(text).split()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def remove_contamination(rows: list[dict[str, Any]], ngram_n: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Drop train rows that share a canonical key (or an `ngram_n`-gram, when > 0) with any eval split.

    Train loses the row rather than the eval split, because eval sets are the fixed yardstick and
    train is the larger pool. Rows carry their key in `_key`.
    """
    eval_keys = {row["_key"] for row in rows if row["split"] in EVAL_SPLITS}
    eval_grams: set[str] = set()
    if ngram_n > 0:
        for row in rows:
            if row["split"] in EVAL_SPLITS:
                eval_grams |= word_ngrams(row["prompt"], ngram_n)
    kept: list[dict[str, Any]] = []
    counts = {"contamination_key": 0, "contamination_ngram": 0} if ngram_n > 0 else {"contamination_key": 0}
    for row in rows:
        if row["split"] == "train":
            if row["_key"] in eval_keys:
                counts["contamination_key"] += 1
                continue
            if eval_grams and not eval_grams.isdisjoint(word_ngrams(row["prompt"], ngram_n)):
                counts["contamination_ngram"] += 1
                continue
        kept.append(row)
    return kept, counts


# ---------------------------------------------------------------------------------------------
# Generated General Points


def _generate_general_points(cfg: PrepareConfig, task: Task) -> tuple[list[dict], dict[str, int], dict]:
    """Draw ID hands until train/val/test_id quotas fill (split by key hash), then OOD hands for test_ood.

    Split by key *before* filling quotas: the quota of a split only ever takes hands whose key hashes
    there, so the sizes are met without any key in two splits. Which share of the puzzle space each
    split owns comes from `split_fractions` (renormalised over train/val/test_id; test_ood has its
    own rule), not from the row quotas: only ~566 ID hands exist, so a large train quota (many card
    orders and solution routes per hand) must not shrink the hands the evaluation sees.
    """
    from amft_lib.tasks.general_points import RULES, generate_rows

    for name in ("id_rule", "ood_rule"):
        if getattr(cfg, name) not in RULES:
            raise ConfigError(f"{name}={getattr(cfg, name)!r}: choose one of {', '.join(RULES)}")
    quotas = {"train": cfg.train_size, "val": cfg.val_size, "test_id": cfg.test_id_size}
    total = sum(quotas.values())
    owned = {name: float(cfg.split_fractions.get(name, 0.0)) for name in quotas}
    starved = [name for name, size in quotas.items() if size and not owned[name]]
    if starved:
        raise ConfigError(f"split_fractions={cfg.split_fractions} gives no hands to {', '.join(starved)}, "
                          "which asks for rows: give it a fraction or set its size to 0")
    weight = sum(owned[name] for name, size in quotas.items() if size)
    fractions = {name: owned[name] / weight for name, size in quotas.items() if size} if total else {}
    dropped: Counter[str] = Counter()
    candidates = 0

    def fill(rule: str, want: dict[str, int], assign: Callable[[str], str], stream: int) -> list[dict]:
        nonlocal candidates
        taken: dict[str, list[dict]] = {name: [] for name in want}
        seen: set[str] = set()
        for round_no in range(_MAX_GENERATION_ROUNDS):
            missing = sum(n - len(taken[s]) for s, n in want.items())
            if missing <= 0:
                break
            # A distinct seed per (stream, round): later rounds add hands, never replay earlier ones.
            round_seed = cfg.seed * 1_000_003 + stream * 1_009 + round_no
            batch = generate_rows(max(64, 2 * missing), rule, round_seed, "train")
            candidates += len(batch)
            for row in batch:
                if row["prompt"] in seen:  # same cards in the same order: an exact duplicate
                    dropped["duplicate_exact"] += 1
                    continue
                key = task.canonical_key(row["answer"], row["prompt"])
                split = assign(key)
                if len(taken[split]) >= want[split]:
                    continue  # quota full: the hand is simply not drawn, not dropped
                seen.add(row["prompt"])
                taken[split].append({**row, "split": split, "_key": key})
        out = []
        for split, split_rows in taken.items():
            for index, row in enumerate(split_rows):
                row["id"] = f"gp-{rule}-{split}-{index:06d}"
                out.append(row)
        return out

    rows = fill(cfg.id_rule, quotas, lambda key: assign_split(cfg.seed, key, fractions), 1) if total else []
    if cfg.test_ood_size:
        rows += fill(cfg.ood_rule, {"test_ood": cfg.test_ood_size}, lambda key: "test_ood", 2)
    produced = Counter(row["split"] for row in rows)
    wanted = {**quotas, "test_ood": cfg.test_ood_size}
    shortfall = {name: n - produced[name] for name, n in wanted.items()}
    notes: dict[str, Any] = {"generated_candidates": candidates}
    if any(shortfall.values()):
        notes["shortfall"] = {s: n for s, n in shortfall.items() if n}
    notes["demonstrations_removed"] = _check_demonstrations(rows, task)
    return rows, dict(dropped), notes


def _generate_countdown(cfg: PrepareConfig, task: Task) -> tuple[list[dict], dict[str, int], dict]:
    """Countdown rows from `tasks.countdown.generate_splits`: each instance once, so splitting by key
    is by construction (val and test_id are disjoint slices of the shuffled ID space, test_ood has
    operands above the ID range)."""
    from amft_lib.tasks.countdown import generate_splits

    for name in ("countdown_train_size", "countdown_eval_size", "countdown_demo_pool"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)}: must be >= 0")
    n_eval = cfg.countdown_eval_size
    sizes = {"train": cfg.countdown_train_size, "val": n_eval, "test_id": n_eval, "test_ood": n_eval}
    rows, notes = generate_splits(sizes, cfg.countdown_demo_pool, cfg.seed)
    for row in rows:
        row["_key"] = task.canonical_key(row["answer"], row["prompt"])
    notes["demonstrations_removed"] = _check_demonstrations(rows, task)
    return rows, {}, notes


# ---------------------------------------------------------------------------------------------
# Ingested math


def _ingest_math(cfg: PrepareConfig, task: Task) -> tuple[list[dict], dict[str, int], dict, list[dict]]:
    """Read, map, normalise and dedup user rows, then split them by the hash of their canonical key."""
    path = Path(cfg.input or "")
    records = read_records(path, cfg.max_row_bytes)
    fields = FieldMap(cfg.question_field, cfg.answer_field, cfg.solution_field, cfg.id_field)
    items = to_math_items(records, fields, cfg.allow_extra_fields)

    dropped: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    seen_raw: set[tuple] = set()
    seen_norm: set[tuple] = set()
    seen_key: set[str] = set()
    id_source: dict[str, str] = {}
    for item in items:
        if item.raw in seen_raw:
            dropped["duplicate_exact"] += 1
            continue
        seen_raw.add(item.raw)
        if item.id is not None:
            if not item.id:
                raise DataError(f"{item.source}: empty id in field {cfg.id_field!r}")
            if item.id in id_source:
                raise DataError(f"{item.source}: duplicate id {item.id[:80]!r} (first at {id_source[item.id]})")
            id_source[item.id] = item.source
        if not item.question:
            dropped["empty_question"] += 1
            continue
        norm = (item.question, item.answer, item.solution)
        if norm in seen_norm:
            dropped["duplicate_normalized"] += 1
            continue
        seen_norm.add(norm)
        if task.check_answer(item.answer) is not None:
            dropped["bad_answer"] += 1
            continue
        key = task.canonical_key(item.answer, item.question)
        if key in seen_key:  # same question up to case/punctuation: keep the first, whatever its answer
            dropped["duplicate_key"] += 1
            continue
        seen_key.add(key)
        row_id = item.id if item.id is not None else f"{task.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        rows.append(
            {
                "id": row_id,
                "task": task.name,
                "prompt": item.question,
                "answer": item.answer,
                "demonstration": item.solution,
                "split": assign_split(cfg.seed, key, cfg.split_fractions),
                "meta": json.dumps({"source": f"{path.name}:{item.line}"}, sort_keys=True),
                "_key": key,
            }
        )
    notes: dict[str, Any] = {"input_rows": len(records)}
    notes["demonstrations_removed"] = _check_demonstrations(rows, task)
    inputs = [{"file": path.name, "sha256": sha256_file(path), "rows": len(records)}]
    return rows, dict(dropped), notes, inputs


def _check_demonstrations(rows: Iterable[dict[str, Any]], task: Task) -> int:
    """Null every demonstration the verifier rejects (the row stays for RL); return how many.

    The validation gate demands that every demonstration earns reward 1, and SFT on a wrong
    solution teaches the wrong thing, so a rejected solution is removed here, not in training.
    """
    removed = 0
    for row in rows:
        demo = row["demonstration"]
        if demo is None:
            continue
        try:
            ok = task.verify(row["answer"], demo).reward == 1
        except ValueError:
            ok = False
        if not ok:
            row["demonstration"] = None
            removed += 1
    return removed


# ---------------------------------------------------------------------------------------------
# Writing


def _generator_record(cfg: PrepareConfig) -> dict[str, Any]:
    """The config as recorded in the card: the input by file name only, since the path is not content."""
    config = dataclasses.asdict(cfg)
    config.pop("out_dir")
    if cfg.input is not None:
        config["input"] = Path(cfg.input).name
    return {
        "name": "amft_lib.data.prepare",
        "amft_lib": amft_lib.__version__,
        "pyarrow": pa.__version__,
        "config": config,
    }


def write_dataset(out_dir: Path, rows: Sequence[dict[str, Any]], card: DatasetCard) -> PrepareResult:
    """Write one parquet per non-empty split and the card, via a temp dir; rename the card in last.

    The old card is removed before the first rename, so during the swap the directory reads as
    "incomplete" (no card) rather than as a mix of old and new files under an old card.
    """
    by_split = {name: [row for row in rows if row["split"] == name] for name in SPLITS}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir))
    try:
        for name, split_rows in by_split.items():
            if not split_rows:
                continue
            file = split_file_name(name)
            write_parquet(rows_to_table(split_rows), tmp / file)
            card.splits[name] = SplitInfo(file=file, rows=len(split_rows), sha256=sha256_file(tmp / file))
        (tmp / CARD_NAME).write_text(dumps_json(card.to_dict()), encoding="utf-8")
        (out_dir / CARD_NAME).unlink(missing_ok=True)
        for name in SPLITS:
            target = out_dir / split_file_name(name)
            if name in card.splits:
                os.replace(tmp / split_file_name(name), target)
            else:
                target.unlink(missing_ok=True)  # a stale split from an earlier run must not linger
        os.replace(tmp / CARD_NAME, out_dir / CARD_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = {name: out_dir / info.file for name, info in card.splits.items()}
    return PrepareResult(out_dir=out_dir, card_path=out_dir / CARD_NAME, files=files, card=card)
