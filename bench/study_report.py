"""The study's tables, paired statistics, verdict and plot, rebuilt from its run records (study_countdown.py).

Why a separate step from the runs: the records are the evidence and are committed one by one as runs
finish; everything here is derived from them and can be rebuilt at any time (`--report-only`), so an
unfinished study always shows exactly what it has, and says how much that is.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
from study_countdown import RESULTS, TEST_SPLITS, read_json, run_path

T_MIN = 2.0  # |t| at or above this is "above noise" (the controller issue's SNR criterion)


def load(study: Path, methods: tuple[str, ...], seeds: tuple[int, ...]) -> tuple[dict | None, list[dict]]:
    """The warm start's scores and every finished run, in table order (method, then seed)."""
    warm = read_json(study / "warm_start_scores.json")
    runs = [r for m in methods for s in seeds if (r := read_json(run_path(study, m, s))) is not None]
    return warm, runs


def metric_names(k: int) -> list[tuple[str, str, str]]:
    """(name, split, per-instance field): greedy pass@1 and pass@k on both test splits."""
    return [(s, s, "greedy") for s in TEST_SPLITS] + [(f"{s}_pass@{k}", s, f"correct_of_{k}") for s in TEST_SPLITS]


def matrix(records: list[dict], split: str, field: str, k: int) -> np.ndarray:
    """[seeds, instances] of one method: 0/1 greedy, or pass@k (any of the k correct) from the counts."""
    m = np.asarray([r["instances"][split][field] for r in records], dtype=np.float64)
    return (m > 0).astype(np.float64) if field == f"correct_of_{k}" else m


def _t_share(records: list[dict]) -> tuple[float, int] | None:
    ts = [m["meta_grad_t"] for r in records for m in r.get("curves", {}).get("meta", [])
          if m.get("meta_grad_t") is not None]
    return (sum(abs(t) >= T_MIN for t in ts) / len(ts), len(ts)) if ts else None


def summarise(warm: dict | None, runs: list[dict], k: int) -> dict:
    names = [n for n, _, _ in metric_names(k)]
    out: dict = {}
    if warm is not None:
        out["warm_start"] = {n: {"mean": warm["accuracy"][n], "std": 0.0, "n_seeds": 1} for n in names
                             if n in warm["accuracy"]}
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        row = {n: {"mean": statistics.mean(r["accuracy"][n] for r in rs),
                   "std": statistics.stdev([r["accuracy"][n] for r in rs]) if len(rs) > 1 else 0.0,
                   "n_seeds": len(rs)} for n in names}
        mus = [r["curves"]["mu"] for r in rs]
        row["mu"] = {"mean_over_training": statistics.mean(statistics.mean(m) for m in mus),
                     "final_mean": statistics.mean(r["mu_final"] for r in rs)}
        share = _t_share(rs)
        if share is not None:
            row["meta_t"] = {"share_above": share[0], "n": share[1]}
        row["budget"] = {"steps": sorted({r["steps"] for r in rs}), "seeds": [r["seed"] for r in rs],
                         "rollouts_train": statistics.mean(r["rollouts_train"] for r in rs),
                         "rollouts_meta": statistics.mean(r["rollouts_meta"] for r in rs),
                         "wall_min": statistics.mean((r["train_s"] + r["eval_s"]) / 60 for r in rs),
                         "n_instances": {s: len(rs[0]["instances"][s]["greedy"]) for s in TEST_SPLITS},
                         "n_pass_k": {s: len(rs[0]["instances"][s][f"correct_of_{k}"]) for s in TEST_SPLITS}}
        out[method] = row
    return out


def paired(warm: dict | None, runs: list[dict], k: int, n_boot: int) -> dict:
    """AMFT − every other method, and every method − the warm start: paired bootstrap over instances
    (and seeds, resampled per method), amft_lib/significance.py."""
    from amft_lib.significance import paired_bootstrap

    by = {m: [r for r in runs if r["method"] == m] for m in dict.fromkeys(r["method"] for r in runs)}
    if warm is not None:
        by_warm = [warm]
    out: dict = {"amft_minus": {}, "minus_warm_start": {}}
    for name, split, fld in metric_names(k):
        for base, rs in by.items():
            if "amft" in by and base != "amft":
                d = paired_bootstrap(matrix(by["amft"], split, fld, k), matrix(rs, split, fld, k), n_boot=n_boot)
                out["amft_minus"].setdefault(base, {})[name] = {**d._asdict(), "significant": d.significant}
            if warm is not None:
                d = paired_bootstrap(matrix(rs, split, fld, k), matrix(by_warm, split, fld, k), n_boot=n_boot)
                out["minus_warm_start"].setdefault(base, {})[name] = {**d._asdict(), "significant": d.significant}
        if "amft" in by and warm is not None:
            d = paired_bootstrap(matrix(by["amft"], split, fld, k), matrix(by_warm, split, fld, k), n_boot=n_boot)
            out["amft_minus"].setdefault("warm_start", {})[name] = {**d._asdict(), "significant": d.significant}
    return out


def verdict(pairs: dict, progress: dict) -> str:
    """The plain answer to the study's question, from the test_ood CIs against sft_grpo and the tuned fixed μ."""
    if progress["done"] < progress["total"]:
        return (f"**Not answered yet**: {progress['done']} of {progress['total']} runs are finished "
                "(the same command resumes the study); the tables below are partial.")

    def found(split: str) -> dict:
        return {b: pairs["amft_minus"].get(b, {}).get(split) for b in ("sft_grpo", "fixed")}

    def detail(cells: dict) -> str:
        return "; ".join(f"AMFT − {b} = {c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]{' **' * c['significant']}"
                         for b, c in cells.items() if c is not None)

    cells = found("test_ood")
    if any(c is None for c in cells.values()):
        return "**Not answerable**: amft, sft_grpo or fixed has no finished run."
    if all(c["significant"] and c["diff"] > 0 for c in cells.values()):
        answer = "**Yes**: AMFT beats both"
    elif any(c["significant"] and c["diff"] < 0 for c in cells.values()):
        answer = "**No**: AMFT is significantly worse than at least one"
    else:
        answer = "**Not distinguishable at this budget**"
    # the target is out of distribution; in distribution is reported beside it so a trade is not hidden
    return (f"{answer} on test_ood (95 % paired CI, instances × seeds; ** = excludes 0): {detail(cells)}. "
            f"On test_id: {detail(found('test_id'))}.")


def markdown(summary: dict, pairs: dict, meta: dict, k: int) -> str:
    names = [n for n, _, _ in metric_names(k)]
    p = meta["progress"]
    follow = meta.get("follow_up")
    lines = [f"Command: `{meta['command']}`  ",
             *([f"Follow-up rows (beside the question's; not in its verdict or progress): "
                f"{', '.join(follow['rows'])} — `{follow['command']}`  "] if follow else []),
             f"Progress: {p['done']}/{p['total']} runs ({meta['spec']['steps']} RL steps each, seeds "
             f"{list(meta['seeds'])}); tuned on val: {meta['tuned'] or 'pending'}", "", verdict(pairs, p), "",
             f"Greedy pass@1 on every instance of each test split, pass@{k} on the first {meta['spec']['pass_k_rows']} "
             "of each; mean ± std over seeds. Rollouts per run: training + the meta step's validation rollouts. "
             f"\\|t\\| ≥ {T_MIN:g}: share of meta steps whose meta-gradient is above its standard error's noise.", "",
             "| method | seeds | " + " | ".join(names) + " | μ mean (final) | meta steps with \\|t\\| ≥ 2 "
             "| rollouts train + meta | min/run |",
             "|---" * (len(names) + 6) + "|"]
    for method, s in summary.items():
        cells = [f"{s[n]['mean']:.3f} ± {s[n]['std']:.3f}" if n in s else "–" for n in names]
        mu = f"{s['mu']['mean_over_training']:.2f} ({s['mu']['final_mean']:.2f})" if "mu" in s else "–"
        t = f"{s['meta_t']['share_above']:.0%} of {s['meta_t']['n']}" if "meta_t" in s else "–"
        b = s.get("budget")
        budget = f"{b['rollouts_train']:.0f} + {b['rollouts_meta']:.0f}" if b else "–"
        wall = f"{b['wall_min']:.1f}" if b else "–"
        seeds = len(b["seeds"]) if b else 1
        lines.append(f"| {method} | {seeds} | " + " | ".join(cells) + f" | {mu} | {t} | {budget} | {wall} |")
    for key, title in (("amft_minus", "AMFT − method"), ("minus_warm_start", "method − warm start")):
        if not pairs[key]:
            continue
        lines += ["", f"Paired bootstrap, {title}, 95 % CI (instances and seeds resampled); ** = CI excludes 0.", "",
                  f"| {title.split(' ')[0] if key == 'amft_minus' else 'method'} | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for base, cells in pairs[key].items():
            row = [f"{c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]{' **' if c['significant'] else ''}"
                   for c in (cells[n] for n in names)]
            label = f"AMFT − {base}" if key == "amft_minus" else base
            lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    """Val accuracy vs step (mean over seeds), μ per step (first seed) and t per meta step with the ±2 band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    methods = list(dict.fromkeys(r["method"] for r in runs))
    palette = plt.get_cmap("tab20").colors  # 12+ rows: the default 10-colour cycle would repeat colours
    for i, method in enumerate(methods):
        rs = [r for r in runs if r["method"] == method]
        style = {"color": "black", "linewidth": 2.4} if method == "amft" else {"color": palette[(2 * i) % 20 + (
            i >= 10)], "linewidth": 1.2}
        steps = [s for s, _ in rs[0]["curves"]["val"]]
        vals = [[v for _, v in r["curves"]["val"]] for r in rs if len(r["curves"]["val"]) == len(steps)]
        axes[0].plot(steps, np.mean(vals, axis=0), marker=".", label=f"{method} (n={len(vals)})", **style)
        axes[1].plot(rs[0]["curves"]["step"], rs[0]["curves"]["mu"], label=method, **style)
        for r in rs:
            meta = [(m["step"], m["meta_grad_t"]) for m in r["curves"]["meta"] if m.get("meta_grad_t") is not None]
            if meta:
                axes[2].plot(*zip(*meta, strict=True), marker="o", markersize=3, linestyle=":",
                             label=f"{method} s{r['seed']}")
    axes[2].axhspan(-T_MIN, T_MIN, color="grey", alpha=0.15, label=f"|t| < {T_MIN:g}: noise")
    for ax, title in zip(axes, ("greedy val accuracy (first eval_prompts val rows; mean over seeds)",
                                "μ (first seed)", "meta-gradient t = m / SE(m) per meta step"), strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _shown(path: Path) -> str:
    """A record's path as the checkout sees it (relative), or absolute for a study kept elsewhere."""
    root = RESULTS.parent.parent
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def report(study: Path, meta: dict, n_boot: int, out_dir: Path = RESULTS, out_stem: str = "methods_countdown") -> str:
    """Rebuild <out_dir>/<out_stem>.{json,md} and <out_stem>_curves.png from the study's records (the
    README renders bench/results'; a study kept elsewhere (--study) reports beside its records)."""
    from study_countdown import write_json

    methods, seeds, k = tuple(meta["methods"]), tuple(meta["seeds"]), meta["spec"]["pass_k"]
    warm, runs = load(study, methods, seeds)
    question = set(meta.get("question", methods))  # follow-up rows are reported, not counted as progress
    meta = {**meta, "progress": {"done": sum(r["method"] in question for r in runs),
                                 "total": len(question) * len(seeds)}}
    summary = summarise(warm, runs, k)
    pairs = paired(warm, runs, k, n_boot) if runs else {"amft_minus": {}, "minus_warm_start": {}}
    light = [{k2: v for k2, v in r.items() if k2 not in ("instances", "curves", "config")}
             | {"record": _shown(run_path(study, r["method"], r["seed"])),
                "n_instances": {s: len(r["instances"][s]["greedy"]) for s in TEST_SPLITS}} for r in runs]
    write_json(out_dir / f"{out_stem}.json", {"meta": meta, "summary": summary, "paired": pairs, "runs": light})
    md = markdown(summary, pairs, meta, k)
    tmp = out_dir / f"{out_stem}.md.tmp"
    tmp.write_text(md)
    tmp.replace(out_dir / f"{out_stem}.md")
    if runs:
        plot(runs, out_dir / f"{out_stem}_curves.png")
    return md

