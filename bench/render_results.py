"""Regenerate README.md's Results section from bench/results/*.json (run after any benchmark).

    python bench/render_results.py
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
DEMO_BEGIN, DEMO_END = "<!-- demo:begin -->", "<!-- demo:end -->"
DEMO_RECORD = RESULTS / "demo_run.json"  # `amft pipeline run-local --record` of the demo run the README shows


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def methods_section() -> list[str]:
    out = []
    for stem in ("methods", "methods_temp1"):
        data = _load(f"{stem}.json")
        if not data:
            continue
        meta, summary = data["meta"], data["summary"]
        out += [f"**Methods on unseen hands (key split)** — tiny model, {meta['steps']} steps, seeds {meta['seeds']}, "
                "one shared warm start; greedy pass@1 on every row of each split, mean ± std over seeds. "
                f"Command: `{meta['command']}`", "",
                "| method | val | test_id | test_ood |", "|---|---|---|---|"]
        for method, s in summary.items():
            if method == "warm_start":  # the common starting point, one greedy evaluation
                out.append("| *warm start (start of every run)* | " + " | ".join(
                    f"{s[k]['mean']:.3f}" if k in s else "–" for k in ("val", "test_id", "test_ood")) + " |")
                continue
            cells = [f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" if k in s else "–"
                     for k in ("val", "test_id", "test_ood")]
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
        reading = RESULTS / f"{stem}_reading.md"
        if reading.exists():
            out += [reading.read_text().strip(), ""]
        if (RESULTS / f"{stem}_curves.png").exists():
            out += [f"![val accuracy, μ and entropy per method (seed 0)](bench/results/{stem}_curves.png)", ""]
    tuning = _load("tuning.json")
    if tuning:
        runs = tuning["runs"]
        commands = [*tuning["meta"].get("earlier_sweeps", []), tuning["meta"]["command"]]
        out += ["**Tuning sweeps on val only** (seed 0, from the same warm start; "
                + ", ".join(f"`{c}`" for c in commands) + "): " + "; ".join(
                    f"{' '.join(x.split('=')[0].split('.')[-1] + '=' + x.split('=')[1] for x in r['extra'])}"
                    f"{' (' + str(r['steps']) + ' steps)' if 'steps' in r else ''} → {r['accuracy']['val']:.3f}"
                    for r in runs) + ".", ""]
    out += ["Superseded results (first demonstration format, prompt split) are kept in `bench/results/archive/`.", ""]
    return out


def countdown_section() -> list[str]:
    """The study (bench/study_countdown.py → bench/results/methods_countdown.md: its progress, verdict, table
    and paired CIs), its reading, its curves, then the meta-gradient's signal-to-noise table."""
    out = []
    table = RESULTS / "methods_countdown.md"
    if table.exists():
        out += ["**The study: does a meta-learned μ beat a tuned fixed μ and a bug-free SFT→RL at equal compute?** — "
                "Countdown (3 numbers 1..20 to a target ≤ 100; OOD: targets 101..200), tiny model, one shared warm "
                "start, the same rollouts and SFT batch per step for every method, every one of the 2000 test_id "
                "and 2000 test_ood instances. `amft bench methods --task countdown` resumes it: each finished run's "
                "record is committed under `bench/results/study_countdown/`.", "", table.read_text().strip(), ""]
        reading = RESULTS / "methods_countdown_reading.md"
        if reading.exists():
            out += [reading.read_text().strip(), ""]
        if (RESULTS / "methods_countdown_curves.png").exists():
            out += ["![study: val accuracy per method, μ, and the meta-gradient's t per meta step]"
                    "(bench/results/methods_countdown_curves.png)", ""]
    second = RESULTS / "study_countdown_smollm2" / "methods_countdown.md"
    if second.exists():  # issue 24 item 5: the same question on a second, pretrained model family
        out += ["**The same question on a pretrained model: SmolLM2-135M-Instruct + LoRA** (amft vs the two tuned "
                "baselines, one seed, the tiny study's tuned values transferred; "
                "`bench/results/study_countdown_smollm2/`):", "", second.read_text().strip(), ""]
        reading = second.with_name("reading.md")
        if reading.exists():
            out += [reading.read_text().strip(), ""]
        if second.with_name("methods_countdown_curves.png").exists():
            out += ["![SmolLM2 study: val accuracy, μ and t per meta step]"
                    "(bench/results/study_countdown_smollm2/methods_countdown_curves.png)", ""]
    snr = RESULTS / "snr_countdown.md"
    if snr.exists():
        lines = snr.read_text().strip().splitlines()
        out += ["**Is the meta-gradient above noise?** " + "\n".join(x for x in lines if not x.startswith("# ")), ""]
        reading = RESULTS / "snr_countdown_reading.md"
        if reading.exists():
            out += [reading.read_text().strip(), ""]
    return out


def speed_section() -> list[str]:
    out = []
    speed = RESULTS / "speed.md"
    if speed.exists():
        text, _, engine = speed.read_text().partition("## Engine")
        table = [line for line in text.splitlines() if line.startswith("|")]
        out += ["**Speed vs TRL** (`python bench/bench_speed.py`, CPU, tiny model, B=8 × G=8, 64 new tokens):", "",
                *table, ""]
        if engine:  # issue 25's section: its own table and notes, kept apart from the one above
            out += [f"**Engine{engine.splitlines()[0]}**", *engine.splitlines()[1:], ""]
    rows = sorted(RESULTS.glob("step_time_*.json"))
    if rows:
        out += ["**Step time split** (`bench/bench_step.py`; T_meta = 10; GPU rows from `bench/gpu_check.sh`):", "",
                "| run | device | step s | rollout s | fwd/bwd s | meta s (amortised) | meta overhead |",
                "|---|---|---|---|---|---|---|"]
        for path in rows:
            r = json.loads(path.read_text())
            out.append(f"| {r['label']} | {r['device']} | {r['mean_step_s']:.3f} | {r['mean_rollout_s']:.3f} | "
                       f"{r['mean_update_s']:.3f} | {r['mean_meta_s_amortised']:.3f} | "
                       f"{r['meta_overhead_pct']:.1f} % |")
        out.append("")
    gpu = _load("gpu_check.json")
    if gpu:
        f = gpu["train_fwd_bwd"]
        out += [f"**GPU check** ({gpu['device']}, torch {gpu['torch']}): bf16 matmul "
                f"{gpu['matmul_bf16_flops'] / 1e12:.0f} TFLOP/s; bf16-mixed SFT loss "
                f"{gpu['sft_sanity']['loss_first5']:.2f} → "
                f"{gpu['sft_sanity']['loss_last5']:.2f} in 60 steps; SmolLM2-135M-architecture train step "
                f"(32×256) {f['tokens_per_s']:.0f} tokens/s = {f['achieved_flops'] / 1e12:.0f} TFLOP/s "
                f"({100 * f['utilisation_of_matmul_peak']:.1f} % of the matmul peak).", ""]
    return out


def distributed_section() -> list[str]:
    """World size 1 vs 2 (bench/bench_distributed.py): the table and the plot, with the machine it ran on."""
    record = _load("distributed.json")
    if not record:
        return []
    m = record["machine"]
    where = m.get("gpu") or f"{m.get('cpu', 'CPU')}, {m['cpu_count']} cores, gloo"
    out = [f"**Scale out: world size 1 vs 2** (`{record['command']}`, `amft train --config {record['config']}`, "
           f"{record['steps']} steps with the first dropped, median of {record['repeats']} interleaved repeats; "
           f"{where}; load average before {record['loadavg_before'][0]:.2f}):", ""]
    out.append((RESULTS / "distributed.md").read_text().rstrip())
    out += ["", "![steps/s and tokens/s by world size](bench/results/distributed.png)", ""]
    return out


def demo_section() -> str:
    """The README's demo section, from the committed run record (tests/unit/test_readme.py compares them)."""
    from pipelines.local import demo_markdown

    return demo_markdown(json.loads(DEMO_RECORD.read_text()))


def replace_between(text: str, begin: str, end: str, body: str) -> str:
    return re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{body}{end}", text, flags=re.S)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help, and no stray arguments
    sections = [*countdown_section(), *methods_section(), *speed_section(), *distributed_section()]
    body = "\n".join(sections).rstrip() + "\n"
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = replace_between(text, BEGIN, END, body)
    if DEMO_RECORD.exists():
        new = replace_between(new, DEMO_BEGIN, DEMO_END, demo_section())
    readme.write_text(new)
    print(body)


if __name__ == "__main__":
    main()
