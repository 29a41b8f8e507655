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
import logging
import os
import shutil
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

import amft_lib
from amft_lib.config import ConfigError
from amft_lib.config import help_field as _help
from amft_lib.data.ingest import DEFAULT_MAX_ROW_BYTES, FieldMap, iter_records, to_math_item
from amft_lib.data.schema import (
    CARD_NAME,
    EVAL_SPLITS,
    SPLITS,
    DataError,
    DatasetCard,
    DataWriteError,
    SplitInfo,
    check_writable_dir,
    dumps_json,
    one_line,
    open_parquet_writer,
    row_control_character,
    rows_to_table,
    sha256_file,
    split_file_name,
    write_parquet,
)
from amft_lib.tasks import Task, get_task, known_tasks
from amft_lib.tasks.math import normalize_question

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test_id": 0.1}
GENERATED_TASKS = ("general_points", "countdown")  # tasks whose data `prepare` generates itself
_MAX_GENERATION_ROUNDS = 40  # each round draws ~the missing rows again; ~566 ID puzzles bound the space


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
    check_writable_dir(Path(cfg.out_dir), "cannot write the dataset")
    task = get_task(cfg.task)
    if cfg.input is not None:
        return _prepare_ingested(cfg, task)  # streamed: never holds the input's rows in memory
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


# Why two passes over the file instead of a list of rows: a Python dict per row costs ~1 KB, so 1M
# short rows took ~2 GB (26x the input). Pass 1 keeps 8-byte hashes per row in numpy-ready arrays
# (~45 B/row) and decides dedup and splits with vectorised first-occurrence tests; pass 2 re-reads
# the file and streams the kept rows into one parquet writer per split. Hashes are 64-bit blake2b:
# a false "duplicate" needs a collision, ~3e-8 for 1M rows.
_WRITE_BATCH_ROWS = 8192


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _raw_text(raw: tuple) -> str:
    """An unambiguous string for the exact-dedup tuple (None and "" differ)."""
    return "\x1f".join("\x00" if v is None else "\x01" + str(v) for v in raw)


@dataclass
class _Scan:
    """Pass 1: per input record (in file order) hashes, flags and the split its key hashes to."""

    raw: Any
    ident: Any
    has_id: Any
    empty: Any
    norm: Any
    bad: Any
    key: Any
    split: Any
    gram: Any  # n-gram hashes of eval-split rows …
    gram_row: Any  # … and the record each came from


def _scan_input(cfg: PrepareConfig, task: Task, fields: FieldMap) -> _Scan:
    from array import array

    import numpy as np

    a_raw, a_id, a_norm, a_key = array("Q"), array("Q"), array("Q"), array("Q")
    has_id, empty, bad, split = bytearray(), bytearray(), bytearray(), bytearray()
    grams, gram_rows = array("Q"), array("q")
    eval_codes = {SPLITS.index(name) for name in EVAL_SPLITS}
    for index, record in enumerate(iter_records(Path(cfg.input or ""), cfg.max_row_bytes)):
        item = to_math_item(record, fields, cfg.allow_extra_fields)
        if item.id is not None and not item.id:
            raise DataError(f"{item.source}: empty id in field {cfg.id_field!r}")
        a_raw.append(_hash64(_raw_text(item.raw)))
        has_id.append(item.id is not None)
        a_id.append(_hash64(item.id) if item.id else 0)
        empty.append(not item.question)
        a_norm.append(_hash64(_raw_text((item.question, item.answer, item.solution))))
        is_bad = bool(item.question) and task.check_answer(item.answer) is not None
        bad.append(is_bad)
        code = 0
        if item.question and not is_bad:
            key = task.canonical_key(item.answer, item.question)
            a_key.append(_hash64(key))
            code = SPLITS.index(assign_split(cfg.seed, key, cfg.split_fractions))
            if cfg.ngram_n > 0 and code in eval_codes:
                for gram in word_ngrams(item.question, cfg.ngram_n):
                    grams.append(_hash64(gram))
                    gram_rows.append(index)
        else:
            a_key.append(0)
        split.append(code)

    def u64(buf: array) -> Any:
        return np.frombuffer(buf, dtype=np.uint64) if len(buf) else np.zeros(0, np.uint64)

    def flags(buf: bytearray) -> Any:
        return np.frombuffer(bytes(buf), dtype=np.uint8).astype(bool)

    return _Scan(raw=u64(a_raw), ident=u64(a_id), has_id=flags(has_id), empty=flags(empty), norm=u64(a_norm),
                 bad=flags(bad), key=u64(a_key), split=np.frombuffer(bytes(split), dtype=np.uint8),
                 gram=u64(grams), gram_row=np.frombuffer(gram_rows, dtype=np.int64) if len(gram_rows)
                 else np.zeros(0, np.int64))


def _first_of(values: Any, mask: Any) -> Any:
    """Mask of the first record (in file order) of each distinct value among the records in `mask`."""
    import numpy as np

    out = np.zeros(len(values), dtype=bool)
    idx = np.flatnonzero(mask)
    if idx.size:
        _, first = np.unique(values[idx], return_index=True)  # index of each value's first occurrence
        out[idx[first]] = True
    return out


def _item_at(cfg: PrepareConfig, fields: FieldMap, index: int) -> Any:
    """The `index`-th record as a MathItem (error messages only: re-reads the file up to it)."""
    for i, record in enumerate(iter_records(Path(cfg.input or ""), cfg.max_row_bytes)):
        if i == index:
            return to_math_item(record, fields, cfg.allow_extra_fields)
    raise AssertionError(index)  # pragma: no cover - the scan saw this record


def _sieve(cfg: PrepareConfig, fields: FieldMap, scan: Any) -> tuple[Any, dict[str, int]]:
    """Which scanned rows survive dedup (a bool mask over the input rows) and how many each rule dropped;
    an id given twice is a DataError naming both places. Vectorised over the scan, but with the answer of
    a row-at-a-time loop (see the comment inside)."""
    import numpy as np

    n = len(scan.raw)
    dropped: dict[str, int] = {}

    def count(name: str, value: Any) -> None:
        if int(value):
            dropped[name] = int(value)

    # The same sieve, in the same order, as one row at a time: exact copy → id clash (an error) → empty
    # question → normalised copy → unparseable answer → same canonical key. Each test only sees the
    # records that passed the previous ones, like the seen-sets of a sequential loop.
    exact = _first_of(scan.raw, np.ones(n, dtype=bool))
    count("duplicate_exact", n - exact.sum())
    with_id = np.flatnonzero(exact & scan.has_id)
    if with_id.size:
        ids = scan.ident[with_id]
        _, first = np.unique(ids, return_index=True)
        repeat = np.ones(with_id.size, dtype=bool)
        repeat[first] = False
        if repeat.any():
            pos = int(np.flatnonzero(repeat)[0])
            original = int(with_id[int(np.flatnonzero(ids == ids[pos])[0])])
            item, first_item = _item_at(cfg, fields, int(with_id[pos])), _item_at(cfg, fields, original)
            raise DataError(f"{item.source}: duplicate id {item.id[:80]!r} (first at {first_item.source})")
    asked = exact & ~scan.empty
    count("empty_question", (exact & scan.empty).sum())
    distinct = _first_of(scan.norm, asked)
    count("duplicate_normalized", asked.sum() - distinct.sum())
    parsed = distinct & ~scan.bad
    count("bad_answer", (distinct & scan.bad).sum())
    kept = _first_of(scan.key, parsed)
    count("duplicate_key", parsed.sum() - kept.sum())
    return kept, dropped


def _prepare_ingested(cfg: PrepareConfig, task: Task) -> PrepareResult:
    """Read, map, normalise, dedup, split and decontaminate user rows, streaming (see above)."""
    import numpy as np

    path = Path(cfg.input or "")
    fields = FieldMap(cfg.question_field, cfg.answer_field, cfg.solution_field, cfg.id_field)
    scan = _scan_input(cfg, task, fields)
    n = len(scan.raw)
    kept, dropped = _sieve(cfg, fields, scan)

    # contamination: train rows sharing a key (or, below in pass 2, an n-gram) with a kept eval row
    eval_codes = [SPLITS.index(name) for name in EVAL_SPLITS]
    train_code = SPLITS.index("train")
    is_eval = kept & np.isin(scan.split, eval_codes)
    key_hit = kept & (scan.split == train_code) & np.isin(scan.key, np.unique(scan.key[is_eval]))
    kept &= ~key_hit
    contamination = {"contamination_key": int(key_hit.sum())}
    eval_grams = np.unique(scan.gram[is_eval[scan.gram_row]]) if scan.gram.size else scan.gram
    if cfg.ngram_n > 0:
        contamination["contamination_ngram"] = 0

    notes: dict[str, Any] = {"input_rows": n}
    inputs = [{"file": path.name, "sha256": sha256_file(path), "rows": n}]
    card = DatasetCard(task=task.name, source="ingested", generator=_generator_record(cfg), splits={},
                       dropped={}, notes=notes, inputs=inputs)

    def stage(tmp: Path) -> None:
        writers: dict[str, Any] = {}
        buffers: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
        rows_out = dict.fromkeys(SPLITS, 0)
        ngram_hit = np.zeros(n, dtype=bool)
        demos_removed = 0
        control: list[str] = []  # rows whose input held a control character (reported in the card notes)

        def flush(name: str) -> None:
            if not buffers[name]:
                return
            if name not in writers:
                writers[name] = open_parquet_writer(tmp / split_file_name(name))
            writers[name].write_table(rows_to_table(buffers[name]))
            rows_out[name] += len(buffers[name])
            buffers[name] = []

        try:
            for index, record in enumerate(iter_records(path, cfg.max_row_bytes)):
                if index >= n or not kept[index]:
                    continue
                item = to_math_item(record, fields, cfg.allow_extra_fields)
                name = SPLITS[scan.split[index]]
                if name == "train" and eval_grams.size:
                    grams = np.fromiter((_hash64(g) for g in word_ngrams(item.question, cfg.ngram_n)),
                                        dtype=np.uint64)
                    if grams.size:
                        pos = np.minimum(np.searchsorted(eval_grams, grams), eval_grams.size - 1)
                        if (eval_grams[pos] == grams).any():
                            ngram_hit[index] = True
                            continue
                key = task.canonical_key(item.answer, item.question)
                row = {
                    "id": item.id if item.id is not None
                    else f"{task.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}",
                    "task": task.name,
                    "prompt": item.question,
                    "answer": item.answer,
                    "demonstration": item.solution,
                    "split": name,
                    "meta": json.dumps({"source": f"{path.name}:{item.line}"}, sort_keys=True),
                }
                demos_removed += _check_demonstrations([row], task)
                raw = dict(zip(("id", "prompt", "answer", "demonstration"), item.raw, strict=True))
                found = row_control_character(row) or row_control_character(raw)
                if found:  # normalisation removes them from questions and solutions; ids and answers keep them
                    control.append(f"{path.name}:{item.line}: {found}")
                buffers[name].append(row)
                if len(buffers[name]) >= _WRITE_BATCH_ROWS:
                    flush(name)
            for name in SPLITS:
                flush(name)
        finally:
            for writer in writers.values():
                writer.close()
        if cfg.ngram_n > 0:
            contamination["contamination_ngram"] = int(ngram_hit.sum())
        if not rows_out["train"]:
            raise DataError("no training rows left after dedup and decontamination; check the input and fractions")
        final = kept & ~ngram_hit
        notes["demonstrations_removed"] = demos_removed
        if control:
            notes["control_character_rows"] = len(control)
            log.warning("%d input row(s) hold control characters (first %s): removed from questions and "
                        "solutions; any left (ids, answers) fail `amft data validate` (check control_characters)",
                        len(control), control[0])
        notes["distinct_keys"] = {
            name: int(np.unique(scan.key[final & (scan.split == code)]).size) for code, name in enumerate(SPLITS)
        }
        card.dropped = dict(sorted({**dropped, **contamination}.items()))
        for name in SPLITS:
            if rows_out[name]:
                file = split_file_name(name)
                card.splits[name] = SplitInfo(file=file, rows=rows_out[name], sha256=sha256_file(tmp / file))

    return _write_staged(Path(cfg.out_dir), card, stage)


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


_TEMP_PREFIX = ".prepare-"


def _temp_prefix() -> str:
    """`.prepare-HOST-PID-`: a later run can tell a dead writer's leftovers from a live writer's."""
    return f"{_TEMP_PREFIX}{socket.gethostname().replace('-', '_')}-{os.getpid()}-"


def remove_stale_temp_dirs(out_dir: Path, max_age_s: float = 24 * 3600) -> list[Path]:
    """Remove `.prepare-*` temp dirs that a killed `prepare` (SIGKILL, OOM, node loss) left behind.

    Stale means: written by a process on this host that no longer runs, or named the old way (no
    host/pid), or untouched for `max_age_s` (a writer on another host of a shared volume). A live
    writer's temp dir is left alone, so two prepares into one folder do not break each other.
    """
    removed = []
    host = socket.gethostname().replace("-", "_")
    for path in out_dir.glob(f"{_TEMP_PREFIX}*"):
        if not path.is_dir():
            continue
        parts = path.name[len(_TEMP_PREFIX) :].split("-")
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            continue
        if len(parts) >= 3 and parts[1].isdigit():
            stale = age > max_age_s or (parts[0] == host and not _pid_alive(int(parts[1])))
        else:
            stale = True
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def write_dataset(out_dir: Path, rows: Sequence[dict[str, Any]], card: DatasetCard) -> PrepareResult:
    """Write one parquet per non-empty split and the card, via a temp dir; rename the card in last.

    The old card is removed before the first rename, so during the swap the directory reads as
    "incomplete" (no card) rather than as a mix of old and new files under an old card.
    """
    by_split = {name: [row for row in rows if row["split"] == name] for name in SPLITS}

    def stage(tmp: Path) -> None:
        for name, split_rows in by_split.items():
            if not split_rows:
                continue
            file = split_file_name(name)
            write_parquet(rows_to_table(split_rows), tmp / file)
            card.splits[name] = SplitInfo(file=file, rows=len(split_rows), sha256=sha256_file(tmp / file))

    return _write_staged(out_dir, card, stage)


def _write_staged(out_dir: Path, card: DatasetCard, stage: Callable[[Path], None]) -> PrepareResult:
    """Create a temp dir in `out_dir`, let `stage` write the split files into it (filling card.splits),
    then write the card and swap everything in; the temp dir is removed whatever happens."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(), dir=out_dir))
    except OSError as exc:
        raise DataWriteError(f"{out_dir}: cannot write the dataset: {one_line(exc)}") from None
    try:
        stage(tmp)
        (tmp / CARD_NAME).write_text(dumps_json(card.to_dict()), encoding="utf-8")
        (out_dir / CARD_NAME).unlink(missing_ok=True)
        for name in SPLITS:
            target = out_dir / split_file_name(name)
            if name in card.splits:
                os.replace(tmp / split_file_name(name), target)
            else:
                target.unlink(missing_ok=True)  # a stale split from an earlier run must not linger
        os.replace(tmp / CARD_NAME, out_dir / CARD_NAME)
    except DataError:
        raise
    except OSError as exc:
        raise DataWriteError(f"{out_dir}: cannot write the dataset: {one_line(exc)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = {name: out_dir / info.file for name, info in card.splits.items()}
    return PrepareResult(out_dir=out_dir, card_path=out_dir / CARD_NAME, files=files, card=card)
