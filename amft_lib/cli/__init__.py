"""`amft`: one command line for every stage. Each subcommand calls the same library function
that the KFP component calls, so what runs here is what runs on the cluster.

One module per subcommand group (`amft_lib.cli.data`, `.train`, `.evaluate`, `.s3`, `.bench`, `.stage`), each
adding its subcommands through `register(subparsers)` and importing heavy dependencies inside the
handler, which keeps `amft --help` fast. Groups that live outside the library — `amft pipeline`, in
`pipelines/cli.py` — come in through the `amft.commands` entry point group (setup.cfg), so the
library never imports the orchestration layer.

The boundary: a `UserError` (bad value, missing file, refused resume …) becomes one line
`error: <what>: <why>` and exit 2; `amft --debug` shows its traceback. Anything else is a bug and
surfaces as one.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib.metadata import entry_points

# Modules that contribute subcommands, in the order `amft --help` lists them.
COMMAND_MODULES = (
    "amft_lib.cli.data",
    "amft_lib.cli.train",
    "amft_lib.cli.evaluate",
    "amft_lib.cli.s3",
    "amft_lib.cli.bench",
    "amft_lib.cli.stage",
)
ENTRY_POINT_GROUP = "amft.commands"


def _version() -> str:
    """The installed distribution's version (setup.cfg), or "unknown" in a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("amft-pipeline")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amft",
        description="AMFT: single-stage SFT+RL with a meta-learned balance, as a Kubeflow pipeline.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error (bad input)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        entry.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from amft_lib.redact import install_log_redaction, redact_text, redacting_excepthook

    # Secrets (a URL's password, a key from the environment) never reach the output: every log record
    # (`-v` included) and the traceback of a bug or of `--debug` pass through the one scrubber.
    install_log_redaction()
    sys.excepthook = redacting_excepthook
    from amft_lib.errors import UserError

    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except UserError as exc:  # a mistake the user can fix: one line, exit 2 (traceback with --debug)
        if args.debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {redact_text(message)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
