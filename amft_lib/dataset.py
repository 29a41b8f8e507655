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


def read_rows(path: str | Path) -> dict[str, list[dict]]:
    """Rows grouped by their `split` column, in file order (deterministic)."""
    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no parquet files found")
    splits: dict[str, list[dict]] = defaultdict(list)
    for f in files:
        for row in pq.read_table(f).to_pylist():
            splits[row["split"]].append(row)
    return dict(splits)


def load_splits(cfg: DataConfig) -> dict[str, list[dict]]:
    if cfg.path:
        if str(cfg.path).startswith("s3://"):
            from amft_lib.storage import download_prefix

            with tempfile.TemporaryDirectory(prefix="amft-data-") as tmp:
                download_prefix(cfg.path, tmp)
                return read_rows(tmp)
        return read_rows(cfg.path)
    if cfg.task != "general_points":
        raise ValueError(f"data.path is required for task {cfg.task!r} (only general_points can be generated)")
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
