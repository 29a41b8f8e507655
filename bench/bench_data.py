"""Throughput of `amft data prepare` + `amft data validate`, and how much of it is Great Expectations.

Two workloads:
- math: N synthetic GSM8K-style rows (default 100k) ingested from JSONL (20–40 random words per
  question, so dedup and the 13-gram contamination check do real work but rarely fire);
- general_points: the default generated size (2000 / 200 / 200 / 200).

GX's import and context setup (a one-off per process, ~2.5 s) is timed apart from GX's validation
work, so "GX share" means the per-dataset cost. Run from the repository root:

    .venv/bin/python bench/bench_data.py [--math-rows 100000] [--out bench/out/data]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from amft_lib.data import validate as validate_mod
from amft_lib.data.prepare import PrepareConfig, run_prepare
from amft_lib.data.validate import ValidateConfig, run_validate


def write_math_jsonl(path: Path, n: int, seed: int = 0) -> None:
    """n distinct word problems with a worked solution ending in '#### answer'."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(2000)]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = " ".join(rng.choice(vocab) for _ in range(rng.randint(20, 40)))
            a, b = rng.randint(1, 999), rng.randint(1, 999)
            question = f"Problem {i}: {words}. What is {a} plus {b}?"
            answer = f"First take {a}. Adding {b} gives {a} + {b} = <<{a}+{b}={a + b}>>{a + b}.\n#### {a + b}"
            f.write(json.dumps({"question": question, "answer": answer}) + "\n")


def bench(name: str, prepare_cfg: PrepareConfig, validate_cfg: ValidateConfig) -> dict:
    t0 = time.perf_counter()
    prepared = run_prepare(prepare_cfg)
    t1 = time.perf_counter()
    result = run_validate(validate_cfg)
    t2 = time.perf_counter()
    rows = sum(prepared.rows.values())
    prepare_s, validate_s = t1 - t0, t2 - t1
    gx_s = result.timings["gx_s"]
    return {
        "workload": name,
        "rows_out": rows,
        "rows_per_split": prepared.rows,
        "dropped": prepared.card.dropped,
        "prepare_s": round(prepare_s, 3),
        "prepare_rows_per_s": round(rows / prepare_s),
        "validate_s": round(validate_s, 3),
        "validate_rows_per_s": round(rows / validate_s),
        "validate_breakdown_s": {k: round(v, 3) for k, v in result.timings.items()},
        "gx_s": round(gx_s, 3),
        "gx_share_of_validate": round(gx_s / validate_s, 3),
        "gx_share_of_total": round(gx_s / (prepare_s + validate_s), 3),
        "passed": result.passed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--math-rows", type=int, default=100_000, help="synthetic math rows to ingest")
    parser.add_argument("--out", default="bench/out/data", help="scratch directory (gitignored)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    validate_mod._gx()  # import + ephemeral context, paid once per process
    gx_setup_s = time.perf_counter() - t0

    src = out / "math.jsonl"
    write_math_jsonl(src, args.math_rows)
    results = [
        bench("math", PrepareConfig(task="math", input=str(src), out_dir=str(out / "math")),
              ValidateConfig(dataset=str(out / "math"))),
        bench("general_points", PrepareConfig(out_dir=str(out / "gp")), ValidateConfig(dataset=str(out / "gp"))),
    ]
    report = {"gx_import_and_context_s": round(gx_setup_s, 3), "cpus": os.cpu_count(), "results": results}
    (out / "bench_data.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
