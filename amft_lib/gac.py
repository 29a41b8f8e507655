"""`gac`: a GAC-style noise-aware μ controller (after Hu et al. 2026, "GAC: Noise-Aware Adaptive Mixing for
Hybrid SFT-RL Post-Training", arXiv 2605.26184).

What the paper's abstract says (the full text was not available to us, so no equation is copied): μ* comes
in closed form from minimising an MSE bound on the mixed stochastic gradient, balancing the RL gradient's
noise σ_r², the SFT gradient's noise σ_s² and an SFT–RL disagreement proxy Δ̃²; the controller adds EMA
smoothing, a schedule prior and capped updates, all from tensors training already has.

What we implement (our derivation of that description; "GAC-style", not a reproduction):
- Closed form. Take the RL gradient g_r as the direction to estimate and the mixed estimate
  ĝ = (1−μ)·ĝ_r + μ·ĝ_s with independent noises of total variance σ_r², σ_s². Then
      E‖ĝ − g_r‖² = (1−μ)²·σ_r² + μ²·σ_s² + μ²·‖g_s − g_r‖²
  whose minimiser is  μ* = σ_r² / (σ_r² + σ_s² + Δ²),  Δ² = ‖g_s − g_r‖².
  Noisy RL ⇒ lean on SFT; noisy or disagreeing SFT ⇒ lean on RL.
- Estimates (`noise_from_halves`): each gradient is computed as two half-batch gradients (the trainer's
  `gradient_halves`; exact, no extra compute), and Var(ĝ) ≈ s_a·s_b·‖ĝ_a − ĝ_b‖² with s_a, s_b the halves'
  shares of the weight (¼‖ĝ_a − ĝ_b‖² for equal halves). Δ̃² = max(0, ‖ĝ_r − ĝ_s‖² − σ_r² − σ_s²) is the
  de-noised disagreement (E‖ĝ_r − ĝ_s‖² = Δ² + σ_r² + σ_s²).
- Prior, smoothing, cap (`gac_step`): target = (1−λ)·μ* + λ·μ_init (our prior is the constant mu_init, not a
  schedule), μ̄_t = β·μ̄_{t−1} + (1−β)·target (μ̄_0 = the first target), μ_{t+1} = clip(μ_t + clip(μ̄_t − μ_t,
  −cap, cap), μ_min, μ_max).
Simplified: no token-wise (CHORD φ) reweighting, a constant prior, trace variances (not per-layer).
"""

from __future__ import annotations

from typing import NamedTuple

from amft_lib.config import ControllerConfig


class GradNoise(NamedTuple):
    """One step's measured noise (gradients as flat vectors; all squared L2 norms)."""

    var_rl: float  # σ_r²: variance (trace) of the g_RL estimate
    var_sft: float  # σ_s²: variance of the g_SFT estimate
    disagreement: float  # Δ̃²: ‖ĝ_RL − ĝ_SFT‖² with the noise taken out, ≥ 0


def half_variance(diff_sq: float, share_a: float) -> float:
    """Var(ĝ) of ĝ = s_a·ĝ_a + s_b·ĝ_b (independent halves) from ‖ĝ_a − ĝ_b‖²: s_a·s_b·‖ĝ_a − ĝ_b‖².

    Why: with per-unit variance v, Var ĝ_a = v/n_a, so E‖ĝ_a − ĝ_b‖² = v·n/(n_a·n_b) and Var ĝ = v/n.
    E.g. equal halves, ‖ĝ_a − ĝ_b‖² = 8 → 2.
    """
    return share_a * (1.0 - share_a) * diff_sq


def noise_from_halves(rl_diff_sq: float, rl_share_a: float, sft_diff_sq: float, sft_share_a: float,
                      gap_sq: float) -> GradNoise:
    """σ_r², σ_s² from the half-batch differences and Δ̃² = max(0, ‖ĝ_r − ĝ_s‖² − σ_r² − σ_s²)."""
    var_rl, var_sft = half_variance(rl_diff_sq, rl_share_a), half_variance(sft_diff_sq, sft_share_a)
    return GradNoise(var_rl, var_sft, max(0.0, gap_sq - var_rl - var_sft))


def gac_target(noise: GradNoise) -> float | None:
    """μ* = σ_r² / (σ_r² + σ_s² + Δ̃²); None when all three are 0 (nothing measured: hold μ).
    E.g. σ_r² 3, σ_s² 1, Δ̃² 2 → 0.5."""
    den = noise.var_rl + noise.var_sft + noise.disagreement
    return noise.var_rl / den if den > 0 else None


def gac_step(mu: float, ema: float | None, noise: GradNoise, step: int, cfg: ControllerConfig) -> tuple[float, float]:
    """(μ_{t+1}, μ̄_t): prior-blended μ*, EMA-smoothed, the move capped at gac_cap, clipped to [μ_min, μ_max].
    `step` is unused by the constant prior (kept so a schedule prior can be dropped in)."""
    del step
    target = gac_target(noise)
    if target is None:
        return mu, ema if ema is not None else mu
    target = (1.0 - cfg.gac_prior_weight) * target + cfg.gac_prior_weight * cfg.mu_init
    ema = target if ema is None else cfg.gac_beta * ema + (1.0 - cfg.gac_beta) * target
    move = max(-cfg.gac_cap, min(cfg.gac_cap, ema - mu))
    return min(cfg.mu_max, max(cfg.mu_min, mu + move)), ema
