"""The losses of AMFT Eq. 1–3 as pure tensor functions.

Shapes: B = sequences in the batch (B_prompts * G for rollouts), L = completion length, V = vocab.
Every mask is 1.0 on completion tokens that count (EOS included) and 0.0 on padding and prompt.
Nothing here knows about models, configs or I/O, so each function is checked against
hand-worked numbers in tests/unit/test_losses.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

AGGREGATIONS = ("token_mean", "seq_mean", "dr_grpo")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(targets | prefix) per position.

    logits: [B, L, V] already aligned so logits[:, t] predicts targets[:, t]; targets: [B, L].
    Returns [B, L]. Temperature scales logits exactly as the sampler did, so π_old and π_θ refer
    to the same distribution the rollouts came from.
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logp = torch.log_softmax(logits / temperature, dim=-1)  # [B, L, V]
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, L]


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution at each position: [B, L, V] -> [B, L]."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where mask == 1; 0 when the mask is empty (no NaN on empty batches)."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_SFT = −mean over demonstration completion tokens of log π_θ(y_t | x, y_<t).

    logprobs, mask: [B, L]. Prompt tokens carry mask 0, so they never contribute (AMFT.md §1).
    """
    return -masked_mean(logprobs, mask)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i − mean_g r) / (std_g r + eps), per group of G consecutive samples.

    rewards: [B*G] with each prompt's G samples contiguous. Returns [B*G].
    std is the unbiased sample std (as TRL). With scale=False only the mean is removed
    (Dr.GRPO / LUFFY). A group whose rewards are all equal gets advantage 0: it carries no signal.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # [B, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, max_len: int | None = None) -> torch.Tensor:
    """Reduce a [B, L] per-token loss to a scalar.

    token_mean: Σ loss·mask / Σ mask over the whole batch (long answers weigh more).
    seq_mean:   mean over sequences of (Σ_t loss·mask / Σ_t mask) (original GRPO).
    dr_grpo:    Σ loss·mask / (B · max_len), a constant normaliser with no length bias.
    """
    if how == "token_mean":
        return masked_mean(per_token, mask)
    if how == "seq_mean":
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # [B]
        return per_seq.mean()
    if how == "dr_grpo":
        denom = per_token.shape[0] * (max_len if max_len is not None else per_token.shape[1])
        return (per_token * mask).sum() / denom
    raise ValueError(f"unknown loss aggregation {how!r}; choose one of {', '.join(AGGREGATIONS)}")


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref): exp(ref − lp) − (ref − lp) − 1 ≥ 0. [B, L]."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1.0


class PolicyLossStats(NamedTuple):
    """Detached diagnostics of one PPO-clip evaluation (floats)."""

    clip_frac: float  # share of counted tokens whose ratio left [1-ε, 1+ε] in the direction that clips
    approx_kl: float  # mean of (ratio - 1) - log ratio, the k3 estimate of KL(π_old ‖ π_θ)
    kl_ref: float  # mean k3 KL to the reference (0 when no reference)


def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    agg: str = "token_mean",
    max_len: int | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """L_RL: the PPO-clip surrogate with group-relative advantages (GRPO family).

    logprobs, old_logprobs, mask: [B, L]; advantages: [B] (one per sequence, broadcast over tokens).
    Per token: −min(ratio·A, clip(ratio, 1−ε, 1+ε)·A) (+ β·KL_k3 to the reference), then `aggregate`.
    On the first update after sampling ratio == 1, so this equals the plain policy gradient; the
    clip only matters for later epochs on the same rollouts.
    """
    log_ratio = logprobs - old_logprobs  # [B, L]
    ratio = torch.exp(log_ratio)  # [B, L]
    adv = advantages.unsqueeze(-1)  # [B, 1]
    pg_loss1 = -adv * ratio  # [B, L]
    pg_loss2 = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # [B, L]
    per_token = torch.maximum(pg_loss1, pg_loss2)  # [B, L]
    kl_mean = 0.0
    if ref_logprobs is not None and kl_beta > 0:
        kl = kl_k3(logprobs, ref_logprobs)
        per_token = per_token + kl_beta * kl
        kl_mean = float(masked_mean(kl.detach(), mask))
    loss = aggregate(per_token, mask, agg, max_len)
    with torch.no_grad():
        clipped = (pg_loss2 > pg_loss1).to(mask.dtype)
        stats = PolicyLossStats(
            clip_frac=float(masked_mean(clipped, mask)),
            approx_kl=float(masked_mean((ratio - 1.0) - log_ratio, mask)),
            kl_ref=kl_mean,
        )
    return loss, stats
