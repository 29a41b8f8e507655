"""Reports people read: the evaluation report and the training-curves page.

Why a document model: the evaluation report ships as Markdown (KFP UI) and HTML (offline, KFP UI);
written twice they drifted. A report is built once as a list of blocks (`Heading`, `Text`,
`Table`, `Bullets`, `Figure`, `Code`) and `to_markdown` / `to_html` render it. Both renderers
escape every piece of text (model output, row ids and paths are untrusted) and embed figures as
`data:` URIs, so a report renders the same in the KFP UI, a browser or a mail attachment, with no
link to follow and no file beside it to lose.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# The held-out splits evaluate scores (its config's default) and every report tabulates, in report order.
# Defined here, below evaluate, so evaluate → reports is the only direction between the two modules.
EVAL_SPLITS = ("test_id", "test_ood")

# ── the document model ──────────────────────────────────────────────────────────────────────────


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Text:
    """A paragraph. `kind` styles it in HTML (verdict-yes / verdict-no); Markdown shows `strong` bold."""

    text: str
    strong: str = ""
    kind: str = ""


@dataclass
class Cell:
    text: str
    kind: str = ""  # improvement / regression / same / neutral: colour in HTML only


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]


@dataclass
class Bullets:
    items: list[Cell]


@dataclass
class Figure:
    name: str
    png: bytes


@dataclass
class Code:
    label: str
    text: str


Block = Heading | Text | Table | Bullets | Figure | Code


@dataclass
class Report:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> Report:
        self.blocks.extend(blocks)
        return self


# ── renderers ───────────────────────────────────────────────────────────────────────────────────

_MD_SPECIAL = re.compile(r"([\\`\[\]|])")  # what could close a code span, open a link or split a cell
_HTML_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def md_escape(text: Any) -> str:
    """Untrusted text (row ids, model paths, reasons) as inert one-line Markdown.

    The characters that could close a code span, open a link or split a table cell get a backslash
    (CommonMark: an escaped ASCII punctuation character is a literal; emphasis marks stay, harmless);
    `<`, `>` and `&` become entities, which every renderer shows as text (some, like Python-Markdown,
    ignore a backslash before `<`); `://` is broken up so nothing autolinks. So a row id such as
    ``a`</code><script>`` can neither close a code span nor open a tag, nor `|` split a cell."""
    text = _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))
    return re.sub(r"[&<>]", lambda m: _HTML_ENTITIES[m.group()], text).replace("://", ":\\/\\/")


def _fence(text: str) -> str:
    """A code fence longer than any backtick run inside `text` (CommonMark)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def to_markdown(report: Report) -> str:
    out = [f"# {md_escape(report.title)}", ""]
    for b in report.blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + md_escape(b.text), ""]
        elif isinstance(b, Text):
            lead = f"**{md_escape(b.strong)}** " if b.strong else ""
            out += [lead + md_escape(b.text), ""]
        elif isinstance(b, Table):
            out.append("| " + " | ".join(md_escape(h) for h in b.header) + " |")
            out.append("|" + "---|" * len(b.header))
            out += ["| " + " | ".join(md_escape(c.text) for c in row) + " |" for row in b.rows]
            out.append("")
        elif isinstance(b, Bullets):
            out += [f"- {md_escape(c.text)}" for c in b.items] + [""]
        elif isinstance(b, Figure):
            out += [f"![{md_escape(b.name)}]({_data_uri(b.png)})", ""]
        elif isinstance(b, Code):
            fence = _fence(b.text)
            out += [md_escape(b.label), "", fence + "text", b.text, fence, ""]
    return "\n".join(out).rstrip() + "\n"


def h(text: Any) -> str:
    """HTML-escape untrusted text and defuse anything URL-shaped, so no reference is followed."""
    return html.escape(str(text)).replace("://", ":&#47;&#47;")


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}.improvement{color:#0a7a2f}.noise{color:#777}.regression{color:#b3261e;font-weight:600}
.yes{background:#e3f5e8;padding:.6em 1em;border-radius:.4em}.no{background:#fbe4e2;padding:.6em 1em;border-radius:.4em}
pre{background:#f5f5f5;padding:.6em;white-space:pre-wrap}img{max-width:100%}figure{display:inline-block;margin:.5em}"""


def to_html(report: Report) -> str:
    """Self-contained HTML: inline CSS, figures as data URIs, no scripts or links."""
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
           f"<title>{h(report.title)}</title><style>{_CSS}</style></head><body>", f"<h1>{h(report.title)}</h1>"]
    for b in report.blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{h(b.text)}</h{b.level}>")
        elif isinstance(b, Text):
            lead = f"<b>{h(b.strong)}</b> " if b.strong else ""
            out.append(f"<p class='{h(b.kind)}'>{lead}{h(b.text)}</p>")
        elif isinstance(b, Table):
            out.append("<table><tr>" + "".join(f"<th>{h(x)}</th>" for x in b.header) + "</tr>")
            out += ["<tr>" + "".join(f"<td class='{h(c.kind)}'>{h(c.text)}</td>" for c in row) + "</tr>"
                    for row in b.rows]
            out.append("</table>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li class='{h(c.kind)}'>{h(c.text)}</li>" for c in b.items) + "</ul>")
        elif isinstance(b, Figure):
            out.append(f"<figure><img alt='{h(b.name)}' src='{_data_uri(b.png)}'></figure>")
        elif isinstance(b, Code):
            out.append(f"<p>{h(b.label)}</p><pre>{h(b.text)}</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def fmt(value: Any) -> str:
    """Numbers as people read them: ints as is, floats to 4 significant decimals, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"


# ── training curves ─────────────────────────────────────────────────────────────────────────────

CURVE_NAMES = ("mu", "reward_mean", "entropy", "target_entropy", "sft_loss", "rl_loss", "val_reward", "val_accuracy")


def read_training_curves(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Per-step series from `metrics.jsonl` ([(step, value)] per metric; nulls dropped). The final
    record (``"final": true``) only contributes its `val_reward` and `val_accuracy`. Also, when the
    run folder has them: `meta_step` (μ at each step a meta-gradient was taken, controller.jsonl),
    `meta_t` (t = m/SE(m) of each meta step) with `t_min_hi` / `t_min_lo` (±controller.meta_t_min: inside the
    band the evidence rule holds μ) and `mu_min` / `mu_max` (the bounds from config.yaml, over the run's steps)."""
    import yaml

    from amft_lib import storage

    curves = _metric_curves(storage.get_bytes(storage.join(run_dir, "metrics.jsonl")).decode("utf-8"))
    steps = [s for s, _ in curves["mu"]]
    try:
        controller = storage.get_bytes(storage.join(run_dir, "controller.jsonl")).decode("utf-8")
        records = [json.loads(line) for line in controller.splitlines() if line.strip()]
        curves["meta_step"] = [(int(r["step"]), float(r["mu"])) for r in records if r.get("meta_grad") is not None]
        curves["meta_t"] = [(int(r["step"]), float(r["meta_grad_t"])) for r in records
                            if isinstance(r.get("meta_grad_t"), int | float) and math.isfinite(r["meta_grad_t"])]
        bounds = (yaml.safe_load(storage.get_bytes(storage.join(run_dir, "config.yaml"))) or {}).get("controller", {})
        for key in ("mu_min", "mu_max"):
            if steps and isinstance(bounds.get(key), int | float):
                curves[key] = [(steps[0], float(bounds[key])), (steps[-1], float(bounds[key]))]
        t_min = bounds.get("meta_t_min")
        if curves["meta_t"] and isinstance(t_min, int | float):
            first, last = curves["meta_t"][0][0], curves["meta_t"][-1][0]
            curves["t_min_hi"] = [(first, float(t_min)), (last, float(t_min))]
            curves["t_min_lo"] = [(first, -float(t_min)), (last, -float(t_min))]
    except storage.ObjectNotFoundError:
        pass  # an older or partial run folder: the curves alone
    return curves


def _metric_curves(text: str) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {n: [] for n in CURVE_NAMES}
    for line in text.splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        step = int(rec.get("step", 0))
        for name in CURVE_NAMES:
            if rec.get("final") and name not in ("val_reward", "val_accuracy"):
                continue
            value = rec.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                curves[name].append((step, float(value)))
    return curves


# (file stem, title, y label, [(series, label, style)], fixed y range or None)
PLOTS = (
    # a fixed 0..1 axis: autoscaled, a 0.005 drift of μ looked dramatic
    ("mu", "μ (weight of the SFT loss), its bounds and meta-gradient steps", "μ",
     [("mu", "μ", "-"), ("mu_min", "μ bounds", "k:"), ("mu_max", "", "k:"), ("meta_step", "meta-gradient step", "x")],
     (0.0, 1.0)),
    ("meta_t", "meta-gradient evidence t = m / SE(m) per meta step", "t",
     [("meta_t", "t", "o"), ("t_min_hi", "±meta_t_min (μ held inside)", "k--"), ("t_min_lo", "", "k--")], None),
    ("reward", "rollout reward (sampled, on training prompts)", "mean reward", [("reward_mean", "reward_mean", "-")],
     None),
    ("entropy", "policy entropy vs target H*", "nats/token",
     [("entropy", "entropy H_t", "-"), ("target_entropy", "target H*", "--")], None),
    ("losses", "SFT and RL losses", "loss", [("sft_loss", "sft_loss", "-"), ("rl_loss", "rl_loss", "-")], None),
    ("val_reward", "validation prompts: sampled reward Û(θ) and greedy accuracy", "reward / accuracy",
     [("val_reward", "val_reward (sampled)", "o-"), ("val_accuracy", "val_accuracy (greedy)", "s--")], (0.0, 1.0)),
)


# drawn on a plot that has data, never a plot of their own
_MARKS = ("mu_min", "mu_max", "meta_step", "t_min_hi", "t_min_lo")


def plot_training_curves(curves: Mapping[str, Sequence[tuple[int, float]]]) -> dict[str, bytes]:
    """PNG bytes per plot (mu, meta_t, reward, entropy, losses, val_reward); plots with no data are left out.

    Uses matplotlib's object API with the Agg canvas: no pyplot global state, no display needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    pngs: dict[str, bytes] = {}
    for stem, title, ylabel, series, ylim in PLOTS:
        if not any(curves.get(name) for name, _, _ in series if name not in _MARKS):
            continue
        fig = MplFigure(figsize=(6.0, 3.2), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for name, label, style in series:
            points = curves.get(name) or []
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label or None,
                        linewidth=1.4, markersize=4)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        pngs[stem] = buf.getvalue()
    return pngs


def training_report(run_dir: str, result: Mapping[str, Any]) -> Report:
    """The training page: the result's numbers and the μ, reward, entropy, loss and validation curves."""
    pngs = plot_training_curves(read_training_curves(run_dir))
    report = Report("AMFT training")
    report.add(Table(["field", "value"], [[Cell(str(k)), Cell(fmt(v))] for k, v in result.items()]))
    report.add(*(Figure(stem, png) for stem, png in pngs.items()))
    return report


def training_report_html(run_dir: str, result: Mapping[str, Any]) -> str:
    return to_html(training_report(run_dir, result))


# ── the evaluation report ───────────────────────────────────────────────────────────────────────

ROLE_TITLES = {"candidate": "candidate", "base": "base", "warm_start": "warm start", "champion": "champion"}
_ROWS = (  # (field, label, better: +1 higher, -1 lower, 0 neutral)
    ("accuracy", "accuracy (pass@1, greedy)", 1),
    ("pass_at_k", "pass@k", 1),
    ("format_error_rate", "format error rate", -1),
    ("mean_response_tokens", "mean response tokens", 0),
    ("n", "n", 0),
)
_EPS = 1e-9


def noise_band(p: float, n: int) -> float:
    """Half-width of the 95 % normal interval of an accuracy `p` measured on `n` prompts (the floor
    1/n keeps it non-zero at p = 0 or 1): differences inside it are sampling noise."""
    return 1.96 * math.sqrt(max(p * (1 - p), 1 / n) / n) if n else 0.0


def _delta(cand: Any, other: Any, better: int, noise: float = 0.0) -> tuple[str, str]:
    """(text, kind) for candidate − other; kind is improvement, regression, noise (inside the
    candidate's noise band: not coloured as a change), same, or neutral (`better` = 0: neither
    better nor worse, such as response length)."""
    if not isinstance(cand, int | float) or not isinstance(other, int | float):
        return "", "neutral"
    diff = cand - other
    if abs(diff) <= _EPS:
        return "±0", "same"
    if better == 0:
        return f"{diff:+.4g}", "neutral"
    if abs(diff) < noise:
        return f"{diff:+.4f} (noise)", "noise"
    kind = "improvement" if diff * better > 0 else "regression"
    return f"{'▲' if diff > 0 else '▼'} {diff:+.4f}", kind


def comparison_rows(metrics: Mapping[str, Any], split: str) -> list[dict[str, Any]]:
    """Table rows for one split: the candidate's value and, per comparison model, its value and the
    signed difference candidate − model with whether that is an improvement or a regression."""
    cand = metrics.get(split) or {}
    rows = []
    for fld, label, better in _ROWS:
        if fld == "pass_at_k" and cand.get("k"):
            temperature = (metrics.get("decoding") or {}).get("temperature")
            label = f"pass@{cand['k']} ({cand.get('n_samples')} samples/prompt, T={temperature})"
        row: dict[str, Any] = {"field": fld, "label": label, "candidate": cand.get(fld), "others": {}}
        value = cand.get(fld)
        noise = noise_band(value, cand.get("n") or 0) if fld in ("accuracy", "pass_at_k") and value is not None \
            else 0.0
        for role, comp in (metrics.get("comparisons") or {}).items():
            other = (comp.get(split) or {}).get(fld)
            text, kind = _delta(value, other, better, noise)
            row["others"][role] = {"value": other, "delta": text, "kind": kind}
        rows.append(row)
    return rows


def _eval_splits(metrics: Mapping[str, Any]) -> list[str]:
    return [s for s in EVAL_SPLITS if s in metrics]


def changes(metrics: Mapping[str, Any]) -> dict[str, list[str]]:
    """Improvements and regressions of the gated fields and format errors, per comparison model."""
    out: dict[str, list[str]] = {}
    for role in metrics.get("comparisons") or {}:
        lines = []
        for split in _eval_splits(metrics):
            for row in comparison_rows(metrics, split):
                info = row["others"][role]
                if info["kind"] in ("improvement", "regression"):
                    lines.append(f"{split} {row['field']}: {info['kind']} {info['delta']} "
                                 f"({fmt(info['value'])} -> {fmt(row['candidate'])})")
        out[role] = lines
    return out


def _std_err_note(metrics: Mapping[str, Any]) -> str:
    parts = []
    for split in _eval_splits(metrics):
        m = metrics[split]
        if isinstance(m, Mapping) and m.get("n"):
            parts.append(f"{split} ±{noise_band(m['accuracy'], m['n']):.3f}")
    return ("Accuracy differences smaller than the 95% interval of the candidate's accuracy ("
            + ", ".join(parts) + ") are marked (noise) and not counted as changes.") if parts else ""


def _rule(b: Mapping[str, Any]) -> str:
    """The blessing rule in one sentence, with the warm-start check when it was applied: a reader of the
    report must see every condition that could have refused the candidate, not only the champion's."""
    rule = (f"Rule: {b.get('metric')} ≥ {b.get('threshold')} and no drop larger than δ={b.get('max_regression')} "
            "vs the champion on any eval split (change check skipped without a champion)")
    if b.get("warm_start_check"):
        rule += (f", and {b.get('metric')} not significantly below the warm start's (paired bootstrap per instance, "
                 "95 % CI; skipped without a scored warm start)")
    return rule + "."


def evaluation_report(metrics: Mapping[str, Any], plots: Mapping[str, bytes],
                      samples: Mapping[str, list[dict]]) -> Report:
    """Verdict, the rule, comparison tables per split, improvements/regressions, training curves and
    sample completions — the one model `report.md` and `report.html` are rendered from."""
    roles = list((metrics.get("comparisons") or {}).keys())
    b = metrics.get("blessing", {})
    blessed = bool(metrics.get("blessed"))
    report = Report(f"Evaluation: candidate vs {', '.join(ROLE_TITLES[r] for r in roles) or 'nothing'}")
    report.add(Text(str(metrics.get("reason")), strong="BLESSED —" if blessed else "NOT BLESSED —",
                    kind="yes" if blessed else "no"),
               Text(f"Candidate: {metrics.get('model')}; data: {metrics.get('data')}; task: {metrics.get('task')}."),
               Text(_rule(b)))
    for split in _eval_splits(metrics):
        header = ["metric", "candidate"]
        for role in roles:
            header += [ROLE_TITLES[role], f"Δ vs {ROLE_TITLES[role]}"]
        rows = []
        for row in comparison_rows(metrics, split):
            cells = [Cell(row["label"]), Cell(fmt(row["candidate"]))]
            for role in roles:
                info = row["others"][role]
                cells += [Cell(fmt(info["value"])), Cell(info["delta"], info["kind"])]
            rows.append(cells)
        report.add(Heading(2, split), Table(header, rows))
    note = _std_err_note(metrics)
    if note:
        report.add(Text(note))
    chart = accuracy_chart(metrics)
    if chart:
        report.add(Figure("accuracy by model and split", chart))
    for role, items in changes(metrics).items():
        model = metrics["comparisons"][role]["model"]
        report.add(Heading(3, f"Improvements and regressions vs {ROLE_TITLES[role]} ({model})"),
                   Bullets([Cell(i, "regression" if " regression " in i else "improvement") for i in items]
                           or [Cell("no change")]))
    if plots:
        report.add(Heading(2, "Training curves"), *(Figure(stem, png) for stem, png in plots.items()))
    if any(samples.values()):
        report.add(Heading(2, "Sample completions (candidate, greedy)"))
        for split, items in samples.items():
            report.add(*(Code(f"{split} {s.get('id')}: {'solved' if s['reward'] > 0.5 else 'failed'}",
                              f"{s.get('prompt', '').rstrip()}\n── completion ──\n{s['completion']}")
                         for s in items))
    return report


def accuracy_chart(metrics: Mapping[str, Any]) -> bytes | None:
    """Grouped bars: greedy accuracy per eval split for every model (candidate and comparisons),
    each with its 95 % noise band as an error bar."""
    splits = _eval_splits(metrics)
    if not splits:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    models = [("candidate", metrics)] + [(ROLE_TITLES[r], c) for r, c in (metrics.get("comparisons") or {}).items()]
    fig = MplFigure(figsize=(6.0, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(models)
    for i, (label, block) in enumerate(models):
        values = [((block.get(s) or {}).get("accuracy") or 0.0) for s in splits]
        errors = [noise_band(v, (block.get(s) or {}).get("n") or 0) for v, s in zip(values, splits, strict=True)]
        ax.bar([j + i * width for j in range(len(splits))], values, width, yerr=errors, capsize=3, label=label)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(splits))], splits)
    ax.set_ylabel("accuracy (greedy pass@1)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
