"""The rejection-sampled warm start (AMFT.md §3), the pipeline stage before AMFT training.

    1. SFT warm-up: W steps on demonstrations.
    2. Rejection sampling: k completions per training prompt from the warmed model; keep the ones
       the verifier accepts, deduplicated, at most c per prompt; report acceptance rates.
    3. SFT on demonstrations ∪ accepted samples → the warm-start model; measure H* (the mean token
       entropy of its own rollouts), which the controller's entropy term steers towards.

Why accepted samples join the demonstrations: they are correct answers in the model's own
distribution, so the final SFT moves the policy less than fitting foreign demonstrations would,
and RL starts from a model that already succeeds on some prompts (GRPO learns nothing from
prompts where every sample fails).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from amft_lib.config import TrainConfig, WarmStartConfig, save_config
from amft_lib.data.schema import DataError
from amft_lib.dataset import check_task, load_splits
from amft_lib.losses import masked_mean
from amft_lib.model import check_model_source, load_policy, save_policy, trainable_parameters
from amft_lib.optim import build_optimizer
from amft_lib.rollout import completion_logprobs, demonstration_batch, sample_completions
from amft_lib.sampler import Cursor
from amft_lib.scoring import greedy_eval, score_completions
from amft_lib.tasks import get_task
from amft_lib.trainer import (
    check_device,
    check_out_dir,
    lr_factor,
    resolve_device,
    seed_everything,
    sft_gradient,
)

log = logging.getLogger(__name__)


@dataclass
class WarmStartResult:
    model_dir: Path
    accepted_path: Path
    stats_path: Path
    target_entropy: float
    acceptance_rate: float
    pass_at_k: float
    val_accuracy: dict[str, float] = field(default_factory=dict)


def sft_steps(
    model, tokenizer, rows: list[dict], steps: int, cfg: WarmStartConfig, seed: int, phase: str,
    lr: float | None = None,
) -> list[dict]:
    """Plain SFT for `steps` steps (AdamW, warm-up + cosine to peak `lr`, default `cfg.lr`). No
    rollouts: this is the cheap part."""
    if steps == 0:
        return []
    peak = cfg.lr if lr is None else lr
    params = trainable_parameters(model)
    optimizer = build_optimizer(params, lr=peak, betas=(0.9, 0.99), weight_decay=0.01,
                                master_weights=cfg.model.master_weights)
    # sft_gradient reads only loss.micro_batch_size and precision from a TrainConfig
    tcfg = TrainConfig(precision=cfg.precision)
    tcfg.loss.micro_batch_size = cfg.micro_batch_size
    cursor = Cursor(len(rows), seed)
    history, t0 = [], time.perf_counter()
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = peak * lr_factor(step, max(1, steps // 20), steps, 0.1)
        batch_rows = [rows[i] for i in cursor.take(cfg.batch_size)]
        batch = demonstration_batch(
            tokenizer,
            [r["prompt"] for r in batch_rows],
            [r["demonstration"] for r in batch_rows],
            cfg.max_new_tokens,
            cfg.model.chat_template,
        )
        grads, loss = sft_gradient(model, params, batch, tcfg)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"phase": phase, "step": step, "sft_loss": loss, "lr": optimizer.param_groups[0]["lr"]})
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            rate = (step + 1) / (time.perf_counter() - t0)
            log.info("%s: step %d/%d loss %.4f (%.2f steps/s, ETA %.0f s)", phase, step + 1, steps, loss, rate,
                     (steps - step - 1) / rate)
    return history


def rejection_sample(model, tokenizer, task, rows: list[dict], cfg: WarmStartConfig) -> tuple[list[dict], dict]:
    """k samples per prompt → verifier → keep accepted, distinct, ≤ c per prompt. Returns (rows, stats)."""
    accepted: list[dict] = []
    per_prompt_correct: list[int] = []
    by_group: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # difficulty → [accepted, sampled]
    k = cfg.rs_samples
    chunk = max(1, 256 // k)
    t0 = time.perf_counter()
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        batch = sample_completions(
            model, tokenizer, [r["prompt"] for r in part], group_size=k, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.rs_temperature, chat_template=cfg.model.chat_template,
        )
        rewards, _ = score_completions(task, [r["answer"] for r in part for _ in range(k)], batch.texts)
        for i, row in enumerate(part):
            texts = batch.texts[i * k : (i + 1) * k]
            ok = rewards[i * k : (i + 1) * k].tolist()
            per_prompt_correct.append(int(sum(ok)))
            group = _difficulty(row)
            by_group[group][0] += int(sum(ok))
            by_group[group][1] += k
            kept: list[str] = []
            for text, r in zip(texts, ok, strict=True):
                norm = text.strip()
                if r == 1.0 and norm and norm not in kept and norm != (row.get("demonstration") or "").strip():
                    kept.append(norm)
                if len(kept) >= cfg.rs_max_per_prompt:
                    break
            for j, text in enumerate(kept):
                meta = json.loads(row.get("meta") or "{}")
                meta.update({"source": "rejection_sampling", "parent_id": row["id"]})
                accepted.append({**row, "id": f"{row['id']}-rs{j}", "demonstration": text + "\n",
                                 "meta": json.dumps(meta, sort_keys=True)})
        done = start + len(part)
        rate = done / (time.perf_counter() - t0)
        log.info("rejection sampling: %d/%d prompts, %d accepted (%.1f prompts/s, ETA %.0f s)", done, len(rows),
                 len(accepted), rate, (len(rows) - done) / rate)
    n_sampled = k * len(per_prompt_correct)
    stats = {
        "prompts": len(per_prompt_correct),
        "samples_per_prompt": k,
        "sampled": n_sampled,
        "correct": int(sum(per_prompt_correct)),
        "acceptance_rate": sum(per_prompt_correct) / max(1, n_sampled),
        "pass_at_k": sum(c > 0 for c in per_prompt_correct) / max(1, len(per_prompt_correct)),
        "kept": len(accepted),
        "max_per_prompt": cfg.rs_max_per_prompt,
        "acceptance_by_difficulty": {g: a / max(1, n) for g, (a, n) in sorted(by_group.items())},
    }
    return accepted, stats


def _difficulty(row: dict) -> str:
    """A coarse difficulty bucket from the row's meta (General Points: how many solutions exist)."""
    meta = json.loads(row.get("meta") or "{}")
    n = meta.get("n_solutions")
    if n is None:
        return "all"
    return "hard_le2" if n <= 2 else "medium_3to10" if n <= 10 else "easy_gt10"  # tag-safe names (MLflow)


@torch.no_grad()
def measure_target_entropy(model, tokenizer, rows: list[dict], cfg: WarmStartConfig) -> float:
    """H*: mean token entropy of the model's own sampled completions (like-for-like with H_t), sampled and
    measured at `cfg.entropy_temperature`, which must be the training rollout temperature."""
    temperature = cfg.entropy_temperature
    batch = sample_completions(
        model, tokenizer, [r["prompt"] for r in rows], group_size=cfg.entropy_group,
        max_new_tokens=cfg.max_new_tokens, temperature=temperature, chat_template=cfg.model.chat_template,
    )
    _, entropy = completion_logprobs(model, batch, temperature, with_entropy=True)
    return float(masked_mean(entropy, batch.completion_mask.to(entropy.device)))


def run_warm_start(cfg: WarmStartConfig, out_dir: str | Path, splits: dict[str, list[dict]] | None = None,
                   init_model: str | None = None) -> WarmStartResult:
    """Run all three phases; write model/, accepted.parquet, stats.json (last) under out_dir."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    model_cfg = cfg.model if init_model is None else replace(cfg.model, name=str(init_model))
    # ── preflight: inputs checked and the model loaded before anything goes into out_dir ──
    check_out_dir(out)
    check_model_source(model_cfg)
    check_device(cfg.device)
    splits = splits if splits is not None else load_splits(cfg.data)
    check_task(splits, cfg.data.task, cfg.data.path)
    train_rows = splits.get("train", [])
    demos = [r for r in train_rows if r.get("demonstration")]
    if not demos:
        raise DataError(f"{cfg.data.path or 'generated data'}: warm start needs demonstrations in the train split; "
                        "none found")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model, tokenizer = load_policy(model_cfg, device=device, seed=cfg.seed)
    task = get_task(cfg.data.task)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    eval_rows = splits.get("val", [])[: cfg.eval_prompts]
    t0 = time.perf_counter()

    def val_acc() -> float:
        return greedy_eval(model, tokenizer, task, eval_rows, cfg.max_new_tokens, cfg.model.chat_template).accuracy

    accuracy = {"initial": val_acc()}
    history = sft_steps(model, tokenizer, demos, cfg.warmup_steps, cfg, cfg.seed, "warmup")
    accuracy["after_warmup"] = val_acc()
    rs_rows = train_rows
    if cfg.rs_max_prompts and len(rs_rows) > cfg.rs_max_prompts:
        rs_rows = random.Random(cfg.seed).sample(rs_rows, cfg.rs_max_prompts)
    accepted, rs_stats = rejection_sample(model, tokenizer, task, rs_rows, cfg)
    history += sft_steps(model, tokenizer, demos + accepted, cfg.final_sft_steps, cfg, cfg.seed + 1, "final_sft",
                         lr=cfg.lr * cfg.final_sft_lr_ratio)
    accuracy["warm_start"] = val_acc()
    h_rows = [train_rows[i] for i in Cursor(len(train_rows), cfg.seed + 2).take(cfg.entropy_prompts)]
    target_entropy = measure_target_entropy(model, tokenizer, h_rows, cfg)

    model_dir = save_policy(model, tokenizer, out / "model")
    accepted_path = out / "accepted.parquet"
    tmp = accepted_path.with_suffix(".parquet.tmp")
    columns = ["id", "task", "prompt", "answer", "demonstration", "split", "meta"]
    table = pa.table({c: [r.get(c) for r in accepted] for c in columns},
                     schema=pa.schema([(c, pa.string()) for c in columns]))
    pq.write_table(table, tmp)
    tmp.replace(accepted_path)
    with (out / "sft_history.jsonl").open("w") as f:
        f.writelines(json.dumps(h) + "\n" for h in history)
    stats = {
        "rejection_sampling": rs_stats,
        "target_entropy": target_entropy,
        "target_entropy_temperature": cfg.entropy_temperature,
        "val_accuracy": accuracy,
        "demonstrations": len(demos),
        "sft_rows_final": len(demos) + len(accepted),
        "warmup_steps": cfg.warmup_steps,
        "final_sft_steps": cfg.final_sft_steps,
        "elapsed_s": time.perf_counter() - t0,
    }
    stats_path = out / "stats.json"
    stats_tmp = stats_path.with_suffix(".json.tmp")
    stats_tmp.write_text(json.dumps(stats, indent=2))
    stats_tmp.replace(stats_path)  # written last: its presence means the warm start is complete
    log.info("warm start done: acceptance %.3f, pass@%d %.3f, val accuracy %s, H* %.3f",
             rs_stats["acceptance_rate"], cfg.rs_samples, rs_stats["pass_at_k"], accuracy, target_entropy)
    return WarmStartResult(model_dir, accepted_path, stats_path, target_entropy, rs_stats["acceptance_rate"],
                           rs_stats["pass_at_k"], accuracy)
