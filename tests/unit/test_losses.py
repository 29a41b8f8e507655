"""Hand-worked checks of amft_lib/losses.py (arithmetic in the comments)."""

import math

import pytest
import torch

from amft_lib.losses import (
    aggregate,
    group_advantages,
    kl_k3,
    ppo_clip_loss,
    sft_loss,
    token_entropy,
    token_logprobs,
)


def test_group_advantages_scaled_and_unscaled():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    # group 1 = [1,0,1,1]: mean .75, centred [.25,-.75,.25,.25], unbiased std = sqrt(.75/3) = .5
    # group 2 = [1,0,0,0]: mean .25, centred [.75,-.25,-.25,-.25], std .5
    adv = group_advantages(r, 4, scale=True, eps=0.0)
    assert torch.allclose(adv, torch.tensor([0.5, -1.5, 0.5, 0.5, 1.5, -0.5, -0.5, -0.5]))
    raw = group_advantages(r, 4, scale=False)
    assert torch.allclose(raw, torch.tensor([0.25, -0.75, 0.25, 0.25, 0.75, -0.25, -0.25, -0.25]))


def test_group_with_equal_rewards_has_zero_advantage():
    adv = group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), 2)
    assert torch.equal(adv, torch.zeros(4))


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.ones(4), 3)


def test_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx(10 / 4)  # (1+2+3+4)/4
    assert aggregate(per_token, mask, "seq_mean").item() == pytest.approx((6 / 3 + 4 / 1) / 2)  # mean(2, 4)
    assert aggregate(per_token, mask, "dr_grpo", max_len=4).item() == pytest.approx(10 / (2 * 4))
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(per_token, mask, "sum")


def test_ppo_clip_by_hand():
    # one token per sequence; ratio = exp(log 1.5) = 1.5, ε = 0.2 → clipped ratio 1.2
    lp = torch.tensor([[math.log(1.5)], [math.log(1.5)], [math.log(0.5)], [0.0]])
    old = torch.zeros(4, 1)
    adv = torch.tensor([1.0, -1.0, -1.0, 2.0])
    mask = torch.ones(4, 1)
    loss, stats = ppo_clip_loss(lp, old, adv, mask, clip_eps=0.2, agg="token_mean")
    # A=+1, r=1.5: max(-1.5, -1.2) = -1.2 (clipped: no credit beyond 1+ε)
    # A=-1, r=1.5: max( 1.5,  1.2) =  1.5 (pessimistic side, not clipped)
    # A=-1, r=0.5: max( 0.5,  0.8) =  0.8 (clipped at 1-ε)
    # A=+2, r=1.0: -2
    assert loss.item() == pytest.approx((-1.2 + 1.5 + 0.8 - 2.0) / 4)
    assert stats.clip_frac == pytest.approx(2 / 4)
    # approx_kl = mean((r-1) - log r)
    expect_kl = ((0.5 - math.log(1.5)) * 2 + (-0.5 - math.log(0.5)) + 0.0) / 4
    assert stats.approx_kl == pytest.approx(expect_kl)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean", "dr_grpo"])
def test_ppo_on_policy_gradient_is_policy_gradient(agg):
    """At ratio 1 the clipped surrogate's gradient is -A·∇logπ aggregated like the loss."""
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([0.5, -2.0])
    loss, _ = ppo_clip_loss(lp, lp.detach(), adv, mask, agg=agg, max_len=5)
    loss.backward()
    per_token = -adv[:, None] * torch.ones_like(lp)
    if agg == "token_mean":
        expect = per_token * mask / 5  # 5 counted tokens
    elif agg == "seq_mean":
        expect = per_token * mask / mask.sum(-1, keepdim=True) / 2
    else:
        expect = per_token * mask / (2 * 5)
    assert torch.allclose(lp.grad, expect)


def test_kl_k3_is_zero_at_equality_and_positive_otherwise():
    a = torch.tensor([-1.0, -2.0])
    assert torch.allclose(kl_k3(a, a), torch.zeros(2))
    # ref - lp = 1 → e - 1 - 1 = 0.71828
    assert kl_k3(torch.tensor([-2.0]), torch.tensor([-1.0])).item() == pytest.approx(math.e - 2)


def test_ppo_kl_penalty_added():
    lp = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    ref = torch.ones(1, 2)  # k3 = e - 2 per token
    loss, stats = ppo_clip_loss(lp, lp, torch.zeros(1), mask, ref_logprobs=ref, kl_beta=0.5)
    assert loss.item() == pytest.approx(0.5 * (math.e - 2))
    assert stats.kl_ref == pytest.approx(math.e - 2)


def test_sft_loss_masks_tokens():
    lp = torch.tensor([[-1.0, -3.0, -100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the -100 is padding or prompt: must not count
    assert sft_loss(lp, mask).item() == pytest.approx(2.0)


def test_token_logprobs_entropy_and_temperature():
    logits = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])  # probs [.5,.5] and [.75,.25]
    targets = torch.tensor([[1], [0]])
    assert torch.allclose(token_logprobs(logits, targets), torch.tensor([[math.log(0.5)], [math.log(0.75)]]))
    ent = token_entropy(logits)
    assert ent[0, 0].item() == pytest.approx(math.log(2))
    assert ent[1, 0].item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    # temperature 2 halves logits: [log 3 / 2, 0] → p = sqrt3/(sqrt3+1)
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    assert token_logprobs(logits, targets, temperature=2.0)[1, 0].item() == pytest.approx(math.log(p))
