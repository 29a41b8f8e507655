"""The policy as both training loops (trainer, warm start) see it: wrapped for torchrun, sampled,
differentiated (the chunked SFT gradient, bf16 autocast) and saved at the end.

Why a module of its own: both loops need these, and importing them from each other (the warm start
used to build a throw-away TrainConfig just to call the trainer's SFT gradient) tied the two loops
together through their configs. (It was `training.py`, a name easy to confuse with `trainer.py`;
the checks both loops run first are in `loop_checks.py`, the LR schedule is in `optim.py`.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from amft_lib import distributed
from amft_lib.distributed import SINGLE, Dist
from amft_lib.losses import sft_loss
from amft_lib.model import load_policy, save_policy
from amft_lib.rollout import TokenBatch, completion_logprobs

log = logging.getLogger(__name__)


@dataclass
class Policy:
    """The policy as each use needs it. `forward` is what anything that backpropagates calls (the DDP
    wrapper, or the FSDP2-sharded model, whose hooks all-reduce / reduce-scatter the gradients);
    `generate` is the HF model sampling runs on; `dist` is this rank's place (Dist() in one process)."""

    forward: torch.nn.Module
    generate: torch.nn.Module
    tokenizer: object
    dist: Dist = SINGLE

    @classmethod
    def of(cls, model: torch.nn.Module, tokenizer, dist: Dist, device: torch.device) -> Policy:
        """Wrap `model` for `dist`'s strategy (DDP, FSDP2 or nothing). Take the parameters (for the
        optimizer) from `policy.generate` afterwards: FSDP2 replaces them with sharded ones."""
        forward = distributed.wrap(model, dist, device)
        return cls(forward, distributed.unwrap(forward), tokenizer, dist)

    def sampling(self):
        """Context for generate() calls: under FSDP2 the weights are gathered once for the whole block
        (distributed.gathered) unless distributed.fsdp_gather_for_sampling is off."""
        if self.dist.sharded and self.dist.gather_for_sampling:
            return distributed.gathered(self.forward)
        return contextlib.nullcontext()


def save_final_policy(policy: Policy, model_cfg, model_dir: Path) -> None:
    """The final model as a plain HF directory, written by rank 0. Under FSDP2 no rank holds the whole
    model: every rank takes part in gathering the full state dict (to CPU), and rank 0 loads it into a
    fresh, unsharded copy of the model to save that."""
    model, dist = policy.generate, policy.dist
    if dist.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.is_main:
            model, _ = load_policy(model_cfg, device="cpu")
            model.load_state_dict(full)
    if dist.is_main:
        save_policy(model, policy.tokenizer, model_dir)
    dist.barrier()  # the model directory exists on return, whichever rank returns first


def autocast(precision: str):
    """bf16 autocast for `bf16-mixed` on a GPU; a no-op otherwise (CPU autocast would change the numbers)."""
    if precision == "bf16-mixed" and torch.cuda.is_available():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def take_grads(params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The gradients `backward()` accumulated in `.grad` (zeros where a loss did not reach), leaving
    `.grad` empty for the next gradient. Why backward() and not torch.autograd.grad: DDP's all-reduce
    and FSDP2's reduce-scatter run as backward hooks that fill `.grad`; autograd.grad would bypass them."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return grads


def sft_gradient(model, params: list[torch.nn.Parameter], batch: TokenBatch, *, micro_batch_size: int,
                 precision: str = "fp32", dist: Dist = SINGLE) -> tuple[list[torch.Tensor], float]:
    """g_SFT = ∇_θ L_SFT (token-mean NLL of demonstration tokens; prompt tokens masked), summed over
    chunks of `micro_batch_size` sequences (memory is bounded; the result is the exact sum).

    Under torchrun `batch` is this rank's shard: each chunk is weighted by its share of the *global*
    token count and scaled by the world size, so the gradient DDP/FSDP2 average is the global one."""
    for p in params:
        p.grad = None
    (n_tok,) = dist.sum([batch.n_tokens])
    n_tok = max(1.0, n_tok)
    total = 0.0
    mb = micro_batch_size
    for s in range(0, len(batch), mb):
        chunk = batch.slice(s, s + mb)
        w = chunk.n_tokens / n_tok
        with autocast(precision):
            logprobs, _ = completion_logprobs(model, chunk)
        loss = sft_loss(logprobs, chunk.completion_mask.to(logprobs.device))
        (loss * (w * dist.world_size)).backward()
        total += loss.detach().item() * w
    (total,) = dist.sum([total])
    return take_grads(params), total
