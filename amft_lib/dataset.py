"""Read a prepared dataset into per-split row lists for training and evaluation.

Accepts what `amft data prepare` writes (a directory of parquet files plus a dataset card), a
single parquet file with a `split` column, or an s3:// URI of either (staged to a temp dir).
When no path is configured and the task is General Points, the dataset is prepared in a temp
directory with the same code path as the pipeline, so in-memory runs and pipeline runs see
identically split data.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from amft_lib.config import DataConfig
from amft_lib.data.schema import CARD_NAME, MAX_CARD_BYTES, DataError, one_line, read_card, read_split_bytes
from amft_lib.regular_file import read_regular_file

log = logging.getLogger(__name__)

# Columns every stage reads, as strings (id keys reports, task picks the verifier, split the role).
REQUIRED_STRING_COLUMNS = ("id", "task", "prompt", "answer", "split")
# Columns that may be absent or entirely null (pyarrow types an all-null column as `null`).
OPTIONAL_STRING_COLUMNS = ("demonstration", "meta")


def read_rows(path: str | Path, card_sha256: str | None = None) -> dict[str, list[dict]]:
    """Rows grouped by their `split` column, in file order (deterministic).

    The one loader train, warm-start, evaluate and the pipeline stages use, so the integrity rules
    live here and nowhere else: with a card.json beside the files (what `amft data prepare` writes
    and the GX gate validated), exactly the files the card lists are read, each must match the
    card's sha256 (the bytes hashed are the bytes parsed: no window to swap the file in between),
    and a parquet file the card does not list is refused. Without a card (a single parquet file, or
    a folder of hand-written parquet) the files are read as they are, with a warning. Every file
    must hold the contract's columns as strings, and ids must be unique across the dataset.
    `card_sha256` (a stage passes what the data gate recorded) pins the card itself the same way: the
    card parsed is the card the gate validated, with no window between checking and reading.

    DataError (one line naming the file, and the column or row) for each of these.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such dataset (give the folder `amft data prepare` wrote, or a parquet file)")
    files = dataset_files(path, card_sha256)
    splits: dict[str, list[dict]] = defaultdict(list)
    first_seen: dict[str, str] = {}
    for f, sha256 in files:
        rows = _read_parquet_rows(f, sha256)
        for i, row in enumerate(rows):
            null = next((c for c in REQUIRED_STRING_COLUMNS if not isinstance(row.get(c), str)), None)
            if null is not None:
                raise DataError(f"{f}: row {i + 1}: column {null!r} is null; every row needs "
                                f"{', '.join(REQUIRED_STRING_COLUMNS)}")
            earlier = first_seen.get(row["id"])
            if earlier is not None:
                raise DataError(f"{f}: row {i + 1}: duplicate id {row['id'][:80]!r} (first at {earlier}); "
                                "ids key rollouts, reports and lineage and must be unique")
            first_seen[row["id"]] = f"{f.name} row {i + 1}"
            splits[row["split"]].append(row)
    return dict(splits)


def card_digest(path: str | Path) -> str:
    """sha256 of a dataset folder's card.json bytes: what the data gate records, so a later stage can
    tell that the card (and through it every file) is the one the gate validated."""
    card = Path(path) / CARD_NAME
    if not card.exists():
        raise DataError(f"{card}: no dataset card (was `amft data prepare` run to completion?)")
    return hashlib.sha256(read_regular_file(card, "dataset card", MAX_CARD_BYTES, DataError)).hexdigest()


def dataset_files(path: Path, card_sha256: str | None = None) -> list[tuple[Path, str | None]]:
    """(file, expected sha256 or None) to read: the card's files when there is a card, else the parquet
    files found. DataError when a card-listed file is missing or escapes the folder, a parquet file
    is not in the card, or the card is not the pinned `card_sha256`."""
    if card_sha256 is not None and not (path / CARD_NAME).exists():
        raise DataError(f"{path / CARD_NAME}: the data gate validated a dataset card ({card_sha256[:12]}…) and "
                        "there is none: the dataset changed after the gate")
    if not path.is_dir():
        return [(path, None)]
    try:
        found = sorted(path.glob("*.parquet"))
    except OSError as exc:
        raise DataError(f"{path}: cannot list the dataset folder: {one_line(exc)}") from None
    if not (path / CARD_NAME).exists():
        if not found:
            raise DataError(f"{path}: no parquet files found (was `amft data prepare` run into it?)")
        log.warning("%s: no %s; reading %d parquet file(s) without an integrity check", path, CARD_NAME, len(found))
        return [(f, None) for f in found]
    card = read_card(path, card_sha256)
    listed: list[tuple[Path, str | None]] = []
    for split, info in sorted(card.splits.items()):
        name = str(info.file)
        if not name or Path(name).name != name or name in (".", ".."):
            raise DataError(f"{path / CARD_NAME}: split {split!r} names file {name[:80]!r}; "
                            "a card lists files inside its own folder")
        file = path / name
        if not file.is_file():
            raise DataError(f"{file}: listed in {CARD_NAME} but missing")
        listed.append((file, str(info.sha256)))
    extra = sorted({f.name for f in found} - {f.name for f, _ in listed})
    if extra:
        raise DataError(f"{path / extra[0]}: not listed in {CARD_NAME}; a file added after prepare would be "
                        "trained on unvalidated (remove it, or prepare the dataset again)")
    if not listed:
        raise DataError(f"{path / CARD_NAME}: lists no split files")
    return listed


def _read_parquet_rows(f: Path, sha256: str | None) -> list[dict]:
    """Rows of one parquet file, after its sha256 (when given) and column types are checked."""
    data = read_split_bytes(f, sha256, "the file changed after prepare (and after the data gate validated it): "
                                       "prepare and validate it again")
    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as exc:  # not parquet, truncated: pyarrow raises many types
        raise DataError(f"{f}: not a readable parquet file: {one_line(exc)}") from None
    check_column_types(table.schema, f)
    try:
        return table.to_pylist()
    except Exception as exc:  # bad UTF-8 in a string column surfaces here
        raise DataError(f"{f}: cannot convert rows: {one_line(exc)}") from None


def _is_string(tp: pa.DataType) -> bool:
    return pa.types.is_string(tp) or pa.types.is_large_string(tp)


def check_column_types(schema: pa.Schema, where: Path | str) -> None:
    """DataError naming the file and column unless the contract's columns are strings: an int prompt or a
    struct answer would otherwise fail deep in tokenisation or the verifier, as a traceback."""
    names = set(schema.names)
    missing = [c for c in REQUIRED_STRING_COLUMNS if c not in names]
    if missing:
        raise DataError(f"{where}: no column {missing[0]!r}; a dataset needs string columns "
                        f"{', '.join(REQUIRED_STRING_COLUMNS)} (see `amft data prepare`)")
    for name in (*REQUIRED_STRING_COLUMNS, *OPTIONAL_STRING_COLUMNS):
        if name not in names:
            continue
        tp = schema.field(name).type
        if _is_string(tp) or (name in OPTIONAL_STRING_COLUMNS and pa.types.is_null(tp)):
            continue
        raise DataError(f"{where}: column {name!r} has type {tp}; the dataset contract needs a string")


def check_prompt_lengths(rows: Sequence[Mapping[str, Any]], count_tokens: Callable[[list[str]], Sequence[int]],
                         context: int, reserve: int, where: str) -> int:
    """The longest prompt in tokens; DataError if any prompt plus `reserve` new tokens exceeds `context`.

    The rule (README "Data integrity"): a prompt that does not fit the model's context together with
    the tokens the stage generates is refused, never truncated. Truncating the left (HF's default)
    cuts the question a verifier judges, so the model would be graded on a task it never saw, and
    every stage would have to truncate the same way; refusing names the row so the data is fixed once.
    Pure: the tokenizer comes in as `count_tokens` (prompts -> token counts, one batched call: a fast
    tokenizer counts 18,000 prompts in a fraction of a second, one call per prompt took 4 s).
    """
    budget = context - reserve
    lengths = list(count_tokens([row["prompt"] for row in rows]))
    longest = max(lengths, default=0)
    offenders = [(n, row) for n, row in zip(lengths, rows, strict=True) if n > budget]
    if offenders:
        n, row = offenders[0]
        raise DataError(
            f"{where}: row {str(row.get('id'))[:80]!r} (split {row.get('split')}): prompt is {n} tokens; with "
            f"{reserve} new tokens that exceeds the model's context of {context} ({len(offenders)} such prompt(s)); "
            "long prompts are refused, not truncated: shorten or drop them"
        )
    return longest


def model_context(model_config: Any) -> int | None:
    """The model's context length from its HF config (None when the config does not say)."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_prompts_fit(rows: Sequence[Mapping[str, Any]], tokenizer: Any, model: Any, max_new_tokens: int | None,
                      chat_template: bool, where: str | None) -> None:
    """`check_prompt_lengths` with the tokenizer and context of a loaded model, counting tokens the way
    rollouts encode a prompt (chat template, BOS). The one-line hook train, warm-start and evaluate call
    after loading the model; logs the rule and the longest prompt."""
    from amft_lib.rollout import render_prompts

    context = model_context(getattr(model, "config", None))
    if context is None or not rows:
        return
    bos = 1 if tokenizer.bos_token_id is not None and not chat_template else 0

    backend = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer of a fast one: same ids, 1.5x less

    def count(prompts: list[str]) -> list[int]:
        texts = render_prompts(tokenizer, prompts, chat_template)  # every prompt, once, in a bounded child
        if backend is not None:
            return [len(e.ids) + bos for e in backend.encode_batch(texts, add_special_tokens=False)]
        return [len(ids) + bos for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    reserve = int(max_new_tokens or 0)
    longest = check_prompt_lengths(rows, count, context, reserve, where or "generated data")
    log.info("prompts fit the context: longest %d tokens + %d new <= %d (longer prompts are refused, not truncated)",
             longest, reserve, context)


def check_task(splits: dict[str, list[dict]], task: str, where: str | None) -> None:
    """DataError unless every row belongs to `task`: a verifier judging another task's answers fails
    deep inside training with a traceback (or, worse, scores everything 0)."""
    found = sorted({r["task"] for rows in splits.values() for r in rows})
    if found and found != [task]:
        raise DataError(
            f"{where or 'generated data'}: rows are for task(s) {', '.join(found)}, but data.task={task!r}; "
            f"pass --task {found[0]} or point --data at a {task} dataset"
        )


def load_splits(cfg: DataConfig) -> dict[str, list[dict]]:
    if cfg.path:
        if str(cfg.path).startswith("s3://"):
            from amft_lib.storage import download_prefix

            with tempfile.TemporaryDirectory(prefix="amft-data-") as tmp:
                download_prefix(cfg.path, tmp)
                return read_rows(tmp)
        return read_rows(cfg.path)
    if cfg.task != "general_points":
        raise DataError(f"data.path is required for task {cfg.task!r} (only general_points can be generated)")
    from amft_lib.data.prepare import PrepareConfig, run_prepare

    with tempfile.TemporaryDirectory(prefix="amft-data-") as tmp:
        run_prepare(
            PrepareConfig(
                task="general_points",
                out_dir=tmp,
                seed=cfg.seed,
                train_size=cfg.train_size,
                val_size=cfg.val_size,
                test_id_size=cfg.val_size,
                test_ood_size=cfg.val_size,
            )
        )
        return read_rows(tmp)
