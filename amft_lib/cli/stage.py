"""`amft stage …`: the processes a pipeline stage launches, as commands (not meant to be typed by hand).

`amft stage train-worker --run-root URI` (and `warm-start-worker`) is one rank of a multi-process train
stage (warm start): the stage's task starts it under `torchrun` (locally as a subprocess; on a cluster as
the command of a Kubeflow Trainer TrainJob's pods). Everything it needs is under the run root
(`launch/<stage>.json`, `data/`, the init model), so the command line carries no config and no credential.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    stage = subparsers.add_parser(
        "stage",
        help="processes a pipeline stage launches (train-worker, warm-start-worker)",
        description="Processes a pipeline stage launches; see amft_lib.run.scale_out.",
    )
    commands = stage.add_subparsers(dest="stage_command", metavar="COMMAND", required=True)
    worker = commands.add_parser(
        "train-worker",
        help="one rank of a multi-process train stage (run under torchrun)",
        description="Read <run-root>/launch/train.json, the data and the init model from the run root, train "
        "(every rank alike; torch.distributed is set up by the trainer), and on rank 0 publish model/, train/ and "
        "train/result.json to the run root.",
    )
    worker.add_argument("--run-root", required=True, help="s3://…/runs/RUN_ID (or a local run folder)")
    worker.set_defaults(handler=_train_worker)
    warm = commands.add_parser(
        "warm-start-worker",
        help="one rank of a multi-process warm start (run under torchrun)",
        description="Read <run-root>/launch/warm_start.json, the data and the base model from the run root, run the "
        "warm start (every rank alike), and on rank 0 publish warm_start/ and warm_start/result.json.",
    )
    warm.add_argument("--run-root", required=True, help="s3://…/runs/RUN_ID (or a local run folder)")
    warm.set_defaults(handler=_warm_start_worker)


def _train_worker(args: argparse.Namespace) -> int:
    from amft_lib.run.layout import RunRoot
    from amft_lib.run.stages import train_worker_stage

    train_worker_stage(RunRoot.at(args.run_root))
    return 0


def _warm_start_worker(args: argparse.Namespace) -> int:
    from amft_lib.run.layout import RunRoot
    from amft_lib.run.stages import warm_start_worker_stage

    warm_start_worker_stage(RunRoot.at(args.run_root))
    return 0
