"""`amft`: one command line for every stage. Each subcommand calls the same library function
that the KFP component calls, so what runs here is what runs on the cluster.

Stage modules add their own subcommands through `register(subparsers)` and import their heavy
dependencies inside the handler, which keeps `amft --help` fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that contribute subcommands, in the order `amft --help` lists them.
COMMAND_MODULES = (
    "amft_lib.data.commands",
    "amft_lib.train_commands",
    "amft_lib.eval_commands",
    "amft_lib.storage_commands",
    "amft_lib.pipeline_commands",
    "amft_lib.bench_commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amft",
        description="AMFT: single-stage SFT+RL with a meta-learned balance, as a Kubeflow pipeline.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error (bad input)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from amft_lib.errors import UserError

    try:
        return int(args.handler(args) or 0)
    except UserError as exc:  # a mistake the user can fix: one line, exit 2 (traceback with --debug)
        if args.debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
