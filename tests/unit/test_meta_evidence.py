"""The per-rollout meta-gradient (AMFT.md §6) is the same number as the backward one, and says how sure it is.

Identity: on the same validation rollouts, weights and gradients, mean_i w_i·D_i (D_i by forward-mode AD) equals
`compute_meta_gradient`'s α⟨∇U, P⊙(g_RL − g_SFT)⟩ (∇U by backpropagation) to ≤ 1e-6 relative in float64, for
the SGD and the Adam lookahead, full fine-tune and LoRA; the central difference agrees with the JVP. Then the
pure parts by hand: SE and t over prompt groups, the evidence rule, the entropy scale.
"""

import json
import math

import pytest
import torch
from test_meta_gradient import adam_precond, float64_tiny, random_batch

from amft_lib import meta_grad
from amft_lib.config import ControllerConfig
from amft_lib.controller import (
    ControllerState,
    compute_meta_evidence,
    compute_meta_gradient,
    controller_step,
    entropy_term,
    meta_decision,
    meta_term,
)
from amft_lib.losses import group_advantages, ppo_clip_loss, sft_loss
from amft_lib.rollout import completion_logprobs

G = 3  # rollouts per validation prompt


@pytest.fixture(params=[False, True], ids=["full", "lora"])
def problem(request, monkeypatch):
    """Tiny float64 Llama, real g_RL (PPO-clip) and g_SFT, 4 validation prompt groups of G = 3 with rewards."""
    model, tok, params = float64_tiny(request.param, monkeypatch)
    gen = torch.Generator().manual_seed(1)
    rl, sft, val = (random_batch(gen, 6, 5, 7, len(tok)), random_batch(gen, 4, 5, 9, len(tok)),
                    random_batch(gen, 4 * G, 5, 6, len(tok)))
    rewards = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0], dtype=torch.float64)
    weights = group_advantages(rewards, G, scale=False)
    with torch.no_grad():
        old, _ = completion_logprobs(model, rl)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0], dtype=torch.float64)
    g_rl = list(torch.autograd.grad(ppo_clip_loss(completion_logprobs(model, rl)[0], old, adv,
                                                  rl.completion_mask)[0], params))
    g_sft = list(torch.autograd.grad(sft_loss(completion_logprobs(model, sft)[0], sft.completion_mask), params))

    def seq_lp(fn) -> torch.Tensor:
        return meta_grad.sequence_logprobs(completion_logprobs(fn, val)[0], val.completion_mask)

    def grad_u():  # the old path: ∇U = (1/N)·Σ w_i·∇log π(τ_i) by backpropagation
        return list(torch.autograd.grad((weights * seq_lp(model)).mean(), params))

    def terms_jvp(v):
        return meta_grad.group_terms(weights, meta_grad.jvp_logprob_derivatives(model, params, v, seq_lp), G)

    def terms_fd(v):
        return meta_grad.group_terms(weights, meta_grad.central_difference_derivatives(
            params, v, lambda: seq_lp(model), step=1e-6), G)  # float64: a small step, O(step²) truncation

    return model, params, g_rl, g_sft, grad_u, terms_jvp, terms_fd


@pytest.mark.parametrize("lookahead", ["sgd", "adam"])
@pytest.mark.parametrize("eval_at", ["lookahead", "current"])
def test_per_rollout_mean_equals_the_backward_meta_gradient(problem, lookahead, eval_at):
    model, params, g_rl, g_sft, grad_u, terms_jvp, _ = problem
    precond = adam_precond(params, g_rl, g_sft) if lookahead == "adam" else None
    alpha, mu = (1e-3 if precond is not None else 0.5), 0.3
    before = [p.detach().clone() for p in params]
    old = compute_meta_gradient(params, g_rl, g_sft, mu, alpha, grad_u, eval_at=eval_at, precond=precond)
    new = compute_meta_evidence(params, g_rl, g_sft, mu, alpha, terms_jvp, eval_at=eval_at, precond=precond)
    assert all(torch.equal(a, b) for a, b in zip(before, params))  # θ bitwise restored
    assert abs(old.raw_meta_grad) > 1e-8, "degenerate test: m ~ 0"
    rel = abs(new.meta_grad - old.raw_meta_grad) / abs(old.raw_meta_grad)
    print(f"{lookahead} {eval_at}: backward {old.raw_meta_grad:.12e} per-rollout {new.meta_grad:.12e} rel {rel:.1e}")
    assert rel <= 1e-6
    assert new.n_groups == 4 and new.meta_grad_se > 0 and math.isfinite(new.meta_grad_t)
    assert new.meta_grad_t == pytest.approx(new.meta_grad / new.meta_grad_se)
    assert new.lookahead == lookahead and math.isnan(new.grad_u_norm)  # no ∇U vector was built


@pytest.mark.parametrize("lookahead", ["sgd", "adam"])
def test_central_difference_agrees_with_the_jvp(problem, lookahead):
    model, params, g_rl, g_sft, _, terms_jvp, terms_fd = problem
    precond = adam_precond(params, g_rl, g_sft) if lookahead == "adam" else None
    v = meta_grad.lookahead_direction(g_rl, g_sft, 1e-3 if precond is not None else 0.5, precond)
    jvp, fd = terms_jvp(v), terms_fd(v)
    assert float(jvp.abs().max()) > 1e-8
    rel = float((jvp - fd).abs().max() / jvp.abs().max())
    print(f"{lookahead}: max |jvp − fd| / max |jvp| = {rel:.1e}")
    assert rel <= 1e-6
    # and the whole meta step with either estimator is the same number
    a = compute_meta_evidence(params, g_rl, g_sft, 0.3, 0.5, terms_jvp, precond=None)
    b = compute_meta_evidence(params, g_rl, g_sft, 0.3, 0.5, terms_fd, precond=None, estimator="central_difference")
    assert b.meta_grad == pytest.approx(a.meta_grad, rel=1e-6) and b.estimator == "central_difference"


def test_central_difference_restores_theta_bitwise_or_to_a_rounding_unit(problem):
    model, params, g_rl, g_sft, *_ = problem
    before = [p.detach().clone() for p in params]
    v = meta_grad.lookahead_direction(g_rl, g_sft, 0.5)
    meta_grad.central_difference_derivatives(params, v, lambda: sum(p.sum() for p in params).reshape(1))
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    # without a copy: θ + s·v − s·v − s·v + s·v, equal up to rounding
    d = meta_grad.central_difference_derivatives(params, v, lambda: sum(p.sum() for p in params).reshape(1),
                                                 exact=False)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-15) for a, b in zip(before, params))
    assert float(d[0]) == pytest.approx(sum(float(x.sum()) for x in v), rel=1e-6)  # d/ds Σθ along v = Σv


# ── the pure parts, by hand ────────────────────────────────────────────────────────────────────────


def test_evidence_hand_worked():
    ev = meta_grad.evidence(torch.tensor([1.0, 2.0, 3.0]))
    assert ev.meta_grad == pytest.approx(2.0) and ev.se == pytest.approx(1 / math.sqrt(3))
    assert ev.t == pytest.approx(2 * math.sqrt(3)) and ev.n_groups == 3
    flat = meta_grad.evidence(torch.zeros(4))  # every group's rewards equal: no signal, t = 0 (finite)
    assert (flat.meta_grad, flat.se, flat.t) == (0.0, 0.0, 0.0)
    one = meta_grad.evidence(torch.tensor([5.0]))
    assert math.isnan(one.se) and math.isnan(one.t)


def test_group_terms_hand_worked():
    w = torch.tensor([1.0, -1.0, 0.5, -0.5])
    d = torch.tensor([2.0, 4.0, 1.0, 3.0])
    # group 1: (2 − 4)/2 = −1; group 2: (0.5 − 1.5)/2 = −0.5
    assert meta_grad.group_terms(w, d, 2).tolist() == [-1.0, -0.5]


def cfg(**kw) -> ControllerConfig:
    return ControllerConfig(**{"method": "amft", "eta_mu": 0.05, "meta_t_min": 2.0, "meta_t_ref": 4.0, **kw})


def test_evidence_rule_moves_on_t_only():
    c = cfg()
    assert meta_term(1e-9, 0.4, c) == (0.0, "|t| = 0.40 < 2: held")
    delta, why = meta_term(1e-9, 3.0, c)
    assert delta == pytest.approx(0.0375) and why.startswith("|t| = 3.00 >= 2")
    assert meta_term(-1e-9, -6.0, c)[0] == pytest.approx(-0.05)  # capped at η_μ
    assert meta_term(1.0, float("nan"), c)[0] == 0.0  # one prompt group: no SE, held
    assert meta_term(0.2, 9.0, cfg(meta_update="raw"))[0] == pytest.approx(0.01)  # raw: η_μ·m


def test_entropy_term_with_a_tolerance_can_act():
    assert entropy_term(0.98, 1.0, 0.05, 0.04) == pytest.approx(0.025)
    assert entropy_term(0.5, 1.0, 0.05, 0.04) == pytest.approx(0.05)  # clipped
    assert entropy_term(0.98, 1.0, 0.05, 0.0) == pytest.approx(0.001)  # the raw Eq. 6 term


def test_cosine_needs_the_backward_estimator_and_evidence_needs_per_rollout_terms():
    from amft_lib.config_file import ConfigError

    with pytest.raises(ConfigError, match="meta_estimator=backward"):
        cfg(meta_update="cosine")
    with pytest.raises(ConfigError, match="SE"):
        cfg(meta_update="evidence", meta_estimator="backward")
    assert cfg(meta_update="cosine", meta_estimator="backward").meta_update == "cosine"


def test_pooling_decides_once_per_k_meta_steps_on_the_pooled_t():
    """meta_accumulate = 2, group terms [1, 2] then [3]: the first meta step holds, the second decides on
    t([1, 2, 3]) = 2√3 ≈ 3.46 → Δμ = 0.05·3.46/4 ≈ 0.0433 — whatever each step's own t was."""
    c, s0 = cfg(meta_accumulate=2), ControllerState(mu=0.5, target_entropy=1.0)
    first = meta_decision(s0, 1.5, 99.0, [1.0, 2.0], c)
    assert (first.delta, first.pool, first.pooled, first.pooled_t) == (0.0, (1.0, 2.0), 1, None)
    assert first.reason == "pooling meta step 1/2 (2 group terms): held"
    second = meta_decision(ControllerState(mu=0.5, meta_pool=(1.0, 2.0), meta_pooled=1), 3.0, 0.1, [3.0], c)
    assert second.pooled_t == pytest.approx(2 * math.sqrt(3)) and (second.pool, second.pooled) == ((), 0)
    assert second.delta == pytest.approx(0.05 * 2 * math.sqrt(3) / 4)
    assert second.reason.startswith("pooled 2 meta steps (3 group terms): |t| = 3.46 >= 2")
    # k = 1 (the default) is exactly the per-step rule
    assert meta_decision(s0, 1e-9, 3.0, [1.0], cfg())[:2] == meta_term(1e-9, 3.0, cfg())
    # through the controller, with a checkpoint (JSON) taken while the pool is half full; η_H = 0: only m acts
    c2 = cfg(meta_accumulate=2, eta_h=0.0)
    held = controller_step(s0, 1.0, 1.5, c2, 99.0, meta_terms=[1.0, 2.0])
    assert held.mu == 0.5 and held.meta_pool == (1.0, 2.0) and held.n_meta == 1
    held = ControllerState.from_dict(json.loads(json.dumps(held.to_dict())))
    moved = controller_step(held, 1.0, 3.0, c2, 0.1, meta_terms=[3.0])
    assert moved.mu == pytest.approx(0.5 + 0.05 * 2 * math.sqrt(3) / 4) and moved.meta_pool == ()
    assert ControllerState.from_dict({"mu": 0.3}).meta_pool == ()  # a checkpoint from before pooling


def test_pooling_needs_the_evidence_rule():
    from amft_lib.config_file import ConfigError

    with pytest.raises(ConfigError, match=r"meta_accumulate=4 .* needs controller\.meta_update=evidence, not raw"):
        cfg(meta_accumulate=4, meta_update="raw")
    with pytest.raises(ConfigError, match="meta_accumulate"):
        cfg(meta_accumulate=0)
