"""Worker for tests/integration/test_distributed.py: the meta-gradient m of one fixed problem, in one
process or as one rank of `torchrun` under FSDP2, plus its central finite difference.

The problem is test_meta_gradient.py's (float64 tiny Llama, fixed random batches, a deterministic
surrogate U), but each rank holds only its shard of the parameters and its block of every batch:
g_RL, g_SFT and ∇U come out of FSDP2's reduce-scatter, and m from `compute_meta_gradient` with the
shard-summing `Reduction`. U itself (for the finite difference) is summed over ranks. The per-rollout meta
step (central difference on the shards, per-group terms gathered) runs on the same rollouts. Rank 0 writes
{"m", "fd", "world_size", "half_cosine", "m_rollout", "t_rollout", "n_groups"} as JSON to argv[1].
"""

import json
import sys

import torch

from amft_lib import meta_grad
from amft_lib.config import DistributedConfig, ModelConfig
from amft_lib.controller import UtilityGrad, compute_meta_evidence, compute_meta_gradient, utility_grad_in_place
from amft_lib.distributed import init, shutdown, wrap
from amft_lib.model import load_policy, trainable_parameters
from amft_lib.policy import sft_gradient, take_grads
from amft_lib.rollout import TokenBatch, completion_logprobs


def _rmsnorm_keep_dtype(self, hidden_states):  # as in test_meta_gradient.py: float64 all the way
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def random_batch(gen: torch.Generator, n: int, p: int, length: int, vocab: int) -> TokenBatch:
    ids = torch.randint(4, vocab, (n, p), generator=gen)
    comp = torch.randint(4, vocab, (n, length), generator=gen)
    cmask = torch.ones(n, length, dtype=torch.float64)
    cmask[0, length - 2 :] = 0.0
    return TokenBatch(ids, torch.ones(n, p, dtype=torch.long), comp, cmask, [""] * n)


def main(out_path: str) -> None:
    from transformers.models.llama import modeling_llama

    modeling_llama.LlamaRMSNorm.forward = _rmsnorm_keep_dtype
    dist, device = init(DistributedConfig(strategy="fsdp"), torch.device("cpu"))
    cfg = ModelConfig(name="tiny", dtype="float64", tiny_hidden=32, tiny_layers=2, tiny_heads=2)
    model, tok = load_policy(cfg, seed=0)
    model.eval()  # no dropout: U is a deterministic function of θ
    model = wrap(model, dist, device)
    params = trainable_parameters(model)
    gen = torch.Generator().manual_seed(1)
    vocab = len(tok)
    rl, sft = random_batch(gen, 6, 5, 7, vocab), random_batch(gen, 4, 5, 9, vocab)
    val = random_batch(gen, 8, 5, 6, vocab)
    weights = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.25, 0.75, -0.25, -0.5], dtype=torch.float64)

    def mine(batch: TokenBatch) -> TokenBatch:
        per = len(batch) // dist.world_size
        return batch.slice(dist.rank * per, (dist.rank + 1) * per)

    def block_u(lo: int, hi: int) -> torch.Tensor:
        """Σ_{i in this rank's block of rows lo..hi} w_i·log π(τ_i) / (hi − lo): this rank's share of U."""
        part = val.slice(lo, hi)
        per = len(part) // dist.world_size
        b, w = part.slice(dist.rank * per, (dist.rank + 1) * per), weights[lo:hi][dist.rank * per:(dist.rank + 1) * per]
        lp, _ = completion_logprobs(model, b)
        return (w * (lp * b.completion_mask).sum(-1)).sum() / (hi - lo)

    def grad_of(share) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        (share() * dist.world_size).backward()  # FSDP2 averages over ranks
        return take_grads(params)

    # g_RL: a sequence-mean policy-gradient surrogate on this rank's rows; g_SFT: the library's own sft_gradient
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0], dtype=torch.float64)

    def rl_share() -> torch.Tensor:
        b = mine(rl)
        lp, _ = completion_logprobs(model, b)
        a = adv[dist.rank * len(b):(dist.rank + 1) * len(b)]
        return (a * (lp * b.completion_mask).sum(-1)).sum() / len(rl)

    g_rl = grad_of(rl_share)
    g_sft, _ = sft_gradient(model, params, mine(sft), micro_batch_size=64, dist=dist)

    def utility_grad() -> UtilityGrad:
        return UtilityGrad(grad_of(lambda: block_u(0, 4)), grad_of(lambda: block_u(4, 8)), 4, 4)

    def u_value() -> float:
        with torch.no_grad():
            (total,) = dist.sum([float(block_u(0, 4) + block_u(4, 8)) / 2])
        return total

    mu, alpha, eps = 0.3, 0.5, 1e-4
    stats = compute_meta_gradient(params, g_rl, g_sft, mu, alpha, utility_grad, eval_at="lookahead",
                                  update="raw", reduction=dist.reduction())
    # the per-rollout meta step (AMFT.md §6) on the same rollouts: D_i by central difference on the shards,
    # per-group terms (G = 2) gathered over ranks; its mean must be m
    per = len(val) // dist.world_size

    def group_terms(v: list[torch.Tensor]) -> torch.Tensor:
        b, w = mine(val), weights[dist.rank * per:(dist.rank + 1) * per]

        def seq_lp() -> torch.Tensor:
            return meta_grad.sequence_logprobs(completion_logprobs(model, b)[0], b.completion_mask)

        d = meta_grad.central_difference_derivatives(params, v, seq_lp, dist.reduction(), step=1e-6)
        return dist.gather(meta_grad.group_terms(w, d, 2))

    per_rollout = compute_meta_evidence(params, g_rl, g_sft, mu, alpha, group_terms, reduction=dist.reduction(),
                                        estimator="central_difference")
    u_plus = utility_grad_in_place(params, g_rl, g_sft, mu + eps, alpha, u_value)
    u_minus = utility_grad_in_place(params, g_rl, g_sft, mu - eps, alpha, u_value)
    fd = (u_plus - u_minus) / (2 * eps)
    if dist.is_main:
        with open(out_path, "w") as f:
            json.dump({"m": stats.raw_meta_grad, "fd": fd, "world_size": dist.world_size,
                       "half_cosine": stats.half_cosine, "grad_u_norm": stats.grad_u_norm,
                       "m_rollout": per_rollout.meta_grad, "t_rollout": per_rollout.meta_grad_t,
                       "n_groups": per_rollout.n_groups}, f)
    shutdown(dist)


if __name__ == "__main__":
    main(sys.argv[1])
