"""Read user data (JSONL or parquet) into checked records; normalise text; parse GSM8K answers.

User files are untrusted: any byte sequence must end either in records or in one `DataError`
whose message names the file (and line or row) and the fix — never a traceback, never a partial
result. Nothing here executes or unpickles input (JSON and parquet are parsed, nothing more).
Size limits are enforced before parsing a line, so a single huge row cannot exhaust memory in
`json.loads`.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from amft_lib.data.schema import DataError, one_line

DEFAULT_MAX_ROW_BYTES = 1 << 20  # 1 MiB: far above any real math problem, far below a memory problem
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class RawRecord:
    """One input row as read: where it came from (`file:line` or `file:row N`), its line/row, its fields."""

    source: str
    line: int
    fields: dict[str, Any]


@dataclass(frozen=True)
class FieldMap:
    """Which input fields hold the question, the answer, an optional solution and an optional id."""

    question: str = "question"
    answer: str = "answer"
    solution: str | None = None
    id: str | None = None

    def required(self) -> tuple[str, ...]:
        return (self.question, self.answer)

    def known(self) -> set[str]:
        return {name for name in (self.question, self.answer, self.solution, self.id) if name}


@dataclass(frozen=True)
class MathItem:
    """A user math problem after field mapping and normalisation (before dedup and splitting).

    `raw` is the tuple of mapped field values before normalisation, the key of exact dedup.
    """

    source: str
    line: int
    id: str | None
    question: str
    answer: str
    solution: str | None
    raw: tuple[Any, ...]


# ---------------------------------------------------------------------------------------------
# Readers


def read_records(path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> list[RawRecord]:
    """Read a JSONL or parquet file (by suffix) into records; raise DataError on any bad input."""
    return list(iter_records(path, max_row_bytes))


def iter_records(path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[RawRecord]:
    """Records one at a time (JSONL line by line, parquet batch by batch), so ingesting a large file
    holds one batch in memory, not the file. Same checks and errors as :func:`read_records`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return iter_jsonl(path, max_row_bytes)
    if suffix in PARQUET_SUFFIXES:
        return iter_parquet(path, max_row_bytes)
    raise DataError(
        f"{path}: unsupported input format {suffix or '(no suffix)'!r}; "
        f"use one of {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}"
    )


def _check_file(path: Path) -> int:
    """Return the file size, or raise DataError naming why the path is unusable."""
    try:
        if not path.is_file():
            raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
        return path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {one_line(exc)}") from None


def read_jsonl(path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> list[RawRecord]:
    """One JSON object per line, UTF-8. Blank lines are skipped; everything else must parse."""
    return list(iter_jsonl(path, max_row_bytes))


def iter_jsonl(path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[RawRecord]:
    """:func:`read_jsonl`, one record at a time (the file is checked before the first one)."""
    if _check_file(path) == 0:
        raise DataError(f"{path}: empty file (no rows)")
    return _jsonl_records(path, max_row_bytes)


def _jsonl_records(path: Path, max_row_bytes: int) -> Iterator[RawRecord]:
    count = 0
    try:
        with open(path, "rb") as f:
            line_no = 0
            while True:
                # Read at most max_row_bytes + 2 (content + CRLF) so a huge line never lands in memory whole.
                line = f.readline(max_row_bytes + 2)
                if not line:
                    break
                line_no += 1
                where = f"{path}:{line_no}"
                if len(line.rstrip(b"\r\n")) > max_row_bytes:
                    raise DataError(
                        f"{where}: row is larger than max_row_bytes={max_row_bytes}; "
                        "raise --max-row-bytes if such rows are intended"
                    )
                if line_no == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]  # a UTF-8 byte-order mark is legal noise, not data
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{where}: not valid UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1})"
                    ) from None
                if not text.strip():
                    continue
                count += 1
                yield RawRecord(where, line_no, _parse_json_object(text, where))
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {one_line(exc)}") from None
    if not count:
        raise DataError(f"{path}: empty file (no rows, only blank lines)")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json_object(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, over-long integers
        raise DataError(f"{where}: malformed JSON: {one_line(exc)}") from None
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object per line, got {_json_type(value)}")
    return value


def read_parquet(path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> list[RawRecord]:
    """Read a parquet file; a file that is not parquet (or is corrupt) is a DataError, not a crash."""
    return list(iter_parquet(path, max_row_bytes))


PARQUET_BATCH_ROWS = 16_384


def iter_parquet(path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[RawRecord]:
    """:func:`read_parquet` batch by batch: the file is opened and checked before the first record."""
    if _check_file(path) == 0:
        raise DataError(f"{path}: empty file (no rows)")
    try:
        handle = pq.ParquetFile(path)
        num_rows = handle.metadata.num_rows
    except Exception as exc:  # not parquet, truncated footer
        raise DataError(f"{path}: not a readable parquet file: {one_line(exc)}") from None
    if num_rows == 0:
        raise DataError(f"{path}: empty file (no rows)")
    return _parquet_records(path, handle, max_row_bytes)


def _parquet_records(path: Path, handle: pq.ParquetFile, max_row_bytes: int) -> Iterator[RawRecord]:
    offset = 0
    batches = handle.iter_batches(batch_size=PARQUET_BATCH_ROWS)
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                return
            table = pa.Table.from_batches([batch])
            table.validate(full=True)  # checks string columns hold valid UTF-8
            _ = table.column_names
        except Exception as exc:  # a corrupt page can surface as almost any exception type in pyarrow
            raise DataError(f"{path}: not a readable parquet file: {one_line(exc)}") from None
        row_bytes = _row_bytes(table)
        if row_bytes is not None:
            too_big = pc.greater(row_bytes, max_row_bytes)
            if pc.any(too_big).as_py():
                index = offset + pc.index(too_big, True).as_py()
                raise DataError(
                    f"{path}:row {index + 1}: row is larger than max_row_bytes={max_row_bytes}; "
                    "raise --max-row-bytes if such rows are intended"
                )
        try:
            rows = table.to_pylist()
        except Exception as exc:  # exotic column types (out-of-range timestamps, …) fail in many ways
            raise DataError(f"{path}: cannot convert rows: {one_line(exc)}") from None
        for i, row in enumerate(rows):
            yield RawRecord(f"{path}:row {offset + i + 1}", offset + i + 1, row)
        offset += len(rows)


def read_parquet_table(path: Path, data: bytes | None = None) -> pa.Table:
    """`pq.read_table` with every failure (not parquet, truncated, bad UTF-8) as one DataError line naming
    `path`; from `data` when given (bytes already read and hashed), else from the file."""
    try:
        table = pq.read_table(pa.BufferReader(data) if data is not None else path)
        table.validate(full=True)  # checks string columns hold valid UTF-8
        _ = table.column_names  # non-UTF-8 column names only fail when decoded
        return table
    except Exception as exc:  # a corrupt file can surface as almost any exception type in pyarrow
        raise DataError(f"{path}: not a readable parquet file: {one_line(exc)}") from None


def _row_bytes(table: pa.Table) -> pa.Array | None:
    """Per-row UTF-8 byte total of the string/binary columns (None when there are none)."""
    total = None
    for column in table.columns:
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
                or pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
            continue
        lengths = pc.fill_null(pc.binary_length(column), 0).cast(pa.int64())
        total = lengths if total is None else pc.add(total, lengths)
    return total


# ---------------------------------------------------------------------------------------------
# Field mapping


def to_math_items(
    records: Sequence[RawRecord], fields: FieldMap, allow_extra_fields: bool = False
) -> list[MathItem]:
    """Map records onto question/answer/solution/id, type-check them, normalise the text.

    Missing fields, extra fields (unless allowed), nulls and wrong types stop ingestion at the
    first offending record with its location, because a silently skipped column is how a
    "solution" ends up in a prompt.
    """
    return [to_math_item(record, fields, allow_extra_fields) for record in records]


def to_math_item(record: RawRecord, fields: FieldMap, allow_extra_fields: bool = False) -> MathItem:
    """One record of :func:`to_math_items` (streaming callers map records one at a time)."""
    known = fields.known()
    missing = [name for name in fields.required() if name not in record.fields]
    if fields.solution and fields.solution not in record.fields:
        missing.append(fields.solution)
    if fields.id and fields.id not in record.fields:
        missing.append(fields.id)
    if missing:
        raise DataError(
            f"{record.source}: missing field(s) {', '.join(map(repr, missing))} "
            f"(present: {_names(record.fields)}); map them with --question-field/--answer-field/"
            "--solution-field/--id-field"
        )
    extra = sorted(set(record.fields) - known)
    if extra and not allow_extra_fields:
        raise DataError(
            f"{record.source}: unexpected field(s) {_names(extra)}; map them or pass --allow-extra-fields"
        )
    question = _string_field(record, fields.question)
    answer_raw = _answer_field(record, fields.answer)
    solution_raw = _string_field(record, fields.solution, nullable=True) if fields.solution else None
    item_id = _string_field(record, fields.id) if fields.id else None
    answer, solution = parse_gsm8k_answer(answer_raw)
    if solution_raw is not None:
        solution = normalize_multiline(solution_raw)
    return MathItem(
        source=record.source,
        line=record.line,
        id=item_id.strip() if item_id is not None else None,
        question=normalize_inline(question),
        answer=answer,
        solution=solution or None,
        raw=(item_id, question, answer_raw, solution_raw),
    )


def _string_field(record: RawRecord, name: str, nullable: bool = False) -> Any:
    value = record.fields[name]
    if value is None:
        if nullable:
            return None
        raise DataError(f"{record.source}: field {name!r} is null")
    if not isinstance(value, str):
        raise DataError(f"{record.source}: field {name!r} must be a string, got {_json_type(value)}")
    _check_encodable(value, record.source, name)
    return value


def _answer_field(record: RawRecord, name: str) -> str:
    """Answers may be numbers in user data ({"answer": 72}); anything else must be a string."""
    value = record.fields[name]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return _string_field(record, name)


def _check_encodable(value: str, where: str, name: str) -> None:
    # JSON may carry lone surrogates ("\ud800"), which no UTF-8 writer accepts later on.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: field {name!r} contains invalid Unicode (unpaired surrogate)") from None


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, int | float) else type(value).__name__
    )


def _names(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(str(n) for n in names)
    shown = ", ".join(repr(n[:40]) for n in names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "") if names else "none"


# ---------------------------------------------------------------------------------------------
# Normalisation and GSM8K answers

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_HSPACE = re.compile(r"[^\S\n]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: "<<48/2=24>>"
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


def normalize_inline(text: str) -> str:
    """NFKC, control characters dropped, all whitespace runs (newlines too) collapsed to one space."""
    text = unicodedata.normalize("NFKC", text)
    text = _CONTROL.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))
    return " ".join(text.split())


def normalize_multiline(text: str) -> str:
    """NFKC and whitespace cleanup that keeps line breaks (they carry a solution's structure)."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub(" ", text)
    lines = [_HSPACE.sub(" ", line).strip() for line in text.split("\n")]
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()


def parse_gsm8k_answer(text: str, strip_calculator: bool = True) -> tuple[str, str | None]:
    """Split a GSM8K-style answer "reasoning … #### 72" into ("72", full worked solution).

    The solution keeps its "#### 72" line, so the demonstration shows the answer in the format
    the math verifier extracts. Text without "####", or with nothing before it, is a bare answer
    and has no solution.
    Thousands separators in a numeric final answer ("1,000") are removed.
    """
    if "####" not in text:
        return _clean_final_answer(normalize_inline(text)), None
    reasoning, final = text.rsplit("####", 1)
    if not reasoning.strip():  # "#### 72" alone is an answer, not a worked solution
        return _clean_final_answer(normalize_inline(final)), None
    solution = _CALCULATOR.sub("", text) if strip_calculator else text
    return _clean_final_answer(normalize_inline(final)), normalize_multiline(solution)


def _clean_final_answer(answer: str) -> str:
    if _THOUSANDS.match(answer):
        return answer.replace(",", "")
    return answer
