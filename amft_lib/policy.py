"""The policy as both training loops (trainer, warm start) see it: wrapped for torchrun, sampled,
differentiated (the chunked SFT gradient under the stage's engine: autocast, compile) and saved at the end.

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
from amft_lib.engine import EAGER, Engine
from amft_lib.losses import sft_loss
from amft_lib.model import load_policy, save_adapter, save_policy
from amft_lib.rollout import TokenBatch, completion_logprobs, kv_cache_mode

log = logging.getLogger(__name__)


@dataclass
class Policy:
    """The policy as each use needs it. `forward` is what anything that backpropagates calls (the DDP
    wrapper, or the FSDP2-sharded model, whose hooks all-reduce / reduce-scatter the gradients, compiled
    when the stage's engine says so); `generate` is the HF model sampling runs on; `dist` is this rank's
    place (Dist() in one process); `engine` is how the stage runs the model (engine.plan of `engine.*`)."""

    forward: torch.nn.Module
    generate: torch.nn.Module
    tokenizer: object
    dist: Dist = SINGLE
    engine: Engine = EAGER

    @classmethod
    def of(cls, model: torch.nn.Module, tokenizer, dist: Dist, device: torch.device, engine: Engine = EAGER) -> Policy:
        """Wrap `model` for `dist`'s strategy (DDP, FSDP2 or nothing), then for `engine` (compile, threads).
        Take the parameters (for the optimizer) from `policy.generate` afterwards: FSDP2 replaces them with
        sharded ones."""
        wrapped = distributed.wrap(model, dist, device)
        engine.use_threads()
        return cls(engine.prepare(wrapped), distributed.unwrap(wrapped), tokenizer, dist, engine)

    def autocast(self):
        """Context for the forwards that feed a loss (engine precision: bf16 autocast or nothing)."""
        return self.engine.autocast()

    @contextlib.contextmanager
    def sampling(self):
        """Context for generate() calls: the engine's decode precision and KV cache, and under FSDP2 the
        weights gathered once for the whole block (distributed.gathered) unless
        distributed.fsdp_gather_for_sampling is off."""
        gather = self.dist.sharded and self.dist.gather_for_sampling
        with self.engine.gpu_only_autocast(), kv_cache_mode(self.engine.kv_cache), (
                distributed.gathered(self.forward) if gather else contextlib.nullcontext()):
            yield


def save_final_policy(policy: Policy, model_cfg, model_dir: Path) -> None:
    """The final model as a plain HF directory, written by rank 0. Under FSDP2 no rank holds the whole
    model: every rank takes part in gathering the full state dict (to CPU), and rank 0 loads it into a
    fresh, unsharded copy of the model to save that. A LoRA run also leaves its adapter in `adapter/`
    beside `model_dir` (save_adapter: a few MB, from which merge_adapter rebuilds the merged folder)."""
    model, dist = policy.generate, policy.dist
    if dist.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.is_main:
            model, _ = load_policy(model_cfg, device="cpu")
            model.load_state_dict(full)
    if dist.is_main:
        save_policy(model, policy.tokenizer, model_dir)
        if model_cfg.lora:
            save_adapter(model, Path(model_dir).with_name("adapter"))
    dist.barrier()  # the model directory exists on return, whichever rank returns first


def take_grads(params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The gradients `backward()` accumulated in `.grad` (zeros where a loss did not reach), leaving
    `.grad` empty for the next gradient. Why backward() and not torch.autograd.grad: DDP's all-reduce
    and FSDP2's reduce-scatter run as backward hooks that fill `.grad`; autograd.grad would bypass them."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return grads


def sft_gradient(model, params: list[torch.nn.Parameter], batch: TokenBatch, *, micro_batch_size: int,
                 engine: Engine = EAGER, dist: Dist = SINGLE) -> tuple[list[torch.Tensor], float]:
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
        with engine.autocast():
            logprobs, _ = completion_logprobs(model, chunk)
        loss = sft_loss(logprobs, chunk.completion_mask.to(logprobs.device))
        (loss * (w * dist.world_size)).backward()
        total += loss.detach().item() * w
    (total,) = dist.sum([total])
    return take_grads(params), total
