"""`amft evaluate`: score a candidate on the ID and OOD test splits, compare it with the base,
warm-start and champion models, and decide whether it is blessed.

What is measured, per eval split present in the dataset (`test_id`, `test_ood`) and per model:
- `accuracy`: pass@1 under greedy decoding (the number the paper reports);
- `pass_at_k`: the unbiased pass@k of Chen et al. (2021), 1 − C(n−c, k)/C(n, k) averaged over
  prompts, from `n_samples` completions per prompt at `temperature` (c of them correct);
- `n`, `format_error_rate` (no parsable answer, greedy) and `mean_response_tokens` (greedy).

Blessing follows TFX's Evaluator (research anchors B, F.5): an absolute threshold on one chosen
metric AND no regression beyond δ against the current champion on every eval split; the change
check is skipped, and the reason says so, when there is no champion (first run). The decision is
the pure function :func:`decide_blessing`, so it is table-tested without a model.

Outputs in `out_dir` (local folder or s3:// URI), each written atomically, `metrics.json` last so
its presence means the evaluation finished: `report.md`, `report.html` (self-contained: inline
CSS, plots as base64 PNG, no external references), `plots/*.png` (training curves, when a run
dir is given) and `metrics.json` (DESIGN.md "Evaluation" contract plus the comparison models).
"""

from __future__ import annotations

import base64
import dataclasses
import gc
import html
import io
import json
import logging
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amft_lib import lineage, storage
from amft_lib.config import ConfigError, check_fields
from amft_lib.data.schema import DataError

log = logging.getLogger(__name__)

EVAL_SPLITS = ("test_id", "test_ood")
# Metrics the blessing may gate on: both "higher is better", so a regression is a decrease.
GATE_FIELDS = ("accuracy", "pass_at_k")
COMPARISON_ROLES = ("base", "warm_start", "champion")
ROLE_TITLES = {"candidate": "candidate", "base": "base", "warm_start": "warm start", "champion": "champion"}
METRICS_FILE = "metrics.json"
SCHEMA_VERSION = 1
_EPS = 1e-9  # float slack so "exactly δ worse" or "exactly at threshold" is not decided by rounding


def _help(text: str, default: Any = dataclasses.MISSING) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class EvalConfig:
    """What to evaluate, how to decode, and the blessing rule."""

    # ── inputs ──
    model: str = _help("Candidate model: HF directory, s3:// folder, or models:/NAME@ALIAS|models:/NAME/VERSION.")
    data: str = _help("Prepared dataset (`amft data prepare` output): folder, parquet file or s3:// URI.")
    out_dir: str = _help("Where metrics.json, the reports and plots go (folder or s3:// URI).")
    base_model: str | None = _help(
        "Base model to compare with (same forms as `model`, or `tiny`/`smollm2-135m`). Optional.", None
    )
    warm_start_model: str | None = _help("Warm-start model to compare with. Optional.", None)
    champion_model: str | None = _help(
        "Current champion (e.g. models:/amft-gp@champion). When it does not resolve (first run), the "
        "change check is skipped. Optional.",
        None,
    )
    run_dir: str | None = _help(
        "Training output folder (metrics.jsonl, controller.jsonl) for the training-curve plots. Optional.", None
    )
    tracking_uri: str | None = _help("MLflow tracking URI for models:/ URIs (default: see amft_lib.registry).", None)
    task: str | None = _help("Verifier to score with; default: the dataset's `task` column.", None)
    splits: list = _help("Eval splits to score, when present in the dataset.", list(EVAL_SPLITS))
    max_examples: int = _help("Score at most this many prompts per split (first rows; 0 = all).", 0)
    # ── decoding ──
    max_new_tokens: int = _help("Maximum completion length in tokens (greedy and sampled).", 96)
    pass_k: int = _help("k of pass@k.", 4)
    n_samples: int = _help(
        "Completions sampled per prompt for pass@k (n >= k; more gives a lower-variance estimate). 0 skips pass@k.", 8
    )
    temperature: float = _help("Sampling temperature for pass@k.", 1.0)
    top_p: float = _help("Nucleus threshold for pass@k sampling; 1.0 disables it.", 1.0)
    batch_size: int = _help(
        "Prompts per generation call (memory/speed knob). Greedy results do not depend on it beyond float "
        "rounding; pass@k samples are drawn in a different order when it changes, so keep it fixed when "
        "comparing runs.",
        64,
    )
    seed: int = _help("Seed of the pass@k sampling; every model gets the same seed per split.", 0)
    chat_template: bool = _help("Wrap prompts with the tokenizer's chat template (instruct models).", False)
    device: str = _help("`auto` (cuda if available), `cpu` or `cuda`.", "auto")
    dtype: str = _help("Parameter dtype: float32, bfloat16 (GPU) or float64.", "float32")
    # ── blessing ──
    metric: str = _help("Gating metric as SPLIT.FIELD, FIELD in accuracy | pass_at_k (higher is better).",
                        "test_id.accuracy")
    threshold: float = _help("Absolute lower bound of the gating metric (TFX value_threshold).", 0.0)
    max_regression: float = _help(
        "δ: the largest drop of FIELD vs the champion tolerated on any eval split (TFX change_threshold).", 0.0
    )
    report_samples: int = _help("Completions per split shown in the reports.", 3)

    def __post_init__(self) -> None:
        check_fields(self, "eval.")  # NaN/inf in any number (temperature, threshold, δ) is refused here
        for name in ("model", "data", "out_dir"):
            if not getattr(self, name):
                raise ConfigError(f"eval.{name} is required")
        split, _, fld = self.metric.partition(".")
        if not split or fld not in GATE_FIELDS:
            raise ConfigError(
                f"eval.metric={self.metric!r}: use SPLIT.FIELD with FIELD in {', '.join(GATE_FIELDS)}, "
                "e.g. test_id.accuracy"
            )
        if self.pass_k < 1:
            raise ConfigError(f"eval.pass_k={self.pass_k}: must be >= 1")
        if self.n_samples and self.n_samples < self.pass_k:
            raise ConfigError(
                f"eval.n_samples={self.n_samples} < eval.pass_k={self.pass_k}: pass@k needs n >= k "
                "(or n_samples=0 to skip pass@k)"
            )
        if self.n_samples < 0 or self.max_examples < 0:
            raise ConfigError("eval.n_samples and eval.max_examples must be >= 0")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("eval.max_new_tokens and eval.batch_size must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"eval.temperature={self.temperature}: must be > 0 (greedy is always measured)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"eval.top_p={self.top_p}: must be in (0, 1]")
        if not 0 <= self.threshold <= 1:
            raise ConfigError(f"eval.threshold={self.threshold}: {fld} is a rate, use a value in [0, 1]")
        if self.max_regression < 0:
            raise ConfigError(f"eval.max_regression={self.max_regression}: δ must be >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"eval.device={self.device!r}: choose auto, cpu or cuda")
        if self.dtype not in ("float32", "bfloat16", "float64"):
            raise ConfigError(f"eval.dtype={self.dtype!r}: choose float32, bfloat16 or float64")
        unknown = [s for s in self.splits if s not in ("train", "val", *EVAL_SPLITS)]
        if unknown or not self.splits:
            raise ConfigError(f"eval.splits={self.splits}: choose from val, test_id, test_ood")


@dataclass
class EvalResult:
    """What run_evaluate wrote; `metrics` is the content of metrics.json."""

    blessed: bool
    reason: str
    metrics: dict[str, Any]
    out_dir: str
    files: list[str]
    elapsed_s: float


# ── the estimator ───────────────────────────────────────────────────────────────────────────────


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt: 1 − C(n−c, k) / C(n, k) (Chen et al. 2021, Eq. 1).

    n: completions sampled, c: correct ones, k <= n. Exact integer binomials (n is small).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset contains a correct completion
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(correct: Sequence[int], n: int, k: int) -> float:
    """pass@k averaged over prompts, `correct[i]` = c for prompt i."""
    if not correct:
        raise ValueError("mean_pass_at_k needs at least one prompt")
    return sum(pass_at_k(n, c, k) for c in correct) / len(correct)


# ── blessing (pure) ─────────────────────────────────────────────────────────────────────────────


def _metric(metrics: Mapping[str, Any] | None, split: str, fld: str) -> float | None:
    """metrics[split][fld] as a finite float, else None (absent, null, NaN, not a number)."""
    block = (metrics or {}).get(split)
    value = block.get(fld) if isinstance(block, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def decide_blessing(
    candidate_metrics: Mapping[str, Any],
    champion_metrics: Mapping[str, Any] | None,
    metric: str = "test_id.accuracy",
    threshold: float = 0.0,
    max_regression: float = 0.0,
) -> tuple[bool, str]:
    """TFX-style blessing: `metric` (SPLIT.FIELD) >= `threshold` AND, when there is a champion, FIELD
    dropped by at most `max_regression` (δ) on every eval split the champion was scored on.

    Metrics are dicts shaped like metrics.json: ``{"test_id": {"accuracy": 0.6, ...}, ...}``.
    Returns (blessed, one-line reason). A missing or non-finite metric is never blessed.
    """
    split, _, fld = metric.partition(".")
    if not split or not fld:
        raise ValueError(f"metric {metric!r}: expected SPLIT.FIELD, e.g. test_id.accuracy")
    value = _metric(candidate_metrics, split, fld)
    if value is None:
        return False, f"not blessed: the candidate has no {metric} (missing or not a number)"
    if value < threshold - _EPS:
        return False, f"not blessed: {metric}={value:.4f} is below the threshold {threshold:.4f}"
    passed = f"{metric}={value:.4f} >= threshold {threshold:.4f}"
    if champion_metrics is None:
        return True, f"blessed: {passed}; no champion to compare with (first run), change check skipped"

    splits = [s for s in (*EVAL_SPLITS, split) if s in champion_metrics or s in candidate_metrics]
    splits = list(dict.fromkeys(splits))
    compared, regressions, skipped = [], [], []
    for s in splits:
        champ = _metric(champion_metrics, s, fld)
        if champ is None:
            skipped.append(s)
            continue
        cand = _metric(candidate_metrics, s, fld)
        if cand is None:
            return False, f"not blessed: the candidate has no {s}.{fld} to compare with the champion's {champ:.4f}"
        delta = cand - champ
        if delta < -max_regression - _EPS:
            regressions.append(f"{s}.{fld} {champ:.4f} -> {cand:.4f} ({delta:+.4f}, allowed -{max_regression:.4f})")
        else:
            compared.append(f"{s}.{fld} {delta:+.4f}")
    if regressions:
        return False, "not blessed: regression vs champion beyond δ: " + "; ".join(regressions)
    if not compared:
        return False, f"not blessed: the champion has no {fld} on any eval split, so regressions cannot be checked"
    note = f" (champion not scored on {', '.join(skipped)})" if skipped else ""
    return True, f"blessed: {passed}; vs champion within δ={max_regression:.4f}: {', '.join(compared)}{note}"


# ── scoring one model ───────────────────────────────────────────────────────────────────────────


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def evaluate_split(model: Any, tokenizer: Any, task: Any, rows: Sequence[dict], cfg: EvalConfig,
                   label: str, split: str) -> tuple[dict[str, Any], list[dict]]:
    """Greedy pass@1 and sampled pass@k of one model on one split, in chunks of `batch_size`
    prompts with a progress line (rate, ETA) after each. Returns (metrics, a few samples)."""
    from amft_lib.rollout import sample_completions
    from amft_lib.scoring import greedy_eval, score_completions

    n_rows = len(rows)
    correct = fmt_errors = tokens = 0.0
    counts: list[int] = []
    samples: list[dict] = []
    t0 = time.perf_counter()
    for start in range(0, n_rows, cfg.batch_size):
        chunk = rows[start : start + cfg.batch_size]
        greedy = greedy_eval(model, tokenizer, task, chunk, cfg.max_new_tokens, cfg.chat_template,
                             n_samples=max(0, cfg.report_samples - len(samples)), batch_size=cfg.batch_size)
        correct += greedy.accuracy * greedy.n
        fmt_errors += greedy.format_error_rate * greedy.n
        tokens += greedy.mean_response_tokens * greedy.n
        samples.extend(greedy.samples)
        if cfg.n_samples:
            sampled = sample_completions(
                model, tokenizer, [r["prompt"] for r in chunk], group_size=cfg.n_samples,
                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                chat_template=cfg.chat_template, batch_size=cfg.batch_size * cfg.n_samples,
            )
            rewards, _ = score_completions(task, [r["answer"] for r in chunk for _ in range(cfg.n_samples)],
                                           sampled.texts)
            counts.extend(int(c) for c in (rewards.view(-1, cfg.n_samples) > 0.5).sum(dim=1).tolist())  # [P]
        done = start + len(chunk)
        elapsed = time.perf_counter() - t0
        rate = done / max(elapsed, 1e-9)
        log.info("eval %s/%s: %d/%d prompts, %.2f prompts/s, ETA %.0f s", label, split, done, n_rows,
                 rate, (n_rows - done) / rate)
    metrics = {
        "accuracy": correct / n_rows,
        "pass_at_k": mean_pass_at_k(counts, cfg.n_samples, cfg.pass_k) if counts else None,
        "k": cfg.pass_k,
        "n_samples": cfg.n_samples,
        "n": n_rows,
        "format_error_rate": fmt_errors / n_rows,
        "mean_response_tokens": tokens / n_rows,
    }
    return metrics, samples


def evaluate_model(model_path: str, splits: Mapping[str, Sequence[dict]], task: Any, cfg: EvalConfig,
                   label: str) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """Load one model, score it on every split, free it. The sampling RNG is reset per split from
    `cfg.seed`, so every model sees the same random stream (comparisons are paired)."""
    import torch

    from amft_lib.config import ModelConfig
    from amft_lib.model import load_policy

    device = _device(cfg.device)
    t0 = time.perf_counter()
    model, tokenizer = load_policy(ModelConfig(name=model_path, dtype=cfg.dtype, chat_template=cfg.chat_template),
                                   device=device, seed=cfg.seed)
    log.info("eval %s: loaded %s on %s in %.1f s", label, model_path, device, time.perf_counter() - t0)
    results: dict[str, dict] = {}
    samples: dict[str, list[dict]] = {}
    try:
        for i, (split, rows) in enumerate(splits.items()):
            with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
                torch.manual_seed(cfg.seed * 1000 + i)
                results[split], samples[split] = evaluate_split(model, tokenizer, task, rows, cfg, label, split)
            m = results[split]
            log.info("eval %s/%s: accuracy %.4f, pass@%d %s, format errors %.3f (n=%d)", label, split,
                     m["accuracy"], cfg.pass_k, "-" if m["pass_at_k"] is None else f"{m['pass_at_k']:.4f}",
                     m["format_error_rate"], m["n"])
    finally:
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return results, samples


# ── staging inputs ──────────────────────────────────────────────────────────────────────────────


def _stage_folder(uri: str, dest: Path) -> Path:
    """Copy an s3:// folder to `dest` (files keep their relative paths); an empty prefix is an error."""
    if not storage.download_prefix(uri.rstrip("/"), dest):
        raise DataError(f"{uri}: no objects under this prefix")
    return dest


def _resolve_model(uri: str | None, work: Path, role: str, tracking_uri: str | None) -> str | None:
    """A local directory (or builtin name) for a model URI; None when a models:/ alias does not
    resolve (no champion yet). Registry and S3 models are copied into `work`."""
    if not uri:
        return None
    if uri.startswith("models:/"):
        from amft_lib import registry

        try:
            ref = registry.resolve(uri, tracking_uri)
        except LookupError as exc:
            log.info("eval %s: %s does not resolve (%s); comparing without it", role, uri, exc)
            return None
        return str(registry.download_model(ref, work / role, tracking_uri))
    if storage.is_s3(uri):
        return str(_stage_folder(uri, work / role))
    return uri


def _load_splits(cfg: EvalConfig, work: Path) -> dict[str, list[dict]]:
    from amft_lib.dataset import read_rows

    data = cfg.data
    if storage.is_s3(data) and data.endswith(".parquet"):  # a single parquet object
        local = work / "data" / data.rsplit("/", 1)[-1]
        storage.get_file(data, local)
        data = str(local)
    elif storage.is_s3(data):
        data = str(_stage_folder(data, work / "data"))
    all_rows = read_rows(data)
    splits = {}
    for split in cfg.splits:
        rows = all_rows.get(split) or []
        if cfg.max_examples:
            rows = rows[: cfg.max_examples]
        if rows:
            splits[split] = rows
    if not splits:
        raise DataError(
            f"{cfg.data}: none of the eval splits {', '.join(cfg.splits)} has rows "
            f"(present: {', '.join(sorted(all_rows)) or 'none'})"
        )
    return splits


def _task_for(cfg: EvalConfig, splits: Mapping[str, Sequence[dict]]) -> Any:
    from amft_lib.tasks import get_task, known_tasks

    names = {r["task"] for rows in splits.values() for r in rows}
    if cfg.task:
        if cfg.task not in known_tasks():
            raise ConfigError(f"eval.task={cfg.task!r}: choose one of {', '.join(known_tasks())}")
        if names and names != {cfg.task}:
            raise DataError(f"{cfg.data}: eval rows are for task(s) {', '.join(sorted(names))}, not "
                            f"eval.task={cfg.task!r}; drop --task or point --data at a {cfg.task} dataset")
        return get_task(cfg.task)
    if len(names) != 1:
        raise DataError(f"{cfg.data}: eval rows mix tasks {sorted(names)}; pass --task to choose the verifier")
    return get_task(names.pop())


# ── training curves ─────────────────────────────────────────────────────────────────────────────


def read_training_curves(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Per-step series from `metrics.jsonl` ([(step, value)] per metric; nulls dropped). The final
    record (``"final": true``) only contributes its `val_reward` and `val_accuracy`."""
    text = storage.get_bytes(storage.join(run_dir, "metrics.jsonl")).decode("utf-8")
    names = ("mu", "reward_mean", "entropy", "target_entropy", "sft_loss", "rl_loss", "val_reward", "val_accuracy")
    curves: dict[str, list[tuple[int, float]]] = {n: [] for n in names}
    for line in text.splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        step = int(rec.get("step", 0))
        for name in names:
            if rec.get("final") and name not in ("val_reward", "val_accuracy"):
                continue
            value = rec.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                curves[name].append((step, float(value)))
    return curves


# (file stem, title, y label, [(series, label, style)])
_PLOTS = (
    ("mu", "μ (weight of the SFT loss)", "μ", [("mu", "μ", "-")]),
    ("reward", "rollout reward", "mean reward", [("reward_mean", "reward_mean", "-")]),
    ("entropy", "policy entropy vs target H*", "nats/token",
     [("entropy", "entropy H_t", "-"), ("target_entropy", "target H*", "--")]),
    ("losses", "SFT and RL losses", "loss", [("sft_loss", "sft_loss", "-"), ("rl_loss", "rl_loss", "-")]),
    ("val_reward", "validation: sampled reward Û(θ) and greedy accuracy", "reward / accuracy",
     [("val_reward", "val_reward (sampled)", "o-"), ("val_accuracy", "val_accuracy (greedy)", "s--")]),
)


def plot_training_curves(curves: Mapping[str, Sequence[tuple[int, float]]]) -> dict[str, bytes]:
    """PNG bytes per plot (mu, reward, entropy, losses, val_reward); plots with no data are left out.

    Uses matplotlib's object API with the Agg canvas: no pyplot global state, no display needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pngs: dict[str, bytes] = {}
    for stem, title, ylabel, series in _PLOTS:
        if not any(curves.get(name) for name, _, _ in series):
            continue
        fig = Figure(figsize=(6.0, 3.2), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for name, label, style in series:
            points = curves.get(name) or []
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label, linewidth=1.4,
                        markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        pngs[stem] = buf.getvalue()
    return pngs


# ── reports ─────────────────────────────────────────────────────────────────────────────────────

_ROWS = (  # (field, label, better: +1 higher, -1 lower, 0 neutral)
    ("accuracy", "accuracy (pass@1, greedy)", 1),
    ("pass_at_k", "pass@k", 1),
    ("format_error_rate", "format error rate", -1),
    ("mean_response_tokens", "mean response tokens", 0),
    ("n", "n", 0),
)


def _num(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"


def _delta(cand: Any, other: Any, better: int) -> tuple[str, str]:
    """(text, kind) for candidate − other; kind is improvement, regression, same or neutral
    (`better` = 0: a difference that is neither, such as response length)."""
    if not isinstance(cand, int | float) or not isinstance(other, int | float):
        return "", "neutral"
    diff = cand - other
    if abs(diff) <= _EPS:
        return "±0", "same"
    if better == 0:
        return f"{diff:+.4g}", "neutral"
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
        for role, comp in (metrics.get("comparisons") or {}).items():
            other = (comp.get(split) or {}).get(fld)
            text, kind = _delta(cand.get(fld), other, better)
            row["others"][role] = {"value": other, "delta": text, "kind": kind}
        rows.append(row)
    return rows


def changes(metrics: Mapping[str, Any]) -> dict[str, list[str]]:
    """Improvements and regressions of the gated fields and format errors, per comparison model."""
    out: dict[str, list[str]] = {}
    for role in metrics.get("comparisons") or {}:
        lines = []
        for split in EVAL_SPLITS:
            if split not in metrics:
                continue
            for row in comparison_rows(metrics, split):
                info = row["others"][role]
                if info["kind"] in ("improvement", "regression"):
                    lines.append(f"{split} {row['field']}: {info['kind']} {info['delta']} "
                                 f"({_num(info['value'])} -> {_num(row['candidate'])})")
        out[role] = lines
    return out


def _std_err_note(metrics: Mapping[str, Any]) -> str:
    parts = []
    for split in EVAL_SPLITS:
        m = metrics.get(split)
        if isinstance(m, Mapping) and m.get("n"):
            p, n = m["accuracy"], m["n"]
            parts.append(f"{split} ±{1.96 * math.sqrt(max(p * (1 - p), 1 / n) / n):.3f}")
    return ("Accuracy differences smaller than the 95% interval of the candidate's accuracy ("
            + ", ".join(parts) + ") are within sampling noise.") if parts else ""


# What can turn text into markup that matters: `\` (escapes), backticks (code spans), `[`/`]` (links,
# images), `|` (table cells) and `<`/`>`/`&` (HTML, entities). Emphasis (`*`, `_`) is left alone: it can
# only italicise, and escaping it would make every snake_case id unreadable in the raw file.
_MD_TABLE = str.maketrans({"\\": "\\\\", "`": "\\`", "[": "\\[", "]": "\\]", "|": "\\|",
                           "<": "&lt;", ">": "&gt;", "&": "&amp;"})


def escape_markdown_cell(value: Any) -> str:
    """Untrusted text (row ids, model paths, reasons) as inert Markdown: one line, no markup.

    Backslash-escapes the metacharacters above (CommonMark: an escaped ASCII punctuation character is
    a literal) and writes `<`, `>`, `&` as entities, which every renderer shows as text — so a row id
    such as ``a`</code><script>`` can neither close a code span nor open an HTML tag, and `|` cannot
    split a table cell. `://` is broken up so no renderer turns a path into a link. Pure: the lead
    can move it along with the report rendering.
    """
    text = " ".join(str(value).split())  # a newline would end the list item or table row
    return text.translate(_MD_TABLE).replace("://", ":\\/\\/")


def render_markdown(metrics: Mapping[str, Any], plots: Sequence[str], samples: Mapping[str, list[dict]]) -> str:
    """The Markdown report: verdict, comparison tables per split, improvements/regressions, plots, samples."""
    roles = list((metrics.get("comparisons") or {}).keys())
    b = metrics.get("blessing", {})
    lines = [
        f"# Evaluation of {escape_markdown_cell(metrics.get('model'))}",
        "",
        f"**{'BLESSED' if metrics.get('blessed') else 'NOT BLESSED'}** — {escape_markdown_cell(metrics.get('reason'))}",
        "",
        f"Rule: {escape_markdown_cell(b.get('metric'))} ≥ {escape_markdown_cell(b.get('threshold'))} and no drop "
        f"larger than δ={escape_markdown_cell(b.get('max_regression'))} "
        "vs the champion on any eval split (change check skipped without a champion).",
        "",
    ]
    for split in EVAL_SPLITS:
        if split not in metrics:
            continue
        lines += [f"## {split}", ""]
        header = ["metric", "candidate"]
        for role in roles:
            header += [ROLE_TITLES[role], f"Δ vs {ROLE_TITLES[role]}"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for row in comparison_rows(metrics, split):
            cells = [escape_markdown_cell(row["label"]), _num(row["candidate"])]
            for role in roles:
                info = row["others"][role]
                cells += [_num(info["value"]), escape_markdown_cell(info["delta"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    note = _std_err_note(metrics)
    if note:
        lines += [note, ""]
    for role, items in changes(metrics).items():
        model = metrics["comparisons"][role]["model"]
        lines += [f"### Improvements and regressions vs {ROLE_TITLES[role]} ({escape_markdown_cell(model)})", ""]
        lines += [f"- {escape_markdown_cell(item)}" for item in items] or ["- no change"]
        lines.append("")
    if plots:
        lines += ["## Training curves", ""]
        lines += [f"![{stem}](plots/{stem}.png)" for stem in plots]
        lines.append("")
    if any(samples.values()):
        lines += ["## Sample completions (candidate, greedy)", ""]
        for split, items in samples.items():
            for s in items:
                completion = s["completion"].replace("```", "'''")
                lines += [f"- **{escape_markdown_cell(split)}** {escape_markdown_cell(s.get('id'))} "
                          f"reward {s['reward']:.0f}", "", "  ```text",
                          *("  " + ln for ln in completion.splitlines() or [""]), "  ```", ""]
    return "\n".join(lines) + "\n"


def _h(text: Any) -> str:
    """HTML-escape untrusted text (model output, paths) and defuse anything URL-shaped, so the
    report never holds a reference a browser would follow."""
    return html.escape(str(text)).replace("://", ":&#47;&#47;")


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}.improvement{color:#0a7a2f}.regression{color:#b3261e;font-weight:600}
.verdict{padding:.6em 1em;border-radius:.4em}.yes{background:#e3f5e8}.no{background:#fbe4e2}
pre{background:#f5f5f5;padding:.6em;white-space:pre-wrap}img{max-width:100%}"""


def render_html(metrics: Mapping[str, Any], plots: Mapping[str, bytes], samples: Mapping[str, list[dict]]) -> str:
    """Self-contained HTML report: inline CSS, plots embedded as base64 PNG, no scripts or links."""
    roles = list((metrics.get("comparisons") or {}).keys())
    b = metrics.get("blessing", {})
    blessed = bool(metrics.get("blessed"))
    out = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>Evaluation {_h(metrics.get('model'))}</title><style>{_CSS}</style></head><body>",
        f"<h1>Evaluation of <code>{_h(metrics.get('model'))}</code></h1>",
        f"<p class='verdict {'yes' if blessed else 'no'}'><b>{'BLESSED' if blessed else 'NOT BLESSED'}</b> — "
        f"{_h(metrics.get('reason'))}</p>",
        f"<p>Rule: <code>{_h(b.get('metric'))}</code> ≥ {_h(b.get('threshold'))} and no drop larger than "
        f"δ={_h(b.get('max_regression'))} vs the champion on any eval split.</p>",
    ]
    for split in EVAL_SPLITS:
        if split not in metrics:
            continue
        out.append(f"<h2>{_h(split)}</h2><table><tr><th>metric</th><th>candidate</th>")
        for role in roles:
            out.append(f"<th>{_h(ROLE_TITLES[role])}</th><th>Δ vs {_h(ROLE_TITLES[role])}</th>")
        out.append("</tr>")
        for row in comparison_rows(metrics, split):
            out.append(f"<tr><td>{_h(row['label'])}</td><td>{_h(_num(row['candidate']))}</td>")
            for role in roles:
                info = row["others"][role]
                out.append(f"<td>{_h(_num(info['value']))}</td><td class='{info['kind']}'>{_h(info['delta'])}</td>")
            out.append("</tr>")
        out.append("</table>")
    note = _std_err_note(metrics)
    if note:
        out.append(f"<p>{_h(note)}</p>")
    for role, items in changes(metrics).items():
        out.append(f"<h3>Improvements and regressions vs {_h(ROLE_TITLES[role])} "
                   f"(<code>{_h(metrics['comparisons'][role]['model'])}</code>)</h3><ul>")
        out += [f"<li class='{'regression' if ' regression ' in item else 'improvement'}'>{_h(item)}</li>"
                for item in items] or ["<li>no change</li>"]
        out.append("</ul>")
    if plots:
        out.append("<h2>Training curves</h2>")
        for stem, png in plots.items():
            data = base64.b64encode(png).decode("ascii")
            out.append(f"<figure><img alt='{_h(stem)}' src='data:image/png;base64,{data}'></figure>")
    if any(samples.values()):
        out.append("<h2>Sample completions (candidate, greedy)</h2>")
        for split, items in samples.items():
            for s in items:
                out.append(f"<p><b>{_h(split)}</b> <code>{_h(s.get('id'))}</code> reward {s['reward']:.0f}</p>"
                           f"<pre>{_h(s['completion'])}</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ── the stage ───────────────────────────────────────────────────────────────────────────────────


def _training_summary(run_dir: str, curves: Mapping[str, Sequence[tuple[int, float]]]) -> dict[str, Any]:
    val = curves.get("val_reward") or []
    return {
        "run_dir": run_dir,
        "steps": max((s for s, _ in curves.get("mu") or []), default=-1) + 1,
        "mu": lineage.summarize_mu(lineage.mu_trajectory(run_dir)),
        "val_reward_final": val[-1][1] if val else None,
    }


def _check_out(out_dir: str) -> None:
    """A local out_dir must be (or be creatable as) a writable folder: checked before any scoring,
    and nothing is written into it until every score is in (metrics.json last)."""
    if storage.is_s3(out_dir):
        return
    from amft_lib.data.schema import check_writable_dir

    check_writable_dir(Path(out_dir), "cannot write the evaluation")


def run_evaluate(cfg: EvalConfig) -> EvalResult:
    """Score the candidate and the comparison models, decide the blessing, write the outputs."""
    t_start = time.perf_counter()
    _check_out(cfg.out_dir)
    with tempfile.TemporaryDirectory(prefix="amft-eval-") as tmp:
        work = Path(tmp)
        splits = _load_splits(cfg, work)
        task = _task_for(cfg, splits)
        log.info("evaluating %s on %s (%s); pass@%d from %d samples at T=%.2f", cfg.model, cfg.data,
                 ", ".join(f"{s}: {len(r)}" for s, r in splits.items()), cfg.pass_k, cfg.n_samples, cfg.temperature)

        candidate_path = _resolve_model(cfg.model, work, "candidate", cfg.tracking_uri)
        if candidate_path is None:
            raise ConfigError(f"eval.model={cfg.model!r} does not resolve to a model in the registry")
        candidate, samples = evaluate_model(candidate_path, splits, task, cfg, "candidate")

        comparisons: dict[str, dict[str, Any]] = {}
        for role, uri in (("base", cfg.base_model), ("warm_start", cfg.warm_start_model),
                          ("champion", cfg.champion_model)):
            path = _resolve_model(uri, work, role, cfg.tracking_uri)
            if path is None:
                continue
            scores, _ = evaluate_model(path, splits, task, cfg, role)
            comparisons[role] = {"model": uri, **scores}

    blessed, reason = decide_blessing(candidate, comparisons.get("champion"), cfg.metric, cfg.threshold,
                                      cfg.max_regression)
    log.info("%s", reason)

    curves: dict[str, list[tuple[int, float]]] = {}
    pngs: dict[str, bytes] = {}
    training = None
    if cfg.run_dir:
        try:
            curves = read_training_curves(cfg.run_dir)
        except storage.ObjectNotFoundError:
            log.warning("run dir %s has no metrics.jsonl; no training curves", cfg.run_dir)
        else:
            pngs = plot_training_curves(curves)
            training = _training_summary(cfg.run_dir, curves)

    metrics: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model": cfg.model,
        "data": cfg.data,
        "task": task.name,
        **candidate,
        "blessed": blessed,
        "reason": reason,
        "blessing": {"metric": cfg.metric, "threshold": cfg.threshold, "max_regression": cfg.max_regression,
                     "champion": cfg.champion_model if "champion" in comparisons else None},
        "comparisons": comparisons,
        "decoding": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
                     "k": cfg.pass_k, "n_samples": cfg.n_samples, "seed": cfg.seed,
                     "max_examples": cfg.max_examples, "chat_template": cfg.chat_template},
        "training": training,
        "elapsed_s": round(time.perf_counter() - t_start, 3),
    }
    metrics = lineage.redact(metrics)

    written = []

    def put(name: str, data: bytes) -> None:
        uri = storage.join(cfg.out_dir, name)
        storage.put_bytes(uri, data)
        written.append(uri)

    for stem, png in pngs.items():
        put(f"plots/{stem}.png", png)
    put("report.md", render_markdown(metrics, list(pngs), samples).encode("utf-8"))
    put("report.html", render_html(metrics, pngs, samples).encode("utf-8"))
    # last: a reader that finds metrics.json finds every other output complete
    put(METRICS_FILE, (json.dumps(metrics, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8"))
    elapsed = time.perf_counter() - t_start
    log.info("evaluation done in %.1f s: %s", elapsed, storage.join(cfg.out_dir, METRICS_FILE))
    return EvalResult(blessed, reason, metrics, cfg.out_dir, written, elapsed)


def load_metrics(out_dir: str) -> dict[str, Any]:
    """Read metrics.json back from an evaluation's output folder (local or s3://)."""
    return json.loads(storage.get_bytes(storage.join(out_dir, METRICS_FILE)).decode("utf-8"))

