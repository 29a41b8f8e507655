"""The rejection-sampled warm start (AMFT.md §3), the pipeline stage before AMFT training.

    1. SFT warm-up: W steps on demonstrations.
    2. Rejection sampling: k completions per training prompt from the warmed model; keep the ones
       the verifier accepts, deduplicated, at most c per prompt; report acceptance rates.
    3. SFT on demonstrations ∪ accepted samples → the warm-start model; measure H* (the mean token
       entropy of its own rollouts), which the controller's entropy term steers towards.

The warm start never hands on a model worse than its warm-up (issue 25): the final SFT's model is
kept only when its validation accuracy is at least the warm-up's; otherwise the after-warm-up
weights are restored, and stats.json says which (`kept_model`, with both accuracies in `val_accuracy`).
Why a guard rather than a different final phase: the General Points demo's 0.22 → 0.10 was measured
on 50 val prompts (11 vs 5 solved; the 95 % interval of the difference, about [−0.26, +0.02], holds
0), and on Countdown (500 val prompts, seeds 0/1/2, W = 400) the final SFT did not lose anything:
+0.015 [−0.003, +0.035] over the warm-up, +0.005 on demonstrations alone, +0.007 with the warm-up's
AdamW state carried over — neither the data mix nor the optimizer reset (nor the schedule: its peak,
0.1 × lr, is where the warm-up's cosine ends) moves val measurably. What remains is noise and, on a
memorising task, more epochs; keeping the better of two by val is cheap and always safe.
Rejection-sampling checkpoints are scored with the after-warm-up accuracy, so retention keeps the
newest of them (it holds exactly the after-warm-up weights: sampling does not train), and a run
resumed inside the final SFT can still fall back.

Why accepted samples join the demonstrations: they are correct answers in the model's own
distribution, so the final SFT moves the policy less than fitting foreign demonstrations would,
and RL starts from a model that already succeeds on some prompts (GRPO learns nothing from
prompts where every sample fails).

Checkpoints (issue 12): with a checkpoint root and `checkpoint_every` > 0 the warm start saves its
state every N steps and at the end of each phase to `<root>/warm_start/checkpoints/step-NNNNNNN`
(amft_lib/checkpoint's layout: MANIFEST.json last, LATEST after it), and `resume="auto"` continues from
the newest verified one bit-exactly on CPU; see :class:`WarmStartCheckpoints`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from amft_lib import checkpoint as ckpt
from amft_lib import distributed, engine, storage
from amft_lib.checkpoint.state import trainable_state
from amft_lib.config import WarmStartConfig, config_hash, save_config
from amft_lib.data.schema import DataError
from amft_lib.dataset import check_prompts_fit
from amft_lib.loop_checks import LoopInputs, check_loop_inputs, check_loop_world, resolve_device, seed_everything
from amft_lib.model import load_policy, trainable_parameters
from amft_lib.optim import build_optimizer, lr_factor
from amft_lib.policy import Policy, save_final_policy, sft_gradient
from amft_lib.rollout import completion_logprobs, demonstration_batch, row_seeds, sample_completions
from amft_lib.sampler import Cursor
from amft_lib.scoring import greedy_eval, score_completions
from amft_lib.tasks import get_task

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
    resumed_from: str | None = None  # the checkpoint this run continued from, if any


# ── checkpoints ─────────────────────────────────────────────────────────────────────────────────

CHECKPOINT_DIR = "warm_start"  # checkpoints go to <run root>/warm_start/checkpoints/, beside the outputs
PHASES = ("warmup", "rejection_sampling", "final_sft")


def rs_chunk_size(k: int) -> int:
    """Prompts per rejection-sampling chunk: ~256 completions per generate call (k per prompt)."""
    return max(1, 256 // k)


class WarmStartCheckpoints:
    """Save and restore the warm start's state through amft_lib/checkpoint (same files, MANIFEST.json
    last, LATEST after it, retention, config-hash refusal), under `<root>/warm_start/`.

    One step counter runs through the three phases so the step folders sort in run order:
    warm-up step s → s, rejection-sampling chunk c → W + c, final SFT step s → W + C + s, with W
    warm-up steps and C chunks. A checkpoint is taken after every `checkpoint_every`-th step and
    after the last step of each phase. What it holds:

        model.safetensors   the trainable weights (all of them, or the LoRA adapters)
        optimizer.pt        the current SFT phase's AdamW state ({} during rejection sampling:
                            each SFT phase starts its own optimizer)
        rng.pt              python, numpy and torch RNG states
        trainer_state.json  step, config_hash, phase, phase_step/phase_steps, each phase's first
                            step (offsets), the phase's data cursor, the SFT history so far, the
                            validation accuracies so far, and rejection sampling's accepted rows
                            and counts (partial while it runs)
        scheduler.pt, controller.json   empty: the learning rate is a function of the step, and
                            there is no μ controller in the warm start

    Restoring happens inside the phase's loop, at the very point the checkpoint was taken (weights,
    optimizer, cursor, RNG last), so on CPU everything after it repeats bit for bit. Phases before
    it are skipped; their results come from `trainer_state.json`.
    """

    def __init__(self, root: str | None, cfg: WarmStartConfig, policy: Policy) -> None:
        self.root = storage.join(root, CHECKPOINT_DIR) if root else None
        self.every = cfg.checkpoint_every if root else 0
        self.keep_last = cfg.checkpoint_keep_last
        self.config_hash = config_hash(cfg)
        self.policy = policy  # under torchrun: DCP sharded checkpoints (checkpoint/sharded.py), same rules
        # each phase's first global step; the final SFT's is known once rejection sampling has its chunk count
        self.offsets = {"warmup": 0, "rejection_sampling": cfg.warmup_steps}
        # run-level results saved with every checkpoint: live references owned by run_warm_start
        self.progress: dict = {}
        self.uri: str | None = None  # the checkpoint resumed from
        self.saved = 0  # checkpoints this process saved (the phase-end log line counts them)
        self._pending: tuple[dict, ckpt.CheckpointPayload] | None = None  # restored, not yet applied

    def load(self, resume: str, force: bool = False) -> dict:
        """Find the checkpoint to resume from ("auto": the newest verified one under the root; or a
        URI) and return its trainer_state ({} to start fresh). Weights and RNG are applied later,
        by :meth:`start` inside the phase the checkpoint was taken in."""
        if resume == "never":
            return {}
        found = ckpt.find_resume_point(self.root, resume, self.config_hash, force)  # the trainer's rule
        if found is None:
            return {}
        self.uri, step, payload = found
        ckpt.check_world(self.uri, payload.trainer_state, self.policy.dist)
        state = payload.trainer_state
        if state.get("phase") not in PHASES:
            raise ckpt.CheckpointError(f"{self.uri} is not a warm-start checkpoint (no phase in trainer_state.json)")
        self._pending = (state, payload)
        self.offsets.update(state["offsets"])
        log.info("warm start resumes from %s: step %d, %s step %d/%d", self.uri, step, state["phase"],
                 state["phase_step"], state["phase_steps"])
        return state

    def start(self, phase: str, total: int, optimizer=None, cursor: Cursor | None = None) -> tuple[int, dict]:
        """(steps of `phase` already done, that phase's saved extras). Restores weights, optimizer,
        cursor and RNG if the pending checkpoint was taken in this phase; a phase the checkpoint is
        past counts as done."""
        if phase == "rejection_sampling":
            self.offsets["final_sft"] = self.offsets[phase] + total
        if self._pending is None:
            return 0, {}
        state, payload = self._pending
        if PHASES.index(state["phase"]) > PHASES.index(phase):
            return total, {}
        if state["phase"] != phase:
            return 0, {}
        self._pending = None
        ckpt.restore_training_state(payload, self.policy, optimizer)  # weights, optimizer, this rank's RNG
        if cursor is not None:
            cursor.load_state_dict(state["cursor"])
        return state["phase_step"], state.get("rs", {})

    def step_done(self, phase: str, done: int, total: int, *, optimizer=None, cursor: Cursor | None = None,
                  records: list[dict] | None = None, rs: dict | None = None, metric: float | None = None) -> None:
        """Checkpoint after step `done` of `total` in `phase` if it is due. `records`: this call's
        new SFT history records; `rs`: rejection sampling's partial results."""
        step = self.offsets[phase] + done
        if not self.every or (step % self.every and done < total):
            return
        progress = dict(self.progress)
        progress["history"] = list(progress.get("history", [])) + list(records or [])
        dist = self.policy.dist
        trainer_state = {
            "step": step, "config_hash": self.config_hash, "phase": phase, "phase_step": done, "phase_steps": total,
            "offsets": self.offsets, "cursor": cursor.state_dict() if cursor is not None else None,
            "world_size": dist.world_size, "strategy": dist.strategy,
            **progress, **({"rs": rs} if rs is not None else {}),
        }
        uri = ckpt.save_training_state(self.root, step, self.policy, optimizer, trainer_state=trainer_state,
                                       config_hash=self.config_hash, keep_last=self.keep_last, metric=metric)
        self.saved += 1
        if done == total:  # one line per phase: each save and deletion is a DEBUG line (checkpoint/files.py)
            log.info("%s: checkpointed, %d save(s) so far in this run, newest %s (the last %d kept)", phase,
                     self.saved, uri, self.keep_last)

    def fallback_weights(self) -> dict[str, torch.Tensor] | None:
        """The after-warm-up trainable weights a run resumed inside the final SFT falls back to: the last
        rejection-sampling checkpoint (sampling does not train; retention keeps it as the only scored
        one). None when no checkpoint is pending in the final SFT (the live weights are the ones)."""
        if self._pending is None or self._pending[0]["phase"] != "final_sft":
            return None
        uri = ckpt.checkpoint_uri(self.root, self.offsets["final_sft"])
        try:
            _, payload = ckpt.load_checkpoint(uri)
        except ckpt.CheckpointError as exc:
            raise ckpt.CheckpointError(f"{self.uri} is inside the final SFT, whose fall-back to the after-warm-up "
                                       f"weights needs the last rejection-sampling checkpoint: {exc}") from None
        ckpt.restore_training_state(payload, self.policy, None)  # weights (and RNG: the pending restore resets it)
        return snapshot(self.policy)

    def check_applied(self) -> None:
        if self._pending is not None:
            raise ckpt.CheckpointError(f"{self.uri}: phase {self._pending[0]['phase']!r} never ran; not resumed")


def snapshot(policy: Policy) -> dict[str, torch.Tensor]:
    """A copy of the trainable weights (this rank's shards under FSDP2; on their device)."""
    return {name: p.detach().clone() for name, p in trainable_state(policy.generate)}


def restore_snapshot(policy: Policy, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in trainable_state(policy.generate):
            p.copy_(weights[name])


def sft_steps(
    model, tokenizer, rows: list[dict], steps: int, cfg: WarmStartConfig, seed: int, phase: str,
    lr: float | None = None, checkpoints: WarmStartCheckpoints | None = None,
) -> list[dict]:
    """Plain SFT for `steps` steps (AdamW, warm-up + cosine to peak `lr`, default `cfg.lr`). No
    rollouts: this is the cheap part. With `checkpoints` (phase "warmup" or "final_sft") it resumes
    a restored checkpoint of this phase and checkpoints as it goes; returns the records of the
    steps it ran. `model` is an HF model, or a `Policy` under torchrun: each rank then trains on its
    block of every global batch of `cfg.batch_size` demonstrations."""
    if steps == 0:
        return []
    policy = model if isinstance(model, Policy) else Policy(model, model, tokenizer)
    dist = policy.dist
    peak = cfg.lr if lr is None else lr
    params = trainable_parameters(policy.generate)
    optimizer = build_optimizer(params, lr=peak, betas=(0.9, 0.99), weight_decay=0.01,
                                master_weights=cfg.model.master_weights)
    cursor = Cursor(len(rows), seed)
    start = checkpoints.start(phase, steps, optimizer, cursor)[0] if checkpoints is not None else 0
    history, t0 = [], time.perf_counter()
    policy.generate.train()
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = peak * lr_factor(step, max(1, steps // 20), steps, 0.1)
        batch_rows = dist.shard([rows[i] for i in cursor.take(cfg.batch_size)], "batch_size")
        batch = demonstration_batch(
            tokenizer,
            [r["prompt"] for r in batch_rows],
            [r["demonstration"] for r in batch_rows],
            cfg.max_new_tokens,
            cfg.model.chat_template,
        )
        grads, loss = sft_gradient(policy.forward, params, batch, micro_batch_size=cfg.micro_batch_size,
                                   engine=policy.engine, dist=dist)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"phase": phase, "step": step, "sft_loss": loss, "lr": optimizer.param_groups[0]["lr"]})
        if checkpoints is not None:
            checkpoints.step_done(phase, step + 1, steps, optimizer=optimizer, cursor=cursor, records=history)
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            rate = (step + 1 - start) / (time.perf_counter() - t0)
            log.info("%s: step %d/%d loss %.4f (%.2f steps/s, ETA %.0f s)", phase, step + 1, steps, loss, rate,
                     (steps - step - 1) / rate)
    return history


def rejection_sample(model, tokenizer, task, rows: list[dict], cfg: WarmStartConfig,
                     checkpoints: WarmStartCheckpoints | None = None,
                     keep_score: float | None = None) -> tuple[list[dict], dict]:
    """k samples per prompt → verifier → keep accepted, distinct, ≤ c per prompt. Returns (rows, stats).
    With `checkpoints` it resumes a restored checkpoint taken after a chunk and checkpoints per chunk,
    each scored `keep_score` for retention (the after-warm-up accuracy: see the module docstring).

    Each completion is sampled from its own seed (prompt index, sample index), so the accepted rows do
    not depend on chunking or on the world size. Under torchrun (`model` a `Policy`) each rank samples
    its block of every chunk and every rank gathers the whole chunk's texts and rewards, so all ranks
    hold the same accepted rows."""
    policy = model if isinstance(model, Policy) else Policy(model, model, tokenizer)
    accepted: list[dict] = []
    per_prompt_correct: list[int] = []
    by_group: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # difficulty → [accepted, sampled]
    k = cfg.rs_samples
    chunk = rs_chunk_size(k) * policy.dist.world_size
    n_chunks, first = math.ceil(len(rows) / chunk), 0
    if checkpoints is not None:
        first, saved = checkpoints.start("rejection_sampling", n_chunks)
        if saved:
            accepted, per_prompt_correct = saved["accepted"], saved["per_prompt_correct"]
            by_group.update(saved["by_group"])
    t0 = time.perf_counter()
    for start in range(first * chunk, len(rows), chunk):
        part = rows[start : start + chunk]
        texts_all, rewards_all = _sample_block(policy, task, part, start, cfg)
        for i, row in enumerate(part):
            texts = texts_all[i * k : (i + 1) * k]
            ok = rewards_all[i * k : (i + 1) * k]
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
        rate = (done - first * chunk) / (time.perf_counter() - t0)
        log.info("rejection sampling: %d/%d prompts, %d accepted (%.1f prompts/s, ETA %.0f s)", done, len(rows),
                 len(accepted), rate, (len(rows) - done) / rate)
        if checkpoints is not None:
            checkpoints.step_done("rejection_sampling", start // chunk + 1, n_chunks, metric=keep_score, rs={
                "accepted": accepted, "per_prompt_correct": per_prompt_correct, "by_group": dict(by_group)})
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


def _sample_block(policy: Policy, task, part: list[dict], first: int, cfg: WarmStartConfig) -> tuple[list, list]:
    """k completions and rewards for every prompt of `part` (global prompt index `first` + i), in order.
    Under torchrun each rank samples a block of at most ⌈len/world⌉ prompts and the blocks are
    gathered; a rank left without prompts (a short last chunk) still steps through a dummy prompt,
    as FSDP2's synced generation needs every rank."""
    k, dist = cfg.rs_samples, policy.dist
    per = -(-len(part) // dist.world_size)
    lo = min(len(part), dist.rank * per)
    mine = part[lo : lo + per]
    todo = mine or part[:1]
    with policy.sampling():
        batch = sample_completions(
            policy.generate, policy.tokenizer, [r["prompt"] for r in todo], group_size=k,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.rs_temperature, chat_template=cfg.model.chat_template,
            seeds=row_seeds(cfg.seed, "rejection_sampling", 0, (first + lo) * k, len(todo) * k), synced=dist.sharded,
        )
    rewards, _ = score_completions(task, [r["answer"] for r in todo for _ in range(k)], batch.texts)
    texts, scores = (batch.texts, rewards.tolist()) if mine else ([], [])
    if dist.world_size == 1:
        return texts, scores
    gathered: list = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, (texts, scores))
    return [t for ts, _ in gathered for t in ts], [r for _, rs in gathered for r in rs]


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
    measured at `cfg.entropy_temperature`, which must be the training rollout temperature. Under
    torchrun (`model` a `Policy`) each rank measures its block of `rows`; the token sums are reduced."""
    policy = model if isinstance(model, Policy) else Policy(model, model, tokenizer)
    dist, G = policy.dist, cfg.entropy_group
    temperature = cfg.entropy_temperature
    mine = dist.shard(rows, "entropy_prompts")
    with policy.sampling():
        batch = sample_completions(
            policy.generate, policy.tokenizer, [r["prompt"] for r in mine], group_size=G,
            max_new_tokens=cfg.max_new_tokens, temperature=temperature, chat_template=cfg.model.chat_template,
            seeds=row_seeds(cfg.seed, "entropy", 0, dist.offset(len(rows)) * G, len(mine) * G), synced=dist.sharded,
        )
    _, entropy = completion_logprobs(policy.forward, batch, temperature, with_entropy=True)
    mask = batch.completion_mask.to(entropy.device)
    total, count = dist.sum([float((entropy * mask).sum()), float(mask.sum())])
    return total / max(1.0, count)


# ── the recipe: checks → setup → restore → warm-up → rejection sampling → final SFT → H* → teardown ──


@dataclass
class WarmStart:
    """What `setup` builds once and every phase reads."""

    cfg: WarmStartConfig
    inputs: LoopInputs
    policy: Policy
    task: object
    checkpoints: WarmStartCheckpoints
    t_start: float


@dataclass
class WarmStartState:
    """The run's results so far; `accuracy` and `history` are the live objects every checkpoint saves."""

    accuracy: dict[str, float]  # greedy validation accuracy: initial, after_warmup, warm_start
    history: list[dict]  # one record per SFT step, both SFT phases
    restored: dict  # the resumed checkpoint's trainer_state ({} on a fresh start)
    accepted: list[dict] = field(default_factory=list)
    rs_stats: dict = field(default_factory=dict)
    target_entropy: float = float("nan")
    kept: str = "final_sft"  # which model became the warm start: "final_sft" or "after_warmup" (keep_better)


def run_warm_start(cfg: WarmStartConfig, out_dir: str | Path, splits: dict[str, list[dict]] | None = None,
                   init_model: str | None = None, *, checkpoint_root: str | None = None, resume: str = "never",
                   force_resume: bool = False) -> WarmStartResult:
    """Run all three phases; write model/, accepted.parquet, stats.json (last) under out_dir.

    checkpoint_root: local path or s3:// run root; checkpoints go to <root>/warm_start/checkpoints/
        every `cfg.checkpoint_every` steps and at each phase's end (see WarmStartCheckpoints).
    resume: "never", "auto" (newest verified checkpoint under the root, if any) or the URI of one
        checkpoint. A different config hash is refused unless force_resume (this run's config wins).
    """
    inputs = check(cfg, out_dir, init_model, splits)
    seed_everything(cfg.seed)
    dist, device = distributed.init(cfg.distributed, resolve_device(cfg.device))
    try:
        ws = setup(cfg, inputs, dist, device, checkpoint_root)
        state = restore(ws, resume, force_resume)
        warm_up(ws, state)
        sample_accepted(ws, state)
        final_sft(ws, state)
        state.target_entropy = measure_h_star(ws)
        return teardown(ws, state)
    finally:
        distributed.shutdown(dist)


def check(cfg: WarmStartConfig, out_dir: str | Path, init_model: str | None,
          splits: dict[str, list[dict]] | None) -> LoopInputs:
    """Every input before anything goes into out_dir (loop_checks), then the warm start's own rule."""
    inputs = check_loop_inputs(out_dir, cfg.model, init_model, cfg.device, cfg.data, splits, cfg.eval_prompts)
    if not inputs.demo_rows:
        raise DataError(f"{cfg.data.path or 'generated data'}: warm start needs demonstrations in the train split; "
                        "none found")
    check_loop_world(cfg.distributed, batch_size=cfg.batch_size, entropy_prompts=cfg.entropy_prompts,
                     **{"validation prompts evaluated (min(eval_prompts, val rows))": len(inputs.eval_rows)})
    return inputs


def setup(cfg: WarmStartConfig, inputs: LoopInputs, dist: distributed.Dist, device: torch.device,
          checkpoint_root: str | None) -> WarmStart:
    """Load and wrap the policy, write config.yaml (the process group is joined)."""
    model, tokenizer = load_policy(inputs.model_cfg, device=device, seed=cfg.seed)
    check_prompts_fit([*inputs.train_rows, *inputs.eval_rows], tokenizer, model, cfg.max_new_tokens,
                      inputs.model_cfg.chat_template, cfg.data.path)  # refused before anything is written (dataset.py)
    policy = Policy.of(model, tokenizer, dist, device, engine.plan(
        cfg.engine, device, steps=cfg.warmup_steps + cfg.final_sft_steps, world_size=dist.world_size))
    task = get_task(cfg.data.task)
    if dist.is_main:
        inputs.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, inputs.out / "config.yaml")
    t_start = time.perf_counter()
    return WarmStart(cfg, inputs, policy, task, WarmStartCheckpoints(checkpoint_root, cfg, policy), t_start)


def restore(ws: WarmStart, resume: str, force_resume: bool) -> WarmStartState:
    """The results of the phases a resumed checkpoint is past (weights and RNG are restored inside the
    phase it was taken in, see WarmStartCheckpoints.start); a fresh start measures the initial accuracy."""
    restored = ws.checkpoints.load(resume, force_resume)  # {} on a fresh start
    state = WarmStartState(accuracy=restored.get("val_accuracy") or {"initial": evaluate(ws)},
                           history=restored.get("history", []), restored=restored)
    ws.checkpoints.progress.update(val_accuracy=state.accuracy, history=state.history)  # saved with each checkpoint
    return state


def warm_up(ws: WarmStart, state: WarmStartState) -> None:
    """Phase 1: `warmup_steps` of SFT on the demonstrations, then the validation accuracy."""
    cfg = ws.cfg
    state.history += sft_steps(ws.policy, ws.policy.tokenizer, ws.inputs.demo_rows, cfg.warmup_steps, cfg, cfg.seed,
                               "warmup", checkpoints=ws.checkpoints)
    if "after_warmup" not in state.accuracy:  # checkpoints taken after the warm-up carry it
        state.accuracy["after_warmup"] = evaluate(ws)


def sample_accepted(ws: WarmStart, state: WarmStartState) -> None:
    """Phase 2: rejection sampling on (at most rs_max_prompts of) the training prompts."""
    cfg, rows = ws.cfg, ws.inputs.train_rows
    if cfg.rs_max_prompts and len(rows) > cfg.rs_max_prompts:
        rows = random.Random(cfg.seed).sample(rows, cfg.rs_max_prompts)
    if "rs_stats" in state.restored:  # resumed in the final SFT: rejection sampling is done
        state.accepted, state.rs_stats = state.restored["accepted"], state.restored["rs_stats"]
    else:
        state.accepted, state.rs_stats = rejection_sample(ws.policy, ws.policy.tokenizer, ws.task, rows, cfg,
                                                          checkpoints=ws.checkpoints,
                                                          keep_score=state.accuracy["after_warmup"])
    ws.checkpoints.progress.update(accepted=state.accepted, rs_stats=state.rs_stats)


def final_sft(ws: WarmStart, state: WarmStartState) -> None:
    """Phase 3: SFT on demonstrations ∪ accepted samples at final_sft_lr_ratio × lr, then the accuracy;
    the after-warm-up weights come back when the final SFT scored lower on val (`state.kept` says which)."""
    cfg = ws.cfg
    fallback = ws.checkpoints.fallback_weights() or snapshot(ws.policy)  # before sft_steps restores its checkpoint
    state.history += sft_steps(ws.policy, ws.policy.tokenizer, ws.inputs.demo_rows + state.accepted,
                               cfg.final_sft_steps, cfg, cfg.seed + 1, "final_sft", lr=cfg.lr * cfg.final_sft_lr_ratio,
                               checkpoints=ws.checkpoints)
    ws.checkpoints.check_applied()
    state.accuracy["final_sft"] = evaluate(ws)
    state.kept = keep_better(state.accuracy["after_warmup"], state.accuracy["final_sft"])
    if state.kept == "after_warmup":
        restore_snapshot(ws.policy, fallback)
    state.accuracy["warm_start"] = state.accuracy[state.kept]
    log.info("final SFT: val accuracy %.4f after the warm-up, %.4f after the final SFT: keeping the %s model",
             state.accuracy["after_warmup"], state.accuracy["final_sft"], state.kept.replace("_", "-"))


def keep_better(after_warmup: float, after_final_sft: float) -> str:
    """Which model the warm start hands on: the final SFT's unless it scored lower on val than the
    warm-up's (a tie keeps the final SFT's: it has also seen the accepted samples)."""
    return "after_warmup" if after_final_sft < after_warmup else "final_sft"


def measure_h_star(ws: WarmStart) -> float:
    """H* of the warm-start model on `entropy_prompts` training prompts (see measure_target_entropy)."""
    cfg, train_rows = ws.cfg, ws.inputs.train_rows
    h_rows = [train_rows[i] for i in Cursor(len(train_rows), cfg.seed + 2).take(cfg.entropy_prompts)]
    return measure_target_entropy(ws.policy, ws.policy.tokenizer, h_rows, cfg)


def evaluate(ws: WarmStart) -> float:
    """Greedy accuracy on the first eval_prompts validation prompts (each rank its block; 0 without any)."""
    dist, eval_rows = ws.policy.dist, ws.inputs.eval_rows
    mine = dist.shard(eval_rows, "validation prompts")
    with ws.policy.sampling():
        acc = greedy_eval(ws.policy.generate, ws.policy.tokenizer, ws.task, mine, ws.cfg.max_new_tokens,
                          ws.cfg.model.chat_template, synced=dist.sharded).accuracy
    (correct,) = dist.sum([acc * len(mine)])
    return correct / len(eval_rows) if eval_rows else 0.0


def teardown(ws: WarmStart, state: WarmStartState) -> WarmStartResult:
    """The final model (every rank takes part under FSDP2), then rank 0 writes accepted.parquet,
    sft_history.jsonl and stats.json — last: its presence means the warm start is complete."""
    cfg, out, rs_stats = ws.cfg, ws.inputs.out, state.rs_stats
    model_dir, accepted_path, stats_path = out / "model", out / "accepted.parquet", out / "stats.json"
    save_final_policy(ws.policy, ws.inputs.model_cfg, model_dir)
    result = WarmStartResult(model_dir, accepted_path, stats_path, state.target_entropy, rs_stats["acceptance_rate"],
                             rs_stats["pass_at_k"], state.accuracy, resumed_from=ws.checkpoints.uri)
    if not ws.policy.dist.is_main:
        return result
    _write_accepted(state.accepted, accepted_path)
    with (out / "sft_history.jsonl").open("w") as f:
        f.writelines(json.dumps(h, sort_keys=True) + "\n" for h in state.history)  # sorted: a resumed run's are equal
    stats = {
        "rejection_sampling": rs_stats,
        "target_entropy": state.target_entropy,
        "target_entropy_temperature": cfg.entropy_temperature,
        "val_accuracy": state.accuracy,
        "demonstrations": len(ws.inputs.demo_rows),
        "sft_rows_final": len(ws.inputs.demo_rows) + len(state.accepted),
        "warmup_steps": cfg.warmup_steps,
        "final_sft_steps": cfg.final_sft_steps,
        "kept_model": state.kept,  # final_sft, or after_warmup when the final SFT scored lower on val
        "elapsed_s": time.perf_counter() - ws.t_start,
    }
    stats_tmp = stats_path.with_suffix(".json.tmp")
    stats_tmp.write_text(json.dumps(stats, indent=2, sort_keys=True))  # sorted: restored dicts come back sorted
    stats_tmp.replace(stats_path)  # written last: its presence means the warm start is complete
    log.info("warm start done: acceptance %.3f, pass@%d %.3f, val accuracy %s, H* %.3f",
             rs_stats["acceptance_rate"], cfg.rs_samples, rs_stats["pass_at_k"], state.accuracy, state.target_entropy)
    return result


def _write_accepted(accepted: list[dict], path: Path) -> None:
    """accepted.parquet (all string columns), through a temp name so a crash never leaves half a file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_suffix(".parquet.tmp")
    columns = ["id", "task", "prompt", "answer", "demonstration", "split", "meta"]
    table = pa.table({c: [r.get(c) for r in accepted] for c in columns},
                     schema=pa.schema([(c, pa.string()) for c in columns]))
    pq.write_table(table, tmp)
    tmp.replace(path)
