"""The μ controller of AMFT Eq. 6 and the baselines expressed as controllers."""

from dataclasses import replace

import pytest

from amft_lib.config import ConfigError, ControllerConfig
from amft_lib.controller import (
    ControllerState,
    controller_step,
    entropy_term,
    initial_state,
    meta_gradient,
    needs_meta_gradient,
)


def cfg(**kw) -> ControllerConfig:
    # Eq. 6 as printed: η_μ·m (meta_update raw) and η_H·(H* − H_t) (no entropy tolerance); the evidence rule and
    # the tolerance are checked in test_meta_evidence.py
    base = dict(method="amft", mu_init=0.5, mu_min=0.05, mu_max=0.95, eta_mu=0.1, eta_h=0.2, meta_interval=5,
                meta_update="raw", entropy_tolerance=0.0)
    base.update(kw)
    return ControllerConfig(**base)


def test_entropy_below_target_raises_mu():
    c = cfg(method="entropy")
    s = ControllerState(mu=0.5, target_entropy=1.0)
    # H = 0.5 < H* = 1.0 → μ += 0.2·(1.0 − 0.5) = 0.1
    assert controller_step(s, 0.5, None, c).mu == pytest.approx(0.6)
    # H above target → μ falls
    assert controller_step(s, 1.5, None, c).mu == pytest.approx(0.4)
    assert entropy_term(0.5, 1.0, 0.2) == pytest.approx(0.1)


def test_amft_combines_both_terms_and_clips():
    c = cfg()
    s = ControllerState(mu=0.5, target_entropy=1.0)
    # μ + η_μ·m + η_H·(H* − H) = 0.5 + 0.1·(−1) + 0.2·(0.25) = 0.45
    assert controller_step(s, 0.75, -1.0, c).mu == pytest.approx(0.45)
    assert controller_step(ControllerState(mu=0.94, target_entropy=1.0), 0.0, 1.0, c).mu == 0.95
    assert controller_step(ControllerState(mu=0.06, target_entropy=1.0), 5.0, -1.0, c).mu == 0.05


def test_meta_only_ignores_entropy_and_is_zero_between_meta_steps():
    c = cfg(method="meta")
    s = ControllerState(mu=0.5, target_entropy=1.0)
    assert controller_step(s, 0.0, None, c).mu == 0.5  # m_t = 0 between meta steps; entropy ignored
    assert controller_step(s, 0.0, 0.5, c).mu == pytest.approx(0.55)


def test_baselines():
    s = ControllerState(mu=0.3, target_entropy=1.0)
    assert controller_step(s, 0.0, 1.0, cfg(method="sft")).mu == 1.0
    assert controller_step(s, 0.0, 1.0, cfg(method="grpo")).mu == 0.0
    assert controller_step(s, 0.0, 1.0, cfg(method="fixed", mu_init=0.3)).mu == 0.3
    sg = cfg(method="sft_grpo", switch_step=3)
    st = initial_state(sg)
    mus = []
    for _ in range(5):
        st = controller_step(st, 1.0, None, sg)
        mus.append(st.mu)
    assert initial_state(sg).mu == 1.0
    assert mus == [1.0, 1.0, 0.0, 0.0, 0.0]  # μ used at steps 1..5; switches when step reaches 3


def test_state_round_trip_and_history():
    c = cfg()
    s = replace(initial_state(c), target_entropy=2.0)
    s = controller_step(s, 1.0, 0.5, c)
    back = ControllerState.from_dict(s.to_dict())
    assert back == s
    assert back.history == ((0, 0.5), (1, s.mu)) and back.n_meta == 1 and back.last_meta_grad == 0.5


def test_entropy_methods_require_target():
    with pytest.raises(ValueError, match="H\\*"):
        controller_step(ControllerState(mu=0.5), 1.0, None, cfg(method="entropy"))


def test_needs_meta_gradient_schedule():
    c = cfg(meta_interval=5)
    assert [s for s in range(12) if needs_meta_gradient(c, s)] == [0, 5, 10]
    assert not any(needs_meta_gradient(cfg(method="entropy"), s) for s in range(12))


def test_meta_gradient_formula_and_cosine():
    import torch

    gu = [torch.tensor([1.0, 0.0]), torch.tensor([2.0])]
    grl = [torch.tensor([3.0, 1.0]), torch.tensor([0.0])]
    gsft = [torch.tensor([1.0, 1.0]), torch.tensor([1.0])]
    # d = g_RL − g_SFT = [2, 0, −1]; ⟨∇U, d⟩ = 2 − 2 = 0 → orthogonal
    st = meta_gradient(gu, grl, gsft, alpha=0.1)
    assert st.raw_meta_grad == pytest.approx(0.0) and st.cosine == pytest.approx(0.0)
    gu2 = [torch.tensor([1.0, 0.0]), torch.tensor([0.0])]
    st2 = meta_gradient(gu2, grl, gsft, alpha=0.1, update="cosine")
    assert st2.raw_meta_grad == pytest.approx(0.1 * 2.0)
    assert st2.meta_grad == pytest.approx(2.0 / (1.0 * 5**0.5))  # cos = 2 / (‖∇U‖=1 · ‖d‖=√5)
    assert st2.grad_rl_norm == pytest.approx(10**0.5) and st2.grad_sft_norm == pytest.approx(3**0.5)


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"mu_init=1\.2"):
        ControllerConfig(mu_init=1.2)
    with pytest.raises(ConfigError, match="method='ppo'"):
        ControllerConfig(method="ppo")


# ── the chord and hpt baselines, the Adam preconditioner, the half-sample agreement ─────────────────


def test_chord_schedule_hand_worked():
    from amft_lib.controller import chord_mu

    c = cfg(method="chord", chord_mu_start=0.9, chord_mu_end=0.1, chord_decay_steps=100)
    # cosine decay: 0.1 + 0.8·0.5·(1 + cos(π·t/100)); t=0 → 0.9, t=50 → 0.1 + 0.4 = 0.5, t ≥ 100 → 0.1
    assert chord_mu(0, c) == pytest.approx(0.9)
    assert chord_mu(50, c) == pytest.approx(0.5)
    assert chord_mu(100, c) == pytest.approx(0.1) and chord_mu(250, c) == pytest.approx(0.1)
    st = initial_state(c)
    assert st.mu == pytest.approx(0.9)
    for _ in range(50):
        st = controller_step(st, 1.0, None, c)  # entropy and m are ignored: a schedule
    assert st.mu == pytest.approx(0.5)


def test_hpt_mu_is_the_share_of_all_wrong_prompts():
    import torch

    from amft_lib.controller import hpt_mu

    # G = 2: groups [0,0] [1,0] [0,0] [1,1] → groups 0 and 2 have no correct rollout → 2/4
    assert hpt_mu(torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]), 2) == pytest.approx(0.5)
    assert hpt_mu(torch.zeros(8), 4) == 1.0 and hpt_mu(torch.ones(8), 4) == 0.0
    c = cfg(method="hpt")
    s = ControllerState(mu=0.25, target_entropy=1.0)  # the trainer sets μ from the rollouts first
    assert controller_step(s, 0.0, 1.0, c).mu == 0.25  # no feedback from H or m


def test_new_methods_are_valid_config_values():
    from amft_lib.config import METHODS

    assert {"chord", "hpt"} <= set(METHODS)
    with pytest.raises(ConfigError, match="chord_decay_steps=0"):
        ControllerConfig(method="chord", chord_decay_steps=0)


def test_preconditioned_meta_gradient_hand_worked():
    import torch

    gu = [torch.tensor([1.0, 1.0])]
    grl = [torch.tensor([2.0, 0.0])]
    gsft = [torch.tensor([0.0, 1.0])]
    p = [torch.tensor([0.5, 4.0])]
    # d = g_RL − g_SFT = [2, −1]; P⊙d = [1, −4]; ⟨∇U, P⊙d⟩ = 1 − 4 = −3; m = α·(−3) with α = 0.1
    st = meta_gradient(gu, grl, gsft, alpha=0.1, precond=p)
    assert st.raw_meta_grad == pytest.approx(-0.3)
    assert st.cosine == pytest.approx(-3.0 / (2**0.5 * 17**0.5))  # ‖∇U‖ = √2, ‖P⊙d‖ = √17
    # without P the same gradients say the opposite: ⟨∇U, d⟩ = 2 − 1 = +1
    assert meta_gradient(gu, grl, gsft, alpha=0.1).raw_meta_grad == pytest.approx(0.1)


def test_adam_preconditioner_reads_the_second_moment():
    import torch

    from amft_lib.controller import adam_preconditioner

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.AdamW([w], lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    assert adam_preconditioner(opt, [w]) is None  # before the first step: no v, the caller falls back to SGD
    w.grad = torch.tensor([3.0, -0.5])
    opt.step()
    # after one step v = (1 − 0.99)·g², v̂ = v / (1 − 0.99) = g², so P = 1 / (|g| + ε)
    (p,) = adam_preconditioner(opt, [w])
    assert torch.allclose(p, torch.tensor([1 / 3.0, 1 / 0.5]), rtol=1e-6)


def test_half_sample_gradient_full_and_cosine():
    import torch

    from amft_lib.controller import UtilityGrad, cosine_similarity

    u = UtilityGrad([torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 2.0])], n_a=8, n_b=24)
    # full = (8·[1, 0] + 24·[0, 2]) / 32 = [0.25, 1.5]: the mean over all 32 rollouts
    assert torch.allclose(u.full[0], torch.tensor([0.25, 1.5]))
    assert cosine_similarity(u.half_a, u.half_b) == 0.0  # orthogonal halves: no agreement at all
    assert cosine_similarity([torch.tensor([1.0, 1.0])], [torch.tensor([2.0, 2.0])]) == pytest.approx(1.0)


# ── μ is set only here: the per-batch HPT share and the first-step H* are controller inputs ──


def test_begin_step_sets_the_hpt_share_and_leaves_every_other_method_alone():
    import torch

    from amft_lib.controller import begin_step

    # G=2: groups [0,0] [1,0] [0,0] [1,1] → 2 of 4 prompts all wrong → μ = 0.5
    rewards = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    s = ControllerState(mu=0.9, target_entropy=1.0)
    assert begin_step(s, rewards, 2, cfg(method="hpt")).mu == 0.5
    for method in ("amft", "fixed", "chord", "sft_grpo"):
        assert begin_step(s, rewards, 2, cfg(method=method)) is s


def test_end_step_measures_a_missing_target_entropy_at_the_first_step_then_steps():
    from amft_lib.controller import end_step

    c = cfg(method="entropy")
    s = end_step(ControllerState(mu=0.5), 1.5, None, c)
    # H* := H_0 = 1.5, so the entropy term η_H·(H* − H_0) is 0 at the first step: μ stays 0.5
    assert s.target_entropy == 1.5 and s.mu == pytest.approx(0.5) and s.step == 1
    # later steps keep that H*: H_1 = 1.0 → μ += 0.2·(1.5 − 1.0) = 0.1
    s = end_step(s, 1.0, None, c)
    assert s.target_entropy == 1.5 and s.mu == pytest.approx(0.6)
    # a measured H* (the warm start's) is never replaced
    assert end_step(ControllerState(mu=0.5, target_entropy=2.0), 1.0, None, c).target_entropy == 2.0
