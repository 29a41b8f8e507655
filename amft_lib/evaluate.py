"""`amft evaluate`: score a candidate on the ID and OOD test splits, compare it with the base,
warm-start and champion models, and decide whether it is blessed.

What is measured, per eval split present in the dataset (`test_id`, `test_ood`) and per model:
- `accuracy`: pass@1 under greedy decoding (the number the paper reports);
- `pass_at_k`: the unbiased pass@k of Chen et al. (2021), 1 − C(n−c, k)/C(n, k) averaged over
  prompts, from `n_samples` completions per prompt at `temperature` (c of them correct);
- `n`, `format_error_rate` (no parsable answer, greedy) and `mean_response_tokens` (greedy).

Blessing follows TFX's Evaluator (research anchors B, F.5): an absolute threshold on one chosen
metric AND no regression beyond δ against the current champion on every eval split; the change
check is skipped, and the reason says so, when there is no champion (first run). On top of that
(issue 25, `warm_start_check`): a candidate *significantly worse than the warm start it trained
from* — paired per instance on the gating split, 95 % bootstrap interval of candidate − warm start
below 0 — is not blessed, even on a first run where the threshold is all that guards the registry
(the demo once registered a model that training had made worse). "No significant change" leaves
the decision to the rules above. The decision is the pure function :func:`decide_blessing`, so it
is table-tested without a model.

Every split block keeps its per-instance scores (`per_instance`: greedy 0/1 and per-prompt pass@k,
in row order), so each pair of models — base → warm start → candidate, champion → candidate — gets
a paired interval (`changes` in metrics.json, `significance.paired_change`); the run summary prints
them.

Outputs in `out_dir` (local folder or s3:// URI), each written atomically, `metrics.json` last so
its presence means the evaluation finished: `report.md`, `report.html` (self-contained: inline
CSS, plots as base64 PNG, no external references; both rendered from one report model in
`amft_lib.reports`), `plots/*.png` (training curves, when a run dir is given) and `metrics.json`
(DESIGN.md "Evaluation" contract plus the comparison models).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amft_lib import engine, lineage, model_files, storage
from amft_lib.config import ConfigError, EngineConfig, check_fields
from amft_lib.config import help_field as _help
from amft_lib.data.schema import DataError
from amft_lib.reports import EVAL_SPLITS
from amft_lib.significance import WORSE, change_text, paired_change

log = logging.getLogger(__name__)

# Metrics the blessing may gate on: both "higher is better", so a regression is a decrease.
GATE_FIELDS = ("accuracy", "pass_at_k")
METRICS_FILE = "metrics.json"
SCHEMA_VERSION = 1
_EPS = 1e-9  # float slack so "exactly δ worse" or "exactly at threshold" is not decided by rounding


@dataclass
class EvalConfig:
    """What to evaluate, how to decode, and the blessing rule."""

    # ── inputs ──
    model: str = _help("Candidate model: HF directory, s3:// folder, or models:/NAME@ALIAS|models:/NAME/VERSION.")
    data: str = _help("Prepared dataset (`amft data prepare` output): folder, parquet file or s3:// URI.")
    out_dir: str = _help("Where metrics.json, the reports and plots go (folder or s3:// URI).")
    data_card_sha256: str | None = _help(
        "sha256 of the dataset card the data gate validated: the card read must be that one (the pipeline's "
        "evaluate stage passes the gate record's). Optional.", None
    )
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
    max_new_tokens: int | None = _help(
        "Maximum completion length in tokens (greedy and sampled). Empty: the candidate's own "
        "generation_config.json (the trainer records its rollout length there), else 96 — so re-scoring a model "
        "decodes it as it was trained.", None)
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
    dtype: str = _help("Parameter dtype: `auto` (bfloat16 on a GPU, float32 on CPU), float32, bfloat16 or "
                       "float64.", "auto")
    # ── blessing ──
    metric: str = _help("Gating metric as SPLIT.FIELD, FIELD in accuracy | pass_at_k (higher is better).",
                        "test_id.accuracy")
    threshold: float = _help("Absolute lower bound of the gating metric (TFX value_threshold).", 0.0)
    max_regression: float = _help(
        "δ: the largest drop of FIELD vs the champion tolerated on any eval split (TFX change_threshold).", 0.0
    )
    warm_start_check: bool = _help(
        "Not blessed when the candidate is significantly worse than warm_start_model on the gating metric: paired "
        "bootstrap per instance on its split, the 95 % interval of candidate − warm start entirely below 0. "
        "No significant change: the threshold and champion rules decide. Skipped (and said so) without a warm "
        "start.", True)
    report_samples: int = _help("Completions per split shown in the reports.", 3)
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={
        "help": "How the model runs (engine.*, as in training): threads and the KV cache of decoding."})
    score_cache: str | None = _help(
        "Folder (or s3:// URI) of comparison-model scores keyed by model content hash, data and decoding: a "
        "base model or unchanged champion is generated once, not on every run. None: no cache.", None)

    def __post_init__(self) -> None:
        check_fields(self, "eval.")  # NaN/inf in any number (temperature, threshold, δ) is refused here
        for name in ("model", "data", "out_dir"):
            if not getattr(self, name):
                raise ConfigError(f"eval.{name} is required")
        if self.data_card_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.data_card_sha256):
            raise ConfigError(f"eval.data_card_sha256={self.data_card_sha256[:80]!r}: give 64 lowercase hex digits "
                              "(the card's sha256, as the data gate records it)")
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
        if (self.max_new_tokens is not None and self.max_new_tokens < 1) or self.batch_size < 1:
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
        if self.dtype not in ("auto", "float32", "bfloat16", "float64"):
            raise ConfigError(f"eval.dtype={self.dtype!r}: choose auto, float32, bfloat16 or float64")
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
    warm_start_change: Mapping[str, Any] | None = None,
) -> tuple[bool, str]:
    """TFX-style blessing: `metric` (SPLIT.FIELD) >= `threshold` AND not significantly worse than the
    warm start AND, when there is a champion, FIELD dropped by at most `max_regression` (δ) on every
    eval split the champion was scored on.

    Metrics are dicts shaped like metrics.json: ``{"test_id": {"accuracy": 0.6, ...}, ...}``.
    `warm_start_change`: candidate − warm start on `metric` as `significance.paired_change` returns it
    (verdict "worse" blocks; None: not checked). Returns (blessed, one-line reason). A missing or
    non-finite metric is never blessed.
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
    if warm_start_change is not None:
        vs_warm = f"vs its warm start {change_text(warm_start_change)}"
        if warm_start_change["verdict"] == WORSE:
            return False, f"not blessed: significantly worse than its warm start on {metric}: {vs_warm}"
        passed += f"; {vs_warm}"
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


# ── paired changes between models (pure) ────────────────────────────────────────────────────────

# (from, to) model roles compared per instance; "candidate" is the model under evaluation
CHANGE_PAIRS = (("base", "warm_start"), ("warm_start", "candidate"), ("base", "candidate"), ("champion", "candidate"))


def _per_instance(block: Mapping[str, Any] | None, split: str, fld: str) -> list[float] | None:
    values = (((block or {}).get(split) or {}).get("per_instance") or {}).get(fld)
    return values if isinstance(values, list) and values else None


def paired_changes(candidate: Mapping[str, Any], comparisons: Mapping[str, Mapping[str, Any]],
                   fields: Sequence[str] = GATE_FIELDS) -> list[dict[str, Any]]:
    """One record per (CHANGE_PAIRS pair, eval split, field) both models have per-instance scores for:
    {"from", "to", "split", "field", diff, lo, hi, n, verdict} (significance.paired_change, after − before).
    Pairs whose instance lists differ in length (scored on other rows) are left out, not guessed."""
    models = {"candidate": candidate, **comparisons}
    out = []
    for before, after in CHANGE_PAIRS:
        for split in EVAL_SPLITS:
            for fld in fields:
                a = _per_instance(models.get(after), split, fld)
                b = _per_instance(models.get(before), split, fld)
                if a is None or b is None or len(a) != len(b):
                    continue
                out.append({"from": before, "to": after, "split": split, "field": fld, **paired_change(a, b)})
    return out


def find_change(changes: Sequence[Mapping[str, Any]], before: str, after: str, metric: str) -> dict | None:
    """The record of `changes` comparing `after` with `before` on `metric` (SPLIT.FIELD), or None."""
    split, _, fld = metric.partition(".")
    return next((dict(c) for c in changes if (c["from"], c["to"], c["split"], c["field"]) == (before, after, split,
                                                                                             fld)), None)


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
    correct_each: list[float] = []  # greedy 0/1 per prompt, in row order: what paired comparisons resample
    t0 = time.perf_counter()
    for start in range(0, n_rows, cfg.batch_size):
        chunk = rows[start : start + cfg.batch_size]
        greedy = greedy_eval(model, tokenizer, task, chunk, cfg.max_new_tokens, cfg.chat_template,
                             n_samples=len(chunk), batch_size=cfg.batch_size)
        correct += greedy.accuracy * greedy.n
        fmt_errors += greedy.format_error_rate * greedy.n
        tokens += greedy.mean_response_tokens * greedy.n
        samples.extend(greedy.samples)
        correct_each.extend(s["reward"] for s in greedy.samples)
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
        "per_instance": {"accuracy": correct_each,
                         "pass_at_k": [pass_at_k(cfg.n_samples, c, cfg.pass_k) for c in counts] if counts else None},
    }
    return metrics, pick_samples(samples, cfg.report_samples)


def pick_samples(samples: Sequence[dict], n: int) -> list[dict]:
    """Up to `n` samples for the report, alternating solved and failed ones (in split order), so a
    reader sees what the model gets right and wrong — not just the first rows, often all failures."""
    solved = [s for s in samples if s["reward"] > 0.5]
    failed = [s for s in samples if s["reward"] <= 0.5]
    picked = []
    for i in range(max(len(solved), len(failed))):
        picked += [group[i] for group in (solved, failed) if i < len(group)]
    return picked[:n]


def evaluate_model(model_path: str, splits: Mapping[str, Sequence[dict]], task: Any, cfg: EvalConfig,
                   label: str) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """Load one model, score it on every split, free it. The sampling RNG is reset per split from
    `cfg.seed`, so every model sees the same random stream (comparisons are paired)."""
    import torch

    from amft_lib.config import ModelConfig
    from amft_lib.dataset import check_prompts_fit
    from amft_lib.model import load_policy

    device = _device(cfg.device)
    t0 = time.perf_counter()
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    model, tokenizer = load_policy(ModelConfig(name=model_path, dtype=dtype, chat_template=cfg.chat_template),
                                   device=device, seed=cfg.seed)
    check_prompts_fit([r for rows in splits.values() for r in rows], tokenizer, model, cfg.max_new_tokens,
                      cfg.chat_template, cfg.data)  # refused before anything is written (dataset.py)
    log.info("eval %s: loaded %s on %s in %.1f s", label, model_path, device, time.perf_counter() - t0)
    results: dict[str, dict] = {}
    samples: dict[str, list[dict]] = {}
    try:
        with engine.decoding(cfg.engine, device):  # threads and KV cache (engine.*)
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
    if storage.is_s3(uri):  # staged once per pod and listing, like every other model source
        from amft_lib.model_source import resolve_model

        return str(resolve_model(uri, hash_files=False).local_dir)
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
    all_rows = read_rows(data, cfg.data_card_sha256)
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


# ── the stage ───────────────────────────────────────────────────────────────────────────────────


def _training_summary(run_dir: str, curves: Mapping[str, Sequence[tuple[int, float]]]) -> dict[str, Any]:
    val = curves.get("val_reward") or []
    return {
        "run_dir": run_dir,
        "steps": max((s for s, _ in curves.get("mu") or []), default=-1) + 1,
        "mu": lineage.summarize_mu(lineage.mu_trajectory(run_dir)),
        "val_reward_final": val[-1][1] if val else None,
    }


DEFAULT_MAX_NEW_TOKENS = 96


def trained_max_new_tokens(model_dir: str) -> int:
    """The completion length a model was trained with (its generation_config.json, written by
    `model.save_policy`), else DEFAULT_MAX_NEW_TOKENS."""
    path = Path(model_dir, "generation_config.json")
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("max_new_tokens")
    except (OSError, ValueError):
        return DEFAULT_MAX_NEW_TOKENS
    return int(value) if isinstance(value, int) and value > 0 else DEFAULT_MAX_NEW_TOKENS


def _data_digest(data: str) -> str | None:
    """Content digest of the eval data (a folder or one parquet file); None when it cannot be hashed."""
    try:
        return lineage.tree_sha256(data) if not data.endswith(".parquet") else lineage.sha256_uri(data)[0]
    except (FileNotFoundError, storage.StorageError):
        return None


def _cache_uri(cfg: EvalConfig, model_dir: str, data_digest: str, task: str) -> str | None:
    """Where the scores of `model_dir` under this data and decoding are cached; None for a model
    without files to hash (a builtin name)."""
    if not Path(model_dir, "config.json").is_file():
        return None
    key = {"schema": SCHEMA_VERSION, "model": model_files.content_digest(model_dir), "data": data_digest, "task": task,
           "splits": list(cfg.splits), "max_examples": cfg.max_examples, "max_new_tokens": cfg.max_new_tokens,
           "pass_k": cfg.pass_k, "n_samples": cfg.n_samples, "temperature": cfg.temperature, "top_p": cfg.top_p,
           "batch_size": cfg.batch_size, "seed": cfg.seed, "chat_template": cfg.chat_template, "dtype": cfg.dtype}
    return storage.join(cfg.score_cache, lineage.canonical_hash(key) + ".json")


def _same_content(a: str | None, b: str | None) -> bool:
    """Whether two model folders hold the same model (model_files.content_digest: tensors, config,
    tokenizer); False when either has no files. A folder listing is not the model: the staged copy
    of a candidate carries `.amft-source.json`, a registry download does not."""
    if not a or not b or not Path(a, "config.json").is_file() or not Path(b, "config.json").is_file():
        return False
    return model_files.content_digest(a) == model_files.content_digest(b)


def _cached_scores(uri: str | None) -> dict[str, Any] | None:
    """Cached scores, or None: absent, or written before scores kept their per-instance lists (such an
    entry cannot be compared per instance, so the model is scored again and the entry replaced)."""
    if not uri:
        return None
    try:
        scores = json.loads(storage.get_bytes(uri).decode("utf-8"))["scores"]
    except storage.ObjectNotFoundError:
        return None
    if not all(isinstance(block, Mapping) and "per_instance" in block for block in scores.values()):
        return None
    return scores


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
        if cfg.max_new_tokens is None:
            cfg = dataclasses.replace(cfg, max_new_tokens=trained_max_new_tokens(candidate_path))
        candidate, samples = evaluate_model(candidate_path, splits, task, cfg, "candidate")

        comparisons: dict[str, dict[str, Any]] = {}
        champion_path = None
        data_digest = _data_digest(cfg.data) if cfg.score_cache else None
        for role, uri in (("base", cfg.base_model), ("warm_start", cfg.warm_start_model),
                          ("champion", cfg.champion_model)):
            path = _resolve_model(uri, work, role, cfg.tracking_uri)
            if path is None:
                continue
            if role == "champion":
                champion_path = path
            cache_uri = _cache_uri(cfg, path, data_digest, task.name) if data_digest else None
            scores = _cached_scores(cache_uri)
            if scores is None:
                scores, _ = evaluate_model(path, splits, task, cfg, role)
                if cache_uri:
                    storage.put_bytes(cache_uri, json.dumps({"scores": scores}, sort_keys=True).encode("utf-8"))
            else:
                log.info("eval %s: scores reused from %s (same model content, data and decoding)", role, cache_uri)
            comparisons[role] = {"model": uri, **scores}
        identical = _same_content(candidate_path, champion_path)  # while a downloaded champion still exists

    changes = paired_changes(candidate, comparisons)
    vs_warm = find_change(changes, "warm_start", "candidate", cfg.metric) if cfg.warm_start_check else None
    blessed, reason = decide_blessing(candidate, comparisons.get("champion"), cfg.metric, cfg.threshold,
                                      cfg.max_regression, warm_start_change=vs_warm)
    if cfg.warm_start_check and vs_warm is None:
        reason += f"; warm-start check skipped (no warm start scored on {cfg.metric} per instance)"
    if blessed and identical:
        # δ = 0 lets an equal score pass; the same weights again must not become a new version
        blessed, reason = False, "not blessed: the candidate is identical to the champion (same content hash)"
    log.info("%s", reason)

    from amft_lib import reports

    curves: dict[str, list[tuple[int, float]]] = {}
    pngs: dict[str, bytes] = {}
    training = None
    if cfg.run_dir:
        try:
            curves = reports.read_training_curves(cfg.run_dir)
        except storage.ObjectNotFoundError:
            log.warning("run dir %s has no metrics.jsonl; no training curves", cfg.run_dir)
        else:
            pngs = reports.plot_training_curves(curves)
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
                     "champion": cfg.champion_model if "champion" in comparisons else None,
                     "warm_start_check": cfg.warm_start_check, "vs_warm_start": vs_warm},
        "comparisons": comparisons,
        "changes": changes,
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
    report = reports.evaluation_report(metrics, pngs, samples)
    put("report.md", reports.to_markdown(report).encode("utf-8"))
    put("report.html", reports.to_html(report).encode("utf-8"))
    # last: a reader that finds metrics.json finds every other output complete
    put(METRICS_FILE, (json.dumps(metrics, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8"))
    elapsed = time.perf_counter() - t_start
    log.info("evaluation done in %.1f s: %s", elapsed, storage.join(cfg.out_dir, METRICS_FILE))
    return EvalResult(blessed, reason, metrics, cfg.out_dir, written, elapsed)


def load_metrics(out_dir: str) -> dict[str, Any]:
    """Read metrics.json back from an evaluation's output folder (local or s3://)."""
    return json.loads(storage.get_bytes(storage.join(out_dir, METRICS_FILE)).decode("utf-8"))

