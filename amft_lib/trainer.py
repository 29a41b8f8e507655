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
(steps, rollouts, SFT tokens) holds by construction; μ is only ever set there (`begin_step`: HPT's
share of all-wrong prompts; `end_step`: H* from the first step when none was measured, then Eq. 6).

The shape is torchtune's recipe: `run_train()` reads check → setup → restore → `train_step` × N (with
`save_checkpoint` and `evaluate` when due) → teardown. `Recipe` holds what setup builds, `TrainState`
what a step changes and a checkpoint saves; the warm start (warm_start.py) has the same phases.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from amft_lib import checkpoint as ckpt
from amft_lib import controller as ctl
from amft_lib import distributed, engine, gac, meta_grad, storage
from amft_lib.config import TrainConfig, check_target_entropy_temperature, config_hash, save_config
from amft_lib.data.schema import DataError
from amft_lib.dataset import check_prompts_fit
from amft_lib.loop_checks import (
    LoopInputs,
    check_loop_inputs,
    check_loop_world,
    check_out_dir,
    resolve_device,
    seed_everything,
)
from amft_lib.losses import group_advantages, ppo_clip_loss
from amft_lib.model import load_policy, trainable_parameters
from amft_lib.optim import build_optimizer, lr_factor
from amft_lib.policy import Policy, save_final_policy, sft_gradient, take_grads
from amft_lib.rollout import TokenBatch, completion_logprobs, demonstration_batch, row_seeds, sample_completions
from amft_lib.sampler import Cursor
from amft_lib.scoring import greedy_eval, score_completions
from amft_lib.tasks import get_task

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
        with policy.autocast():
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
        # the stats are token means within the chunk: weighed by its token share whatever the loss's aggregation
        # (by w they moved with loss.micro_batch_size under seq_mean / dr_grpo: tests/unit/test_grad_accum.py)
        w_tok = chunk.n_tokens / n_tok
        clip_frac += stats.clip_frac * w_tok
        approx_kl += stats.approx_kl * w_tok
        kl_ref += stats.kl_ref * w_tok
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
    if len(rows) < 2:
        return _utility_half(policy, params, task, rows, 0, len(rows), cfg, step)
    cut = len(rows) // 2
    return ctl.UtilityGrad(_utility_half(policy, params, task, rows, 0, cut, cfg, step),
                           _utility_half(policy, params, task, rows, cut, len(rows), cfg, step),
                           cut * G, (len(rows) - cut) * G)


def _utility_half(policy: Policy, params, task, rows: Sequence[dict], lo: int, hi: int, cfg: TrainConfig,
                  step: int) -> list[torch.Tensor]:
    """The policy-gradient estimate of ∇_θU over prompts rows[lo:hi] (G rollouts each, global batch)."""
    G, dist = cfg.controller.meta_val_group, policy.dist
    mb, device = cfg.loss.micro_batch_size, params[0].device
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
        with policy.autocast():
            logprobs, _ = completion_logprobs(policy.forward, chunk, cfg.rollout.temperature)
        seq_logprob = (logprobs * chunk.completion_mask.to(device)).sum(-1)  # [mb]
        surrogate = (weights[s : s + len(chunk)].to(device) * seq_logprob).sum() / n_rows
        (surrogate * dist.world_size).backward()
    return take_grads(params)


def meta_group_terms(policy: Policy, params, task, rows: Sequence[dict], cfg: TrainConfig, step: int,
                     direction: list[torch.Tensor]) -> torch.Tensor:
    """c_g = (1/G)·Σ_{i∈g} (R_i − b_g)·D_i for every prompt group of the global validation batch `rows`, sampled
    at the current parameters (G = meta_val_group rollouts each, the same seeds as `utility_gradient`'s), with
    D_i = ⟨∇ log π(τ_i), v⟩ along `direction` v = ∂θ'/∂μ (`rollout_derivatives`). Each rank samples its block
    of prompts; the terms are gathered, so every rank returns the same [n_groups] and computes the same μ."""
    G, dist = cfg.controller.meta_val_group, policy.dist
    mine = dist.shard(rows, "controller.meta_val_prompts")
    batch, rewards, _ = sample_and_score(policy, task, mine, G, cfg,
                                         row_seeds(cfg.seed, "meta", step, dist.offset(len(rows)) * G, len(mine) * G))
    weights = group_advantages(rewards, G, scale=False)  # R_i − b_g: [N]
    derivs = rollout_derivatives(policy, params, batch, direction, cfg)
    return dist.gather(meta_grad.group_terms(weights, derivs.to(weights.device), G))


def meta_estimator(cfg: TrainConfig, dist: distributed.Dist) -> str:
    """The estimator the meta step runs: `jvp` needs whole parameters, so FSDP2 shards take the central difference."""
    est = cfg.controller.meta_estimator
    return "central_difference" if est == "jvp" and dist.sharded else est


def rollout_derivatives(policy: Policy, params, batch: TokenBatch, direction: list[torch.Tensor],
                        cfg: TrainConfig) -> torch.Tensor:
    """D_i = d/dμ log π_θ'(τ_i) for every rollout of `batch` (this rank's), micro-batched: forward-mode AD
    (`meta_grad.jvp_logprob_derivatives`) or the central difference, per `meta_estimator`. [N]"""
    mb, temperature, device = cfg.loss.micro_batch_size, cfg.rollout.temperature, params[0].device
    chunks = [batch.slice(s, s + mb) for s in range(0, len(batch), mb)]

    def seq_logprob(model, chunk: TokenBatch) -> torch.Tensor:
        with policy.engine.gpu_only_autocast():  # bf16 on GPUs as before; CPU fp32 (forward-mode AD untested in bf16)
            logprobs, _ = completion_logprobs(model, chunk, temperature)
        return meta_grad.sequence_logprobs(logprobs, chunk.completion_mask.to(device))

    if meta_estimator(cfg, policy.dist) == "jvp":
        return torch.cat([meta_grad.jvp_logprob_derivatives(policy.generate, params, direction,
                                                            functools.partial(seq_logprob, chunk=c)) for c in chunks])
    # inside the lookahead θ is restored afterwards anyway (from its copy, or by undoing the step): no copy here
    return meta_grad.central_difference_derivatives(
        params, direction, lambda: torch.cat([seq_logprob(policy.forward, c) for c in chunks]),
        policy.dist.reduction(), exact=cfg.controller.meta_eval_at == "current")


def gradient_halves(grad_fn, n: int, sizes, dist: distributed.Dist):
    """The gradient of a batch of n sequences as two half-batch gradients `grad_fn(lo, hi)` → (grads, loss, stats),
    recombined exactly by their global shares: (grads, loss, stats, ĝ_a − ĝ_b, s_a). Same compute as one pass;
    the halves' difference is what gac measures the gradient's noise from (gac.half_variance).

    sizes(lo, hi) → (weight units, tokens) of rows lo..hi: the loss's aggregation unit (tokens for token_mean,
    sequences otherwise) and the token count (the stats, entropy included, are token means)."""
    cut = n // 2
    (wa, ta), (w, t) = sizes(0, cut), sizes(0, n)
    wa, w, ta, t = dist.sum([wa, w, ta, t])
    sa, sta = wa / max(w, 1e-12), ta / max(t, 1e-12)
    ga, la, stats_a = grad_fn(0, cut)
    gb, lb, stats_b = grad_fn(cut, n)
    grads = [sa * a + (1.0 - sa) * b for a, b in zip(ga, gb, strict=True)]
    stats = {k: sta * stats_a[k] + (1.0 - sta) * stats_b[k] for k in stats_a}  # token means (see rl_gradient)
    return grads, sa * la + (1.0 - sa) * lb, stats, [a - b for a, b in zip(ga, gb, strict=True)], sa


def sample_and_score(policy: Policy, task, rows: Sequence[dict], group_size: int, cfg: TrainConfig,
                     seeds: Sequence[int] | None = None):
    """G rollouts per row at the configured sampling settings, with verifier rewards [N] and format flags.
    `seeds` (one per rollout, `row_seeds`) make each rollout independent of the batch it is drawn in."""
    with policy.sampling():  # the engine's decode precision and KV cache
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


# ── the recipe: checks → setup → restore → train_step × N (save_checkpoint, evaluate) → teardown ──────


@dataclass
class Recipe:
    """What `setup` builds once and every phase reads: the run's parts, never changed by a step."""

    cfg: TrainConfig
    inputs: LoopInputs
    dist: distributed.Dist
    device: torch.device
    policy: Policy
    params: list[torch.nn.Parameter]  # trainable; after wrapping (FSDP2 swaps in sharded ones)
    task: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ref_model: torch.nn.Module | None  # π_ref for the KL penalty (loss.kl_beta > 0)
    checkpoint_root: str | None
    cfg_hash: str
    logs: _Logs | None  # rank 0 only
    t_start: float


@dataclass
class TrainState:
    """What changes from step to step, and all a checkpoint needs to continue bit-exactly."""

    step: int  # optimizer steps done
    controller: ctl.ControllerState  # μ, H*, the meta-gradient count, the μ history
    prompt_cursor: Cursor  # training prompts (rollouts)
    demo_cursor: Cursor  # demonstrations (the SFT batch)
    meta_cursor: Cursor  # validation prompts (the meta-gradient's utility)
    val_initial: dict | None  # evaluation before training (None until measured)
    val_last: dict  # the latest evaluation


@dataclass(frozen=True)
class _Checked:
    """What `check` hands to setup: the loop's inputs and the checkpoint to resume (uri, step, payload)."""

    inputs: LoopInputs
    checkpoint_root: str | None
    cfg_hash: str
    restored: tuple | None


def run_train(
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
    checked = check(cfg, out_dir, init_model, splits, checkpoint_root, resume, force_resume, force_restart)
    seed_everything(cfg.seed)
    dist, device = distributed.init(cfg.distributed, resolve_device(cfg.device))
    _check_resume_world(checked, dist)
    try:
        run, state = setup(cfg, checked, dist, device, t_start)
        if checked.restored is not None:
            restore(run, state, checked.restored)
        start_step = state.step
        if state.val_initial is None:
            state.val_initial = state.val_last = evaluate(run, 0)
        bar = _start(run, state, progress)
        while state.step < cfg.max_steps:
            record = train_step(run, state)
            if run.logs is not None:
                run.logs.metrics(record)
            if run.checkpoint_root and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                save_checkpoint(run, state)
            if bar is not None:
                bar.set_postfix(reward=f"{record['reward_mean']:.2f}", mu=f"{record['mu']:.3f}",
                                H=f"{record['entropy']:.2f}", val=f"{state.val_last['val_reward']:.3f}")
                bar.update(1)
        if bar is not None:
            bar.close()
        return teardown(run, state, start_step, resumed_from=checked.restored[0] if checked.restored else None)
    finally:
        distributed.shutdown(dist)


def _check_resume_world(checked: _Checked, dist: distributed.Dist) -> None:
    """Refuse a checkpoint this world cannot continue (before setup writes anything); log a change."""
    if checked.restored is not None:
        change = ckpt.check_world(checked.restored[0], checked.restored[2].trainer_state, dist, elastic=True)
        if change:
            log.info("%s: %s", checked.restored[0], change)


def _start(run: Recipe, state: TrainState, progress: bool):
    """Say what is about to train; the progress bar (rank 0, when asked), else None."""
    cfg, dist = run.cfg, run.dist
    log.info("training %s for %d steps on %s (%s); initial val accuracy %.3f", cfg.controller.method,
             cfg.max_steps, run.device, f"{dist.strategy} × {dist.world_size}" if dist.world_size > 1 else "1 process",
             state.val_initial["val_accuracy"])
    return _progress(cfg.max_steps, progress and dist.is_main, initial=state.step)


def check(cfg: TrainConfig, out_dir: str | Path, init_model: str | None, splits: dict[str, list[dict]] | None,
          checkpoint_root: str | None, resume: str, force_resume: bool, force_restart: bool) -> _Checked:
    """Every input, before anything is written (see `train`); finds the checkpoint to resume."""
    check_target_entropy_temperature(cfg)  # again: the pipeline's train component sets H* after loading
    if cfg.controller.target_entropy is not None and cfg.controller.target_entropy_temperature is None:
        log.warning("controller.target_entropy=%s has no target_entropy_temperature: cannot check it was measured "
                    "at rollout.temperature=%s", cfg.controller.target_entropy, cfg.rollout.temperature)
    inputs = check_loop_inputs(out_dir, cfg.model, init_model, cfg.device, cfg.data, splits, cfg.eval_prompts)
    where = cfg.data.path or "generated data"
    if not inputs.train_rows:
        raise DataError(f"{where}: the train split is empty")
    if not inputs.demo_rows and cfg.controller.method != "grpo":
        raise DataError(f"{where}: controller.method={cfg.controller.method!r} "
                        "needs demonstrations and the train split has none (use method grpo)")
    half = cfg.controller.meta_val_prompts // 2
    check_loop_world(cfg.distributed, **{
        "rollout.prompts_per_step": cfg.rollout.prompts_per_step, "loss.sft_batch_size": cfg.loss.sft_batch_size,
        "controller.meta_val_prompts // 2": half,
        "controller.meta_val_prompts - meta_val_prompts // 2": cfg.controller.meta_val_prompts - half,
        "validation prompts evaluated (min(eval_prompts, val rows))": len(inputs.eval_rows)})
    if resume != "never" and resume != "auto" and not checkpoint_root:
        checkpoint_root = ckpt.root_of(resume)
    cfg_hash = config_hash(cfg)
    if checkpoint_root and not storage.is_s3(checkpoint_root):
        check_out_dir(Path(checkpoint_root), "checkpoint root")
    if resume == "never" and checkpoint_root and cfg.checkpoint_every:
        ckpt.list_checkpoints(checkpoint_root)  # reachable (credentials, endpoint) before training starts
    restored = (ckpt.find_resume_point(checkpoint_root, resume, cfg_hash, force_resume, force_restart)
                if resume != "never" else None)
    return _Checked(inputs, checkpoint_root, cfg_hash, restored)


def setup(cfg: TrainConfig, checked: _Checked, dist: distributed.Dist, device: torch.device,
          t_start: float) -> tuple[Recipe, TrainState]:
    """Build every part of the run (the process group is joined) and the state of step 0."""
    inputs = checked.inputs
    model, tokenizer = load_policy(inputs.model_cfg, device=device, seed=cfg.seed)
    check_prompts_fit([*inputs.train_rows, *inputs.val_rows], tokenizer, model, cfg.rollout.max_new_tokens,
                      inputs.model_cfg.chat_template, cfg.data.path)  # refused before anything is written (dataset.py)
    model.train()
    policy = Policy.of(model, tokenizer, dist, device,
                       engine.plan(cfg.engine, device, steps=cfg.max_steps, world_size=dist.world_size))
    params = trainable_parameters(policy.generate)  # after wrapping: FSDP2 swaps in sharded parameters
    task = get_task(cfg.data.task)
    if dist.is_main:
        inputs.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, inputs.out / "config.yaml")
    optimizer = build_optimizer(  # AdamW; fp32 master weights + moments for bf16 weights (model.master_weights)
        params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=cfg.optim.weight_decay,
        master_weights=cfg.model.master_weights,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # a lambda, not a partial: its state_dict stays the same
        optimizer, lambda s: lr_factor(s, cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr_ratio))
    ref_model = None
    if cfg.loss.kl_beta > 0:
        ref_model, _ = load_policy(inputs.model_cfg, device=device, seed=cfg.seed)
        ref_model.eval().requires_grad_(False)
        if dist.sharded:
            ref_model = distributed.wrap(ref_model, dist, device)
    state = TrainState(
        step=0, controller=ctl.initial_state(cfg.controller),
        prompt_cursor=Cursor(len(inputs.train_rows), cfg.seed), demo_cursor=Cursor(len(inputs.demo_rows), cfg.seed + 1),
        meta_cursor=Cursor(len(inputs.val_rows), cfg.seed + 2), val_initial=None, val_last=dict(_NAN_EVAL))
    if checked.restored is not None and checked.checkpoint_root and dist.is_main:
        _restore_logs(checked.checkpoint_root, inputs.out, checked.restored[1])  # cut at its step, then appended to
    logs = _Logs(inputs.out, append=checked.restored is not None) if dist.is_main else None
    run = Recipe(cfg, inputs, dist, device, policy, params, task, optimizer, scheduler, ref_model,
                 checked.checkpoint_root, checked.cfg_hash, logs, t_start)
    return run, state


def restore(run: Recipe, state: TrainState, restored: tuple) -> None:
    """Continue from a checkpoint: weights, optimizer and RNG (checkpoint.restore_training_state), then
    the scheduler, μ controller, data cursors and evaluations (setup has cut the run's logs at its step)."""
    uri, step, payload = restored
    ckpt.restore_training_state(payload, run.policy, run.optimizer)
    run.scheduler.load_state_dict(payload.scheduler_state)
    ts = payload.trainer_state
    state.step = step
    state.controller = ctl.ControllerState.from_dict(payload.controller_state)
    state.prompt_cursor.load_state_dict(ts["prompt_cursor"])
    state.demo_cursor.load_state_dict(ts["demo_cursor"])
    state.meta_cursor.load_state_dict(ts["meta_cursor"])
    state.val_initial, state.val_last = ts["val_initial"], ts["val_last"]
    log.info("resumed from %s at step %d (μ=%.4f)", uri, step, state.controller.mu)


class _Rollouts(NamedTuple):
    """One step's rollouts on this rank: token batch, rewards [N] and format flags, advantages [N];
    `all_rewards` [B*G] is the global batch's (every rank)."""

    batch: TokenBatch
    rewards: torch.Tensor
    format_ok: list
    advantages: torch.Tensor
    all_rewards: torch.Tensor


class _Update(NamedTuple):
    """What the update of one step measured (losses NaN where not computed this step)."""

    entropy: float  # H_t of this step's rollouts, at θ before the update
    rl_loss: float
    sft_loss: float
    rl_stats: dict
    meta: ctl.MetaGradStats | None
    grad_norm: float
    t_meta: float
    noise: gac.GradNoise | None = None  # gac's measured gradient noise (method gac only)


def train_step(run: Recipe, state: TrainState) -> dict:
    """One step (AMFT.md §4): sample → score → μ_t → gradients (+ meta-gradient) → mixed update →
    μ_{t+1} → maybe evaluate. Advances `state` and returns the step's metrics record."""
    cfg, step = run.cfg, state.step
    t0 = time.perf_counter()
    # ── 1. sample and score: G completions for each of B training prompts (this rank: its block of them) ──
    ro = _sample_rollouts(run, state, step)
    # ── 2. μ_t: the controller's (HPT: the share of all-wrong prompts in this batch, controller.py) ──
    state.controller = ctl.begin_step(state.controller, ro.all_rewards, cfg.rollout.group_size, cfg.controller)
    mu = state.controller.mu
    do_meta = ctl.needs_meta_gradient(cfg.controller, step) and bool(run.inputs.val_rows)
    # With one update per batch the RL forward doubles as the π_old / entropy forward (see rl_gradient).
    on_policy = cfg.loss.ppo_epochs == 1 and (mu < 1.0 or do_meta)
    old_logprobs, ref_logprobs, entropy = _reference_logprobs(run, ro.batch, on_policy)
    t_rollout = time.perf_counter() - t0
    # ── 3. the two gradients, the meta-gradient, and the mixed update θ ← AdamW((1 − μ)·g_RL + μ·g_SFT) ──
    t1 = time.perf_counter()
    sft_batch = _sft_batch(run, state)
    up = _update(run, state, step, mu, do_meta, on_policy, ro, old_logprobs, ref_logprobs, sft_batch, entropy)
    lr = run.scheduler.get_last_lr()[0]
    with warnings.catch_warnings():
        if not up.grad_norm > 0.0:  # no optimizer step (see _apply_mixed_gradient): torch's order warning is not news
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        run.scheduler.step()
    t_update = time.perf_counter() - t1 - up.t_meta
    # ── 4. controller: μ_{t+1} = clip(μ_t + η_μ·m_t + η_H·(H* − H_t)) (H* = H_0 when not measured before) ──
    meta_grad, meta_t = (up.meta.meta_grad, up.meta.meta_grad_t) if up.meta is not None else (None, None)
    before = state.controller
    state.controller = ctl.end_step(before, up.entropy, meta_grad, cfg.controller, meta_t, up.noise,
                                    up.meta.terms if up.meta is not None else ())
    state.step = step + 1
    if run.logs is not None and (up.meta is not None or up.noise is not None):
        run.logs.controller(controller_record(step, mu, state.controller, up.entropy, up.meta, up.noise, cfg,
                                              before))
    # ── 5. evaluate when due; the record (global numbers; rank 0 writes it) ──
    val_now: dict = {"val_reward": None, "val_accuracy": None}
    if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.max_steps and run.inputs.eval_rows:
        state.val_last = val_now = evaluate(run, state.step)
    return _record(run, state, step, mu, ro, sft_batch, up, val_now, lr,
                   {"t0": t0, "time_rollout_s": t_rollout, "time_update_s": t_update})


def _sample_rollouts(run: Recipe, state: TrainState, step: int) -> _Rollouts:
    cfg, dist = run.cfg, run.dist
    B, G = cfg.rollout.prompts_per_step, cfg.rollout.group_size
    rows = dist.shard([run.inputs.train_rows[i] for i in state.prompt_cursor.take(B)], "rollout.prompts_per_step")
    batch, rewards, format_ok = sample_and_score(
        run.policy, run.task, rows, G, cfg, row_seeds(cfg.seed, "rollout", step, dist.offset(B) * G, len(rows) * G))
    advantages = group_advantages(rewards, G, scale=cfg.loss.scale_rewards)  # groups never straddle ranks
    return _Rollouts(batch, rewards, format_ok, advantages, dist.gather(rewards))


@torch.no_grad()
def _reference_logprobs(run: Recipe, batch: TokenBatch, on_policy: bool):
    """(log π_old [N, L] or None when on policy, log π_ref [N, L] or None, H_t or NaN when on policy)."""
    cfg, dist = run.cfg, run.dist
    old_logprobs = ref_logprobs = None
    entropy = float("nan")
    with run.policy.autocast():
        if not on_policy:
            old_logprobs, entropy_tok = completion_logprobs(run.policy.forward, batch, cfg.rollout.temperature,
                                                            with_entropy=True)
            mask = batch.completion_mask.to(old_logprobs.device)
            ent_sum, n_tok = dist.sum([float((entropy_tok * mask).sum()), float(mask.sum())])
            entropy = ent_sum / max(1.0, n_tok)  # H_t over the global batch
        if run.ref_model is not None:
            ref_logprobs, _ = completion_logprobs(run.ref_model, batch, cfg.rollout.temperature)
    return old_logprobs, ref_logprobs, entropy


def _sft_batch(run: Recipe, state: TrainState) -> TokenBatch | None:
    """This step's demonstrations (this rank's block of loss.sft_batch_size), or None without any."""
    cfg, demo_rows = run.cfg, run.inputs.demo_rows
    if not demo_rows:
        return None
    rows = run.dist.shard([demo_rows[i] for i in state.demo_cursor.take(cfg.loss.sft_batch_size)],
                          "loss.sft_batch_size")
    if not rows:
        return None
    return demonstration_batch(run.policy.tokenizer, [r["prompt"] for r in rows], [r["demonstration"] for r in rows],
                               cfg.rollout.max_new_tokens, cfg.model.chat_template)


def _update(run: Recipe, state: TrainState, step: int, mu: float, do_meta: bool, on_policy: bool, ro: _Rollouts,
            old_logprobs, ref_logprobs, sft_batch: TokenBatch | None, entropy: float) -> _Update:
    """g_RL and g_SFT (each only when its weight or the meta-gradient needs it; both, as half-batch pairs, for
    gac's noise), m_t on meta steps (first epoch), and one optimizer step on their mix per PPO epoch."""
    cfg = run.cfg
    meta_stats, noise, t_meta = None, None, 0.0
    rl_loss, sft_loss, rl_stats, grad_norm = float("nan"), float("nan"), {}, 0.0
    noisy = cfg.controller.method in ctl.USES_NOISE
    for epoch in range(cfg.loss.ppo_epochs):
        meta_now = do_meta and epoch == 0
        g_rl = g_sft = rl_half = sft_half = None
        if mu < 1.0 or meta_now or noisy:
            g_rl, rl_loss, rl_stats, rl_half = _rl_gradient(run, ro, old_logprobs, ref_logprobs, halves=noisy)
            if on_policy:
                entropy = rl_stats.pop("entropy")  # H_t at θ before this step's update
        if sft_batch is not None and (mu > 0.0 or meta_now or noisy):
            g_sft, sft_loss, sft_half = _sft_gradient(run, sft_batch, halves=noisy)
        if meta_now and g_rl is not None and g_sft is not None:
            tm = time.perf_counter()
            meta_stats = _meta_gradient(run, state, step, mu, g_rl, g_sft)
            t_meta = time.perf_counter() - tm
        if epoch == 0 and rl_half is not None and sft_half is not None:
            noise = _gradient_noise(run, g_rl, g_sft, rl_half, sft_half)
        grad_norm = _apply_mixed_gradient(run, g_rl, g_sft, mu)
    return _Update(entropy, rl_loss, sft_loss, rl_stats, meta_stats, grad_norm, t_meta, noise)


def _rl_gradient(run: Recipe, ro: _Rollouts, old_logprobs, ref_logprobs, halves: bool):
    """`rl_gradient` over the step's rollouts: (g, loss, stats, None), or with halves (g, loss, stats, (ĝ_a − ĝ_b, s_a))
    from two half-batch passes (`gradient_halves`; needs ≥ 2 rollouts on this rank)."""
    cfg, batch = run.cfg, ro.batch

    def grad_fn(lo: int, hi: int):
        return rl_gradient(run.policy, run.params, batch.slice(lo, hi),
                           None if old_logprobs is None else old_logprobs[lo:hi], ro.advantages[lo:hi], cfg,
                           None if ref_logprobs is None else ref_logprobs[lo:hi])

    if not halves or len(batch) < 2:
        return (*grad_fn(0, len(batch)), None)
    by_tokens = cfg.loss.loss_agg == "token_mean"

    def sizes(lo: int, hi: int) -> tuple[float, float]:
        part = batch.slice(lo, hi)
        return (part.n_tokens if by_tokens else len(part)), part.n_tokens

    g, loss, stats, diff, share = gradient_halves(grad_fn, len(batch), sizes, run.dist)
    return g, loss, stats, (diff, share)


def _sft_gradient(run: Recipe, batch: TokenBatch, halves: bool):
    """`sft_gradient` over the demonstrations: (g, loss, None), or (g, loss, (ĝ_a − ĝ_b, s_a)) with halves."""
    cfg = run.cfg

    def grad_fn(lo: int, hi: int):
        g, loss = sft_gradient(run.policy.forward, run.params, batch.slice(lo, hi),
                               micro_batch_size=cfg.loss.micro_batch_size, engine=run.policy.engine,
                               dist=run.policy.dist)
        return g, loss, {}

    if not halves or len(batch) < 2:
        g, loss, _ = grad_fn(0, len(batch))
        return g, loss, None

    def sizes(lo: int, hi: int) -> tuple[float, float]:
        n = batch.slice(lo, hi).n_tokens
        return n, n

    g, loss, _, diff, share = gradient_halves(grad_fn, len(batch), sizes, run.dist)
    return g, loss, (diff, share)


def _gradient_noise(run: Recipe, g_rl, g_sft, rl_half, sft_half) -> gac.GradNoise:
    """gac's measurement: σ²_RL, σ²_SFT from the half-batch differences and the de-noised disagreement."""
    red = run.policy.dist.reduction()
    rl_diff, sft_diff = red.to_local(rl_half[0]), red.to_local(sft_half[0])
    gap = [a - b for a, b in zip(red.to_local(g_rl), red.to_local(g_sft), strict=True)]
    dots = red.total(ctl._partial_dots([(rl_diff, rl_diff), (sft_diff, sft_diff), (gap, gap)])).tolist()
    return gac.noise_from_halves(dots[0], rl_half[1], dots[1], sft_half[1], dots[2])


def _meta_gradient(run: Recipe, state: TrainState, step: int, mu: float, g_rl, g_sft) -> ctl.MetaGradStats:
    """m_t on fresh validation rollouts at θ'(μ): per rollout with its SE (jvp, central_difference), or the
    old backward ∇U (`meta_estimator=backward`, for meta_update=cosine)."""
    cfg, policy, params, c = run.cfg, run.policy, run.params, run.cfg.controller
    val_batch = [run.inputs.val_rows[i] for i in state.meta_cursor.take(c.meta_val_prompts)]
    common = {"eval_at": c.meta_eval_at, "reduction": policy.dist.reduction(),
              "precond": ctl.adam_preconditioner(run.optimizer, params) if c.meta_lookahead == "adam" else None}
    alpha = run.scheduler.get_last_lr()[0]
    if c.meta_estimator == "backward":
        return ctl.compute_meta_gradient(
            params, g_rl, g_sft, mu, alpha, update=c.meta_update,
            utility_grad=functools.partial(utility_gradient, policy, params, run.task, val_batch, cfg, step), **common)
    return ctl.compute_meta_evidence(
        params, g_rl, g_sft, mu, alpha, estimator=meta_estimator(cfg, policy.dist),
        group_terms=functools.partial(meta_group_terms, policy, params, run.task, val_batch, cfg, step), **common)


def _apply_mixed_gradient(run: Recipe, g_rl, g_sft, mu: float) -> float:
    """θ ← AdamW step on (1 − μ)·g_RL + μ·g_SFT (AMFT Eq. 3), clipped; returns the norm before clipping."""
    params = run.params
    for i, p in enumerate(params):
        g = torch.zeros_like(p)
        if g_rl is not None and mu < 1.0:
            g.add_(g_rl[i], alpha=1.0 - mu)
        if g_sft is not None and mu > 0.0:
            g.add_(g_sft[i], alpha=mu)
        p.grad = g
    clip = run.cfg.optim.grad_clip if run.cfg.optim.grad_clip > 0 else math.inf
    grad_norm = _full(torch.nn.utils.clip_grad_norm_(params, clip))
    # A batch with no signal (every group's rewards equal, μ = 0) has an exactly zero gradient. Adam
    # would still move θ along its stale momentum, drifting a converged policy with no evidence;
    # skip the step instead (the LR schedule still advances).
    if grad_norm > 0.0:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _record(run: Recipe, state: TrainState, step: int, mu: float, ro: _Rollouts, sft_batch: TokenBatch | None,
            up: _Update, val_now: dict, lr: float, times: dict) -> dict:
    """The step's metrics.jsonl record (DESIGN.md's metric contract), global over the ranks."""
    dist, G, all_rewards = run.dist, run.cfg.rollout.group_size, ro.all_rewards
    n_tokens, n_format_ok, n_rollouts, completion_tokens = dist.sum([
        ro.batch.n_tokens + (sft_batch.n_tokens if sft_batch is not None else 0), sum(ro.format_ok),
        len(ro.format_ok), float(ro.batch.completion_mask.sum())])
    mu_spread = dist.spread(state.controller.mu)  # μ must be the same number on every rank
    dt = time.perf_counter() - times["t0"]
    record = {
        "step": step, "mu": mu, "mu_next": state.controller.mu, "entropy": up.entropy,
        "target_entropy": state.controller.target_entropy, "sft_loss": _num(up.sft_loss),
        "rl_loss": _num(up.rl_loss), "reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std()),
        "format_error_rate": 1.0 - n_format_ok / n_rollouts,
        "frac_reward_zero_std": float((all_rewards.view(-1, G).std(dim=1) == 0).float().mean()),
        "meta_grad": up.meta.meta_grad if up.meta is not None else None, "lr": lr, "grad_norm": up.grad_norm,
        "clip_frac": up.rl_stats.get("clip_frac"), "approx_kl": up.rl_stats.get("approx_kl"),
        "kl_ref": up.rl_stats.get("kl_ref"),
        "completion_len": completion_tokens / n_rollouts,
        **val_now, "tokens_per_s": n_tokens / dt,
        "time_rollout_s": times["time_rollout_s"], "time_update_s": times["time_update_s"],
        "time_meta_s": up.t_meta, "elapsed_s": time.perf_counter() - run.t_start,
    }
    if dist.world_size > 1:
        record.update(world_size=dist.world_size, mu_rank_spread=mu_spread)
    return record


def controller_record(step: int, mu: float, after: ctl.ControllerState, entropy: float,
                      meta: ctl.MetaGradStats | None, noise: gac.GradNoise | None, cfg: TrainConfig,
                      before: ctl.ControllerState | None = None) -> dict:
    """One controller.jsonl line: μ before and after, the entropy term's Δμ, and on meta steps m, SE(m), t, the
    meta rule's Δμ and why (`ctl.meta_decision` on the state `before` the update, pooling included), with the
    estimator's diagnostics; gac: its measured noise."""
    c = cfg.controller
    record = {"step": step, "mu": mu, "mu_next": after.mu, "entropy": entropy, "target_entropy": after.target_entropy}
    if c.method in ctl.USES_ENTROPY and after.target_entropy is not None:
        record["entropy_delta"] = ctl.entropy_term(entropy, after.target_entropy, c.eta_h, c.entropy_tolerance)
    if meta is not None:
        d = ctl.meta_decision(before or after, meta.meta_grad, meta.meta_grad_t, meta.terms, c)
        record.update({k: _finite(v) for k, v in meta._asdict().items() if k != "terms"}, delta_mu=d.delta,
                      reason=d.reason)
        if c.meta_accumulate > 1:
            record.update(meta_pooled=d.pooled or c.meta_accumulate, meta_pooled_t=_finite(d.pooled_t))
    if noise is not None:
        target = gac.gac_target(noise)
        record.update(noise._asdict(), gac_target=target, gac_ema=after.gac_ema, delta_mu=after.mu - mu,
                      reason="gac: nothing measured: held" if target is None else
                      f"gac: μ* = {target:.4f}, μ̄ = {after.gac_ema:.4f}, move capped at {c.gac_cap:g}")
    return record


def _finite(x):
    """NaN and ±inf as JSON null (json.dumps would write the invalid tokens NaN/Infinity)."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def save_checkpoint(run: Recipe, state: TrainState) -> str:
    """Checkpoint after `state.step` steps: everything a resumed run needs to continue bit-exactly, with
    the run's logs (so a resume on a fresh node keeps them). Collective under torchrun."""
    cfg, dist = run.cfg, run.dist
    trainer_state = {
        "step": state.step, "config_hash": run.cfg_hash, "method": cfg.controller.method,
        "prompt_cursor": state.prompt_cursor.state_dict(), "demo_cursor": state.demo_cursor.state_dict(),
        "meta_cursor": state.meta_cursor.state_dict(), "val_initial": state.val_initial, "val_last": state.val_last,
        "world_size": dist.world_size, "strategy": dist.strategy,
    }
    metric = None if state.val_last["val_reward"] != state.val_last["val_reward"] else state.val_last["val_reward"]
    if run.logs is not None:
        run.logs.flush()
        for name in LOG_FILES:
            storage.put_file(str(run.inputs.out / name), storage.join(run.checkpoint_root, "logs", name))
    return ckpt.save_training_state(run.checkpoint_root, state.step, run.policy, run.optimizer,
                                    trainer_state=trainer_state, config_hash=run.cfg_hash,
                                    keep_last=cfg.checkpoint_keep_last, scheduler_state=run.scheduler.state_dict(),
                                    controller_state=state.controller.to_dict(), metric=metric)


def evaluate(run: Recipe, step: int) -> dict[str, float]:
    """Greedy accuracy and sampled reward on the validation prompts (each rank its block); NaN without
    any. Sampling is seeded per row and step, so evaluating (or not) never changes the trajectory."""
    cfg, dist, eval_rows = run.cfg, run.dist, run.inputs.eval_rows
    if not eval_rows:
        return dict(_NAN_EVAL)
    mine = dist.shard(eval_rows, "validation prompts")
    with run.policy.sampling():
        ev = greedy_eval(run.policy.generate, run.policy.tokenizer, run.task, mine, cfg.rollout.max_new_tokens,
                         cfg.model.chat_template, cfg.log_samples, synced=dist.sharded)
    if run.logs is not None:
        run.logs.samples(step, ev.samples)
    seeds = row_seeds(cfg.seed, "eval", step, dist.offset(len(eval_rows)) * cfg.eval_samples,
                      len(mine) * cfg.eval_samples)
    _, rewards, _ = sample_and_score(run.policy, run.task, mine, cfg.eval_samples, cfg, seeds)
    correct, reward_sum = dist.sum([ev.accuracy * len(mine), float(rewards.sum())])
    return {"val_reward": reward_sum / (len(eval_rows) * cfg.eval_samples), "val_accuracy": correct / len(eval_rows)}


def teardown(run: Recipe, state: TrainState, start_step: int, resumed_from: str | None) -> TrainResult:
    """The final checkpoint (when the last step was not one), the final evaluation, the final model."""
    cfg, out = run.cfg, run.inputs.out
    if resumed_from is not None and start_step >= cfg.max_steps:
        log.warning("checkpoint %s is already at max_steps=%d: nothing left to train", resumed_from, cfg.max_steps)
    if run.checkpoint_root and cfg.checkpoint_every and cfg.max_steps % cfg.checkpoint_every and \
            start_step < cfg.max_steps:
        save_checkpoint(run, state)  # the final state is always checkpointed
    val_final = evaluate(run, cfg.max_steps)
    model_dir = out / "model"
    if run.logs is not None:
        run.logs.metrics({"step": cfg.max_steps, **{k: _num(v) for k, v in val_final.items()}, "final": True,
                          "mu": state.controller.mu, "config_hash": config_hash(cfg)})
        run.logs.close()
    save_final_policy(run.policy, run.inputs.model_cfg, model_dir)
    val_initial = state.val_initial
    result = TrainResult(
        out_dir=out, model_dir=model_dir, steps=cfg.max_steps, mu_final=state.controller.mu,
        target_entropy=state.controller.target_entropy, val_reward_initial=val_initial["val_reward"],
        val_reward_final=val_final["val_reward"], val_accuracy_initial=val_initial["val_accuracy"],
        val_accuracy_final=val_final["val_accuracy"], elapsed_s=time.perf_counter() - run.t_start,
    )
    log.info("done: val reward %.3f → %.3f, val accuracy %.3f → %.3f, μ %.3f, %.1f s", result.val_reward_initial,
             result.val_reward_final, result.val_accuracy_initial, result.val_accuracy_final, state.controller.mu,
             result.elapsed_s)
    return result


_NAN_EVAL = {"val_reward": float("nan"), "val_accuracy": float("nan")}


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
