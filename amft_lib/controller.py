"""The balance controller: how μ (the SFT weight in L = (1−μ)·L_RL + μ·L_SFT) moves. AMFT Eq. 4–6.

    μ_{t+1} = clip(μ_t + η_μ·m_t + η_H·(H* − H_t), μ_min, μ_max)

- Entropy term: H_t is the mean token entropy of the current rollouts, H* the same quantity on
  rollouts of the warm-start policy. Entropy collapsing below H* ⇒ the term is positive ⇒ μ rises
  ⇒ more imitation, which re-injects the demonstrations' diversity.
- Meta term: m_t = ∂U(θ'(μ))/∂μ with the one-step lookahead θ'(μ) = θ − α[(1−μ)g_RL + μ g_SFT].
  By the chain rule ∂θ'/∂μ = −α(g_SFT − g_RL), hence m = α⟨∇_θU(θ'), g_RL − g_SFT⟩.
  The sign matters: μ moves *up* the validation utility. (The reference code added dL_val/dμ,
  moving μ to raise validation loss — a bug we do not copy.)

Every baseline of AMFT.md §4 is a controller, not a separate trainer: sft, grpo, sft_grpo, fixed,
entropy, meta, amft, and two published schedules users compare against:
- chord: CHORD's global weight (Zhang et al. 2025, "On-Policy RL Meets Off-Policy Experts"), μ decaying
  from an SFT-heavy start to a small floor (`chord_mu`); its token-wise φ reweighting is not included;
- hpt: HPT's switch (Lv et al. 2025, "Towards a Unified View of LLM Post-Training"): a prompt whose G
  rollouts are all wrong is learned by SFT, the others by RL. As a controller: μ_t = the share of
  all-wrong prompts in this step's batch (`hpt_mu`), applied to the step's shared demonstration batch,
  so the SFT token budget stays equal to the other methods'. An all-wrong group has zero advantage,
  so its RL term is zero anyway: (1 − μ)·L_RL + μ·L_SFT weighs RL by the share of prompts with signal.
The state is a frozen dataclass and `controller_step` is pure, so the whole
controller is checked without a model (tests/unit/test_controller.py) and round-trips through
checkpoints as JSON.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple, TypeVar

import torch

from amft_lib.config import ControllerConfig
from amft_lib.distributed import Reduction
from amft_lib.gac import GradNoise, gac_step

T = TypeVar("T")
USES_META = frozenset({"meta", "amft"})
USES_ENTROPY = frozenset({"entropy", "amft"})
USES_NOISE = frozenset({"gac"})  # μ from the measured noise of g_RL and g_SFT (gac.py)
SCHEDULED = frozenset({"sft", "grpo", "sft_grpo", "fixed", "chord", "hpt"})  # μ set without feedback from H or m


@dataclass(frozen=True)
class ControllerState:
    mu: float
    target_entropy: float | None = None  # H*; None until measured on the warm-start rollouts
    step: int = 0
    last_meta_grad: float | None = None  # m of the most recent meta-gradient computation
    n_meta: int = 0  # how many meta-gradients have been computed
    history: tuple[tuple[int, float], ...] = ()  # (step, μ) after every update: the audited trajectory
    gac_ema: float | None = None  # gac only: the EMA of its noise-aware target μ*
    meta_pool: tuple[float, ...] = ()  # meta_accumulate > 1: prompt-group terms of the meta steps not decided yet
    meta_pooled: int = 0  # how many meta steps `meta_pool` holds

    def to_dict(self) -> dict:
        d = asdict(self)
        d["history"] = [list(h) for h in self.history]
        d["meta_pool"] = list(self.meta_pool)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ControllerState:
        d = dict(d)
        d["history"] = tuple((int(s), float(m)) for s, m in d.get("history", ()))
        d["meta_pool"] = tuple(float(x) for x in d.get("meta_pool", ()))
        return cls(**d)


def initial_state(cfg: ControllerConfig) -> ControllerState:
    """μ_0 per method. sft and sft_grpo start pure SFT; grpo is pure RL."""
    mu = {"sft": 1.0, "grpo": 0.0, "sft_grpo": 1.0, "chord": chord_mu(0, cfg)}.get(cfg.method, cfg.mu_init)
    if cfg.method == "sft_grpo" and cfg.switch_step <= 0:
        mu = 0.0
    return ControllerState(mu=mu, target_entropy=cfg.target_entropy, history=((0, mu),))


def needs_meta_gradient(cfg: ControllerConfig, step: int) -> bool:
    """True on the steps where m_t is computed (every T_meta steps, methods meta and amft)."""
    return cfg.method in USES_META and step % cfg.meta_interval == 0


def chord_mu(step: int, cfg: ControllerConfig) -> float:
    """CHORD-style μ at `step`: cosine decay from chord_mu_start to chord_mu_end over chord_decay_steps,
    then flat. E.g. start 0.9, end 0.1, 100 steps: step 0 → 0.9, 50 → 0.5, ≥ 100 → 0.1."""
    progress = min(1.0, step / cfg.chord_decay_steps)
    return cfg.chord_mu_end + (cfg.chord_mu_start - cfg.chord_mu_end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def hpt_mu(rewards: torch.Tensor, group_size: int) -> float:
    """HPT's gate as a batch weight: the share of prompts none of whose G rollouts is correct.

    rewards: [B*G], groups contiguous. E.g. G=2, rewards [0,0, 1,0, 0,0, 1,1] → 2 of 4 groups fail → 0.5.
    """
    solved = rewards.view(-1, group_size).max(dim=1).values > 0  # [B]
    return float((~solved).float().mean())


def entropy_term(entropy: float, target_entropy: float, eta_h: float, tolerance: float = 0.0) -> float:
    """η_H·(H* − H_t): positive when entropy collapses below the warm-start level (⇒ μ rises).

    tolerance h_tol > 0 gives the term a scale that can act: η_H·clip((H* − H_t)/h_tol, −1, 1), so a drift of
    h_tol nats moves μ by the full η_H a step. Why: H_t measured like H* (the policy's own rollouts at the
    rollout temperature) stays within ~0.05 nats of it on Countdown, so the raw η_H·(H* − H_t) was ≤ 0.0025 a
    step and the `entropy` method scored exactly like `fixed`. tolerance 0 is the raw Eq. 6 term.
    E.g. H* = 1.0, H_t = 0.98, η_H = 0.05, h_tol = 0.04 → 0.05·0.5 = 0.025.
    """
    if tolerance > 0:
        return eta_h * max(-1.0, min(1.0, (target_entropy - entropy) / tolerance))
    return eta_h * (target_entropy - entropy)


def meta_term(meta_grad: float, meta_t: float | None, cfg: ControllerConfig) -> tuple[float, str]:
    """Δμ of the meta term and why, per `controller.meta_update`.

    raw / cosine: η_μ·m (m is α⟨∇U, d⟩ or its cosine). evidence: μ moves only on evidence, by the evidence:
    Δμ = η_μ·clip(t/t_ref, −1, 1) when |t| ≥ t_min, else 0 ("held"). A |t| below t_min is a sign the meta step
    cannot tell from noise; scaling by t (not m) makes η_μ a step in μ per unit of evidence, independent of α
    and of the gradients' size. E.g. η_μ 0.05, t_min 2, t_ref 4: t = 3 → +0.0375; t = −6 → −0.05; t = 0.4 → 0.
    """
    if cfg.meta_update != "evidence":
        return cfg.eta_mu * meta_grad, f"{cfg.meta_update}: η_μ·m = {cfg.eta_mu * meta_grad:+.4g}"
    if meta_t is None or math.isnan(meta_t):
        return 0.0, "no t (fewer than 2 prompt groups): held"
    if abs(meta_t) < cfg.meta_t_min:
        return 0.0, f"|t| = {abs(meta_t):.2f} < {cfg.meta_t_min:g}: held"
    delta = cfg.eta_mu * max(-1.0, min(1.0, meta_t / cfg.meta_t_ref))
    return delta, f"|t| = {abs(meta_t):.2f} >= {cfg.meta_t_min:g}: Δμ = η_μ·clip(t/{cfg.meta_t_ref:g}) = {delta:+.4f}"


class MetaDecision(NamedTuple):
    """What the meta term does on one meta step (`meta_decision`)."""

    delta: float  # Δμ of the meta term
    reason: str  # why, for controller.jsonl
    pool: tuple[float, ...]  # the group terms still pooled afterwards
    pooled: int  # meta steps in `pool`
    pooled_t: float | None  # t of the pooled evidence, on the step that decided on it (meta_accumulate > 1)


def meta_decision(state: ControllerState, meta_grad: float, meta_t: float | None, terms: Sequence[float],
                  cfg: ControllerConfig) -> MetaDecision:
    """The meta term of one meta step, pooling over `meta_accumulate` meta steps (evidence rule only).

    Why pool: a single meta step's t is above noise ~10 % of the time on Countdown, while the drift it measures is
    consistent (bench/results/snr_countdown.md); k meta steps' group terms together have ~√k × the t of one. The
    pooled steps were measured at different θ — the assumption is that the drift of μ's gradient over k·T_meta
    steps is small next to its noise, which is what the SNR runs found. While the pool fills, μ's meta term holds.
    E.g. k = 2, terms [1, 2] then [3]: first step held (2 terms pooled), second decides on t([1, 2, 3]) ≈ 3.46.
    """
    k = cfg.meta_accumulate
    if k <= 1 or cfg.meta_update != "evidence":
        delta, reason = meta_term(meta_grad, meta_t, cfg)
        return MetaDecision(delta, reason, (), 0, None)
    from amft_lib.meta_grad import evidence

    pool, n = (*state.meta_pool, *(float(x) for x in terms)), state.meta_pooled + 1
    if n < k:
        return MetaDecision(0.0, f"pooling meta step {n}/{k} ({len(pool)} group terms): held", pool, n, None)
    ev = evidence(torch.tensor(pool, dtype=torch.float64))
    delta, reason = meta_term(ev.meta_grad, ev.t, cfg)
    return MetaDecision(delta, f"pooled {k} meta steps ({ev.n_groups} group terms): {reason}", (), 0, ev.t)


def controller_step(
    state: ControllerState, entropy: float, meta_grad: float | None, cfg: ControllerConfig,
    meta_t: float | None = None, noise: GradNoise | None = None, meta_terms: Sequence[float] = (),
) -> ControllerState:
    """One update of μ after training step `state.step` (Eq. 6). Pure: returns a new state.

    entropy: H_t, mean token entropy of this step's rollouts (nats/token).
    meta_grad: m_t when it was computed this step, else None (the meta term is 0 in between).
    meta_t: t = m/SE(m) of that m (the evidence rule moves on it, `meta_term`).
    noise: gac only, this step's measured gradient noise (`gac_step`; None: μ held).
    meta_terms: that m's prompt-group terms (mean = m), pooled when controller.meta_accumulate > 1.
    """
    step = state.step + 1
    method = cfg.method
    if method == "sft":
        mu = 1.0
    elif method == "grpo":
        mu = 0.0
    elif method == "sft_grpo":
        mu = 1.0 if step < cfg.switch_step else 0.0
    elif method == "fixed":
        mu = cfg.mu_init
    elif method == "chord":
        mu = chord_mu(step, cfg)
    elif method == "hpt":
        mu = state.mu  # set per step from the rollouts (hpt_mu) before the update, not by feedback
    elif method == "gac":
        mu, ema = (state.mu, state.gac_ema) if noise is None else gac_step(state.mu, state.gac_ema, noise, step, cfg)
        state = replace(state, gac_ema=ema)
    else:
        delta = 0.0
        if method in USES_META and meta_grad is not None:
            decision = meta_decision(state, meta_grad, meta_t, meta_terms, cfg)
            delta += decision.delta
            state = replace(state, meta_pool=decision.pool, meta_pooled=decision.pooled)
        if method in USES_ENTROPY:
            if state.target_entropy is None:
                raise ValueError("controller: H* (target_entropy) must be measured before the first update")
            delta += entropy_term(entropy, state.target_entropy, cfg.eta_h, cfg.entropy_tolerance)
        mu = min(cfg.mu_max, max(cfg.mu_min, state.mu + delta))
    return replace(
        state,
        mu=mu,
        step=step,
        last_meta_grad=meta_grad if meta_grad is not None else state.last_meta_grad,
        n_meta=state.n_meta + (meta_grad is not None),
        history=(*state.history, (step, mu)),
    )


def begin_step(state: ControllerState, rewards: torch.Tensor, group_size: int,
               cfg: ControllerConfig) -> ControllerState:
    """μ_t for this step's update, from the step's rollout rewards [B*G] (groups contiguous): HPT takes
    the share of all-wrong prompts (`hpt_mu`); every other method keeps the μ its last update chose."""
    if cfg.method == "hpt":
        return replace(state, mu=hpt_mu(rewards, group_size))
    return state


def end_step(state: ControllerState, entropy: float, meta_grad: float | None, cfg: ControllerConfig,
             meta_t: float | None = None, noise: GradNoise | None = None,
             meta_terms: Sequence[float] = ()) -> ControllerState:
    """μ_{t+1} after the update. Without a measured H* (no warm-start value in the config) the first
    step's entropy becomes H*: the starting policy's own rollouts, like-for-like with H_t. Then Eq. 6
    (`controller_step`)."""
    if state.target_entropy is None:
        state = replace(state, target_entropy=entropy)
    return controller_step(state, entropy, meta_grad, cfg, meta_t, noise, meta_terms)


# ── the meta-gradient ────────────────────────────────────────────────────────────────────────────


class MetaGradStats(NamedTuple):
    """Everything logged each time m is computed (controller.jsonl)."""

    meta_grad: float  # m used by the controller (after `meta_update`: cosine replaces it by the cosine)
    raw_meta_grad: float  # α⟨∇U, g_RL − g_SFT⟩, the exact derivative ∂U(θ'(μ))/∂μ
    grad_u_norm: float  # ‖∇_θU‖
    grad_rl_norm: float  # ‖g_RL‖
    grad_sft_norm: float  # ‖g_SFT‖
    cosine: float  # cos(∇U, P⊙(g_RL − g_SFT)); P = 1 for the SGD lookahead
    half_cosine: float = math.nan  # cos(∇U on half A, ∇U on half B) of the validation prompts: ~0 = noise
    lookahead: str = "sgd"  # the lookahead actually used (adam falls back to sgd before Adam's first step)
    meta_grad_se: float = math.nan  # SE(m) over prompt groups (per-rollout estimators, meta_grad.evidence)
    meta_grad_t: float = math.nan  # t = m / SE(m)
    n_groups: int = 0  # prompt groups the SE rests on
    estimator: str = "backward"  # how m was computed (controller.meta_estimator)
    terms: tuple[float, ...] = ()  # the prompt-group terms m is the mean of (pooled by meta_accumulate; not logged)


class UtilityGrad(NamedTuple):
    """∇U from validation rollouts as two half-sample estimates (prompt groups split in two halves).

    full = (n_a·half_a + n_b·half_b) / (n_a + n_b) is the estimate m uses; the cosine of the halves
    says how much of it is signal: two independent unbiased estimates of one vector agree at cosine ≈ 1
    when the noise is small and ≈ 0 when it dominates.
    """

    half_a: list[torch.Tensor]
    half_b: list[torch.Tensor]
    n_a: int
    n_b: int

    @property
    def full(self) -> list[torch.Tensor]:
        n = self.n_a + self.n_b
        return [(self.n_a * a + self.n_b * b) / n for a, b in zip(self.half_a, self.half_b, strict=True)]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    # float64 accumulation: the dot product of ~1e8 small terms must not lose its sign to rounding.
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


def cosine_similarity(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """cos(a, b) of two gradients given as lists of tensors (float64 sums); 0 when either is zero."""
    norm_a, norm_b = math.sqrt(_dot(a, a)), math.sqrt(_dot(b, b))
    return _dot(a, b) / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else 0.0


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """P = 1/(sqrt(v̂) + ε) per parameter from Adam(W)'s second moment v (bias-corrected: v̂ = v/(1 − β2^t)).

    Why: the real update is Adam's, ~lr per weight whatever the gradient's size, while the SGD lookahead
    θ − α·g moves ~α·|g| — on the tiny model ~1000× less. P⊙g makes θ' land about where Adam would go
    (without its momentum). None before Adam's first step (no v yet), so callers fall back to SGD.
    """
    preconditioner = []
    for group in optimizer.param_groups:
        beta2, eps = group["betas"][1], group["eps"]
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            if "exp_avg_sq" not in st:
                return None
            t = float(st["step"])
            v_hat = st["exp_avg_sq"] / (1.0 - beta2**t)
            preconditioner.append(1.0 / (v_hat.sqrt() + eps))
    if len(preconditioner) != len(params):
        raise ValueError(f"optimizer holds {len(preconditioner)} tensors, the meta step {len(params)}")
    return preconditioner


def _partial_dots(pairs: Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]]) -> torch.Tensor:
    """[Σ⟨a, b⟩ for each pair] as one float64 vector, so sharded callers sum all of them at once."""
    return torch.stack([torch.stack([(x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)]).sum().cpu()
                        for a, b in pairs])


def meta_gradient(
    grad_u: Sequence[torch.Tensor],
    g_rl: Sequence[torch.Tensor],
    g_sft: Sequence[torch.Tensor],
    alpha: float,
    update: str = "raw",
    precond: Sequence[torch.Tensor] | None = None,
    reduction: Reduction | None = None,
    halves: UtilityGrad | None = None,
) -> MetaGradStats:
    """m = α·⟨∇_θU, P⊙(g_RL − g_SFT)⟩ from the three gradients (lists over the trainable parameters).

    precond: P of the Adam lookahead θ' = θ − α·P⊙[(1−μ)g_RL + μ g_SFT], whose ∂θ'/∂μ = −α·P⊙(g_SFT − g_RL);
    None is the SGD lookahead (P = 1).
    update="cosine" (controller.meta_update) returns cos(∇U, P⊙(g_RL − g_SFT)) instead: same sign, scale-free
    magnitude in [−1, 1]. α > 0 is dropped there because it only rescales and would tie η_μ to the LR schedule.
    Under data parallelism every gradient here must already be global (DDP's all-reduce). Under FSDP2
    each rank holds a shard of each: `reduction` takes the local shards and sums the partial dot
    products (these five, and the half-sample cosine's three) with one all-reduce.
    halves: the two half-sample ∇U estimates, whose cosine is the noise check (`half_cosine`).
    """
    red = reduction or Reduction()
    u, rl, sft = red.to_local(grad_u), red.to_local(g_rl), red.to_local(g_sft)
    diff = [gr - gs for gr, gs in zip(rl, sft, strict=True)]
    if precond is not None:
        diff = [pc * d for pc, d in zip(red.to_local(precond), diff, strict=True)]
    pairs = [(u, diff), (u, u), (diff, diff), (rl, rl), (sft, sft)]
    if halves is not None:
        a, b = red.to_local(halves.half_a), red.to_local(halves.half_b)
        pairs += [(a, b), (a, a), (b, b)]
    dots = red.total(_partial_dots(pairs)).tolist()
    dot, norm_u, norm_d = dots[0], math.sqrt(dots[1]), math.sqrt(dots[2])
    cosine = dot / (norm_u * norm_d) if norm_u > 0 and norm_d > 0 else 0.0
    raw = alpha * dot
    if update in ("raw", "evidence"):
        m = raw
    elif update == "cosine":
        m = cosine
    else:
        raise ValueError(f"unknown meta_update {update!r}; choose raw, cosine or evidence")
    half_cosine = math.nan
    if halves is not None:
        na, nb = math.sqrt(dots[6]), math.sqrt(dots[7])
        half_cosine = dots[5] / (na * nb) if na > 0 and nb > 0 else 0.0
    return MetaGradStats(
        meta_grad=m,
        raw_meta_grad=raw,
        grad_u_norm=norm_u,
        grad_rl_norm=math.sqrt(dots[3]),
        grad_sft_norm=math.sqrt(dots[4]),
        cosine=cosine,
        half_cosine=half_cosine,
    )


def lookahead_params(
    params: Sequence[torch.Tensor],
    g_rl: Sequence[torch.Tensor],
    g_sft: Sequence[torch.Tensor],
    mu: float,
    alpha: float,
    precond: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """θ'(μ) = θ − α·[(1−μ)·g_RL + μ·g_SFT] (SGD form of the next step), as new tensors; with `precond`
    P the Adam form θ − α·P⊙[(1−μ)·g_RL + μ·g_SFT]."""
    pcs = precond if precond is not None else [None] * len(params)
    return [p.detach() - _lookahead_step(gr, gs, mu, alpha, pc)
            for p, gr, gs, pc in zip(params, g_rl, g_sft, pcs, strict=True)]


def utility_grad_at(
    params: Sequence[torch.nn.Parameter],
    values: Sequence[torch.Tensor],
    utility_grad: Callable[[], list[torch.Tensor] | UtilityGrad],
) -> list[torch.Tensor] | UtilityGrad:
    """Evaluate `utility_grad()` with `params` temporarily set to `values`, then restore them exactly.

    Restoring copies the saved tensors back (not θ' + step), so θ is bitwise unchanged afterwards
    and training stays deterministic whether or not a meta step happened.
    """
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, v in zip(params, values, strict=True):
                p.copy_(v)
        return utility_grad()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


# Full copies of θ (trainable params) the meta step holds besides ∇U, per `meta_eval_at` (memory.py uses this):
# "lookahead" saves θ and applies the step in place (exact restore: 1 copy; before this it also built θ' as
# new tensors: 2); "lookahead_undo" applies the step in place and undoes it by adding the same step back
# (0 copies; θ may move by one rounding unit where θ−d+d ≠ θ, which the fp32 master weights of bf16 runs
# then overwrite at the optimizer step); "current" evaluates ∇U at θ (0 copies).
LOOKAHEAD_COPIES = {"lookahead": 1, "lookahead_undo": 0, "current": 0}
# θ-sized buffers the meta step's estimator holds besides those copies, per `meta_estimator` (memory.py): backward
# keeps the two half-sample ∇U estimates and builds their weighted mean (3); jvp only the tangent
# v = α·P⊙(g_RL − g_SFT) (1; forward-mode keeps no graph); the central difference v (1), and with
# meta_eval_at=current one copy of θ its shift restores (inside the lookahead, θ's own restore covers it).
META_BUFFERS = {"backward": 3, "jvp": 1, "central_difference": 1}


def _lookahead_step(g_rl: torch.Tensor, g_sft: torch.Tensor, mu: float, alpha: float,
                    precond: torch.Tensor | None = None) -> torch.Tensor:
    """α·[(1−μ)·g_RL + μ·g_SFT] for one tensor (⊙ P for the Adam lookahead): what θ' subtracts."""
    step = alpha * ((1.0 - mu) * g_rl + mu * g_sft)
    return step if precond is None else step * precond


def utility_grad_in_place(
    params: Sequence[torch.nn.Parameter],
    g_rl: Sequence[torch.Tensor],
    g_sft: Sequence[torch.Tensor],
    mu: float,
    alpha: float,
    utility_grad: Callable[[], T],
    exact: bool = True,
    precond: Sequence[torch.Tensor] | None = None,
) -> T:
    """`utility_grad()` at θ'(μ) without materialising θ' as new tensors: the step is applied in place
    (`precond` P: the Adam lookahead θ − α·P⊙[…]).

    exact=True keeps one saved copy of θ and copies it back (θ bitwise unchanged, as `utility_grad_at`);
    exact=False keeps no copy and adds the same step back, one tensor at a time (θ − d + d: equal to θ up to
    one rounding unit per element).
    """
    saved = [p.detach().clone() for p in params] if exact else None
    pcs = precond if precond is not None else [None] * len(params)
    try:
        with torch.no_grad():
            for p, gr, gs, pc in zip(params, g_rl, g_sft, pcs, strict=True):
                p.sub_(_lookahead_step(gr, gs, mu, alpha, pc))  # θ' = θ − α[(1−μ)g_RL + μ g_SFT](⊙P)
        return utility_grad()
    finally:
        with torch.no_grad():
            if saved is not None:
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
            else:
                for p, gr, gs, pc in zip(params, g_rl, g_sft, pcs, strict=True):
                    p.add_(_lookahead_step(gr, gs, mu, alpha, pc))


def at_eval_point(params: Sequence[torch.nn.Parameter], g_rl: Sequence[torch.Tensor], g_sft: Sequence[torch.Tensor],
                  mu: float, alpha: float, fn: Callable[[], T], eval_at: str,
                  precond: Sequence[torch.Tensor] | None = None) -> T:
    """`fn()` where `controller.meta_eval_at` says: at θ'(μ) applied in place ("lookahead": θ restored bitwise;
    "lookahead_undo": the step added back) or at θ ("current")."""
    if eval_at in ("lookahead", "lookahead_undo"):
        return utility_grad_in_place(params, g_rl, g_sft, mu, alpha, fn, exact=eval_at == "lookahead",
                                     precond=precond)
    if eval_at == "current":
        return fn()
    raise ValueError(f"unknown meta_eval_at {eval_at!r}; choose lookahead, lookahead_undo or current")


def compute_meta_gradient(
    params: Sequence[torch.nn.Parameter],
    g_rl: Sequence[torch.Tensor],
    g_sft: Sequence[torch.Tensor],
    mu: float,
    alpha: float,
    utility_grad: Callable[[], list[torch.Tensor] | UtilityGrad],
    eval_at: str = "lookahead",
    update: str = "raw",
    precond: Sequence[torch.Tensor] | None = None,
    reduction: Reduction | None = None,
) -> MetaGradStats:
    """The full meta step: ∇U at θ'(μ) (or at θ when eval_at="current"), then `meta_gradient`.

    eval_at: "lookahead" (θ restored bitwise; one saved copy of θ), "lookahead_undo" (no copy; see
    LOOKAHEAD_COPIES) or "current".

    utility_grad: returns ∇_θU at the *current* parameter values, e.g. the policy-gradient
    estimate mean_i (R_i − b)·∇log π(τ_i) on validation rollouts sampled there, either as one
    gradient or as a `UtilityGrad` of two half-sample estimates (then their cosine is logged).
    precond: P of the Adam lookahead (`adam_preconditioner`); None is the SGD lookahead.
    reduction: how to sum dot products over FSDP2 shards (`Dist.reduction()`); None in one process.
    The lookahead itself is element-wise, so it runs on sharded parameters unchanged.
    """
    result = at_eval_point(params, g_rl, g_sft, mu, alpha, utility_grad, eval_at, precond)
    halves = result if isinstance(result, UtilityGrad) else None
    grad_u = result.full if halves is not None else result
    stats = meta_gradient(grad_u, g_rl, g_sft, alpha, update, precond, reduction, halves)
    return stats._replace(lookahead="sgd" if precond is None else "adam")


def compute_meta_evidence(
    params: Sequence[torch.nn.Parameter],
    g_rl: Sequence[torch.Tensor],
    g_sft: Sequence[torch.Tensor],
    mu: float,
    alpha: float,
    group_terms: Callable[[list[torch.Tensor]], torch.Tensor],
    eval_at: str = "lookahead",
    precond: Sequence[torch.Tensor] | None = None,
    reduction: Reduction | None = None,
    estimator: str = "jvp",
) -> MetaGradStats:
    """The per-rollout meta step (AMFT.md §6): m, SE(m) and t without any backward over validation rollouts.

    group_terms(v) → c_g = (1/G)·Σ_{i∈g} w_i·D_i for every prompt group of the *global* validation batch
    (gathered over ranks), sampled and differentiated at the current parameters along v = ∂θ'/∂μ
    (meta_grad.lookahead_direction). It runs at θ'(μ) (eval_at lookahead / lookahead_undo, as
    `compute_meta_gradient`) or at θ (current). mean_g c_g equals `compute_meta_gradient`'s α⟨∇U, P⊙d⟩ on the
    same rollouts (tests/unit/test_meta_evidence.py). No ∇U vector exists, so its norm and cosines are NaN.
    """
    from amft_lib import meta_grad

    direction = meta_grad.lookahead_direction(g_rl, g_sft, alpha, precond)
    terms = at_eval_point(params, g_rl, g_sft, mu, alpha, lambda: group_terms(direction), eval_at, precond)
    ev = meta_grad.evidence(terms)
    red = reduction or Reduction()
    rl, sft = red.to_local(g_rl), red.to_local(g_sft)
    norms = red.total(_partial_dots([(rl, rl), (sft, sft)])).tolist()
    return MetaGradStats(
        meta_grad=ev.meta_grad, raw_meta_grad=ev.meta_grad, grad_u_norm=math.nan, grad_rl_norm=math.sqrt(norms[0]),
        grad_sft_norm=math.sqrt(norms[1]), cosine=math.nan, lookahead="sgd" if precond is None else "adam",
        meta_grad_se=ev.se, meta_grad_t=ev.t, n_groups=ev.n_groups, estimator=estimator,
        terms=tuple(terms.double().tolist()),
    )
