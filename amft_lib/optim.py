"""AdamW for bf16 weights: fp32 master weights and fp32 moments, bf16 parameters for the forward.

Why: with weights stored in bfloat16 (8 bits of mantissa) an update smaller than ~1/256 of a weight
rounds to nothing — at lr 1e-6 and weights ~0.02 every Adam step is lost, and the policy silently
does not train. Keeping an fp32 copy (the "master weights") and fp32 moments, and copying the
rounded result back into the bf16 parameter after each step, is the standard fix (mixed-precision
training, Micikevicius et al. 2018). Cost: 4 (master) + 8 (moments) bytes per trainable parameter
instead of 4 (bf16 moments).

`build_optimizer` returns plain `torch.optim.AdamW` whenever the parameters are already fp32/fp64
(float32 runs, LoRA adapters that peft keeps in fp32): nothing changes for them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) over fp32 master copies of low-precision params.

    State per parameter: `master` (fp32 copy of θ), `exp_avg`, `exp_avg_sq` (fp32), `step`. Everything is a
    tensor, so `state_dict()` goes through `torch.load(weights_only=True)` like any optimizer's.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def _state(self, p: torch.nn.Parameter) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["master"] = p.detach().to(torch.float32).clone()
            st["exp_avg"] = torch.zeros_like(st["master"])
            st["exp_avg_sq"] = torch.zeros_like(st["master"])
        return st

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self._state(p)
                g = p.grad.to(torch.float32)
                st["step"] += 1
                t = float(st["step"])
                master, m, v = st["master"], st["exp_avg"], st["exp_avg_sq"]
                master.mul_(1.0 - lr * wd)  # decoupled weight decay (AdamW)
                m.lerp_(g, 1.0 - beta1)  # m ← β1·m + (1−β1)·g
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)  # v ← β2·v + (1−β2)·g²
                step_size = lr / (1.0 - beta1**t)
                denom = (v.sqrt() / math.sqrt(1.0 - beta2**t)).add_(eps)
                master.addcdiv_(m, denom, value=-step_size)
                p.copy_(master)  # round once, into the bf16 parameter the forward uses
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # torch.optim.Optimizer casts floating state to the *parameter's* dtype on load, which would
        # round the fp32 master weights and moments to bf16; put the saved fp32 tensors back.
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for idx, st in saved.items():
            p = params[int(idx)]
            for key in ("master", "exp_avg", "exp_avg_sq"):
                if key in st:
                    self.state[p][key] = st[key].to(device=p.device, dtype=torch.float32)


def build_optimizer(params: list[torch.nn.Parameter], *, lr: float, betas: tuple[float, float],
                    weight_decay: float, master_weights: bool = True) -> torch.optim.Optimizer:
    """AdamW over `params`; fp32 master weights + moments when they are bf16/fp16 and `master_weights`."""
    if master_weights and any(p.dtype in _LOW_PRECISION for p in params):
        return MasterWeightAdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `max_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
