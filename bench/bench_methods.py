"""Does AMFT beat its baselines? All seven methods of AMFT.md §4 from one shared warm start.

    python bench/bench_methods.py --out bench/out/methods --seeds 0 1 2 --steps 60
    python bench/bench_methods.py --out bench/out/methods --tune          # controller sweep, on val only
    python bench/bench_methods.py --task countdown --out bench/out/countdown --seeds 0 1 2 --steps 20 --workers 1 \
        --eval-rows 1000 --pass-k-rows 128 --set eval_prompts=64 eval_samples=1   # bench/results/methods_countdown.md

Countdown (`--task countdown`, see amft_lib/tasks/countdown.py) adds the baselines chord and hpt, scores
greedy pass@1 on the first `--eval-rows` (default: every) test_id / test_ood instance and pass@8 on the first
`--pass-k-rows` of each, keeps
the per-instance results, and compares AMFT with every other method by a paired bootstrap (instances
and seeds resampled; amft_lib/significance.py): a difference counts only when its 95 % CI excludes 0.

Equal budget by construction: every method runs the same trainer with the same steps, rollouts
(B×G per step) and SFT batch; only the controller that sets μ differs. Accuracy is greedy pass@1 on
val, test_id and test_ood (OOD rule: J/Q/K = 11/12/13). Ablations: `entropy` (no meta-gradient),
`meta` (no entropy term) and `amft_no_warm_start` (AMFT from the untrained base model).
Runs go two at a time (one thread each) on a 2-core machine.

Writes <out>/results.json, bench/results/methods.{json,md} and PNG plots (val accuracy vs step,
μ trajectories, entropy). --tune writes bench/results/tuning.json; it only ever reads `val`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("sft", "grpo", "sft_grpo", "fixed", "entropy", "meta", "amft", "amft_no_warm_start")
SPLITS = ("val", "test_id", "test_ood")
COUNTDOWN_METHODS = ("sft", "grpo", "sft_grpo", "fixed", "entropy", "meta", "amft", "chord", "hpt")
COUNTDOWN_TEST_SPLITS = ("test_id", "test_ood")  # what the table reports; val is for tuning only
TASK_DEFAULTS = {  # --task → (train config, warm-start config)
    "general_points": ("configs/tiny_gp.yaml", "configs/tiny_warm_start.yaml"),
    "countdown": ("configs/tiny_countdown.yaml", "configs/tiny_countdown_warm_start.yaml"),
}


def base_overrides(steps: int) -> list[str]:
    return [f"max_steps={steps}", f"eval_every={max(1, steps // 3)}", "eval_prompts=100",
            f"controller.switch_step={steps // 2}", f"controller.chord_decay_steps={steps}"]


def greedy_accuracy(model_dir: str, cfg, job: dict) -> dict[str, float]:
    """Greedy pass@1 of the model in `model_dir` on every row of the job's splits."""
    from amft_lib.dataset import read_rows
    from amft_lib.model import load_policy
    from amft_lib.scoring import greedy_eval
    from amft_lib.tasks import get_task

    splits = read_rows(job["data"])
    model, tok = load_policy(cfg.model.__class__(**{**cfg.model.__dict__, "name": model_dir}))
    task = get_task(cfg.data.task)
    return {s: greedy_eval(model, tok, task, splits[s], cfg.rollout.max_new_tokens).accuracy
            for s in job["splits"] if s in splits}


def one_run(job: dict) -> dict:
    """Train one (method, seed) from the warm start and score it; runs in a worker process."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    if job.get("result_path"):  # countdown: keep each result beside its run so an interrupted bench resumes
        result = _one_run(job)
        Path(job["result_path"]).write_text(json.dumps(result))
        return result
    return _one_run(job)


def _one_run(job: dict) -> dict:
    from amft_lib.config import apply_overrides, load_config
    from amft_lib.trainer import run_train

    method = job["method"]
    if method == "warm_start":  # the common starting point, scored on the same rows (greedy: seed-free)
        cfg = apply_overrides(load_config(job["config"]), [f"data.path={job['data']}", *job.get("extra", [])])
        if job.get("per_instance"):
            scores = instance_scores(job["warm_model"], cfg, job)
            return {"method": method, "seed": job["seed"], "accuracy": scores.pop("summary"), "instances": scores,
                    "mu_final": float("nan"), "run_dir": "", "extra": [], "train_s": 0.0}
        return {"method": method, "seed": job["seed"], "accuracy": greedy_accuracy(job["warm_model"], cfg, job),
                "mu_final": float("nan"), "run_dir": "", "extra": [], "train_s": 0.0}
    real = "amft" if method == "amft_no_warm_start" else method
    cfg = load_config(job["config"])
    cfg = apply_overrides(cfg, [*base_overrides(job["steps"]), f"controller.method={real}", f"seed={job['seed']}",
                                f"data.path={job['data']}", *job.get("extra", [])])
    if method != "amft_no_warm_start":  # H* measured at the rollout temperature (checked by TrainConfig)
        cfg = apply_overrides(cfg, [f"controller.target_entropy={job['target_entropy']}",
                                    f"controller.target_entropy_temperature={job['target_entropy_temperature']}"])
    init = None if method == "amft_no_warm_start" else job["warm_model"]
    t0 = time.perf_counter()
    res = run_train(cfg, job["run_dir"], init_model=init, progress=False)
    train_s = time.perf_counter() - t0
    if job.get("per_instance"):
        scores = instance_scores(str(res.model_dir), cfg, job)
        return {"method": method, "seed": job["seed"], "accuracy": scores.pop("summary"), "instances": scores,
                "mu_final": res.mu_final, "run_dir": str(job["run_dir"]), "extra": job.get("extra", []),
                "steps": job["steps"], "train_s": train_s, "eval_s": time.perf_counter() - t0 - train_s}
    return {"method": method, "seed": job["seed"], "accuracy": greedy_accuracy(str(res.model_dir), cfg, job),
            "mu_final": res.mu_final, "run_dir": str(job["run_dir"]), "extra": job.get("extra", []),
            "steps": job["steps"], "train_s": train_s}


def instance_scores(model_dir: str, cfg, job: dict) -> dict:
    """Per instance of every split in job["splits"]: greedy correctness (0/1) on the first job["eval_rows"]
    rows (0: all), and the number
    correct of k samples (at the rollout temperature, seed fixed per split so every method sees the same
    sampling stream) on the first job["pass_k_rows"] rows. "summary" holds the means."""
    import torch

    from amft_lib.dataset import read_rows
    from amft_lib.model import load_policy
    from amft_lib.rollout import sample_completions
    from amft_lib.scoring import score_completions
    from amft_lib.tasks import get_task

    splits = read_rows(job["data"])
    model, tok = load_policy(cfg.model.__class__(**{**cfg.model.__dict__, "name": model_dir}))
    model.eval()
    task = get_task(cfg.data.task)
    k, n_k = job["pass_k"], job["pass_k_rows"]
    out: dict = {"summary": {}}
    for i, split in enumerate(job["splits"]):
        rows = splits[split][: job.get("eval_rows") or None]
        with torch.no_grad():
            greedy = sample_completions(model, tok, [r["prompt"] for r in rows],
                                        max_new_tokens=cfg.rollout.max_new_tokens, greedy=True, batch_size=256)
            correct, _ = score_completions(task, [r["answer"] for r in rows], greedy.texts)
            torch.manual_seed(10_007 + i)
            sampled = sample_completions(model, tok, [r["prompt"] for r in rows[:n_k]], group_size=k,
                                         max_new_tokens=cfg.rollout.max_new_tokens,
                                         temperature=cfg.rollout.temperature, batch_size=256)
            rewards, _ = score_completions(task, [r["answer"] for r in rows[:n_k] for _ in range(k)], sampled.texts)
        counts = rewards.view(-1, k).sum(dim=1).int().tolist()
        out[split] = {"ids": [r["id"] for r in rows], "greedy": [int(x) for x in correct.tolist()],
                      f"correct_of_{k}": counts}
        out["summary"][split] = float(correct.mean())
        out["summary"][f"{split}_pass@{k}"] = sum(c > 0 for c in counts) / max(1, len(counts))
    return out


def prompt_split(src: Path, dst: Path) -> Path:
    """Re-split the key-split dataset: per training hand, one held-out prompt goes to val and one to
    test_id (prompts never shared with train); test_ood is kept as is."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from amft_lib.dataset import read_rows

    if (dst / "train.parquet").exists():
        return dst
    rows = read_rows(src)
    by_key: dict[str, list[dict]] = {}
    for r in rows["train"]:
        by_key.setdefault(json.dumps(sorted(json.loads(r["answer"])["values"])), []).append(r)
    out: dict[str, list[dict]] = {"train": [], "val": [], "test_id": [], "test_ood": rows.get("test_ood", [])}
    for group in by_key.values():
        prompts = list(dict.fromkeys(r["prompt"] for r in group))
        held = {"val": prompts[-1]} if len(prompts) >= 2 else {}
        if len(prompts) >= 3:
            held["test_id"] = prompts[-2]
        for split, prompt in held.items():
            out[split].append({**next(r for r in group if r["prompt"] == prompt), "split": split})
        out["train"] += [r for r in group if r["prompt"] not in held.values()]
    dst.mkdir(parents=True, exist_ok=True)
    cols = ["id", "task", "prompt", "answer", "demonstration", "split", "meta"]
    for split, rs in out.items():
        pq.write_table(pa.table({c: [r[c] for r in rs] for c in cols}), dst / f"{split}.parquet")
    return dst


def _load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def summarise(runs: list[dict]) -> dict:
    out: dict = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        out[method] = {}
        for split in SPLITS:
            vals = [r["accuracy"][split] for r in rs if split in r["accuracy"]]
            if vals:
                out[method][split] = {"mean": statistics.mean(vals),
                                      "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
    return out


def markdown(summary: dict, warm: dict, meta: dict) -> str:
    lines = [f"Command: `{meta['command']}`  ", f"Seeds: {meta['seeds']}; steps: {meta['steps']}; "
             f"warm start val accuracy {warm.get('warm_start', float('nan')):.3f}", "",
             "| method | val | test_id | test_ood |", "|---|---|---|---|"]
    for method, s in summary.items():
        cells = [f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" if k in s else "–" for k in SPLITS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], out: Path, stem: str = "methods") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for r in runs:
        if r["seed"] != runs[0]["seed"] or not r["run_dir"]:  # one seed; the warm-start row has no curve
            continue
        rows = [json.loads(x) for x in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        steps = [x for x in rows if not x.get("final")]
        val = [(x["step"] + 1, x["val_accuracy"]) for x in steps if x.get("val_accuracy") is not None]
        if val:
            axes[0].plot(*zip(*val, strict=True), marker="o", label=r["method"])
        axes[1].plot([x["step"] for x in steps], [x["mu"] for x in steps], label=r["method"])
        axes[2].plot([x["step"] for x in steps], [x["entropy"] for x in steps], label=r["method"])
    for ax, title in zip(axes, ("val accuracy (greedy)", "μ", "rollout entropy H_t"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / f"{stem}_curves.png"
    fig.savefig(path, dpi=110)
    return [str(path)]


def h_star_at(warm: Path, wstats: dict, temperature: float, warm_config: str, data: Path) -> float:
    """H* of the warm-start model at the rollout `temperature`: from its stats.json when measured there,
    else measured now with the warm-start config's settings (an older warm start measured it at 1.0)."""
    if wstats.get("target_entropy_temperature", 1.0) == temperature:
        return wstats["target_entropy"]
    cache = warm / f"target_entropy_T{temperature}.json"
    if cache.exists():
        return json.loads(cache.read_text())["target_entropy"]
    from amft_lib.config import WarmStartConfig, apply_overrides, load_config
    from amft_lib.dataset import read_rows
    from amft_lib.model import load_policy
    from amft_lib.sampler import Cursor
    from amft_lib.warm_start import measure_target_entropy

    wcfg = apply_overrides(load_config(warm_config, WarmStartConfig), [f"entropy_temperature={temperature}"])
    rows = read_rows(data)["train"]
    h_rows = [rows[i] for i in Cursor(len(rows), wcfg.seed + 2).take(wcfg.entropy_prompts)]
    model, tok = load_policy(wcfg.model.__class__(**{**wcfg.model.__dict__, "name": str(warm / "model")}))
    value = measure_target_entropy(model, tok, h_rows, wcfg)
    cache.write_text(json.dumps({"target_entropy": value, "temperature": temperature}))
    return value


def report_countdown(runs: list[dict], meta: dict, out: Path, n_boot: int) -> None:
    """Countdown table (means ± std over seeds), paired bootstrap CIs of AMFT − each other method,
    μ summary, plots; bench/results/methods_countdown.{json,md}, per-instance data beside them."""
    import gzip

    import numpy as np

    from amft_lib.significance import paired_bootstrap, pass_at_k_any

    order = {m: i for i, m in enumerate(("warm_start", *COUNTDOWN_METHODS))}
    runs = sorted(runs, key=lambda r: (order.get(r["method"], 99), r["seed"]))
    k = next(int(key.split("_")[-1]) for key in runs[0]["instances"]["test_id"] if key.startswith("correct_of_"))
    metrics = [(f"{s}", s, "greedy") for s in COUNTDOWN_TEST_SPLITS] + [
        (f"{s}_pass@{k}", s, f"correct_of_{k}") for s in COUNTDOWN_TEST_SPLITS]

    def matrix(method: str, split: str, field: str) -> np.ndarray:  # [S, N] per seed, per instance
        rows = [r["instances"][split][field] for r in runs if r["method"] == method]
        m = np.asarray(rows, dtype=np.float64)
        return pass_at_k_any(m, k) if field.startswith("correct_of_") else m

    methods = list(dict.fromkeys(r["method"] for r in runs))
    summary: dict = {}
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        summary[method] = {name: {"mean": statistics.mean(r["accuracy"][name] for r in rs),
                                  "std": statistics.stdev([r["accuracy"][name] for r in rs]) if len(rs) > 1 else 0.0,
                                  "n_seeds": len(rs)} for name, _, _ in metrics}
        mus = [_mu_trajectory(r) for r in rs if r["run_dir"]]
        if mus:
            summary[method]["mu"] = {"final_mean": statistics.mean(m[-1] for m in mus),
                                     "mean_over_training": statistics.mean(statistics.mean(m) for m in mus),
                                     "min": min(min(m) for m in mus), "max": max(max(m) for m in mus)}
        halves = [c for r in rs if r["run_dir"] for c in _controller_log(r, "half_cosine")]
        if halves:
            summary[method]["half_cosine"] = {"mean": statistics.mean(halves), "n": len(halves),
                                              "std": statistics.stdev(halves) if len(halves) > 1 else 0.0}
    paired: dict = {}
    if "amft" in methods:
        for base in (m for m in methods if m != "amft"):
            paired[base] = {}
            for name, split, field in metrics:
                d = paired_bootstrap(matrix("amft", split, field), matrix(base, split, field), n_boot=n_boot)
                paired[base][name] = {**d._asdict(), "significant": d.significant}
    meta["n_greedy"] = len(runs[0]["instances"]["test_id"]["greedy"])
    meta["n_pass_k"] = len(runs[0]["instances"]["test_id"][f"correct_of_{k}"])
    instances = {f"{r['method']}-s{r['seed']}": r.pop("instances") for r in runs}
    RESULTS.mkdir(exist_ok=True)
    with gzip.open(RESULTS / "methods_countdown_instances.json.gz", "wt") as f:
        json.dump(instances, f)
    blob = {"meta": meta, "summary": summary, "paired_amft_minus": paired, "runs": runs}
    (out / "results.json").write_text(json.dumps(blob, indent=2, default=str))
    (RESULTS / "methods_countdown.json").write_text(json.dumps(blob, indent=2, default=str))
    md = markdown_countdown(summary, paired, meta, [name for name, _, _ in metrics])
    (RESULTS / "methods_countdown.md").write_text(md)
    plot_countdown(runs, RESULTS / "methods_countdown_curves.png")
    print(md)


def _mu_trajectory(run: dict) -> list[float]:
    rows = [json.loads(x) for x in (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return [x["mu"] for x in rows if not x.get("final")]


def _controller_log(run: dict, key: str) -> list[float]:
    path = Path(run["run_dir"]) / "controller.jsonl"
    if not path.exists():
        return []
    values = [json.loads(x).get(key) for x in path.read_text().splitlines()]
    return [v for v in values if v is not None and v == v]


def markdown_countdown(summary: dict, paired: dict, meta: dict, names: list[str]) -> str:
    ws = meta["warm_start"]
    lines = [f"Command: `{meta['command']}`  ",
             f"Seeds: {meta['seeds']}; steps: {meta['steps']}; warm start: {ws['warmup_steps']} SFT steps + "
             f"{ws['final_sft_steps']} on demonstrations ∪ {ws['rejection_sampling']['kept']} accepted samples; "
             f"H* = {ws.get('target_entropy', float('nan')):.3f} at T = {ws.get('target_entropy_temperature', 1.0)}",
             "", f"Greedy pass@1 on the first {meta.get('n_greedy')} instances of each test split, pass@k on the first "
             f"{meta.get('n_pass_k')}; mean ± std over seeds. μ: mean over the steps of a run (final value), averaged "
             "over seeds; ∇U half-cosine: agreement of the two half-sample estimates per meta step (all seeds).", "",
             "| method | " + " | ".join(names) + " | μ mean (final) | ∇U half-cosine |",
             "|---" * (len(names) + 3) + "|"]
    for method, s in summary.items():
        cells = [f"{s[n]['mean']:.3f} ± {s[n]['std']:.3f}" for n in names]
        mu = f"{s['mu']['mean_over_training']:.2f} ({s['mu']['final_mean']:.2f})" if "mu" in s else "–"
        hc = f"{s['half_cosine']['mean']:+.3f} ± {s['half_cosine']['std']:.3f} (n={s['half_cosine']['n']})" \
            if "half_cosine" in s else "–"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {mu} | {hc} |")
    if paired:
        lines += ["", "Paired bootstrap (instances and seeds resampled), AMFT − method, 95 % CI; ** = CI excludes 0.",
                  "", "| AMFT − | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for base, cells in paired.items():
            row = [f"{c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]{' **' if c['significant'] else ''}"
                   for c in (cells[n] for n in names)]
            lines.append(f"| {base} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_countdown(runs: list[dict], path: Path) -> None:
    """Val accuracy vs step, μ and entropy (first seed per method), and the ∇U half-sample cosine per
    meta step (every seed of meta and amft)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    first_seed = min(r["seed"] for r in runs)
    for r in runs:
        if not r["run_dir"]:
            continue
        rows = [json.loads(x) for x in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        steps = [x for x in rows if not x.get("final")]
        halves = [(x["step"], x["half_cosine"]) for x in map(json.loads, (Path(r["run_dir"]) / "controller.jsonl")
                                                             .read_text().splitlines()) if x.get("half_cosine")
                  is not None]
        if halves:
            axes[1, 1].plot(*zip(*halves, strict=True), marker="o", linestyle=":",
                            label=f"{r['method']} s{r['seed']}")
        if r["seed"] != first_seed:
            continue
        val = [(x["step"], x["val_accuracy"]) for x in rows if x.get("val_accuracy") is not None]
        if val:
            axes[0, 0].plot(*zip(*val, strict=True), marker="o", label=r["method"])
        axes[0, 1].plot([x["step"] for x in steps], [x["mu"] for x in steps], label=r["method"])
        axes[1, 0].plot([x["step"] for x in steps], [x["entropy"] for x in steps], label=r["method"])
    titles = ("val accuracy (greedy, first eval_prompts of val)", "μ", "rollout entropy H_t",
              "∇U half-sample cosine per meta step (≈0: noise)")
    for ax, title in zip(axes.flat, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[1, 1].axhline(0.0, color="grey", linewidth=0.8)
    axes[0, 0].legend(fontsize=7)
    axes[1, 1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASK_DEFAULTS), default="general_points",
                    help="general_points (the seven methods, means ± std) or countdown (nine methods, per-instance "
                    "scores, pass@k and paired bootstrap CIs of AMFT − each baseline)")
    ap.add_argument("--out", default=None, help="default bench/out/methods (general_points), bench/out/countdown")
    ap.add_argument("--config", default=None, help="training config; default per --task (configs/tiny_*.yaml)")
    ap.add_argument("--warm-config", default=None, help="warm-start config; default per --task")
    ap.add_argument("--pass-k", type=int, default=8, help="countdown: k of pass@k (samples per instance)")
    ap.add_argument("--eval-rows", type=int, default=0,
                    help="countdown: greedy pass@1 on the first this many instances of each test split (0: all)")
    ap.add_argument("--pass-k-rows", type=int, default=500,
                    help="countdown: pass@k on the first this many instances of each test split (greedy uses all)")
    ap.add_argument("--n-boot", type=int, default=5000, help="countdown: bootstrap replicates per comparison")
    ap.add_argument("--warm-start", help="reuse this warm-start output dir instead of building one")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tune", action="store_true", help="sweep AMFT controller settings, scored on val only")
    ap.add_argument("--grid", nargs="+", metavar="KEY=V1,V2",
                    help="with --tune: config keys and values to sweep (their product); default η_μ × η_H × μ_init")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="config overrides for every run (e.g. rollout.temperature=2.0), recorded in the results")
    ap.add_argument("--merge", action="store_true",
                    help="keep the runs of <out>/results.json and replace only the (method, seed) pairs run now, "
                    "e.g. to rerun the μ-dependent methods after retuning μ_init")
    ap.add_argument("--split-mode", choices=["key", "prompt"], default="key",
                    help="key: the pipeline's split (no hand in two splits; test_id/test_ood are unseen hands). "
                    "prompt: val and test_id are held-out *prompts* (card orders) of training hands, test_ood "
                    "stays unseen OOD hands — measures what a small model can transfer, not generalisation")
    args = ap.parse_args()
    countdown = args.task == "countdown"
    args.config = args.config or TASK_DEFAULTS[args.task][0]
    args.warm_config = args.warm_config or TASK_DEFAULTS[args.task][1]
    args.out = args.out or ("bench/out/countdown" if countdown else "bench/out/methods")
    if countdown and args.methods == list(METHODS):
        args.methods = list(COUNTDOWN_METHODS)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from amft_lib.config import WarmStartConfig, apply_overrides, load_config
    from amft_lib.data.prepare import PrepareConfig, run_prepare

    data = out / "data"
    if not (data / "card.json").exists():
        run_prepare(PrepareConfig(task=args.task, out_dir=str(data)))
    if args.split_mode == "prompt":
        data = prompt_split(data, out / "data_prompt")
    warm = Path(args.warm_start) if args.warm_start else out / "warm_start"
    # H* must be measured at the temperature the rollouts use (see config.check_target_entropy_temperature)
    temperature = apply_overrides(load_config(args.config), list(args.set)).rollout.temperature
    if not (warm / "stats.json").exists():
        from amft_lib.warm_start import run_warm_start

        wcfg = apply_overrides(load_config(args.warm_config, WarmStartConfig),
                               [f"data.path={data}", f"entropy_temperature={temperature}"])
        run_warm_start(wcfg, warm)
    wstats = json.loads((warm / "stats.json").read_text())
    target_entropy = h_star_at(warm, wstats, temperature, args.warm_config, data)
    common = {"config": args.config, "data": str(data), "warm_model": str(warm / "model"), "steps": args.steps,
              "target_entropy": target_entropy, "target_entropy_temperature": temperature, "extra": list(args.set)}
    if countdown:
        common.update(per_instance=True, pass_k=args.pass_k, pass_k_rows=args.pass_k_rows, eval_rows=args.eval_rows)

    if args.tune:
        axes = dict(item.split("=", 1) for item in args.grid) if args.grid else {
            "controller.eta_mu": "0.05,0.5", "controller.eta_h": "0.05,0.5", "controller.meta_normalize": "cosine",
            "controller.mu_init": "0.5,0.7"}
        grid = [[f"{k}={v}" for k, v in zip(axes, values, strict=True)]
                for values in itertools.product(*(v.split(",") for v in axes.values()))]
        jobs = [{**common, "method": "amft", "seed": 0, "extra": [*args.set, *g], "splits": ["val"],
                 "run_dir": out / "tune" / f"g{i}"} for i, g in enumerate(grid)]
    else:
        splits = list(COUNTDOWN_TEST_SPLITS if countdown else SPLITS)
        jobs = [] if args.merge else [{**common, "method": "warm_start", "seed": args.seeds[0], "splits": splits}]
        jobs += [{**common, "method": m, "seed": s, "splits": splits, "run_dir": out / "runs" / f"{m}-s{s}"}
                 for s in args.seeds for m in args.methods]
        if countdown:  # resumable: a finished (method, seed) is read back from its result file
            for j in jobs:
                j["result_path"] = str(Path(j.get("run_dir") or out) / ("bench_run.json" if j.get("run_dir")
                                                                        else "warm_start_scores.json"))
            runs_done = [_load_json(Path(j["result_path"])) for j in jobs if Path(j["result_path"]).exists()]
            jobs = [j for j in jobs if not Path(j["result_path"]).exists()]
    t0 = time.perf_counter()
    runs = list(runs_done) if countdown and not args.tune else []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for i, r in enumerate(pool.map(one_run, jobs), 1):
            runs.append(r)
            elapsed = time.perf_counter() - t0
            print(f"[{i}/{len(jobs)}] {r['method']} seed {r['seed']} {r['extra']} acc={r['accuracy']} "
                  f"mu_final={r['mu_final']:.3f} ({elapsed:.0f} s, ETA {elapsed / i * (len(jobs) - i):.0f} s)",
                  flush=True)
    meta = {"command": "python bench/bench_methods.py " + " ".join(sys.argv[1:]), "seeds": args.seeds,
            "steps": args.steps, "warm_start": wstats, "wall_s": time.perf_counter() - t0}
    RESULTS.mkdir(exist_ok=True)
    if args.tune:
        for r in runs:
            r.pop("instances", None)  # tuning ranks on the val mean; per-instance lists are for paired tests
        ranked = sorted(runs, key=lambda r: -r["accuracy"]["val"])
        tuning = RESULTS / ("tuning_countdown.json" if countdown else "tuning.json")
        previous = _load_json(tuning) if args.grid else None
        if previous:  # a further sweep adds to the record instead of replacing it
            meta["earlier_sweeps"] = [*previous["meta"].get("earlier_sweeps", []), previous["meta"]["command"]]
            ranked = sorted([*previous["runs"], *ranked], key=lambda r: -r["accuracy"]["val"])
        tuning.write_text(json.dumps({"meta": meta, "runs": ranked}, indent=2, default=str))
        for r in ranked:
            print(f"val={r['accuracy']['val']:.3f} {r['extra']}")
        return
    earlier = _load_json(out / "results.json") if args.merge else None
    if earlier:
        fresh = {(r["method"], r["seed"]) for r in runs}
        runs = [r for r in earlier["runs"] if (r["method"], r["seed"]) not in fresh] + runs
        order = {m: i for i, m in enumerate(("warm_start", *METHODS))}
        runs.sort(key=lambda r: (order.get(r["method"], 99), r["seed"]))
        meta["commands"] = [*earlier["meta"].get("commands", [earlier["meta"]["command"]]), meta["command"]]
    if countdown:
        report_countdown(runs, meta, out, args.n_boot)
        return
    summary = summarise(runs)
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2, default=str))
    stem = "methods" if args.split_mode == "key" else f"methods_{args.split_mode}"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2,
                                                     default=str))
    md = markdown(summary, wstats["val_accuracy"], meta)
    (RESULTS / f"{stem}.md").write_text(md)
    for p in plot(runs, RESULTS, stem):
        print("plot:", p)
    print(md)


if __name__ == "__main__":
    main()
