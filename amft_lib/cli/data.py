"""`amft data prepare` and `amft data validate`: flags generated from the config dataclasses.

Every config field becomes a flag whose help is the field's help text, so the CLI, the YAML
config and the KFP component cannot drift apart. Handlers import the stage modules lazily
(pyarrow, tasks; GX only once validation runs) to keep `amft --help` fast. Exit codes: 0 success
(or validation passed), 1 validation failed, 2 bad config or bad data, printed as one line
`error: ...` on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `data prepare` and `data validate` to the main CLI's subparsers."""
    from amft_lib.data.prepare import PrepareConfig
    from amft_lib.data.validate import ValidateConfig

    data = subparsers.add_parser("data", help="prepare and validate datasets", description=__doc__.split("\n")[0])
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    prepare = sub.add_parser(
        "prepare",
        help="generate General Points or ingest math data; dedup, split, decontaminate, write parquet + card",
        description="Write one parquet per split and card.json (row counts, sha256, config, dropped rows).",
    )
    _add_config_flags(prepare, PrepareConfig)
    prepare.set_defaults(handler=_prepare)
    validate = sub.add_parser(
        "validate",
        help="run the Great Expectations gate; exit 0 on pass, 1 on fail",
        description="Validate a prepared dataset; writes validation.json, report.md and report.html.",
    )
    _add_config_flags(validate, ValidateConfig)
    validate.set_defaults(handler=_validate)


# ---------------------------------------------------------------------------------------------
# Flags from dataclass fields


def _parse_mapping(value_type: Callable[[str], Any]) -> Callable[[str], dict[str, Any]]:
    """`train=0.8,val=0.1` -> {"train": 0.8, "val": 0.1}; argparse reports a ValueError as a usage error."""

    def parse(text: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, raw = part.partition("=")
            if not sep or not key.strip():
                raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,KEY=VALUE...], got {part!r}")
            try:
                out[key.strip()] = value_type(raw.strip())
            except ValueError as exc:
                raise argparse.ArgumentTypeError(f"{part!r}: {exc}") from None
        return out

    return parse


def _parse_bounds(text: str) -> list[float]:
    low, sep, high = text.partition(":")
    if not sep:
        raise ValueError("expected LOW:HIGH")
    return [float(low), float(high)]


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif tp is int:
            parser.add_argument(flag, type=int, default=None, metavar="N", help=text)
        elif tp is float:
            parser.add_argument(flag, type=float, default=None, metavar="X", help=text)
        elif typing.get_origin(tp) is dict:
            value_type = typing.get_args(tp)[1]
            bounds = typing.get_origin(value_type) is list
            parse = _parse_mapping(_parse_bounds if bounds else value_type)
            metavar = "SPLIT=LOW:HIGH,..." if bounds else "SPLIT=VALUE,..."
            text += " The flag replaces the whole mapping."
            parser.add_argument(flag, type=parse, default=None, metavar=metavar, help=text)
        else:  # str and str | None
            parser.add_argument(flag, type=str, default=None, metavar=f.name.upper(), help=text)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Build the config from the flags that were given; the dataclass defaults fill the rest."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**given)


# ---------------------------------------------------------------------------------------------
# Handlers


def _prepare(args: argparse.Namespace) -> int:
    from amft_lib.data.prepare import PrepareConfig, run_prepare

    # ConfigError and DataError are UserErrors: amft_lib.cli prints one `error:` line and exits 2
    result = run_prepare(config_from_args(PrepareConfig, args))
    counts = ", ".join(f"{name} {n}" for name, n in result.rows.items())
    dropped = ", ".join(f"{k} {v}" for k, v in result.card.dropped.items() if v) or "none"
    print(f"prepared {result.card.task}: {counts}; dropped: {dropped}; card: {result.card_path}")
    return EXIT_OK


def _validate(args: argparse.Namespace) -> int:
    from amft_lib.data.validate import ValidateConfig, run_validate

    result = run_validate(config_from_args(ValidateConfig, args))
    stats = result.statistics
    verdict = "PASSED" if result.passed else "FAILED"
    print(f"validation {verdict}: {stats.get('successful_expectations')}/{stats.get('evaluated_expectations')} "
          f"expectations; report: {result.markdown_path}")
    for failure in result.failures:
        if failure.examples:
            detail = f"{failure.unexpected_count} rows, e.g. {', '.join(failure.examples[:3])}"
        else:
            detail = f"observed {failure.observed}"
        print(f"  failed {failure.check}: {' '.join(detail.split())[:200]}")
    return EXIT_OK if result.passed else EXIT_FAILED
