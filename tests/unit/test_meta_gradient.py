"""The heart of AMFT: the implemented meta-gradient equals the derivative of the lookahead utility.

AMFT.md §2: with a deterministic surrogate U (fixed validation samples, rewards and baselines),
m = α⟨∇U(θ'), g_RL − g_SFT⟩ must equal the central finite difference
[U(θ'(μ+ε)) − U(θ'(μ−ε))] / 2ε computed by really taking the lookahead step, and a small step of μ
along m must raise U. float64, tiny Llama, full fine-tune and LoRA.
"""

import pytest
import torch

from amft_lib.config import ModelConfig
from amft_lib.controller import compute_meta_gradient, lookahead_params, utility_grad_at
from amft_lib.losses import group_advantages, ppo_clip_loss, sft_loss
from amft_lib.model import load_policy, trainable_parameters
from amft_lib.rollout import TokenBatch, completion_logprobs


def random_batch(gen: torch.Generator, n: int, p: int, length: int, vocab: int) -> TokenBatch:
    ids = torch.randint(4, vocab, (n, p), generator=gen)
    comp = torch.randint(4, vocab, (n, length), generator=gen)
    cmask = torch.ones(n, length, dtype=torch.float64)
    cmask[0, length - 2 :] = 0.0  # ragged lengths: padding must not count
    return TokenBatch(ids, torch.ones(n, p, dtype=torch.long), comp, cmask, [""] * n)


def _rmsnorm_keep_dtype(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def float64_tiny(lora: bool, monkeypatch):
    """(model, tokenizer, trainable params) of a float64 tiny Llama in eval mode, full or LoRA."""
    # transformers' LlamaRMSNorm upcasts to float32 and back (right for bf16, wrong for a float64
    # gradient check: it would make U only float32-precise). Same maths, input dtype kept.
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rmsnorm_keep_dtype)
    torch.manual_seed(0)
    cfg = ModelConfig(name="tiny", dtype="float64", lora=lora, lora_r=4, lora_dropout=0.0,
                      tiny_hidden=32, tiny_layers=2, tiny_heads=2)
    model, tok = load_policy(cfg, seed=0)
    model.eval()  # no dropout: U must be a deterministic function of θ
    params = trainable_parameters(model)
    if lora:
        with torch.no_grad():  # LoRA B starts at 0; move off it so every adapter weight matters
            for p in params:
                p.add_(0.05 * torch.randn_like(p))
    return model, tok, params


@pytest.fixture(params=[False, True], ids=["full", "lora"])
def setup(request, monkeypatch):
    model, tok, params = float64_tiny(request.param, monkeypatch)
    gen = torch.Generator().manual_seed(1)
    vocab = len(tok)
    rl = random_batch(gen, 6, 5, 7, vocab)
    sft = random_batch(gen, 4, 5, 9, vocab)
    val = random_batch(gen, 8, 5, 6, vocab)
    val_rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    val_weights = group_advantages(val_rewards, 4, scale=False)  # R_i − b_g with fixed baselines

    def surrogate_u() -> torch.Tensor:
        lp, _ = completion_logprobs(model, val)
        return (val_weights * (lp * val.completion_mask).sum(-1)).mean()

    def grad_of(loss_fn):
        return list(torch.autograd.grad(loss_fn(), params))

    with torch.no_grad():
        old, _ = completion_logprobs(model, rl)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0], dtype=torch.float64)

    def rl_loss():
        lp, _ = completion_logprobs(model, rl)
        return ppo_clip_loss(lp, old, adv, rl.completion_mask)[0]

    def sft_l():
        lp, _ = completion_logprobs(model, sft)
        return sft_loss(lp, sft.completion_mask)

    return model, params, grad_of(rl_loss), grad_of(sft_l), surrogate_u, lambda: grad_of(surrogate_u)


def u_at(params, surrogate_u, values) -> float:
    return float(utility_grad_at(params, values, lambda: [surrogate_u().detach()])[0])


@pytest.mark.parametrize("mu", [0.2, 0.7])
def test_meta_gradient_matches_finite_difference(setup, mu):
    model, params, g_rl, g_sft, surrogate_u, grad_u = setup
    alpha, eps = 0.5, 1e-4
    before = [p.detach().clone() for p in params]
    stats = compute_meta_gradient(params, g_rl, g_sft, mu, alpha, grad_u, eval_at="lookahead", update="raw")
    # θ must be restored bitwise after the temporary lookahead
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    u_plus = u_at(params, surrogate_u, lookahead_params(params, g_rl, g_sft, mu + eps, alpha))
    u_minus = u_at(params, surrogate_u, lookahead_params(params, g_rl, g_sft, mu - eps, alpha))
    fd = (u_plus - u_minus) / (2 * eps)
    assert abs(stats.raw_meta_grad) > 1e-6, "degenerate test: the derivative is ~0"
    rel = abs(stats.raw_meta_grad - fd) / abs(fd)
    print(f"mu={mu} m={stats.raw_meta_grad:.10e} fd={fd:.10e} rel_err={rel:.2e}")
    assert rel < 1e-4, (stats.raw_meta_grad, fd)
    # a small step of μ along m raises the lookahead utility
    u_here = u_at(params, surrogate_u, lookahead_params(params, g_rl, g_sft, mu, alpha))
    step = 0.02 * (1 if stats.raw_meta_grad > 0 else -1)
    u_moved = u_at(params, surrogate_u, lookahead_params(params, g_rl, g_sft, mu + step, alpha))
    assert u_moved > u_here
    # and the opposite step lowers it (the sign is not an accident)
    u_back = u_at(params, surrogate_u, lookahead_params(params, g_rl, g_sft, mu - step, alpha))
    assert u_back < u_here


def test_cosine_normalisation_keeps_the_sign(setup):
    model, params, g_rl, g_sft, surrogate_u, grad_u = setup
    raw = compute_meta_gradient(params, g_rl, g_sft, 0.5, 0.5, grad_u, update="raw")
    cos = compute_meta_gradient(params, g_rl, g_sft, 0.5, 0.5, grad_u, update="cosine")
    assert cos.meta_grad == pytest.approx(cos.cosine)
    assert -1.0 <= cos.meta_grad <= 1.0
    assert (cos.meta_grad > 0) == (raw.raw_meta_grad > 0)


def test_first_order_variant_uses_current_theta(setup):
    model, params, g_rl, g_sft, surrogate_u, grad_u = setup
    cur = compute_meta_gradient(params, g_rl, g_sft, 0.5, 0.5, grad_u, eval_at="current")
    look = compute_meta_gradient(params, g_rl, g_sft, 0.5, 0.5, grad_u, eval_at="lookahead")
    g_now = grad_u()
    expect = 0.5 * sum(float((gu * (a - b)).sum()) for gu, a, b in zip(g_now, g_rl, g_sft))
    assert cur.raw_meta_grad == pytest.approx(expect, rel=1e-10)
    assert cur.raw_meta_grad != pytest.approx(look.raw_meta_grad, rel=1e-6)


# ── the Adam-preconditioned lookahead θ' = θ − α·P⊙[(1−μ)g_RL + μ g_SFT] ─────────────────────────────


def adam_precond(params, g_rl, g_sft):
    """P from a real AdamW after two steps on other gradients (so v is not just g²), then θ restored."""
    from amft_lib.controller import adam_preconditioner

    saved = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    for grads in (g_rl, g_sft):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    return adam_preconditioner(opt, params)


@pytest.mark.parametrize("mu", [0.2, 0.7])
def test_adam_lookahead_meta_gradient_matches_finite_difference(setup, mu):
    """m = α⟨∇U(θ'), P⊙(g_RL − g_SFT)⟩ equals the central difference of U(θ'(μ)) to rel. error ≤ 1e-6."""
    model, params, g_rl, g_sft, surrogate_u, grad_u = setup
    precond = adam_precond(params, g_rl, g_sft)
    # Adam moves every weight by ~α whatever |g|: α = 1e-3 keeps θ' in the region where U is smooth
    alpha, eps = 1e-3, 1e-5
    stats = compute_meta_gradient(params, g_rl, g_sft, mu, alpha, grad_u, update="raw", precond=precond)
    assert stats.lookahead == "adam"
    u_plus = u_at(params, surrogate_u, lookahead_params(params, g_rl, g_sft, mu + eps, alpha, precond))
    u_minus = u_at(params, surrogate_u, lookahead_params(params, g_rl, g_sft, mu - eps, alpha, precond))
    fd = (u_plus - u_minus) / (2 * eps)
    assert abs(stats.raw_meta_grad) > 1e-6, "degenerate test: the derivative is ~0"
    rel = abs(stats.raw_meta_grad - fd) / abs(fd)
    print(f"adam mu={mu} m={stats.raw_meta_grad:.12e} fd={fd:.12e} rel_err={rel:.2e}")
    assert rel <= 1e-6, (stats.raw_meta_grad, fd, rel)
    # the preconditioned step is the one that matters: it differs from the SGD derivative
    sgd = compute_meta_gradient(params, g_rl, g_sft, mu, alpha, grad_u, update="raw")
    assert sgd.raw_meta_grad != pytest.approx(stats.raw_meta_grad, rel=1e-3)


def test_half_sample_estimates_are_logged_and_averaged(setup):
    """A UtilityGrad's weighted mean is what m uses; the cosine of its halves is logged as half_cosine."""
    from amft_lib.controller import UtilityGrad, cosine_similarity

    model, params, g_rl, g_sft, surrogate_u, grad_u = setup
    g = grad_u()
    twin = [2.0 * x for x in g]

    def halves():
        return UtilityGrad(g, twin, n_a=4, n_b=4)  # full = 1.5·g

    stats = compute_meta_gradient(params, g_rl, g_sft, 0.5, 0.5, halves, eval_at="current")
    assert stats.half_cosine == pytest.approx(1.0)  # parallel halves agree fully
    plain = compute_meta_gradient(params, g_rl, g_sft, 0.5, 0.5, grad_u, eval_at="current")
    assert stats.raw_meta_grad == pytest.approx(1.5 * plain.raw_meta_grad, rel=1e-12)
    assert plain.half_cosine != plain.half_cosine  # NaN when the estimate comes as one gradient
    assert cosine_similarity(g, [-x for x in g]) == pytest.approx(-1.0)
