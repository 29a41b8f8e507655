"""Is the meta-gradient above noise? The share of meta steps with |t| = |m/SE(m)| ≥ 2 on Countdown (issue 23).

    python bench/bench_snr.py                      # = amft bench snr; every setting, 30 meta steps each
    python bench/bench_snr.py --settings default sgd --steps 30

From one warm start (configs/tiny_countdown_warm_start.yaml, built once under --out), each setting trains
configs/tiny_countdown.yaml with controller.meta_interval=1 (a meta step every step) for --steps steps and reads
m, SE(m), t of every meta step from controller.jsonl. The levers that should raise |t|:
- val rollouts per meta step: 256 (64 prompts × 4, the default) vs 1024 (256 × 4);
- the lookahead: Adam-preconditioned (default) vs SGD;
- group size: 8 rollouts per prompt (32 × 8 = 256 rollouts) vs 4;
- accumulation over k meta steps (hypergradient-descent style: the per-group terms of k consecutive meta steps
  pooled, m_k = mean of the k m's, SE_k = √(Σ SE²)/k): computed from the default run's records, no extra run.
Step time: `fixed` (no meta step) for the same steps; the extra time of a setting is reported per meta step
(meta_interval 1) and amortised at the shipped meta_interval. The old backward meta step (meta_estimator
backward) runs a few steps for the new/old meta-step time ratio.
Settings run one at a time in this process (niced by the caller, OMP_NUM_THREADS=1); finished ones are kept
in <out>/snr_partial.json, so the same command resumes. Writes bench/results/snr_countdown.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = "configs/tiny_countdown.yaml"
WARM_CONFIG = "configs/tiny_countdown_warm_start.yaml"
BASE = ["controller.meta_interval=1", "eval_every=0", "eval_prompts=8", "eval_samples=1", "log_samples=0"]
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "default": ("the shipped settings: 256 val rollouts (64 × 4), Adam lookahead", []),
    "val1024": ("1024 val rollouts (256 × 4)", ["controller.meta_val_prompts=256"]),
    "sgd": ("SGD lookahead", ["controller.meta_lookahead=sgd"]),
    "group8": ("group size 8 (32 × 8 = 256 rollouts)", ["controller.meta_val_prompts=32",
                                                         "controller.meta_val_group=8"]),
    "fixed": ("fixed μ: no meta step (the step-time baseline)", ["controller.method=fixed"]),
    "backward": ("the old backward ∇U meta step (timing only)", ["controller.meta_estimator=backward",
                                                                  "controller.meta_update=raw"]),
    "central_difference": ("D_i by central difference (timing only)", ["controller.meta_estimator=central_difference"]),
}
TIMING_ONLY = {"fixed", "backward", "central_difference"}
T_MIN = 2.0


def ensure_warm_start(out: Path) -> tuple[Path, Path, float]:
    """(data dir, warm-start model dir, H*) — built once under `out`."""
    from amft_lib.config import WarmStartConfig, apply_overrides, load_config
    from amft_lib.data.prepare import PrepareConfig, run_prepare
    from amft_lib.warm_start import run_warm_start

    data, warm = out / "data", out / "warm_start"
    if not (data / "card.json").exists():
        run_prepare(PrepareConfig(task="countdown", out_dir=str(data)))
    if not (warm / "stats.json").exists():
        run_warm_start(apply_overrides(load_config(WARM_CONFIG, WarmStartConfig),
                                       [f"data.path={data}", "entropy_temperature=1.0"]), warm)
    return data, warm / "model", json.loads((warm / "stats.json").read_text())["target_entropy"]


def run_setting(name: str, steps: int, out: Path, data: Path, model: Path, h_star: float) -> dict:
    """Train one setting from the warm start; its meta steps' m, SE, t and its step times."""
    from amft_lib.config import apply_overrides, load_config
    from amft_lib.trainer import run_train

    overrides = [*BASE, f"max_steps={steps}", f"data.path={data}", f"controller.target_entropy={h_star}",
                 "controller.target_entropy_temperature=1.0", *SETTINGS[name][1]]
    cfg = apply_overrides(load_config(CONFIG), overrides)
    run_dir = out / name
    t0 = time.perf_counter()
    run_train(cfg, run_dir, init_model=str(model), progress=True)
    wall = time.perf_counter() - t0
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_rec = [r for r in metrics if not r.get("final")]
    meta = [json.loads(x) for x in (run_dir / "controller.jsonl").read_text().splitlines()]
    meta = [r for r in meta if "meta_grad" in r]
    step_s = [r["time_rollout_s"] + r["time_update_s"] + r["time_meta_s"] for r in steps_rec]
    return {
        "setting": name, "what": SETTINGS[name][0], "overrides": overrides, "steps": len(steps_rec), "wall_s": wall,
        "step_s_mean": statistics.mean(step_s), "meta_s_mean": statistics.mean(r["time_meta_s"] for r in steps_rec),
        "meta": [{k: r.get(k) for k in ("step", "meta_grad", "meta_grad_se", "meta_grad_t", "n_groups", "mu",
                                        "mu_next", "delta_mu", "reason", "entropy", "entropy_delta")} for r in meta],
        "mu_final": steps_rec[-1]["mu_next"] if steps_rec else math.nan,
    }


def estimator_timing(data: Path, model_dir: Path, rounds: int = 3) -> dict:
    """Seconds of the meta step's derivative part alone, per estimator, interleaved (backward ∇U, JVP, central
    difference) on the same 256 validation rollouts of the warm-start model (sampling, common to all, excluded)."""
    import torch

    from amft_lib import meta_grad
    from amft_lib.config import apply_overrides, load_config
    from amft_lib.dataset import read_rows
    from amft_lib.losses import group_advantages
    from amft_lib.model import load_policy, trainable_parameters
    from amft_lib.policy import Policy, take_grads
    from amft_lib.rollout import completion_logprobs
    from amft_lib.tasks import get_task
    from amft_lib.trainer import rollout_derivatives, sample_and_score

    cfg = apply_overrides(load_config(CONFIG), [f"data.path={data}", f"model.name={model_dir}"])
    model, tok = load_policy(cfg.model, seed=0)
    policy, params = Policy(model, model, tok), trainable_parameters(model)
    rows = read_rows(data)["val"][: cfg.controller.meta_val_prompts]
    G = cfg.controller.meta_val_group
    batch, rewards, _ = sample_and_score(policy, get_task("countdown"), rows, G, cfg)
    weights = group_advantages(rewards, G, scale=False)
    direction = [1e-4 * torch.randn_like(p) for p in params]
    mb = cfg.loss.micro_batch_size

    def backward():
        for s in range(0, len(batch), mb):
            chunk = batch.slice(s, s + mb)
            lp, _ = completion_logprobs(model, chunk, cfg.rollout.temperature)
            ((weights[s:s + mb] * meta_grad.sequence_logprobs(lp, chunk.completion_mask)).sum() / len(batch)).backward()
        return take_grads(params)

    def per_rollout(est: str):
        cfg.controller.meta_estimator = est
        return rollout_derivatives(policy, params, batch, direction, cfg)

    times: dict[str, list[float]] = {"backward": [], "jvp": [], "central_difference": []}
    m: dict[str, float] = {}
    for _ in range(rounds):
        for name in times:
            t0 = time.perf_counter()
            out = backward() if name == "backward" else per_rollout(name)
            times[name].append(time.perf_counter() - t0)
            m[name] = (sum(float((g.double() * v.double()).sum()) for g, v in zip(out, direction, strict=True))
                       if name == "backward" else float((weights.double() * out.double()).mean()))
    return {"rollouts": len(batch), "rounds": rounds, "seconds": {k: statistics.median(v) for k, v in times.items()},
            "all": times, "m": m,  # the same m = ⟨∇U, v⟩ three ways (float32 model)
            "rel_diff_vs_jvp": {k: abs(v - m["jvp"]) / abs(m["jvp"]) for k, v in m.items() if m["jvp"]}}


def summarise(res: dict) -> dict:
    """The share of meta steps with |t| ≥ 2, and the signal's size: median |t|, median |m|/SE."""
    ts = [r["meta_grad_t"] for r in res["meta"] if r["meta_grad_t"] is not None]
    if not ts:
        return {"n_meta": 0}
    above = sum(abs(t) >= T_MIN for t in ts)
    return {"n_meta": len(ts), "frac_above": above / len(ts), "median_abs_t": statistics.median(abs(t) for t in ts),
            "mean_t": statistics.mean(ts), "frac_positive": sum(t > 0 for t in ts) / len(ts),
            "median_se": statistics.median(r["meta_grad_se"] for r in res["meta"] if r["meta_grad_se"] is not None)}


def accumulated(res: dict, k: int) -> dict:
    """Pool k consecutive meta steps (non-overlapping windows): m_k = mean m, SE_k = √(Σ SE²)/k, t_k = m_k/SE_k."""
    rows = [r for r in res["meta"] if r["meta_grad_se"] is not None]
    ts = []
    for i in range(0, len(rows) - k + 1, k):
        w = rows[i:i + k]
        m = statistics.mean(r["meta_grad"] for r in w)
        se = math.sqrt(sum(r["meta_grad_se"] ** 2 for r in w)) / k
        ts.append(m / se if se > 0 else 0.0)
    if not ts:
        return {"n_meta": 0}
    return {"n_meta": len(ts), "frac_above": sum(abs(t) >= T_MIN for t in ts) / len(ts),
            "median_abs_t": statistics.median(abs(t) for t in ts), "mean_t": statistics.mean(ts),
            "frac_positive": sum(t > 0 for t in ts) / len(ts)}


def table(results: dict, interval: int, command: str) -> str:
    fixed = results.get("fixed", {}).get("step_s_mean")
    lines = ["# Meta-gradient signal-to-noise on Countdown (issue 23)", "",
             f"`{command}` — tiny model from the warm start of `{WARM_CONFIG}`, `{CONFIG}` with a meta step every "
             f"step; a meta step is *above noise* when |t| = |m / SE(m)| ≥ {T_MIN:g} (SE over prompt groups). "
             "Goal: ≥ 50 % above noise at ≤ 25 % extra step time over `fixed`.", "",
             "| setting | meta steps | share with abs(t) ≥ 2 | median abs(t) | mean t | t > 0 | "
             f"extra step time, meta every step | extra at meta_interval {interval} |",
             "|---|---|---|---|---|---|---|---|"]
    rows = []
    for name, res in results.items():
        if name in TIMING_ONLY:
            continue
        rows.append((name, res["what"], summarise(res), res))
        if name == "default":
            for k in (4, 8):
                rows.append((f"default, accumulated over k={k}", f"{k} meta steps pooled", accumulated(res, k), res))
    for name, what, s, res in rows:
        if not s.get("n_meta"):
            continue
        extra = (res["step_s_mean"] - fixed) / fixed if fixed else math.nan
        # accumulating over the meta interval needs a meta step every step: its cost is not amortised
        amortised = extra if "k=" in name else extra / interval
        lines.append(f"| {name} ({what}) | {s['n_meta']} | {s['frac_above']:.0%} | {s['median_abs_t']:.2f} | "
                     f"{s['mean_t']:+.2f} | {s['frac_positive']:.0%} | {extra:+.0%} | {amortised:+.0%} |")
    if "backward" in results:
        old = results["backward"]["meta_s_mean"]
        for name, label in (("default", "per-rollout JVP"), ("central_difference", "per-rollout central difference")):
            if name in results:
                new = results[name]["meta_s_mean"]
                lines += ["", f"Meta-step time, {label} vs the old backward ∇U: {new:.2f} s vs {old:.2f} s (ratio "
                          f"{new / old:.2f}; 256 validation rollouts each, sampling included; same box, shared, "
                          "settings run one after another)."]
    if fixed:
        lines += [f"Mean step time of `fixed`: {fixed:.2f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/out/snr", help="work folder (warm start, runs; git-ignored)")
    ap.add_argument("--steps", type=int, default=30, help="training steps = meta steps per setting (≥ 30)")
    ap.add_argument("--timing-steps", type=int, default=8, help="steps of the timing-only settings")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--results", default=str(RESULTS), help="where snr_countdown.{json,md} go")
    ap.add_argument("--estimator-timing", action="store_true",
                    help="only time the meta step's derivative part per estimator (interleaved) into <out>")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, model, h_star = ensure_warm_start(out)
    if args.estimator_timing:
        timing = estimator_timing(data, model)
        (out / "estimator_timing.json").write_text(json.dumps(timing, indent=1))
        print(json.dumps({k: timing[k] for k in ("seconds", "m", "rel_diff_vs_jvp")}))
        return 0
    partial_path = out / "snr_partial.json"
    results = json.loads(partial_path.read_text()) if partial_path.exists() else {}
    todo = [s for s in args.settings if s not in results]
    t0 = time.perf_counter()
    for i, name in enumerate(todo):
        steps = args.timing_steps if name in TIMING_ONLY else args.steps
        print(f"[{i + 1}/{len(todo)}] {name}: {steps} steps ({SETTINGS[name][0]})", file=sys.stderr, flush=True)
        results[name] = run_setting(name, steps, out, data, model, h_star)
        partial_path.write_text(json.dumps(results, indent=1))
        done = time.perf_counter() - t0
        print(f"  {name}: {summarise(results[name])} — {done / 60:.1f} min so far, about "
              f"{done / (i + 1) * (len(todo) - i - 1) / 60:.0f} min left", file=sys.stderr, flush=True)
    from amft_lib.config import load_config

    interval = load_config(CONFIG).controller.meta_interval
    command = "python bench/bench_snr.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {name: summarise(res) for name, res in results.items()}
    if "default" in results:
        summary.update({f"default_accumulated_k{k}": accumulated(results["default"], k) for k in (4, 8)})
    res_dir = Path(args.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / "snr_countdown.json").write_text(json.dumps(
        {"command": command.strip(), "h_star": h_star, "summary": summary, "runs": results}, indent=1))
    (res_dir / "snr_countdown.md").write_text(table(results, interval, command.strip()))
    print(table(results, interval, command.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
