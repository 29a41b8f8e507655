"""Gradient accumulation is exact: g_RL, g_SFT and the mixed update do not depend on loss.micro_batch_size.

arXiv 2604.23747 found the SFT→RL baselines of many mixed-policy papers weakened by gradient-accumulation and
loss-aggregation bugs (a per-micro-batch mean averaged again, so a token's weight depends on which micro-batch
it landed in). Here every loss_agg is computed with micro-batches of 1, 4 and the whole batch on sequences of
different lengths (where such a bug shows), in float64, and must agree to float tolerance; the mixed AdamW
step must be the same; gac's half-batch split (trainer.gradient_halves) must recombine to the same gradient.
So μ means the same thing at any micro-batch size.
"""

import pytest
import torch
from test_meta_gradient import _rmsnorm_keep_dtype

from amft_lib.config import ModelConfig, TrainConfig
from amft_lib.distributed import Dist
from amft_lib.model import load_policy, trainable_parameters
from amft_lib.policy import Policy, sft_gradient
from amft_lib.rollout import TokenBatch, completion_logprobs
from amft_lib.trainer import gradient_halves, rl_gradient

N = 8  # sequences in the batch
SIZES = (1, 4, N)


def ragged_batch(gen: torch.Generator, n: int, p: int, length: int, vocab: int) -> TokenBatch:
    """Completions of lengths 1..length (right-padded): token and sequence means then weigh tokens differently."""
    ids = torch.randint(4, vocab, (n, p), generator=gen)
    comp = torch.randint(4, vocab, (n, length), generator=gen)
    lengths = torch.randint(1, length + 1, (n,), generator=gen)
    lengths[0], lengths[1] = 1, length  # the extremes, always
    cmask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.float64)
    return TokenBatch(ids, torch.ones(n, p, dtype=torch.long), comp, cmask, [""] * n)


@pytest.fixture(scope="module")
def problem():
    from transformers.models.llama import modeling_llama

    keep = modeling_llama.LlamaRMSNorm.forward
    modeling_llama.LlamaRMSNorm.forward = _rmsnorm_keep_dtype  # float64 all the way (see test_meta_gradient)
    try:
        torch.manual_seed(0)
        model, tok = load_policy(ModelConfig(name="tiny", dtype="float64", tiny_hidden=32, tiny_layers=2,
                                             tiny_heads=2), seed=0)
        model.eval()
        gen = torch.Generator().manual_seed(3)
        rl, sft = ragged_batch(gen, N, 5, 9, len(tok)), ragged_batch(gen, N, 5, 11, len(tok))
        with torch.no_grad():
            old, _ = completion_logprobs(model, rl)
        adv = torch.randn(N, generator=gen, dtype=torch.float64)
        yield model, tok, rl, sft, old, adv
    finally:
        modeling_llama.LlamaRMSNorm.forward = keep


def train_cfg(micro: int, agg: str) -> TrainConfig:
    cfg = TrainConfig()
    cfg.loss.micro_batch_size, cfg.loss.loss_agg = micro, agg
    cfg.rollout.max_new_tokens = 9
    return cfg


def perturbed_old(old: torch.Tensor) -> torch.Tensor:
    """π_old ≠ π_θ by a fixed amount per token, so the clip is active for some tokens."""
    g = torch.Generator().manual_seed(5)
    return old + 0.3 * torch.randn(old.shape, generator=g, dtype=old.dtype)


def rl_grads(problem, micro: int, agg: str, on_policy: bool):
    model, _, rl, _, old, adv = problem
    params = trainable_parameters(model)
    return rl_gradient(Policy(model, model, None), params, rl, None if on_policy else perturbed_old(old), adv,
                       train_cfg(micro, agg))


def assert_same(a, b, rtol=1e-10):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean", "dr_grpo"])
@pytest.mark.parametrize("on_policy", [True, False], ids=["on_policy", "off_policy"])
def test_rl_gradient_is_invariant_to_the_micro_batch_size(problem, agg, on_policy):
    ref_g, ref_loss, ref_stats = rl_grads(problem, N, agg, on_policy)
    assert sum(float(g.abs().sum()) for g in ref_g) > 0
    for micro in SIZES[:-1]:
        g, loss, stats = rl_grads(problem, micro, agg, on_policy)
        assert_same(g, ref_g)
        assert loss == pytest.approx(ref_loss, rel=1e-10)
        assert stats == pytest.approx(ref_stats, rel=1e-9, abs=1e-12)


def test_sft_gradient_is_invariant_to_the_micro_batch_size(problem):
    model, _, _, sft, _, _ = problem
    params = trainable_parameters(model)
    ref_g, ref_loss = sft_gradient(model, params, sft, micro_batch_size=N)
    for micro in SIZES[:-1]:
        g, loss = sft_gradient(model, params, sft, micro_batch_size=micro)
        assert_same(g, ref_g)
        assert loss == pytest.approx(ref_loss, rel=1e-10)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean", "dr_grpo"])
def test_the_mixed_adamw_update_is_invariant_to_the_micro_batch_size(problem, agg):
    """θ after one AdamW step on (1 − μ)·g_RL + μ·g_SFT is the same at every micro-batch size."""
    model, _, _, sft, _, _ = problem
    params = trainable_parameters(model)
    start = [p.detach().clone() for p in params]
    mu, after = 0.3, {}
    for micro in SIZES:
        g_rl, _, _ = rl_grads(problem, micro, agg, on_policy=False)
        g_sft, _ = sft_gradient(model, params, sft, micro_batch_size=micro)
        opt = torch.optim.AdamW(params, lr=1e-2)
        for p, a, b in zip(params, g_rl, g_sft, strict=True):
            p.grad = (1 - mu) * a + mu * b
        opt.step()
        after[micro] = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, start, strict=True):
                p.copy_(s)
    assert any(not torch.equal(a, b) for a, b in zip(after[N], start))  # the step did move θ
    for micro in SIZES[:-1]:
        assert_same(after[micro], after[N], rtol=1e-9)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean", "dr_grpo"])
def test_gac_half_batch_split_recombines_to_the_whole_batch_gradient(problem, agg):
    model, _, rl, _, old, adv = problem
    params, cfg, policy = trainable_parameters(model), train_cfg(4, agg), Policy(model, model, None)
    old = perturbed_old(old)
    whole, loss, stats = rl_gradient(policy, params, rl, old, adv, cfg)

    def grad_fn(lo, hi):
        return rl_gradient(policy, params, rl.slice(lo, hi), old[lo:hi], adv[lo:hi], cfg)

    def sizes(lo, hi):
        part = rl.slice(lo, hi)
        return (part.n_tokens if agg == "token_mean" else len(part)), part.n_tokens

    g, hl, hstats, diff, share = gradient_halves(grad_fn, N, sizes, Dist())
    assert_same(g, whole)
    assert hl == pytest.approx(loss, rel=1e-10) and hstats == pytest.approx(stats, rel=1e-9, abs=1e-12)
    assert stats["clip_frac"] > 0  # the clip is active, so its token-share recombination is checked
    assert 0 < share < 1 and sum(float(d.abs().sum()) for d in diff) > 0
