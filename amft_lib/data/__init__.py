"""Data preparation and the validation gate (DESIGN.md "Data flow", first two stages).

    schema.py    the dataset contract: columns, splits, pyarrow schema, card, DataError, atomic writes
    ingest.py    JSONL/parquet readers for untrusted user files; text normalisation; GSM8K answers
    prepare.py   run_prepare(PrepareConfig) -> PrepareResult
    validate.py  run_validate(ValidateConfig) -> ValidationResult (Great Expectations)
    commands.py  `amft data prepare|validate`

The public names below resolve lazily, so `import amft_lib.data` stays cheap (no pyarrow, no GX)
until one of them is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "amft_lib.data.schema",
    "DatasetCard": "amft_lib.data.schema",
    "COLUMNS": "amft_lib.data.schema",
    "SPLITS": "amft_lib.data.schema",
    "PrepareConfig": "amft_lib.data.prepare",
    "PrepareResult": "amft_lib.data.prepare",
    "run_prepare": "amft_lib.data.prepare",
    "ValidateConfig": "amft_lib.data.validate",
    "ValidationResult": "amft_lib.data.validate",
    "run_validate": "amft_lib.data.validate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'amft_lib.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
