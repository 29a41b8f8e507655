"""``amft bench …``: the benchmarks in the checkout's ``bench/`` folder behind the one command line.

The benchmark scripts stay plain scripts (they are what the README's Results cite and what a reader
runs by hand); this module only finds them and runs one with the remaining arguments, so
``amft bench methods --seeds 0 1 2`` is ``python bench/bench_methods.py --seeds 0 1 2``.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
# name → (script, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "methods": ("bench_methods.py", "every method from one warm start, ≥3 seeds, paired CIs (--task countdown)"),
    "speed": ("bench_speed.py", "RL step vs TRL GRPOTrainer, rollout tokens/s, meta-gradient overhead, FLOP/s"),
    "snr": ("bench_snr.py", "share of meta steps whose |t| = |m/SE(m)| >= 2 per lever, Countdown (issue 23)"),
    "step": ("bench_step.py", "one trainer step split into rollout / forward-backward / meta-gradient"),
    "data": ("bench_data.py", "data prepare + validate throughput"),
    "distributed": ("bench_distributed.py", "steps/s and tokens/s at world size 1 and 2 (torchrun DDP / FSDP2)"),
    "checkpoint": ("bench_checkpoint.py", "checkpoint save/load to S3 vs bare boto3"),
    "ingest-memory": ("bench_ingest_memory.py", "peak RSS of ingesting N rows vs the input size (streamed)"),
    "render": ("render_results.py", "regenerate the README Results section from bench/results"),
}


def register(subparsers: Any) -> None:
    """Add ``amft bench NAME [ARGS...]`` to an ``argparse`` subparsers object."""
    bench = subparsers.add_parser(
        "bench",
        help="run a benchmark from bench/ (" + ", ".join(BENCHMARKS) + ")",
        description="Run a benchmark script from the checkout's bench/ folder; ARGS go to the script "
        "(`amft bench NAME --help` shows its options).",
    )
    bench.add_argument("name", choices=sorted(BENCHMARKS), metavar="NAME",
                       help="; ".join(f"{k}: {v[1]}" for k, v in BENCHMARKS.items()))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    bench.set_defaults(handler=_run)


def script_path(name: str, bench_dir: Path = BENCH_DIR) -> Path:
    """The script behind `name`; a clear error when the package was installed without its checkout."""
    script = bench_dir / BENCHMARKS[name][0]
    if not script.is_file():
        raise SystemExit(f"error: {script} not found: benchmarks run from a source checkout (bench/ beside amft_lib/)")
    return script


def _run(args: argparse.Namespace) -> int:
    script = script_path(args.name)
    saved = sys.argv
    sys.argv = [str(script), *args.args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as stop:  # the script's own exit status (argparse --help exits 0)
        code = stop.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0
