"""``amft s3 …`` subcommands. The main CLI calls :func:`register` with its subparsers object.

Each subcommand sets ``handler`` (``args -> int`` exit code, what ``amft_lib.cli.main`` calls) via
``set_defaults``; the heavy modules are imported inside the handler so ``amft --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``amft s3 serve`` to an ``argparse`` subparsers object (``parser.add_subparsers()``)."""
    s3 = subparsers.add_parser(
        "s3",
        help="embedded S3 object store (SeaweedFS) for local runs",
        description="Embedded S3 object store (SeaweedFS `weed mini`) for local pipeline runs.",
    )
    s3_commands = s3.add_subparsers(dest="s3_command", metavar="COMMAND", required=True)
    serve = s3_commands.add_parser(
        "serve",
        help="run SeaweedFS in the foreground on 127.0.0.1 with auth on",
        description=(
            "Run SeaweedFS in the foreground on 127.0.0.1 with auth on. Prints the endpoint and writes "
            "the AWS_* variables to DATA_DIR/s3.env (mode 0600) for `. DATA_DIR/s3.env`. Keys are "
            "generated on first start and reused on later starts with the same data dir. Ctrl-C or "
            "SIGTERM stops it cleanly."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument(
        "--data-dir", required=True, type=Path, help="folder for objects, logs and keys (survives restarts)"
    )
    serve.add_argument("--port", type=int, default=8333, help="S3 port (other internal ports are picked free)")
    serve.add_argument("--bucket", default="amft", help="bucket to create if missing")
    serve.add_argument(
        "--show-secret",
        action="store_true",
        help="also print the export lines with the secret key (it is always in DATA_DIR/s3.env)",
    )
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from amft_lib.s3server import serve_forever

    return serve_forever(args.data_dir, port=args.port, bucket=args.bucket, show_secret=args.show_secret)
