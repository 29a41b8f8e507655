"""The dataset contract (DESIGN.md "Dataset"): columns, split names, the pyarrow schema, the card.

Every stage that reads or writes a dataset goes through this module, so a change to the contract
is a change in one place. Writing is deterministic (fixed schema, no pandas metadata, no
timestamps) and atomic (temp name, then `os.replace`) because the card's sha256 values are what
lineage records point at: the same inputs must give byte-identical files, and a crash must never
leave a file that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from amft_lib.errors import UserError
from amft_lib.regular_file import read_regular_file

COLUMNS: tuple[str, ...] = ("id", "task", "prompt", "answer", "demonstration", "split", "meta")
SPLITS: tuple[str, ...] = ("train", "val", "test_id", "test_ood")
EVAL_SPLITS: tuple[str, ...] = ("val", "test_id", "test_ood")
NULLABLE_COLUMNS: frozenset[str] = frozenset({"demonstration"})
CARD_NAME = "card.json"
MAX_CARD_BYTES = 16 << 20  # a card lists a few splits and inputs: kilobytes
MAX_PARQUET_BYTES = 8 << 30  # 8 GiB per split file: far above any dataset here, below a /dev/zero fill
CARD_VERSION = 1

# Every column is a string; only `demonstration` may be null (rows without a worked solution
# still serve RL and evaluation).
ARROW_SCHEMA = pa.schema([pa.field(name, pa.string(), nullable=name in NULLABLE_COLUMNS) for name in COLUMNS])

# zstd with statistics off: smaller files and nothing in the footer that depends on anything but
# the rows. pyarrow writes no timestamps; `created_by` names the pyarrow version, which is why the
# byte-identical promise is "same inputs, seed and library versions".
_PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "write_statistics": False,
    "use_dictionary": False,
    "store_schema": True,
}


# C0 controls except tab, newline and carriage return, DEL, and the C1 controls: NUL truncates strings in
# C-based tools, ESC starts terminal escape sequences (a row that rewrites a reviewer's terminal), and
# none of them belongs in a prompt, answer or demonstration.
_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
TEXT_COLUMNS: tuple[str, ...] = ("id", "prompt", "answer", "demonstration", "meta")


def find_control_character(text: str) -> str | None:
    """"U+001B at 12" for the first control character in `text` (tab, newline, CR allowed), else None."""
    match = _CONTROL_RE.search(text)
    return None if match is None else f"U+{ord(match.group()):04X} at {match.start()}"


def row_control_character(row: Mapping[str, Any]) -> str | None:
    """"prompt: U+0000 at 3" for the first text column of a row holding a control character, else None."""
    for name in TEXT_COLUMNS:
        value = row.get(name)
        found = find_control_character(value) if isinstance(value, str) else None
        if found:
            return f"{name}: {found}"
    return None


class DataError(UserError):
    """Bad input data or a dataset that cannot be read or written.

    The message is one line and names the file (and line or row) and what to do, because the CLI
    prints it verbatim as `error: <message>` and exits 2; no traceback is meant for the user.
    """


class DataWriteError(DataError, OSError):
    """The dataset or a report cannot be written (permission denied, disk full); names the path."""


def unwritable_ancestor(out_dir: Path) -> tuple[Path, bool] | None:
    """Why `out_dir` cannot be created as a writable directory: (its nearest existing ancestor, whether
    that is a directory at all — else it is one without write permission), or None when it can. Creates
    nothing, so a run can check this before its expensive part (data preparation and both loops do)."""
    probe = Path(out_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return probe, False
    return None if os.access(probe, os.W_OK | os.X_OK) else (probe, True)


def check_writable_dir(out_dir: Path, what: str) -> None:
    """DataWriteError ("<out_dir>: <what>: <why>") unless `out_dir` is, or can be created as, a
    writable directory."""
    found = unwritable_ancestor(out_dir)
    if found is not None:
        probe, is_dir = found
        why = f"permission denied on {probe}" if is_dir else f"{probe} is not a directory"
        raise DataWriteError(f"{out_dir}: {what}: {why}")


def split_file_name(split: str) -> str:
    """File name of one split inside a prepared dataset directory."""
    return f"{split}.parquet"


def rows_to_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Build a table with exactly ARROW_SCHEMA from row dicts (column order fixed by COLUMNS)."""
    columns = {name: [row.get(name) for row in rows] for name in COLUMNS}
    try:
        return pa.Table.from_pydict(columns, schema=ARROW_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"rows do not fit the dataset schema: {one_line(exc)}") from None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed so large files do not load into memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path beside `final`; rename it onto `final` only if the block succeeds.

    The temp file lives in the same directory so the rename is atomic on one filesystem; on any
    exception the temp file is removed, so readers see either the old file or the new one.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 would survive the rename. 0666 minus the umask is what open() gives any
    # new file, so a prepared dataset is as readable as the user's other files (0644 by default).
    for _ in range(100):
        tmp = final.parent / f".{final.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 48 random bits
        raise FileExistsError(f"{final.parent}: cannot create a unique temp file")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write `table` deterministically to a temp name beside `path`, then rename it into place."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **_PARQUET_OPTIONS)


def open_parquet_writer(path: Path) -> pq.ParquetWriter:
    """A writer with the same deterministic options as :func:`write_parquet`, for files written in
    batches (streamed ingestion). The caller writes into a temp folder and renames it into place."""
    return pq.ParquetWriter(path, ARROW_SCHEMA, **_PARQUET_OPTIONS)


def write_text(text: str, path: Path) -> None:
    """Write UTF-8 text atomically (reports, cards)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def dumps_json(obj: Any) -> str:
    """Stable JSON (sorted keys, fixed indent, trailing newline) so equal content is equal bytes."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


@dataclass
class SplitInfo:
    """One split file as the card records it."""

    file: str
    rows: int
    sha256: str


@dataclass
class DatasetCard:
    """The JSON written beside the parquet files (`card.json`), last, as the completeness marker.

    Holds what an auditor needs to trace a model back to its data: what made it (generator and
    config), what came in (inputs with sha256), what was dropped and why, and the exact bytes out.
    """

    task: str
    source: str
    generator: dict[str, Any]
    splits: dict[str, SplitInfo]
    dropped: dict[str, int] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    version: int = CARD_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (nested dataclasses expanded)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetCard:
        """Rebuild a card read from JSON; raises DataError if required keys are missing."""
        try:
            splits = {name: SplitInfo(**info) for name, info in data["splits"].items()}
            return cls(
                task=data["task"],
                source=data["source"],
                generator=dict(data["generator"]),
                splits=splits,
                dropped=dict(data.get("dropped", {})),
                notes=dict(data.get("notes", {})),
                inputs=list(data.get("inputs", [])),
                version=int(data.get("version", CARD_VERSION)),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise DataError(f"dataset card is malformed: {one_line(exc)}") from None


def read_split_bytes(file: Path, sha256: str | None, changed: str) -> bytes:
    """A split file's bytes (a regular file under MAX_PARQUET_BYTES), checked against the card's sha256 when
    given. The caller parses these same bytes: nothing can swap the file between hashing and parsing.
    `changed` ends the one-line error (what the reader should do about a file changed since prepare)."""
    data = read_regular_file(file, "dataset file", MAX_PARQUET_BYTES, DataError)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"{file}: sha256 differs from {CARD_NAME}; {changed}")
    return data


def read_card(dataset_dir: Path, sha256: str | None = None) -> DatasetCard:
    """Read `card.json` from a prepared dataset directory; `sha256` pins it (see load_card)."""
    return load_card(dataset_dir, sha256)[0]


def load_card(dataset_dir: Path, sha256: str | None = None) -> tuple[DatasetCard, str]:
    """`card.json` of a prepared dataset directory (a regular file of at most MAX_CARD_BYTES: a FIFO or
    device named card.json must not hang the loader of every stage) and the sha256 of its bytes.

    The bytes hashed are the bytes parsed: the data gate records the digest of the card it validated, and
    a stage passes that digest back as `sha256`, so a card swapped at any moment after the gate (even
    between a stage's check of the gate record and its read of the rows) is refused, not trusted."""
    path = dataset_dir / CARD_NAME
    if not path.exists() and not path.is_symlink():
        raise DataError(f"{path}: no dataset card (was `amft data prepare` run to completion?)")
    raw = read_regular_file(path, "dataset card", MAX_CARD_BYTES, DataError)
    digest = hashlib.sha256(raw).hexdigest()
    if sha256 is not None and digest != sha256:
        raise DataError(f"{path}: sha256 {digest[:12]}… is not the card the data gate validated ({sha256[:12]}…): "
                        "the dataset changed after the gate")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: cannot read dataset card: {one_line(exc)}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: dataset card must be a JSON object")
    return DatasetCard.from_dict(data), digest


def one_line(exc: BaseException) -> str:
    """An exception message squeezed onto one line (messages from pyarrow span several)."""
    text = " ".join(str(exc).split())
    return text[:300] + ("…" if len(text) > 300 else "")
