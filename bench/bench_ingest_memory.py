"""Peak memory of `amft data prepare` ingesting a large JSONL file (a benchmark, not a test).

Writes N short GSM8K-style rows (default 1M, ~75 bytes each: the worst case for per-row overhead),
then runs `amft data prepare --task math` on them in a fresh child process and reports the child's
peak RSS (ru_maxrss) next to the input size, and the RSS of a child that only imports the stage
(the interpreter + pyarrow floor every run pays). Target (issue 17): peak RSS <= 5x the input.

    .venv/bin/python bench/bench_ingest_memory.py [--rows 1000000] [--words 0] [--work /tmp/ingest-bench]

`--words W` adds W random words per question (longer rows, real 13-gram contamination work).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_rows(path: Path, n: int, words: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(2000)]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            extra = (" " + " ".join(rng.choice(vocab) for _ in range(words))) if words else ""
            a, b = rng.randint(1, 999), rng.randint(1, 999)
            f.write(json.dumps({"question": f"Q{i}{extra}: what is {a} plus {b}?", "answer": f"#### {a + b}"}) + "\n")


def run_child(code: str) -> tuple[float, float, str]:
    """(peak RSS in MiB, wall seconds, stdout) of `python -c code` in a fresh process (wait4's rusage)."""
    import tempfile

    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode:
        raise SystemExit(f"child failed ({proc.returncode}): {text}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--words", type=int, default=0, help="extra random words per question")
    parser.add_argument("--work", default="/tmp/amft-ingest-bench")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"rows-{args.rows}-{args.words}.jsonl"
    if not src.exists():
        write_rows(src, args.rows, args.words)
    size_mib = src.stat().st_size / 2**20
    floor, _, _ = run_child("import amft_lib.data.prepare, amft_lib.confusables as c; c._table()")
    code = (
        "from amft_lib.data.prepare import PrepareConfig, run_prepare\n"
        f"r = run_prepare(PrepareConfig(task='math', input={str(src)!r}, out_dir={str(work / 'out')!r}))\n"
        "print(dict(r.rows), dict(r.card.dropped))"
    )
    peak, wall, out = run_child(code)
    result = {
        "rows": args.rows, "words": args.words, "input_mib": round(size_mib, 1), "peak_rss_mib": round(peak, 1),
        "ratio": round(peak / size_mib, 2), "import_floor_mib": round(floor, 1),
        "ratio_above_floor": round((peak - floor) / size_mib, 2), "wall_s": round(wall, 1), "out": out.strip(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
