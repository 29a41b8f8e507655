"""The meta-gradient as a mean over validation rollouts, with its standard error (AMFT.md §6).

U's policy-gradient estimate is a mean over N validation rollouts, so m = ∂U(θ'(μ))/∂μ is one too:

    m = (1/N)·Σ_i w_i·D_i,   w_i = R_i − b_g (group-mean baseline),
    D_i = d/dμ log π_{θ'(μ)}(τ_i) = ⟨∇_θ log π(τ_i)|θ', v⟩,   v = ∂θ'/∂μ = α·P⊙(g_RL − g_SFT)

with the sampled tokens τ_i held fixed (P = 1 for the SGD lookahead, Adam's 1/(√v̂ + ε) otherwise). Each D_i
is a directional derivative of one sequence log-prob, so it needs no backward over the validation batch and
no θ-sized ∇U buffer: one forward-mode JVP along v (`jvp_logprob_derivatives`) or two no-grad forwards at
θ' ± s·v (`central_difference_derivatives`).

Why per rollout: the controller moves μ on one scalar, and whether that scalar's sign is evidence is decided
by *its* standard error. Prompt groups are independent draws (a group's rollouts share a baseline, so they are
not), so `evidence` turns the per-group terms c_g = (1/G)·Σ_{i∈g} w_i·D_i into m = mean_g c_g,
SE(m) = std_g(c_g)/√n_groups and t = m/SE(m).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from amft_lib.distributed import Reduction

# Central difference: the shift s·v is sized so its largest moves are FD_STEP·RMS(θ): s = FD_STEP·RMS(θ)/‖v‖_8,
# where ‖v‖_8 = (Σ v_j⁸)^(1/8) is ≈ max|v_j| for a direction concentrated on a few weights and ~2× it for a spread
# one, and, being a sum, is the same number on FSDP2 shards as in one process (a max over shards would need its own
# collective). Measured on the Countdown warm start (float32, 128 rollouts, vs the exact JVP): m within 1.8e-4 for
# a concentrated SGD-like direction (α·g_SFT) and 1.9e-3 for a spread (random) one. Sized by RMS(s·v) instead,
# no single step suited both: 1e-3 was off by 2.5 % on the SGD-like direction (a few weights moved far:
# curvature), 1e-4 by 4e-3 on the spread one (rounding).
FD_STEP = 3e-3
_NORM_P = 8


class Evidence(NamedTuple):
    """m with its standard error over prompt groups, and how many groups it rests on."""

    meta_grad: float  # m = mean_g c_g = (1/N)·Σ_i w_i·D_i
    se: float  # std_g(c_g) / √n_groups (0 when every group's term is equal; NaN with one group)
    t: float  # m / SE; 0 when m = 0 (no signal: every group's rewards were equal), NaN with one group
    n_groups: int


def lookahead_direction(g_rl: Sequence[torch.Tensor], g_sft: Sequence[torch.Tensor], alpha: float,
                        precond: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """v = ∂θ'/∂μ = α·P⊙(g_RL − g_SFT): the lookahead θ' = θ − α·P⊙[(1−μ)g_RL + μ g_SFT] is linear in μ."""
    pcs = precond if precond is not None else [None] * len(g_rl)
    return [alpha * (gr - gs) * (1.0 if pc is None else pc) for gr, gs, pc in zip(g_rl, g_sft, pcs, strict=True)]


def group_terms(weights: torch.Tensor, derivs: torch.Tensor, group_size: int) -> torch.Tensor:
    """c_g = (1/G)·Σ_{i∈g} w_i·D_i per prompt group (groups contiguous), float64: [N] → [N/G]."""
    return (weights.double() * derivs.double()).view(-1, group_size).mean(dim=1)


def evidence(terms: torch.Tensor) -> Evidence:
    """m, SE(m) and t from the per-group terms of the *whole* batch (gather them over ranks first).

    E.g. terms [1, 2, 3]: m = 2, std = 1, SE = 1/√3 ≈ 0.577, t ≈ 3.46.
    """
    n = int(terms.numel())
    m = float(terms.double().mean()) if n else 0.0
    if n < 2:
        return Evidence(m, math.nan, math.nan, n)
    se = float(terms.double().std(unbiased=True)) / math.sqrt(n)
    t = m / se if se > 0 else 0.0 if m == 0 else math.copysign(math.inf, m)
    return Evidence(m, se, t, n)


def sequence_logprobs(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log π(τ_i) = Σ_t log π(token_t | …) over the counted completion tokens: [N, L] → [N]."""
    return (logprobs * mask.to(logprobs.dtype)).sum(-1)


def jvp_logprob_derivatives(
    model: torch.nn.Module,
    params: Sequence[torch.nn.Parameter],
    direction: Sequence[torch.Tensor],
    seq_logprob: Callable[[torch.nn.Module | Callable], torch.Tensor],
) -> torch.Tensor:
    """D_i = ⟨∇_θ log π(τ_i), v⟩ for every sequence by forward-mode AD: one `torch.func.jvp` of the functional
    model at the current parameter values along `direction` (v per trainable parameter).

    seq_logprob(fn) → [n] sequence log-probs of one micro-batch, calling `fn(**model_inputs)` in place of the
    model (so the caller owns batching, masks and temperature). Costs about two forwards; keeps no graph.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    primals = {k: p.detach() for k, p in zip(keys, params, strict=True)}
    tangents = {k: v.detach().to(p.dtype) for k, p, v in zip(keys, params, direction, strict=True)}

    def f(values: dict[str, torch.Tensor]) -> torch.Tensor:
        return seq_logprob(_Functional(model, values))

    # The fused SDPA kernels (flash, memory-efficient; CPU flash too) have no forward-mode derivative: the math
    # kernel (matmul + softmax) has, and computes the same attention.
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        _, derivs = torch.func.jvp(f, (primals,), (tangents,))
    return derivs


class _Functional(torch.nn.Module):
    """`model` called with some of its parameters replaced (torch.func.functional_call), as a module so code
    that asks it for its parameters' device (rollout.completion_logprobs) still works."""

    def __init__(self, model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._model, self._values = model, values

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        return self._model.parameters(recurse)

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self._model, self._values, args, kwargs, strict=False)


def fd_scale(params: Sequence[torch.Tensor], direction: Sequence[torch.Tensor],
             reduction: Reduction | None = None, step: float = FD_STEP) -> float:
    """s = step·RMS(θ)/‖v‖_8 (sums over FSDP2 shards, so the same s on every rank and world size). 0 when v = 0."""
    red = reduction or Reduction()
    p, v = red.to_local(params), red.to_local(direction)
    sums = red.total(torch.tensor([
        float(sum(x.detach().double().pow(2).sum() for x in p)), float(sum(x.numel() for x in p)),
        float(sum(x.double().pow(_NORM_P).sum() for x in v))], dtype=torch.float64)).tolist()
    v_norm = sums[2] ** (1.0 / _NORM_P)
    return step * math.sqrt(sums[0] / max(sums[1], 1.0)) / v_norm if v_norm > 0 else 0.0


@contextlib.contextmanager
def shifted(params: Sequence[torch.nn.Parameter], direction: Sequence[torch.Tensor], scale: float,
            exact: bool = True) -> Iterator[None]:
    """θ ← θ + scale·v in place for the block, then θ back: from one saved copy (exact, bitwise), or by
    subtracting the same shift (no copy; θ may move by a rounding unit — for callers that restore θ themselves,
    e.g. inside the lookahead's own exact restore)."""
    saved = [p.detach().clone() for p in params] if exact else None
    try:
        with torch.no_grad():
            for p, v in zip(params, direction, strict=True):
                p.add_(v.to(p.dtype), alpha=scale)
        yield
    finally:
        with torch.no_grad():
            for i, (p, v) in enumerate(zip(params, direction, strict=True)):
                if saved is not None:
                    p.copy_(saved[i])
                else:
                    p.sub_(v.to(p.dtype), alpha=scale)


def central_difference_derivatives(
    params: Sequence[torch.nn.Parameter],
    direction: Sequence[torch.Tensor],
    seq_logprobs_now: Callable[[], torch.Tensor],
    reduction: Reduction | None = None,
    step: float = FD_STEP,
    exact: bool = True,
) -> torch.Tensor:
    """D_i ≈ [log π_{θ+s·v}(τ_i) − log π_{θ−s·v}(τ_i)] / 2s: two no-grad forwards (`seq_logprobs_now()` → [N]
    at the current parameters), θ restored bitwise. Works on FSDP2 shards unchanged (the shift is element-wise;
    only s's norms are summed). Because θ'(μ) is linear in μ, this is the central difference in μ at step s.
    step: the relative size of the shift (`fd_scale`); at the default m is within ~1e-3 of the exact value on
    the tiny model, far below the rollout noise SE(m) measures (float64 tests use 1e-6).
    exact: restore θ from a saved copy (one θ-sized buffer); False subtracts the shift back (no copy)."""
    s = fd_scale(params, direction, reduction, step)
    if s == 0.0:
        with torch.no_grad():
            return torch.zeros_like(seq_logprobs_now(), dtype=torch.float64)
    with torch.no_grad():
        with shifted(params, direction, s, exact):
            up = seq_logprobs_now().double()
        with shifted(params, direction, -s, exact):
            down = seq_logprobs_now().double()
    return (up - down) / (2.0 * s)
