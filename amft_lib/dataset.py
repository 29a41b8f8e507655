"""Read a prepared dataset into per-split row lists for training and evaluation.

Accepts what `amft data prepare` writes (a directory of parquet files plus a dataset card), a
single parquet file with a `split` column, or an s3:// URI of either (staged to a temp dir).
When no path is configured and the task is General Points, the dataset is prepared in a temp
directory with the same code path as the pipeline, so in-memory runs and pipeline runs see
identically split data.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from amft_lib.config import DataConfig
from amft_lib.data.schema import DataError, one_line


def read_rows(path: str | Path) -> dict[str, list[dict]]:
    """Rows grouped by their `split` column, in file order (deterministic).

    DataError (one line naming the path) when the path is missing, holds no parquet, or a file is
    unreadable or lacks the `split` column.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such dataset (give the folder `amft data prepare` wrote, or a parquet file)")
    try:
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    except OSError as exc:
        raise DataError(f"{path}: cannot list the dataset folder: {one_line(exc)}") from None
    if not files:
        raise DataError(f"{path}: no parquet files found (was `amft data prepare` run into it?)")
    splits: dict[str, list[dict]] = defaultdict(list)
    for f in files:
        try:
            rows = pq.read_table(f).to_pylist()
        except Exception as exc:  # permission, not parquet, truncated: pyarrow raises many types
            raise DataError(f"{f}: not a readable parquet file: {one_line(exc)}") from None
        for i, row in enumerate(rows):
            if not isinstance(row.get("split"), str) or not isinstance(row.get("task"), str):
                raise DataError(
                    f"{f}: row {i + 1} has no `split`/`task` string; is this an `amft data prepare` dataset?"
                )
            splits[row["split"]].append(row)
    return dict(splits)


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
