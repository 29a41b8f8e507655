"""`amft data validate`: the Great Expectations gate the pipeline branches on.

Why GX is the single source of the verdict: checks that GX cannot express directly (the task's
answer parser, the verifier on every demonstration, canonical-key overlap between train and eval,
length in tokens) are computed here as extra columns (`_chk_*`) and then asserted with ordinary
GX expectations (`ExpectColumnValuesToBeInSet([True])`, `ExpectColumnValuesToBeBetween`), so one
GX validation result decides pass/fail and lists offending row ids for every failed check.

Outputs (in `out_dir`): `validation.json` (the GX result, verbatim), `report.md` and a
self-contained `report.html` (GX's own Data Docs load CSS/JS from CDNs, useless offline), each
written atomically. `great_expectations` is imported lazily (~2.5 s), only when a validation
actually runs, and one ephemeral context is reused for the life of the process.
"""

from __future__ import annotations

import html
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from amft_lib.config import ConfigError
from amft_lib.config import help_field as _help
from amft_lib.data.ingest import read_parquet_table
from amft_lib.data.schema import (
    CARD_NAME,
    COLUMNS,
    EVAL_SPLITS,
    NULLABLE_COLUMNS,
    SPLITS,
    TEXT_COLUMNS,
    DataError,
    DatasetCard,
    DataWriteError,
    check_writable_dir,
    load_card,
    one_line,
    read_split_bytes,
    row_control_character,
    write_text,
)
from amft_lib.tasks import Task, get_task, known_tasks

TokenCounter = Callable[[str], int]
CHECK_PREFIX = "_chk_"
JSON_NAME, MARKDOWN_NAME, HTML_NAME = "validation.json", "report.md", "report.html"


@dataclass
class ValidateConfig:
    """What the gate checks and where it writes its reports."""

    dataset: str = _help(
        "Prepared dataset: a directory written by `amft data prepare` (card.json + split parquet files; "
        "*.parquet when there is no card) or one parquet file.",
        "data",
    )
    out_dir: str | None = _help("Where the reports go. Empty: `<dataset dir>/validation`.", None)
    task: str | None = _help("Task whose suite runs. Empty: from the card, else the data's `task` column.", None)
    tokenizer: str | None = _help(
        "Tokenizer directory (tokenizer.json, or anything AutoTokenizer loads offline) for the length bounds. "
        "Empty: lengths are counted in characters.",
        None,
    )
    min_prompt_tokens: int = _help("Shortest prompt accepted, in tokens (characters without a tokenizer).", 1)
    max_prompt_tokens: int = _help("Longest prompt accepted, in tokens; keep it under the model's context.", 2048)
    min_demonstration_tokens: int = _help("Shortest demonstration accepted, in tokens (null ones are skipped).", 1)
    max_demonstration_tokens: int = _help(
        "Longest demonstration accepted, in tokens; longer ones would be truncated in SFT.", 4096
    )
    min_rows: dict[str, int] = _help(
        "Minimum rows per split; a split not named here may be absent (e.g. test_ood for math).",
        {"train": 100, "val": 10, "test_id": 10},
    )
    split_fractions: dict[str, list[float]] = _help(
        "Allowed [low, high] share of all rows per split.", {"train": [0.5, 0.95]}
    )
    examples: int = _help("Offending rows quoted per failed expectation in the reports.", 5)
    check_card: bool = _help(
        "With a card: refuse files whose sha256 differs from the card (changed after prepare).", True
    )

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ConfigError("dataset is empty: name a prepared dataset directory or parquet file")
        if self.task is not None and self.task not in known_tasks():
            raise ConfigError(f"task={self.task!r}: choose one of {', '.join(known_tasks())}")
        for low, high in (("min_prompt_tokens", "max_prompt_tokens"),
                          ("min_demonstration_tokens", "max_demonstration_tokens")):
            if getattr(self, low) < 0 or getattr(self, high) < getattr(self, low):
                raise ConfigError(
                    f"{low}={getattr(self, low)}, {high}={getattr(self, high)}: need 0 <= {low} <= {high}"
                )
        for split, n in self.min_rows.items():
            if split not in SPLITS:
                raise ConfigError(f"min_rows[{split!r}]: unknown split; splits are {', '.join(SPLITS)}")
            if not isinstance(n, int) or n < 0:
                raise ConfigError(f"min_rows[{split!r}]={n!r}: must be an integer >= 0")
        for split, bounds in self.split_fractions.items():
            if split not in SPLITS:
                raise ConfigError(f"split_fractions[{split!r}]: unknown split; splits are {', '.join(SPLITS)}")
            if (not isinstance(bounds, list | tuple) or len(bounds) != 2
                    or not 0.0 <= float(bounds[0]) <= float(bounds[1]) <= 1.0):
                raise ConfigError(f"split_fractions[{split!r}]={bounds!r}: need [low, high] with 0 <= low <= high <= 1")
        if self.examples < 0:
            raise ConfigError(f"examples={self.examples}: must be >= 0")


@dataclass
class FailedCheck:
    """One failed expectation, as the reports show it."""

    check: str
    expectation: str
    column: str | None
    why: str
    unexpected_count: int | None
    observed: Any
    examples: list[str]


@dataclass
class ValidationResult:
    """The gate's verdict: `passed` decides the pipeline branch; the paths point at the reports."""

    passed: bool
    task: str
    statistics: dict[str, Any]
    failures: list[FailedCheck]
    json_path: Path
    markdown_path: Path
    html_path: Path
    gx_result: dict[str, Any]
    timings: dict[str, float]
    card_sha256: str | None = None  # of the card bytes validated: what the gate records and later stages pin


def run_validate(cfg: ValidateConfig, count_tokens: TokenCounter | None = None) -> ValidationResult:
    """Validate a prepared dataset with the task's GX suite and write the reports.

    `count_tokens` overrides `cfg.tokenizer`; with neither, lengths are characters. Raises DataError
    when the dataset cannot be read at all; a dataset that reads but breaks the contract is a
    failed result (passed=False), not an exception.
    """
    t0 = time.perf_counter()
    dataset = Path(cfg.dataset)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else (dataset if dataset.is_dir() else dataset.parent) / "validation"
    check_writable_dir(out_dir, "cannot write the validation reports")  # before GX (~3 s) and any write
    try:
        tables, card, card_sha256 = load_dataset(dataset, cfg.check_card)
    except DataError:
        raise
    except OSError as exc:  # permission denied on a split file or the folder
        raise DataError(f"{dataset}: cannot read the dataset: {one_line(exc)}") from None
    task_name = _resolve_task(cfg.task, card, tables)
    task = get_task(task_name)
    counter = count_tokens or (load_token_counter(cfg.tokenizer) if cfg.tokenizer else len)
    t1 = time.perf_counter()
    frame, derived, notes = build_check_frame(tables, task, counter, sorted(cfg.split_fractions))
    t2 = time.perf_counter()
    gx_result = _run_gx(frame, derived, task, cfg)
    t3 = time.perf_counter()

    failures = summarize_failures(gx_result, notes, cfg.examples)
    columns = set(frame.columns)
    split_counts = frame["split"].value_counts(dropna=False).to_dict() if "split" in columns else {}
    statistics = {
        "rows": len(frame),
        "rows_per_split": {str(k): int(v) for k, v in sorted(split_counts.items(), key=lambda kv: str(kv[0]))},
        "length_unit": "tokens" if (count_tokens or cfg.tokenizer) else "characters",
        **gx_result.get("statistics", {}),
        "failed_checks": [f.check for f in failures],
    }
    passed = bool(gx_result.get("success"))
    json_path, md_path, html_path = out_dir / JSON_NAME, out_dir / MARKDOWN_NAME, out_dir / HTML_NAME
    title = {"dataset": str(dataset), "task": task_name, "suite": _suite_name(task_name)}
    try:
        write_text(render_markdown(passed, title, statistics, failures, gx_result), md_path)
        write_text(render_html(passed, title, statistics, failures, gx_result), html_path)
        write_text(json.dumps(gx_result, indent=2, sort_keys=True, default=str) + "\n", json_path)
    except OSError as exc:
        raise DataWriteError(f"{out_dir}: cannot write the validation reports: {one_line(exc)}") from None
    t4 = time.perf_counter()
    timings = {"load_s": t1 - t0, "checks_s": t2 - t1, "gx_s": t3 - t2, "report_s": t4 - t3, "total_s": t4 - t0}
    return ValidationResult(passed, task_name, statistics, failures, json_path, md_path, html_path, gx_result, timings,
                            card_sha256)


# ---------------------------------------------------------------------------------------------
# Loading



def load_dataset(path: Path, check_card: bool = True) -> tuple[list[pa.Table], DatasetCard | None, str | None]:
    """The split files of a prepared dataset (or one parquet file) as arrow tables, its card and the
    card's sha256. With `check_card`, each file's bytes are hashed and parsed from one read, so the
    tables validated are the bytes the card names (not a file swapped between hashing and parsing)."""
    if path.is_file():
        return [read_parquet_table(path)], None, None
    if not path.is_dir():
        raise DataError(f"{path}: no such dataset (expected a directory from `amft data prepare` or a parquet file)")
    if not (path / CARD_NAME).exists():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise DataError(f"{path}: no parquet files to validate")
        return [read_parquet_table(file) for file in files], None, None
    card, card_sha256 = load_card(path)
    tables = []
    for info in card.splits.values():
        file = path / info.file
        if not file.is_file():
            raise DataError(f"{file}: listed in {CARD_NAME} but missing")
        if not check_card:
            tables.append(read_parquet_table(file))
            continue
        tables.append(read_parquet_table(file, read_split_bytes(file, info.sha256, "the file changed after prepare")))
    if not tables:
        raise DataError(f"{path}: no parquet files to validate")
    return tables, card, card_sha256


def _resolve_task(name: str | None, card: DatasetCard | None, tables: list[pa.Table]) -> str:
    if name:
        return name
    if card is not None and card.task in known_tasks():
        return card.task
    values: set[Any] = set()
    for table in tables:
        if "task" in table.column_names:
            values |= set(table.column("task").unique().to_pylist())
    known = sorted(v for v in values if v in known_tasks())
    if len(known) == 1:
        return known[0]
    raise DataError(f"cannot tell which task's suite to run (task values: {sorted(map(str, values))[:5]}); pass --task")


def load_token_counter(tokenizer_dir: str) -> TokenCounter:
    """A token counter from a local tokenizer (no hub access): tokenizer.json directly, else AutoTokenizer."""
    path = Path(tokenizer_dir)
    if not path.is_dir():  # checked first: the transformers fallback alone costs ~2 s to import
        raise DataError(f"{path}: cannot load tokenizer: no such directory")
    try:
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            fast = Tokenizer.from_file(str(path / "tokenizer.json"))
            return lambda text: len(fast.encode(text, add_special_tokens=False).ids)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
    except Exception as exc:  # any loader failure is a bad --tokenizer, reported as one line
        raise DataError(f"{path}: cannot load tokenizer: {' '.join(str(exc).split())[:200]}") from None


# ---------------------------------------------------------------------------------------------
# Custom checks as columns


def build_check_frame(
    tables: list[pa.Table], task: Task, count_tokens: TokenCounter, fraction_splits: list[str]
) -> tuple[Any, list[str], dict[str, dict[str, str]]]:
    """The dataset as one pandas frame plus the `_chk_*` columns GX asserts on.

    A check column is null (skipped by GX) where the check does not apply or where another
    expectation already owns the failure — a non-string prompt fails the type check, not the
    length check as well — so one defect fails one expectation. Returns the frame, the derived
    column names and, per check, {row id: reason} for the reports.
    """
    import pandas as pd

    frames = [table.to_pandas() for table in tables]
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    clash = [c for c in frame.columns if str(c).startswith(CHECK_PREFIX)]
    if clash:
        raise DataError(f"column name(s) {clash[:3]} use the reserved prefix {CHECK_PREFIX!r}")

    def column(name: str) -> list[Any]:
        out: list[Any] = []
        for table in tables:
            out += table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
        return out

    n = len(frame)
    ids = column("id")
    prompts, answers, demos, splits = column("prompt"), column("answer"), column("demonstration"), column("split")
    reasons: dict[str, dict[str, str]] = {"answer_parseable": {}, "demonstrations_verified": {},
                                          "control_characters": {}}
    row_ids = [_short(ids[i]) if ids[i] is not None else f"row {i}" for i in range(n)]
    prompt_tokens: list[int | None] = [count_tokens(p) if isinstance(p, str) else None for p in prompts]
    demo_tokens: list[int | None] = [count_tokens(d) if isinstance(d, str) else None for d in demos]
    answer_ok: list[bool | None] = [None] * n
    demo_ok: list[bool | None] = [None] * n
    keys: list[str | None] = [None] * n
    for i in range(n):
        answer = answers[i]
        if not isinstance(answer, str):
            continue  # the type / not-null expectations report it
        problem = task.check_answer(answer)
        answer_ok[i] = problem is None
        if problem is not None:
            reasons["answer_parseable"][row_ids[i]] = problem
            continue
        if isinstance(prompts[i], str):
            keys[i] = task.canonical_key(answer, prompts[i])
        if isinstance(demos[i], str):
            try:
                verdict = task.verify(answer, demos[i])
                demo_ok[i], why = verdict.reward == 1, verdict.reason
            except ValueError as exc:
                demo_ok[i], why = False, str(exc)
            if not demo_ok[i]:
                reasons["demonstrations_verified"][row_ids[i]] = why

    no_control: list[bool] = []
    text = {name: column(name) for name in TEXT_COLUMNS}
    for i in range(n):
        found = row_control_character({name: values[i] for name, values in text.items()})
        no_control.append(found is None)
        if found:
            reasons["control_characters"][row_ids[i]] = found

    train_keys = {k for k, s in zip(keys, splits, strict=True) if k is not None and s == "train"}
    eval_keys = {k for k, s in zip(keys, splits, strict=True) if k is not None and s in EVAL_SPLITS}
    shared = train_keys & eval_keys
    no_overlap = [None if k is None or s not in SPLITS else k not in shared for k, s in zip(keys, splits, strict=True)]

    derived = {
        "_chk_prompt_tokens": pd.array(prompt_tokens, dtype="Int64"),
        "_chk_demonstration_tokens": pd.array(demo_tokens, dtype="Int64"),
        "_chk_answer_ok": pd.array(answer_ok, dtype="boolean"),
        "_chk_demonstration_ok": pd.array(demo_ok, dtype="boolean"),
        "_chk_no_train_eval_overlap": pd.array(no_overlap, dtype="boolean"),
        "_chk_no_control_characters": pd.array(no_control, dtype="boolean"),
    }
    for split in fraction_splits:
        derived[f"_chk_is_{split}"] = pd.array([int(s == split) for s in splits], dtype="int64")
    frame = frame.assign(**derived)
    return frame, list(derived), reasons


# ---------------------------------------------------------------------------------------------
# The GX suite

_GX_STATE: dict[str, Any] = {}


def _gx() -> tuple[Any, Any, Any]:
    """(gx, gxe, batch definition) from one ephemeral context per process (import + setup cost ~2.5 s)."""
    if not _GX_STATE:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        # GX logs hundreds of INFO lines on import; the gate's own report is what users read.
        logging.getLogger("great_expectations").setLevel(logging.WARNING)
        import great_expectations as gx
        import great_expectations.expectations as gxe
        from great_expectations.data_context.types.base import ProgressBarsConfig

        # This module pins its own logger to INFO at import; quiet it after the fact.
        logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)  # no tqdm in logs
        batch_definition = (
            context.data_sources.add_pandas("amft_dataset")
            .add_dataframe_asset(name="rows")
            .add_batch_definition_whole_dataframe("all_rows")
        )
        _GX_STATE.update(gx=gx, gxe=gxe, batch_definition=batch_definition)
    return _GX_STATE["gx"], _GX_STATE["gxe"], _GX_STATE["batch_definition"]


def _suite_name(task: str) -> str:
    return f"amft_{task}"


def _split_is(split: str) -> Any:
    """GX row condition `split == <split>` as a Condition object (string conditions are deprecated
    in GX 1.9+ and removed in 2.0)."""
    from great_expectations.expectations.row_conditions import Column

    return Column("split") == split


def build_suite(columns: set[str], derived: list[str], task: Task, cfg: ValidateConfig) -> Any:
    """The task's expectation suite. Each expectation carries meta.check (its short name) and a
    description (why it matters), which the reports print. Column expectations are added only for
    columns that exist; a missing column is reported once, by the column-set expectation."""
    gx, gxe, _ = _gx()
    suite = gx.ExpectationSuite(name=_suite_name(task.name))

    def add(check: str, why: str, expectation_cls: Any, **kwargs: Any) -> None:
        if "column" in kwargs and kwargs["column"] not in columns:
            return
        if "row_condition" in kwargs and "split" not in columns:
            return
        suite.add_expectation(expectation_cls(meta={"check": check}, description=why, **kwargs))

    add("columns", "the dataset contract: exactly these columns (plus this gate's own _chk_* columns)",
        gxe.ExpectTableColumnsToMatchSet, column_set=[*COLUMNS, *derived], exact_match=True)
    for name in COLUMNS:
        add(f"type:{name}", "every contract column holds strings", gxe.ExpectColumnValuesToBeOfType,
            column=name, type_="str")
        if name not in NULLABLE_COLUMNS:
            add(f"not_null:{name}", "only demonstration may be null", gxe.ExpectColumnValuesToNotBeNull, column=name)
    add("unique_ids", "ids key lineage, rollouts and reports", gxe.ExpectColumnValuesToBeUnique, column="id")
    add("split_values", f"split is one of {', '.join(SPLITS)}", gxe.ExpectColumnValuesToBeInSet,
        column="split", value_set=list(SPLITS))
    add("task_values", f"every row belongs to task {task.name!r}, whose verifier judges it",
        gxe.ExpectColumnValuesToBeInSet, column="task", value_set=[task.name])
    add("meta_json", "meta is a JSON string", gxe.ExpectColumnValuesToBeJsonParseable, column="meta")
    for split, n in sorted(cfg.min_rows.items()):
        if n > 0:
            add(f"min_rows:{split}", f"split {split} needs at least {n} rows", gxe.ExpectTableRowCountToBeBetween,
                min_value=n, row_condition=_split_is(split))
    for split, (low, high) in sorted(cfg.split_fractions.items()):
        add(f"fraction:{split}", f"split {split} should be {low:.0%}–{high:.0%} of all rows",
            gxe.ExpectColumnMeanToBeBetween, column=f"_chk_is_{split}", min_value=float(low), max_value=float(high))
    add("prompt_length", f"prompt length in [{cfg.min_prompt_tokens}, {cfg.max_prompt_tokens}]",
        gxe.ExpectColumnValuesToBeBetween, column="_chk_prompt_tokens",
        min_value=cfg.min_prompt_tokens, max_value=cfg.max_prompt_tokens)
    add("demonstration_length",
        f"demonstration length in [{cfg.min_demonstration_tokens}, {cfg.max_demonstration_tokens}]",
        gxe.ExpectColumnValuesToBeBetween, column="_chk_demonstration_tokens",
        min_value=cfg.min_demonstration_tokens, max_value=cfg.max_demonstration_tokens)
    add("answer_parseable", f"the {task.name} task can parse every answer (task.check_answer)",
        gxe.ExpectColumnValuesToBeInSet, column="_chk_answer_ok", value_set=[True])
    add("demonstrations_verified", "the verifier gives every demonstration reward 1 (SFT must not learn errors)",
        gxe.ExpectColumnValuesToBeInSet, column="_chk_demonstration_ok", value_set=[True])
    add("control_characters", "no NUL, ESC or other control character (tab, newline, CR allowed) in id, prompt, "
        "answer, demonstration or meta: they truncate text in C tools and drive terminals",
        gxe.ExpectColumnValuesToBeInSet, column="_chk_no_control_characters", value_set=[True])
    add("no_train_eval_overlap", "no canonical key is in train and in an eval split (leakage)",
        gxe.ExpectColumnValuesToBeInSet, column="_chk_no_train_eval_overlap", value_set=[True])
    return suite


def _run_gx(frame: Any, derived: list[str], task: Task, cfg: ValidateConfig) -> dict[str, Any]:
    _, _, batch_definition = _gx()
    suite = build_suite(set(frame.columns), derived, task, cfg)
    result_format: dict[str, Any] = {"result_format": "SUMMARY", "partial_unexpected_count": max(cfg.examples, 1)}
    if "id" in frame.columns:
        result_format["unexpected_index_column_names"] = ["id"]
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    result = batch.validate(suite, result_format=result_format)
    # Round-trip through JSON: numpy scalars become plain numbers, so the dict is safe to store.
    return json.loads(json.dumps(result.to_json_dict(), default=_json_default))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


# ---------------------------------------------------------------------------------------------
# Reports


def summarize_failures(
    gx_result: dict[str, Any], reasons: dict[str, dict[str, str]], examples: int
) -> list[FailedCheck]:
    """Failed expectations in suite order, with counts and up to `examples` offending ids.

    For the custom checks the verifier's or parser's reason follows the id ("gp-7: not_24").
    """
    failures = []
    for item in gx_result.get("results", []):
        if item.get("success"):
            continue
        config = item.get("expectation_config", {})
        kwargs = config.get("kwargs", {})
        res = item.get("result", {}) or {}
        exc = item.get("exception_info", {}) or {}
        found: list[str] = []
        check = str((config.get("meta") or {}).get("check", config.get("type")))
        why_rows = reasons.get(check, {})
        for entry in res.get("partial_unexpected_index_list") or []:
            row_id = _short(entry.get("id", entry)) if isinstance(entry, dict) else _short(entry)
            reason = why_rows.get(row_id)
            found.append(f"{row_id}: {_short(reason)}" if reason else row_id)
        # `details` says what differs (e.g. the missing columns); the observed value is the fallback.
        observed = res.get("details") or res.get("observed_value")
        if observed is None and exc.get("raised_exception"):
            observed = f"exception: {_short(exc.get('exception_message'), 200)}"
        failures.append(
            FailedCheck(
                check=check,
                expectation=str(config.get("type")),
                column=kwargs.get("column"),
                why=str(config.get("description") or ""),
                unexpected_count=res.get("unexpected_count"),
                observed=observed,
                examples=found[:examples],
            )
        )
    return failures


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _overview_rows(gx_result: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for item in gx_result.get("results", []):
        config = item.get("expectation_config", {})
        res = item.get("result", {}) or {}
        unexpected = res.get("unexpected_count")
        rows.append((
            str((config.get("meta") or {}).get("check", "")),
            str(config.get("type")),
            str(config.get("kwargs", {}).get("column") or ""),
            "pass" if item.get("success") else "FAIL",
            "" if unexpected is None else str(unexpected),
        ))
    return rows


def render_markdown(passed: bool, title: dict[str, str], statistics: dict[str, Any],
                    failures: list[FailedCheck], gx_result: dict[str, Any]) -> str:
    """The gate's report as Markdown: verdict, row counts, each failure with ids, then every check.

    Row ids, values and paths come from the data: they go through escape_markdown_cell, never into a
    code span, so an id holding a backtick cannot smuggle HTML into the report."""
    from amft_lib.reports import md_escape as esc

    lines = [f"# Data validation: {'PASSED' if passed else 'FAILED'}", ""]
    lines += [f"- {k}: {esc(v)}" for k, v in title.items()]
    lines += [f"- rows: {statistics['rows']} ({_split_summary(statistics)})",
              f"- lengths counted in {statistics['length_unit']}",
              f"- expectations: {statistics.get('successful_expectations', 0)} of "
              f"{statistics.get('evaluated_expectations', 0)} passed", ""]
    if failures:
        lines += ["## Failed expectations", ""]
        for f in failures:
            lines.append(f"### {esc(f.check)} — {esc(f.expectation)}" + (f" on {esc(f.column)}" if f.column else ""))
            lines.append("")
            lines.append(f"- why: {esc(f.why)}")
            if f.unexpected_count is not None:
                lines.append(f"- offending rows: {f.unexpected_count}")
            if f.observed is not None:
                lines.append(f"- observed: {esc(_short(f.observed, 200))}")
            if f.examples:
                lines.append("- example ids: " + ", ".join(esc(e) for e in f.examples))
            lines.append("")
    lines += ["## All expectations", "", "| check | expectation | column | result | unexpected |",
              "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(esc(c) for c in row)} |" for row in _overview_rows(gx_result)]
    return "\n".join(lines) + "\n"


_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222}
h1.pass{color:#17643a}h1.fail{color:#a01818}table{border-collapse:collapse;width:100%}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}tr.fail td{background:#fde8e8}
code{background:#f3f3f3;padding:0 3px}.card{border-left:4px solid #a01818;padding:2px 12px;margin:1em 0}"""


def render_html(passed: bool, title: dict[str, str], statistics: dict[str, Any],
                failures: list[FailedCheck], gx_result: dict[str, Any]) -> str:
    """The same report as one self-contained HTML page (inline CSS, no scripts, no external links)."""
    e = html.escape
    verdict = "PASSED" if passed else "FAILED"
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>Data validation: {verdict}</title><style>{_CSS}</style></head><body>",
             f'<h1 class="{"pass" if passed else "fail"}">Data validation: {verdict}</h1><ul>']
    parts += [f"<li>{e(k)}: <code>{e(str(v))}</code></li>" for k, v in title.items()]
    parts += [f"<li>rows: {statistics['rows']} ({e(_split_summary(statistics))})</li>",
              f"<li>lengths counted in {e(statistics['length_unit'])}</li>",
              f"<li>expectations: {statistics.get('successful_expectations', 0)} of "
              f"{statistics.get('evaluated_expectations', 0)} passed</li></ul>"]
    if failures:
        parts.append("<h2>Failed expectations</h2>")
        for f in failures:
            parts.append(f'<div class="card"><h3><code>{e(f.check)}</code> — {e(f.expectation)}'
                         + (f" on <code>{e(f.column)}</code>" if f.column else "") + "</h3><ul>")
            parts.append(f"<li>why: {e(f.why)}</li>")
            if f.unexpected_count is not None:
                parts.append(f"<li>offending rows: {f.unexpected_count}</li>")
            if f.observed is not None:
                parts.append(f"<li>observed: <code>{e(_short(f.observed, 200))}</code></li>")
            if f.examples:
                parts.append("<li>example ids: " + ", ".join(f"<code>{e(x)}</code>" for x in f.examples) + "</li>")
            parts.append("</ul></div>")
    parts.append("<h2>All expectations</h2><table><tr><th>check</th><th>expectation</th><th>column</th>"
                 "<th>result</th><th>unexpected</th></tr>")
    for row in _overview_rows(gx_result):
        cls = ' class="fail"' if row[3] == "FAIL" else ""
        parts.append(f"<tr{cls}>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts) + "\n"


def _split_summary(statistics: dict[str, Any]) -> str:
    per_split = statistics.get("rows_per_split", {})
    return ", ".join(f"{k} {v}" for k, v in per_split.items()) or "no split column"


__all__ = [
    "FailedCheck",
    "ValidateConfig",
    "ValidationResult",
    "build_check_frame",
    "build_suite",
    "load_dataset",
    "load_token_counter",
    "run_validate",
]
