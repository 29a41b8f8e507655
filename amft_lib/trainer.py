"""The AMFT training loop: one readable loop for all seven methods (AMFT.md §4).

Each step:
    sample G completions for B prompts → score with the verifier → group advantages →
    g_RL = ∇L_RL (PPO-clip) and g_SFT = ∇L_SFT (demonstrations) →
    [every T_meta steps: m = α⟨∇U(θ'), g_RL − g_SFT⟩ on validation rollouts] →
    θ ← AdamW((1 − μ)·g_RL + μ·g_SFT, clipped) → μ ← controller_step(μ, H_t, m) → log → checkpoint

Why the two gradients are computed separately rather than backpropagating the mixed loss once:
the meta-gradient needs both, and since L_RL and L_SFT are evaluated on different sequences
(rollouts vs demonstrations) two backward passes cost the same as one pass over both.
The baselines differ only in their controller (see controller.py), so an equal budget
(steps, rollouts, SFT tokens) holds by construction.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from amft_lib import checkpoint as ckpt
from amft_lib import controller as ctl
from amft_lib import distributed, storage
from amft_lib.config import TrainConfig, check_target_entropy_temperature, config_hash, save_config
from amft_lib.data.schema import DataError
from amft_lib.dataset import check_task, load_splits
from amft_lib.losses import group_advantages, ppo_clip_loss
from amft_lib.model import check_model_source, load_policy, trainable_parameters
from amft_lib.optim import build_optimizer
from amft_lib.rollout import TokenBatch, completion_logprobs, demonstration_batch, row_seeds, sample_completions
from amft_lib.sampler import Cursor
from amft_lib.scoring import greedy_eval, score_completions
from amft_lib.tasks import get_task
from amft_lib.training import (
    Policy,
    autocast,
    check_device,
    check_out_dir,
    lr_factor,
    resolve_device,
    save_final_policy,
    seed_everything,
    sft_gradient,
    take_grads,
)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    out_dir: Path
    model_dir: Path
    steps: int
    mu_final: float
    target_entropy: float | None
    val_reward_initial: float  # sampled validation reward Û(θ) before training
    val_reward_final: float
    val_accuracy_initial: float  # greedy pass@1 on the same validation prompts
    val_accuracy_final: float
    elapsed_s: float


# ── gradients of the two losses (chunked so memory is bounded; results are exact sums) ─────────────


def rl_gradient(
    policy: Policy,
    params: list[torch.nn.Parameter],
    batch: TokenBatch,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    cfg: TrainConfig,
    ref_logprobs: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], float, dict]:
    """g_RL = ∇_θ L_RL over the rollout batch, in micro-batches whose weights make the sum exact.

    old_logprobs=None means "on policy": this forward *is* π_old (the first and only update on these
    rollouts), so log π_old = log π_θ detached (ratio exactly 1) and the rollout entropy H_t comes from
    the same logits. That saves the separate no-grad forward over the batch.
    Under torchrun `batch` is this rank's shard and each chunk's weight is its share of the global
    batch (× world size, as DDP/FSDP2 average), so the result and the stats are the global ones.
    """
    dist = policy.dist
    for p in params:
        p.grad = None
    n, n_tok = dist.sum([len(batch), batch.n_tokens])
    n_tok = max(1.0, n_tok)
    total, clip_frac, approx_kl, kl_ref, entropy_sum = 0.0, 0.0, 0.0, 0.0, 0.0
    mb = cfg.loss.micro_batch_size
    device = params[0].device
    for s in range(0, len(batch), mb):
        chunk = batch.slice(s, s + mb)
        mask = chunk.completion_mask.to(device)
        # token_mean weighs chunks by their token share; seq_mean and dr_grpo by their sequence share
        w = chunk.n_tokens / n_tok if cfg.loss.loss_agg == "token_mean" else len(chunk) / n
        with autocast(cfg.precision):
            logprobs, entropy = completion_logprobs(policy.forward, chunk, cfg.rollout.temperature,
                                                    with_entropy=old_logprobs is None)
        if entropy is not None:
            entropy_sum += float((entropy * mask).sum())
        loss, stats = ppo_clip_loss(
            logprobs,
            logprobs.detach() if old_logprobs is None else old_logprobs[s : s + mb].to(device),
            advantages[s : s + mb].to(device),
            mask,
            clip_eps=cfg.loss.clip_eps,
            agg=cfg.loss.loss_agg,
            max_len=cfg.rollout.max_new_tokens,
            ref_logprobs=None if ref_logprobs is None else ref_logprobs[s : s + mb].to(device),
            kl_beta=cfg.loss.kl_beta,
        )
        (loss * (w * dist.world_size)).backward()
        total += loss.detach().item() * w
        clip_frac += stats.clip_frac * w
        approx_kl += stats.approx_kl * w
        kl_ref += stats.kl_ref * w
    total, clip_frac, approx_kl, kl_ref, entropy_sum = dist.sum([total, clip_frac, approx_kl, kl_ref, entropy_sum])
    stats = {"clip_frac": clip_frac, "approx_kl": approx_kl, "kl_ref": kl_ref}
    if old_logprobs is None:
        stats["entropy"] = entropy_sum / n_tok
    return take_grads(params), total, stats


def utility_gradient(
    policy: Policy, params, task, rows: Sequence[dict], cfg: TrainConfig, step: int
) -> list[torch.Tensor] | ctl.UtilityGrad:
    """∇_θU by the policy gradient on fresh validation rollouts: mean_i (R_i − b_g)·∇log π(τ_i).

    b_g is the group mean reward (G = meta_val_group samples per prompt), so groups where every
    sample got the same reward contribute nothing, as they carry no information about direction.
    With ≥ 2 prompts the estimate comes as two half-sample gradients (first and second half of the
    prompts, groups intact), whose cosine the meta step logs as the noise check; their weighted mean
    is the same estimate over all rollouts. `rows` is the global batch: under torchrun each rank
    samples its share of each half and the backward hooks sum the shares.
    """
    G = cfg.controller.meta_val_group
    dist = policy.dist
    mb = cfg.loss.micro_batch_size
    device = params[0].device

    def half(lo: int, hi: int) -> list[torch.Tensor]:
        part = rows[lo:hi]
        mine = dist.shard(part, "controller.meta_val_prompts half")
        first = (lo + dist.offset(len(part))) * G
        batch, rewards, _ = sample_and_score(policy, task, mine, G, cfg,
                                             row_seeds(cfg.seed, "meta", step, first, len(mine) * G))
        weights = group_advantages(rewards, G, scale=False)  # R_i − b_g: [N]
        n_rows = (hi - lo) * G  # the whole half, over all ranks
        for p in params:
            p.grad = None
        for s in range(0, len(batch), mb):
            chunk = batch.slice(s, s + mb)
            with autocast(cfg.precision):
                logprobs, _ = completion_logprobs(policy.forward, chunk, cfg.rollout.temperature)
            seq_logprob = (logprobs * chunk.completion_mask.to(device)).sum(-1)  # [mb]
            surrogate = (weights[s : s + len(chunk)].to(device) * seq_logprob).sum() / n_rows
            (surrogate * dist.world_size).backward()
        return take_grads(params)

    if len(rows) < 2:
        return half(0, len(rows))
    cut = len(rows) // 2
    return ctl.UtilityGrad(half(0, cut), half(cut, len(rows)), cut * G, (len(rows) - cut) * G)


def sample_and_score(policy: Policy, task, rows: Sequence[dict], group_size: int, cfg: TrainConfig,
                     seeds: Sequence[int] | None = None):
    """G rollouts per row at the configured sampling settings, with verifier rewards [N] and format flags.
    `seeds` (one per rollout, `row_seeds`) make each rollout independent of the batch it is drawn in."""
    with autocast(cfg.precision), policy.sampling():
        batch = sample_completions(
            policy.generate,
            policy.tokenizer,
            [r["prompt"] for r in rows],
            group_size=group_size,
            max_new_tokens=cfg.rollout.max_new_tokens,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            chat_template=cfg.model.chat_template,
            seeds=seeds,
            synced=policy.dist.sharded,
        )
    rewards, format_ok = score_completions(task, [r["answer"] for r in rows for _ in range(group_size)], batch.texts)
    return batch, rewards, format_ok


# ── the loop ────────────────────────────────────────────────────────────────────────────────────────


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    init_model: str | None = None,
    splits: dict[str, list[dict]] | None = None,
    progress: bool = True,
    checkpoint_root: str | None = None,
    resume: str = "never",
    force_resume: bool = False,
    force_restart: bool = False,
) -> TrainResult:
    """Train with `cfg.controller.method`; writes metrics.jsonl, controller.jsonl, samples.jsonl,
    config.yaml and the final model (HF directory, safetensors) under `out_dir`.

    init_model: start from this HF directory (e.g. the warm-start model) instead of cfg.model.name.
    checkpoint_root: local path or s3:// run root; checkpoints go to <root>/checkpoints/step-NNNNNNN
        every `cfg.checkpoint_every` steps and at the end (see amft_lib/checkpoint/).
    resume: "never", "auto" (newest checkpoint under checkpoint_root whose manifest verifies) or
        the URI of one checkpoint. A different config hash is refused unless force_resume.
    force_restart: with resume="auto", start from step 0 even when every checkpoint under the root is
        corrupt (otherwise refused with NoValidCheckpointError naming each and why).

    Under `torchrun` with `distributed.strategy` ddp/fsdp/auto every rank calls this with the same
    arguments: the process group is joined here and left at the end, rank 0 alone writes `out_dir`
    and the checkpoint manifests, and every rank returns the same result (see distributed.py).

    Everything a user can get wrong (out_dir, model, device, data and its task, checkpoint root,
    the checkpoint to resume) is checked before out_dir is created or written: a refused run leaves
    no trace. Errors are UserErrors (ConfigError, DataError, ModelError, CheckpointError).
    """
    t_start = time.perf_counter()
    check_target_entropy_temperature(cfg)  # again: the pipeline's train component sets H* after loading
    if cfg.controller.target_entropy is not None and cfg.controller.target_entropy_temperature is None:
        log.warning("controller.target_entropy=%s has no target_entropy_temperature: cannot check it was measured "
                    "at rollout.temperature=%s", cfg.controller.target_entropy, cfg.rollout.temperature)
    out = Path(out_dir)
    model_cfg = cfg.model if init_model is None else replace(cfg.model, name=str(init_model))
    # ── preflight: every input is checked (and the model loaded) before a byte goes into out_dir ──
    check_out_dir(out)
    check_model_source(model_cfg)
    check_device(cfg.device)
    splits = splits if splits is not None else load_splits(cfg.data)
    check_task(splits, cfg.data.task, cfg.data.path)
    train_rows = splits.get("train", [])
    demo_rows = [r for r in train_rows if r.get("demonstration")]
    val_rows = splits.get("val", [])
    if not train_rows:
        raise DataError(f"{cfg.data.path or 'generated data'}: the train split is empty")
    if not demo_rows and cfg.controller.method != "grpo":
        raise DataError(f"{cfg.data.path or 'generated data'}: controller.method={cfg.controller.method!r} "
                        "needs demonstrations and the train split has none (use method grpo)")
    eval_rows = val_rows[: cfg.eval_prompts]
    _check_world(cfg, len(eval_rows))
    if resume != "never" and resume != "auto" and not checkpoint_root:
        checkpoint_root = ckpt.root_of(resume)
    cfg_hash = config_hash(cfg)
    if checkpoint_root and not storage.is_s3(checkpoint_root):
        check_out_dir(Path(checkpoint_root), "checkpoint root")
    if resume == "never" and checkpoint_root and cfg.checkpoint_every:
        ckpt.list_checkpoints(checkpoint_root)  # reachable (credentials, endpoint) before training starts
    restored = (ckpt.find_resume_point(checkpoint_root, resume, cfg_hash, force_resume, force_restart)
                if resume != "never" else None)
    seed_everything(cfg.seed)
    dist, device = distributed.init(cfg.distributed, resolve_device(cfg.device))
    if restored is not None:
        change = ckpt.check_world(restored[0], restored[2].trainer_state, dist, elastic=True)
        if change:
            log.info("%s: %s", restored[0], change)
    try:
        return _train(cfg, out, model_cfg, dist, device, train_rows, demo_rows, val_rows, eval_rows, progress,
                      checkpoint_root, restored, cfg_hash, t_start)
    finally:
        distributed.shutdown(dist)


def _check_world(cfg: TrainConfig, n_eval: int) -> None:
    """Under torchrun: a valid strategy, and global batches the world size divides (before any work)."""
    _, world, _ = distributed.world_from_env()
    distributed.resolve_strategy(cfg.distributed, world)
    if world > 1:
        half = cfg.controller.meta_val_prompts // 2
        distributed.check_divisible(
            world, **{"rollout.prompts_per_step": cfg.rollout.prompts_per_step,
                      "loss.sft_batch_size": cfg.loss.sft_batch_size,
                      "controller.meta_val_prompts // 2": half,
                      "controller.meta_val_prompts - meta_val_prompts // 2": cfg.controller.meta_val_prompts - half,
                      "validation prompts evaluated (min(eval_prompts, val rows))": n_eval})


def _train(cfg, out, model_cfg, dist, device, train_rows, demo_rows, val_rows, eval_rows, progress,
           checkpoint_root, restored, cfg_hash, t_start) -> TrainResult:
    """The loop (`train` has checked every input and joined the process group)."""
    main = dist.is_main
    model, tokenizer = load_policy(model_cfg, device=device, seed=cfg.seed)
    model.train()
    policy = Policy.of(model, tokenizer, dist, device)
    forward = policy.forward
    params = trainable_parameters(policy.generate)  # after wrapping: FSDP2 swaps in sharded parameters
    task = get_task(cfg.data.task)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    optimizer = build_optimizer(  # AdamW; fp32 master weights + moments for bf16 weights (model.master_weights)
        params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=cfg.optim.weight_decay,
        master_weights=cfg.model.master_weights,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr_ratio),
    )
    ref_model = None
    if cfg.loss.kl_beta > 0:
        ref_model, _ = load_policy(model_cfg, device=device, seed=cfg.seed)
        ref_model.eval().requires_grad_(False)
        if dist.sharded:
            ref_model = distributed.wrap(ref_model, dist, device)

    state = ctl.initial_state(cfg.controller)
    prompt_cursor = Cursor(len(train_rows), cfg.seed)
    demo_cursor = Cursor(len(demo_rows), cfg.seed + 1)
    meta_cursor = Cursor(len(val_rows), cfg.seed + 2)

    B, G = cfg.rollout.prompts_per_step, cfg.rollout.group_size
    nan_eval = {"val_reward": float("nan"), "val_accuracy": float("nan")}
    start_step, val_initial, val_last = 0, None, nan_eval
    if restored is not None:
        uri, start_step, payload = restored
        ckpt.restore_training_state(payload, policy, optimizer)  # weights, optimizer, this rank's RNG
        scheduler.load_state_dict(payload.scheduler_state)
        state = ctl.ControllerState.from_dict(payload.controller_state)
        ts = payload.trainer_state
        prompt_cursor.load_state_dict(ts["prompt_cursor"])
        demo_cursor.load_state_dict(ts["demo_cursor"])
        meta_cursor.load_state_dict(ts["meta_cursor"])
        val_initial, val_last = ts["val_initial"], ts["val_last"]
        if checkpoint_root and main:
            _restore_logs(checkpoint_root, out, start_step)
        log.info("resumed from %s at step %d (μ=%.4f)", uri, start_step, state.mu)
    logs = _Logs(out, append=restored is not None) if main else None

    def save(step_done: int) -> None:
        """Checkpoint after `step_done` steps: everything a resumed run needs to continue bit-exactly."""
        trainer_state = {
            "step": step_done, "config_hash": cfg_hash, "method": cfg.controller.method,
            "prompt_cursor": prompt_cursor.state_dict(), "demo_cursor": demo_cursor.state_dict(),
            "meta_cursor": meta_cursor.state_dict(), "val_initial": val_initial, "val_last": val_last,
            "world_size": dist.world_size, "strategy": dist.strategy,
        }
        metric = None if val_last["val_reward"] != val_last["val_reward"] else val_last["val_reward"]
        if logs is not None:
            logs.flush()
            for name in LOG_FILES:  # logs travel with the run root so a resume on a fresh node keeps them
                storage.put_file(str(out / name), storage.join(checkpoint_root, "logs", name))
        ckpt.save_training_state(checkpoint_root, step_done, policy, optimizer, trainer_state=trainer_state,
                                 config_hash=cfg_hash, keep_last=cfg.checkpoint_keep_last,
                                 scheduler_state=scheduler.state_dict(), controller_state=state.to_dict(),
                                 metric=metric)

    def run_eval(step: int) -> dict[str, float]:
        """Greedy accuracy and sampled reward on the validation prompts (each rank its block). Sampling
        is seeded per row and step, so evaluating (or not) never changes the training trajectory."""
        mine = dist.shard(eval_rows, "validation prompts")
        with policy.sampling():
            ev = greedy_eval(policy.generate, tokenizer, task, mine, cfg.rollout.max_new_tokens,
                             cfg.model.chat_template, cfg.log_samples, synced=dist.sharded)
        if logs is not None:
            logs.samples(step, ev.samples)
        seeds = row_seeds(cfg.seed, "eval", step, dist.offset(len(eval_rows)) * cfg.eval_samples,
                          len(mine) * cfg.eval_samples)
        _, rewards, _ = sample_and_score(policy, task, mine, cfg.eval_samples, cfg, seeds)
        correct, reward_sum = dist.sum([ev.accuracy * len(mine), float(rewards.sum())])
        return {"val_reward": reward_sum / (len(eval_rows) * cfg.eval_samples),
                "val_accuracy": correct / len(eval_rows)}

    if val_initial is None:
        val_initial = run_eval(0) if eval_rows else nan_eval
        val_last = val_initial
    bar = _progress(cfg.max_steps, progress and main, initial=start_step)
    log.info("training %s for %d steps on %s (%s); initial val accuracy %.3f", cfg.controller.method,
             cfg.max_steps, device, f"{dist.strategy} × {dist.world_size}" if dist.world_size > 1 else "1 process",
             val_initial["val_accuracy"])

    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        mu = state.mu
        # ── 1. sample: G completions for each of B training prompts (this rank: its block of them) ──
        rows = dist.shard([train_rows[i] for i in prompt_cursor.take(B)], "rollout.prompts_per_step")
        # ── 2. score: verifier rewards, group-relative advantages, π_old log-probs and entropy ──
        rollouts, rewards, format_ok = sample_and_score(
            policy, task, rows, G, cfg, row_seeds(cfg.seed, "rollout", step, dist.offset(B) * G, len(rows) * G))
        advantages = group_advantages(rewards, G, scale=cfg.loss.scale_rewards)  # groups never straddle ranks
        all_rewards = dist.gather(rewards)
        if cfg.controller.method == "hpt":  # HPT: all-wrong prompts go to SFT; μ is their share (controller.py)
            mu = ctl.hpt_mu(all_rewards, G)
            state = replace(state, mu=mu)
        do_meta = ctl.needs_meta_gradient(cfg.controller, step) and bool(val_rows)
        # With one update per batch the RL forward doubles as the π_old / entropy forward (see rl_gradient).
        on_policy = cfg.loss.ppo_epochs == 1 and (mu < 1.0 or do_meta)
        old_logprobs = ref_logprobs = None
        entropy = float("nan")
        with torch.no_grad(), autocast(cfg.precision):
            if not on_policy:
                old_logprobs, entropy_tok = completion_logprobs(forward, rollouts, cfg.rollout.temperature,
                                                                with_entropy=True)
                mask = rollouts.completion_mask.to(old_logprobs.device)
                ent_sum, n_tok = dist.sum([float((entropy_tok * mask).sum()), float(mask.sum())])
                entropy = ent_sum / max(1.0, n_tok)  # H_t over the global batch
            if ref_model is not None:
                ref_logprobs, _ = completion_logprobs(ref_model, rollouts, cfg.rollout.temperature)
        t_rollout = time.perf_counter() - t0

        # ── 3. the two gradients, the meta-gradient, and the mixed update ──
        t1 = time.perf_counter()
        sft_rows = (dist.shard([demo_rows[i] for i in demo_cursor.take(cfg.loss.sft_batch_size)], "loss.sft_batch_size")
                    if demo_rows else [])
        sft_batch = (
            demonstration_batch(
                tokenizer,
                [r["prompt"] for r in sft_rows],
                [r["demonstration"] for r in sft_rows],
                cfg.rollout.max_new_tokens,
                cfg.model.chat_template,
            )
            if sft_rows
            else None
        )
        meta_stats, t_meta = None, 0.0
        rl_loss_v, sft_loss_v, rl_stats = float("nan"), float("nan"), {}
        grad_norm, stepped = 0.0, False
        for epoch in range(cfg.loss.ppo_epochs):
            need_rl = mu < 1.0 or (do_meta and epoch == 0)
            need_sft = sft_batch is not None and (mu > 0.0 or (do_meta and epoch == 0))
            g_rl = g_sft = None
            if need_rl:
                g_rl, rl_loss_v, rl_stats = rl_gradient(policy, params, rollouts, old_logprobs, advantages, cfg,
                                                        ref_logprobs)
                if on_policy:
                    entropy = rl_stats.pop("entropy")  # H_t at θ before this step's update
            if need_sft:
                g_sft, sft_loss_v = sft_gradient(forward, params, sft_batch, micro_batch_size=cfg.loss.micro_batch_size,
                                                 precision=cfg.precision, dist=dist)
            if do_meta and epoch == 0 and g_rl is not None and g_sft is not None:
                tm = time.perf_counter()
                val_batch = [val_rows[i] for i in meta_cursor.take(cfg.controller.meta_val_prompts)]
                meta_stats = ctl.compute_meta_gradient(
                    params,
                    g_rl,
                    g_sft,
                    mu,
                    alpha=scheduler.get_last_lr()[0],
                    utility_grad=lambda vb=val_batch, st=step: utility_gradient(policy, params, task, vb, cfg, st),
                    eval_at=cfg.controller.meta_eval_at,
                    normalize=cfg.controller.meta_normalize,
                    precond=ctl.adam_preconditioner(optimizer, params)
                    if cfg.controller.meta_lookahead == "adam" else None,
                    reduction=dist.reduction(),
                )
                t_meta = time.perf_counter() - tm
            # θ ← AdamW step on (1 − μ)·g_RL + μ·g_SFT   (AMFT Eq. 3)
            for i, p in enumerate(params):
                g = torch.zeros_like(p)
                if g_rl is not None and mu < 1.0:
                    g.add_(g_rl[i], alpha=1.0 - mu)
                if g_sft is not None and mu > 0.0:
                    g.add_(g_sft[i], alpha=mu)
                p.grad = g
            grad_norm = _full(
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
            )
            # A batch with no signal (every group's rewards equal, μ = 0) has an exactly zero gradient. Adam
            # would still move θ along its stale momentum, drifting a converged policy with no evidence;
            # skip the step instead (the LR schedule still advances).
            stepped = grad_norm > 0.0
            if stepped:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        with warnings.catch_warnings():
            if not stepped:  # deliberate (above): torch's "scheduler before optimizer" warning is not news
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            scheduler.step()
        t_update = time.perf_counter() - t1 - t_meta

        if state.target_entropy is None:
            # H*: entropy of the starting (warm-start) policy's own rollouts, like-for-like with H_t
            state = replace(state, target_entropy=entropy)
        # ── 4. controller: μ_{t+1} = clip(μ_t + η_μ·m_t + η_H·(H* − H_t)) ──
        meta_grad = meta_stats.meta_grad if meta_stats is not None else None
        state = ctl.controller_step(state, entropy, meta_grad, cfg.controller)
        if meta_stats is not None and logs is not None:
            logs.controller({"step": step, "mu": mu, "mu_next": state.mu, "entropy": entropy,
                             "target_entropy": state.target_entropy, **meta_stats._asdict()})

        # ── 5. log (global numbers; rank 0 writes) ──
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps and eval_rows:
            val_last = run_eval(step + 1)
            val_now: dict = val_last
        else:
            val_now = {"val_reward": None, "val_accuracy": None}
        n_tokens, n_format_ok, n_rollouts, completion_tokens = dist.sum([
            rollouts.n_tokens + (sft_batch.n_tokens if sft_batch is not None else 0), sum(format_ok),
            len(format_ok), float(rollouts.completion_mask.sum())])
        mu_spread = dist.spread(state.mu)  # μ must be the same number on every rank
        dt = time.perf_counter() - t0
        record = {
            "step": step, "mu": mu, "mu_next": state.mu, "entropy": entropy,
            "target_entropy": state.target_entropy, "sft_loss": _num(sft_loss_v), "rl_loss": _num(rl_loss_v),
            "reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std()),
            "format_error_rate": 1.0 - n_format_ok / n_rollouts,
            "frac_reward_zero_std": float((all_rewards.view(-1, G).std(dim=1) == 0).float().mean()),
            "meta_grad": meta_grad, "lr": lr, "grad_norm": grad_norm,
            "clip_frac": rl_stats.get("clip_frac"), "approx_kl": rl_stats.get("approx_kl"),
            "kl_ref": rl_stats.get("kl_ref"),
            "completion_len": completion_tokens / n_rollouts,
            **val_now, "tokens_per_s": n_tokens / dt,
            "time_rollout_s": t_rollout, "time_update_s": t_update, "time_meta_s": t_meta,
            "elapsed_s": time.perf_counter() - t_start,
        }
        if dist.world_size > 1:
            record.update(world_size=dist.world_size, mu_rank_spread=mu_spread)
        if logs is not None:
            logs.metrics(record)
        if checkpoint_root and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            save(step + 1)
        if bar is not None:
            bar.set_postfix(reward=f"{record['reward_mean']:.2f}", mu=f"{mu:.3f}", H=f"{entropy:.2f}",
                            val=f"{val_last['val_reward']:.3f}")
            bar.update(1)

    if bar is not None:
        bar.close()
    if restored is not None and start_step >= cfg.max_steps:
        log.warning("checkpoint %s is already at max_steps=%d: nothing left to train", restored[0], cfg.max_steps)
    if checkpoint_root and cfg.checkpoint_every and cfg.max_steps % cfg.checkpoint_every and start_step < cfg.max_steps:
        save(cfg.max_steps)  # the final state is always checkpointed
    val_final = run_eval(cfg.max_steps) if eval_rows else nan_eval
    model_dir = out / "model"
    if logs is not None:
        logs.metrics({"step": cfg.max_steps, **{k: _num(v) for k, v in val_final.items()}, "final": True,
                      "mu": state.mu, "config_hash": config_hash(cfg)})
        logs.close()
    save_final_policy(policy, model_cfg, model_dir)
    result = TrainResult(
        out_dir=out, model_dir=model_dir, steps=cfg.max_steps, mu_final=state.mu,
        target_entropy=state.target_entropy, val_reward_initial=val_initial["val_reward"],
        val_reward_final=val_final["val_reward"], val_accuracy_initial=val_initial["val_accuracy"],
        val_accuracy_final=val_final["val_accuracy"],
        elapsed_s=time.perf_counter() - t_start,
    )
    log.info("done: val reward %.3f → %.3f, val accuracy %.3f → %.3f, μ %.3f, %.1f s", result.val_reward_initial,
             result.val_reward_final, result.val_accuracy_initial, result.val_accuracy_final, state.mu,
             result.elapsed_s)
    return result


def _full(x: torch.Tensor) -> float:
    """A norm that FSDP2 returns as a (replicated) DTensor, as a plain float."""
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)


class _Logs:
    """metrics.jsonl, controller.jsonl and samples.jsonl of the run (rank 0 only), one JSON record per line."""

    def __init__(self, out: Path, append: bool) -> None:
        mode = "a" if append else "w"
        self._files = {name: (out / name).open(mode) for name in LOG_FILES}
        self._out = out

    def metrics(self, record: dict) -> None:
        self._write("metrics.jsonl", [record])

    def controller(self, record: dict) -> None:
        self._write("controller.jsonl", [record])

    def samples(self, step: int, samples: list[dict]) -> None:
        self._write("samples.jsonl", [{"step": step, **s} for s in samples])

    def _write(self, name: str, records: list[dict]) -> None:
        f = self._files[name]
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.flush()

    def flush(self) -> None:
        for f in self._files.values():
            f.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def _num(x: float) -> float | None:
    return None if x != x else x  # NaN (loss not computed this step) → null in JSON


def _progress(total: int, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


LOG_FILES = ("metrics.jsonl", "controller.jsonl", "samples.jsonl")


def _restore_logs(root: str, out: Path, step: int) -> None:
    """Bring back the run's logs from the checkpoint root and cut them at `step`, so the resumed
    run appends exactly what an uninterrupted run would have written after it."""
    for name in LOG_FILES:
        src = storage.join(root, "logs", name)
        lines = storage.get_bytes(src).decode().splitlines() if storage.exists(src) else []
        # samples are written by the evaluation *after* step-1 and carry its count; the rest carry their index
        limit = step + 1 if name == "samples.jsonl" else step
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:  # a torn last line (killed mid-write): the resumed run rewrites it
                log.warning("dropping an unreadable line of %s", src)
                continue
            if record.get("step", 0) < limit:
                kept.append(line)
        (out / name).write_text("".join(line + "\n" for line in kept))
