"""Does AMFT beat its baselines? Every method of AMFT.md §4 from one shared warm start.

    amft bench methods --task countdown        # the study (bench/study_countdown.py): ≥ 200 RL steps, 3 seeds,
                                               # tuned baselines, every test instance, paired CIs; resumable
    python bench/bench_methods.py --out bench/out/methods --seeds 0 1 2 --steps 60       # General Points
    python bench/bench_methods.py --out bench/out/methods --tune          # controller sweep, on val only

`--task countdown` is the study of issue 24, documented in bench/study_countdown.py (its report in
bench/study_report.py). The rest of this file is the General Points table: equal budget by construction,
every method runs the same trainer with the same steps, rollouts (B×G per step) and SFT batch; only the
controller that sets μ differs. Accuracy is greedy pass@1 on val, test_id and test_ood (OOD rule: J/Q/K =
11/12/13). Ablations: `entropy` (no meta-gradient), `meta` (no entropy term) and `amft_no_warm_start` (AMFT
from the untrained base model). Runs go two at a time (one thread each) on a 2-core machine.

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
    return _one_run(job)


def _one_run(job: dict) -> dict:
    from amft_lib.config import apply_overrides, load_config
    from amft_lib.trainer import run_train

    method = job["method"]
    if method == "warm_start":  # the common starting point, scored on the same rows (greedy: seed-free)
        cfg = apply_overrides(load_config(job["config"]), [f"data.path={job['data']}", *job.get("extra", [])])
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
    return {"method": method, "seed": job["seed"], "accuracy": greedy_accuracy(str(res.model_dir), cfg, job),
            "mu_final": res.mu_final, "run_dir": str(job["run_dir"]), "extra": job.get("extra", []),
            "steps": job["steps"], "train_s": train_s}


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


def h_star_at(warm: Path, model_dir: Path, wstats: dict, temperature: float, warm_config: str, data: Path) -> float:
    """H* of the warm-start model (in `model_dir`; its stats and the cached value in `warm`) at the rollout
    `temperature`: from its stats.json when measured there, else measured now with the warm-start config's
    settings (an older warm start measured it at 1.0). A warm start too big for git keeps its model apart
    from its stats, hence the two folders."""
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
    model, tok = load_policy(wcfg.model.__class__(**{**wcfg.model.__dict__, "name": str(model_dir)}))
    value = measure_target_entropy(model, tok, h_rows, wcfg)
    cache.write_text(json.dumps({"target_entropy": value, "temperature": temperature}))
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASK_DEFAULTS), default="general_points",
                    help="general_points (the seven methods, means ± std) or countdown (the study: twelve rows, "
                    "per-instance scores, pass@k, paired bootstrap CIs; bench/study_countdown.py)")
    ap.add_argument("--out", default=None, help="working folder (git-ignored); default bench/out/methods "
                    "(general_points), bench/out/study_countdown")
    ap.add_argument("--config", default=None, help="training config; default per --task (configs/tiny_*.yaml)")
    ap.add_argument("--warm-config", default=None, help="warm-start config; default per --task")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (countdown smollm2: 0)")
    ap.add_argument("--steps", type=int, default=None, help="RL steps per run (default 60; countdown 200)")
    ap.add_argument("--methods", nargs="+", default=None, help="default: every method of the task")
    ap.add_argument("--workers", type=int, default=2, help="runs at a time, one thread each")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="config overrides for every run (e.g. rollout.temperature=2.0), recorded in the results")
    cd = ap.add_argument_group("countdown (the study)")
    cd.add_argument("--pass-k", type=int, default=8, help="k of pass@k (samples per instance)")
    cd.add_argument("--eval-rows", type=int, default=None,
                    help="greedy pass@1 on the first this many instances of each test split (0, the default: all; "
                    "smollm2: 500)")
    cd.add_argument("--pass-k-rows", type=int, default=None,
                    help="pass@k on the first this many of each test split (default 500; smollm2: 100)")
    cd.add_argument("--n-boot", type=int, default=5000, help="bootstrap replicates per comparison")
    cd.add_argument("--switch-grid", type=int, nargs="+", default=[50, 100, 150],
                    help="sft_grpo: RL-start steps tuned on val")
    cd.add_argument("--mu-grid", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="fixed: μ values tuned on val")
    cd.add_argument("--tuned", nargs="+", default=None, metavar="METHOD=VALUE",
                    help="skip the val sweeps and use these values (sft_grpo=SWITCH_STEP fixed=MU), recorded as "
                    "given, not tuned: for a study too expensive to tune (the SmolLM2 one)")
    cd.add_argument("--model", choices=["tiny", "smollm2"], default="tiny",
                    help="smollm2: SmolLM2-135M + LoRA (configs/smollm2_countdown_*.yaml), its own study folder "
                    "bench/results/study_countdown_smollm2 and report")
    cd.add_argument("--study", default=None, help="the study's record folder (default bench/results/study_countdown)")
    cd.add_argument("--commit", action="store_true", help="git-commit each finished run's record as it lands")
    cd.add_argument("--report-only", action="store_true", help="rebuild the report from the records; train nothing")
    cd.add_argument("--no-report-every-run", dest="report_every_run", action="store_false",
                    help="rebuild the report only at the end (default: after every finished run)")
    gp = ap.add_argument_group("general_points")
    gp.add_argument("--warm-start", help="reuse this warm-start output dir instead of building one")
    gp.add_argument("--tune", action="store_true", help="sweep AMFT controller settings, scored on val only")
    gp.add_argument("--grid", nargs="+", metavar="KEY=V1,V2",
                    help="with --tune: config keys and values to sweep (their product); default η_μ × η_H × μ_init")
    gp.add_argument("--merge", action="store_true",
                    help="keep the runs of <out>/results.json and replace only the (method, seed) pairs run now, "
                    "e.g. to rerun the μ-dependent methods after retuning μ_init")
    gp.add_argument("--split-mode", choices=["key", "prompt"], default="key",
                    help="key: the pipeline's split (no hand in two splits; test_id/test_ood are unseen hands). "
                    "prompt: val and test_id are held-out *prompts* (card orders) of training hands, test_ood "
                    "stays unseen OOD hands — measures what a small model can transfer, not generalisation")
    args = ap.parse_args()
    if args.task == "countdown":
        import study_countdown

        study_countdown.apply_model_preset(args)
        args.seeds = args.seeds or [0, 1, 2]
        args.steps = args.steps or 200
        args.methods = args.methods or list(study_countdown.METHODS)
        args.out = args.out or "bench/out/study_countdown"
        study_countdown.main(args)
        return
    general_points(args)


def general_points(args) -> None:
    args.config = args.config or TASK_DEFAULTS[args.task][0]
    args.warm_config = args.warm_config or TASK_DEFAULTS[args.task][1]
    args.steps = args.steps or 60
    args.seeds = args.seeds or [0, 1, 2]
    args.methods = args.methods or list(METHODS)
    args.out = args.out or "bench/out/methods"
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
    target_entropy = h_star_at(warm, warm / "model", wstats, temperature, args.warm_config, data)
    common = {"config": args.config, "data": str(data), "warm_model": str(warm / "model"), "steps": args.steps,
              "target_entropy": target_entropy, "target_entropy_temperature": temperature, "extra": list(args.set)}

    if args.tune:
        axes = dict(item.split("=", 1) for item in args.grid) if args.grid else {
            "controller.eta_mu": "0.05,0.5", "controller.eta_h": "0.05,0.5", "controller.meta_update": "cosine",
            "controller.meta_estimator": "backward",
            "controller.mu_init": "0.5,0.7"}
        grid = [[f"{k}={v}" for k, v in zip(axes, values, strict=True)]
                for values in itertools.product(*(v.split(",") for v in axes.values()))]
        jobs = [{**common, "method": "amft", "seed": 0, "extra": [*args.set, *g], "splits": ["val"],
                 "run_dir": out / "tune" / f"g{i}"} for i, g in enumerate(grid)]
    else:
        jobs = [] if args.merge else [{**common, "method": "warm_start", "seed": args.seeds[0], "splits": list(SPLITS)}]
        jobs += [{**common, "method": m, "seed": s, "splits": list(SPLITS), "run_dir": out / "runs" / f"{m}-s{s}"}
                 for s in args.seeds for m in args.methods]
    t0 = time.perf_counter()
    runs = []
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
        ranked = sorted(runs, key=lambda r: -r["accuracy"]["val"])
        tuning = RESULTS / "tuning.json"
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
