"""Throughput of the trainer at world size 1 and 2: steps/s and tokens/s, single process vs torchrun DDP / FSDP2.

    python bench/bench_distributed.py                          # CPU: tiny_gp, 6 steps, 1 / ddp×2 / fsdp×2, 2 repeats
    python bench/bench_distributed.py --device cuda --nproc 1  # on a GPU machine (torchrun with 1 rank per GPU)

Each configuration runs `amft train --config configs/tiny_gp.yaml --max-steps N` (the issue's must-show
command) in a fresh process group: plain `python -m amft_lib.cli train` for world size 1, and
`torchrun --standalone --nproc-per-node W … --set distributed.strategy=S` for W ranks, with
OMP_NUM_THREADS=1 per rank. The first step of every run is dropped (allocation warm-up); steps/s is
steps ÷ Σ step time and tokens/s is Σ global tokens (rollouts + demonstrations) ÷ Σ step time, taken from
metrics.jsonl (rank 0 logs global numbers). Runs of the configurations are interleaved, so changes in
machine load hit all of them, and the medians over repeats are reported.

Honest expectation on this machine: 2 ranks on 2 shared CPU cores with gloo do not scale; every step
also pays the collectives (all-reduce of gradients, FSDP2's per-layer all-gather and reduce-scatter,
synced generation). The point of this benchmark on CPU is that the distributed paths run and what they
cost; the scaling numbers belong to GPUs (run it there with --device cuda).

Writes bench/results/distributed.json, distributed.md and distributed.png, and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def configurations(nproc: int) -> list[tuple[str, int, str]]:
    """(label, world size, strategy) of every run: one process, then DDP and FSDP2 on `nproc` ranks."""
    out = [("1 process", 1, "none")]
    if nproc > 1:
        out += [(f"DDP × {nproc}", nproc, "ddp"), (f"FSDP2 × {nproc}", nproc, "fsdp")]
    return out


def command(world: int, strategy: str, out: Path, a: argparse.Namespace) -> list[str]:
    python = sys.executable
    launcher = [python] if world == 1 else [str(Path(python).with_name("torchrun")), "--standalone",
                                            f"--nproc-per-node={world}"]
    return [*launcher, "-m", "amft_lib.cli", "train", "--config", a.config, "--max-steps", str(a.steps), "--out",
            str(out), "--no-progress", "--set", f"distributed.strategy={strategy}", "--set", f"device={a.device}",
            *(x for s in a.set for x in ("--set", s))]


def measure(out: Path) -> dict[str, float]:
    """steps/s and tokens/s over the steps after the first, from rank 0's metrics.jsonl."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if not r.get("final")][1:]
    seconds = [r["time_rollout_s"] + r["time_update_s"] + r["time_meta_s"] for r in steps]
    tokens = [r["tokens_per_s"] * t for r, t in zip(steps, seconds, strict=True)]
    total = sum(seconds)
    return {"steps_per_s": len(steps) / total, "tokens_per_s": sum(tokens) / total, "step_s": total / len(steps),
            "rollout_s": statistics.mean(r["time_rollout_s"] for r in steps),
            "meta_s": statistics.mean(r["time_meta_s"] for r in steps)}


def machine(device: str) -> dict:
    import torch

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device}
    with contextlib.suppress(OSError, StopIteration):
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    labels = [r["label"] for r in rows]
    for ax, key, name in ((axes[0], "steps_per_s", "steps/s"), (axes[1], "tokens_per_s", "tokens/s")):
        values = [r[key] for r in rows]
        ax.bar(labels, values, color=["#4c72b0", "#dd8452", "#55a868"][: len(rows)])
        for x, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=9)
        ax.set_ylabel(name)
        ax.set_title(name)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(rows: list[dict]) -> str:
    lines = ["| configuration | world size | steps/s | tokens/s | s/step | rollout s/step | meta s/step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['world_size']} | {r['steps_per_s']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['step_s']:.2f} | {r['rollout_s']:.2f} | {r['meta_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny_gp.yaml")
    p.add_argument("--steps", type=int, default=6, help="steps per run (the first is dropped)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2, help="ranks of the distributed runs")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--out", default=str(RESULTS), help="folder for distributed.{json,md,png}")
    a = p.parse_args(argv)
    if a.steps < 2:
        p.error("--steps must be >= 2 (the first step is dropped)")
    configs = configurations(a.nproc)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    samples: dict[str, list[dict]] = {label: [] for label, _, _ in configs}
    runs, t0 = len(configs) * a.repeats, time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="amft-bench-dist-") as work:
        for i in range(runs):
            label, world, strategy = configs[i % len(configs)]
            out = Path(work) / f"run{i}"
            done = subprocess.run(command(world, strategy, out, a), cwd=ROOT, env=env, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"error: {label} failed with exit code {done.returncode}")
            samples[label].append(measure(out))
            elapsed = time.perf_counter() - t0
            print(f"[{i + 1}/{runs}] {label}: {samples[label][-1]['steps_per_s']:.3f} steps/s "
                  f"({elapsed:.0f} s elapsed, ETA {elapsed / (i + 1) * (runs - i - 1):.0f} s)", flush=True)
    rows = [{"label": label, "world_size": world, "strategy": strategy,
             **{k: statistics.median(s[k] for s in samples[label]) for k in samples[label][0]}}
            for label, world, strategy in configs]
    record = {"command": " ".join(["python bench/bench_distributed.py", *(argv if argv is not None else sys.argv[1:])]),
              "config": a.config, "steps": a.steps, "repeats": a.repeats, "overrides": a.set,
              "machine": machine(a.device), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": rows, "samples": samples}
    dest = Path(a.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "distributed.json").write_text(json.dumps(record, indent=2) + "\n")
    md = table(rows)
    (dest / "distributed.md").write_text(md + "\n")
    where = record["machine"].get("gpu") or f"CPU ({record['machine']['cpu_count']} cores, gloo)"
    plot(rows, dest / "distributed.png", f"amft train {a.config}, {a.steps} steps, {where}")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
