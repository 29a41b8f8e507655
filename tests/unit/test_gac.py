"""`gac` (gac.py): the GAC-style noise-aware μ, by hand, and its place among the methods."""

import pytest

from amft_lib.config import METHOD_HELP, ControllerConfig
from amft_lib.controller import controller_step, initial_state
from amft_lib.gac import GradNoise, gac_step, gac_target, half_variance, noise_from_halves


def cfg(**kw) -> ControllerConfig:
    return ControllerConfig(**{"method": "gac", "mu_init": 0.5, "gac_beta": 0.5, "gac_cap": 0.1,
                               "gac_prior_weight": 0.0, **kw})


def test_half_variance_and_noise_hand_worked():
    assert half_variance(8.0, 0.5) == pytest.approx(2.0)  # equal halves: ¼‖ĝ_a − ĝ_b‖²
    assert half_variance(8.0, 0.25) == pytest.approx(1.5)  # 0.25·0.75·8
    # σ_r² = ¼·12 = 3, σ_s² = ¼·4 = 1, ‖ĝ_r − ĝ_s‖² = 6 → Δ̃² = 6 − 3 − 1 = 2
    assert noise_from_halves(12.0, 0.5, 4.0, 0.5, 6.0) == GradNoise(3.0, 1.0, 2.0)
    # the disagreement is floored at 0 when the gap is all noise
    assert noise_from_halves(12.0, 0.5, 4.0, 0.5, 1.0).disagreement == 0.0


def test_target_hand_worked():
    assert gac_target(GradNoise(3.0, 1.0, 2.0)) == pytest.approx(0.5)  # 3 / (3 + 1 + 2)
    assert gac_target(GradNoise(1.0, 0.0, 0.0)) == pytest.approx(1.0)  # only RL is noisy → all SFT
    assert gac_target(GradNoise(0.0, 1.0, 3.0)) == pytest.approx(0.0)  # RL exact → all RL
    assert gac_target(GradNoise(0.0, 0.0, 0.0)) is None  # nothing measured


def test_step_blends_the_prior_smooths_and_caps():
    c = cfg(gac_prior_weight=0.5, gac_cap=0.1)
    # target = 0.5·0.9 + 0.5·0.5 = 0.7 (μ* = 9/10); first EMA = target; μ 0.5 → 0.6 (capped at +0.1)
    mu, ema = gac_step(0.5, None, GradNoise(9.0, 1.0, 0.0), 1, c)
    assert ema == pytest.approx(0.7) and mu == pytest.approx(0.6)
    # next: μ* = 0 → target 0.25; EMA 0.5·0.7 + 0.5·0.25 = 0.475; μ 0.6 → 0.5 (capped at −0.1)
    mu, ema = gac_step(mu, ema, GradNoise(0.0, 1.0, 1.0), 2, c)
    assert ema == pytest.approx(0.475) and mu == pytest.approx(0.5)
    # a gap under the cap is closed fully: μ* = 1/4 → target 0.5·0.25 + 0.25 = 0.375, EMA 0.425, μ 0.46 → 0.425
    assert gac_step(0.46, 0.475, GradNoise(1.0, 3.0, 0.0), 3, c) == pytest.approx((0.425, 0.425))
    # μ_max clips
    assert gac_step(0.94, 1.0, GradNoise(1.0, 0.0, 0.0), 3, cfg(gac_beta=0.0))[0] == pytest.approx(0.95)


def test_controller_step_runs_gac_and_holds_without_a_measurement():
    c = cfg()
    s0 = initial_state(c)
    s1 = controller_step(s0, 1.0, None, c, noise=GradNoise(3.0, 1.0, 2.0))  # μ* 0.5 = μ: stays
    assert s1.mu == pytest.approx(0.5) and s1.gac_ema == pytest.approx(0.5)
    s2 = controller_step(s1, 1.0, None, c, noise=GradNoise(1.0, 0.0, 0.0))  # μ* 1 → EMA 0.75 → +0.1 (cap)
    assert s2.gac_ema == pytest.approx(0.75) and s2.mu == pytest.approx(0.6)
    s3 = controller_step(s2, 1.0, None, c)  # no noise measured this step: μ held
    assert s3.mu == s2.mu and s3.history[-1] == (3, s2.mu)
    assert type(s3).from_dict(s3.to_dict()) == s3  # the EMA survives a checkpoint


def test_gac_is_a_registered_method():
    assert "gac" in METHOD_HELP and "GAC" in METHOD_HELP["gac"]
