"""The one save and the one restore of a training loop's state, called by the trainer and the warm start.

Both loops checkpoint the same things — the trainable weights, the optimizer, this rank's RNG, and
their own small states (scheduler, μ controller, trainer_state.json) — in one of two layouts: one
process writes whole tensors (`files.py`: safetensors + weights-only `.pt`), a torchrun world writes
DCP shards (`sharded.py`). Which layout is this module's decision, not the loops'; what goes into
`trainer_state` (cursors, phase, results so far) is the loop's.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from amft_lib.checkpoint import files, sharded
from amft_lib.distributed import Dist


class Trainable(Protocol):
    """What a checkpoint needs of the policy (training.Policy): `forward` is the (DDP/FSDP2-)wrapped
    module the optimizer steps, `generate` the plain model whose trainable parameters are saved."""

    forward: torch.nn.Module
    generate: torch.nn.Module
    dist: Dist


def trainable_state(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters a checkpoint holds: the trainable ones (all, or the LoRA adapters), by name."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def save_training_state(
    root: str, step: int, policy: Trainable, optimizer: torch.optim.Optimizer | None, *,
    trainer_state: dict[str, Any], config_hash: str, keep_last: int,
    scheduler_state: dict[str, Any] | None = None, controller_state: dict[str, Any] | None = None,
    metric: float | None = None,
) -> str:
    """Checkpoint `step` under `root` (`<root>/checkpoints/step-NNNNNNN`); returns its URI.

    Collective under torchrun (every rank calls it; DCP shards, rank 0 writes the manifest); in one
    process a plain save. `optimizer` None (the warm start between its SFT phases) saves an empty
    optimizer state; `metric` scores the checkpoint for retention's "keep the best"."""
    scheduler_state = scheduler_state if scheduler_state is not None else {}
    controller_state = controller_state if controller_state is not None else {}
    dist = policy.dist
    if dist.world_size > 1:
        return sharded.save(root, step, dist, policy.forward, optimizer, scheduler_state=scheduler_state,
                            controller_state=controller_state, trainer_state=trainer_state,
                            config_hash=config_hash, keep_last=keep_last, metric=metric)
    payload = files.CheckpointPayload(
        model_state={name: p.detach().cpu() for name, p in trainable_state(policy.generate)},
        optimizer_state=optimizer.state_dict() if optimizer is not None else {},
        scheduler_state=scheduler_state,
        controller_state=controller_state,
        rng_state=files.capture_rng_state(),
        trainer_state=trainer_state,
    )
    return files.save_checkpoint(root, step, payload, config_hash, keep_last=keep_last, metric=metric)


def restore_training_state(payload: files.CheckpointPayload, policy: Trainable,
                           optimizer: torch.optim.Optimizer | None) -> None:
    """Load a checkpoint's weights and optimizer state into `policy` and `optimizer`, then this rank's RNG.

    The RNG goes last and the caller restores only draw-free state after it (cursors, scheduler,
    controller), so on CPU the steps after the checkpoint repeat bit for bit. A DCP checkpoint is
    resharded onto whatever sharding `policy.forward` has; a rank the saving run did not have (an
    elastic resume onto more ranks) keeps its seeded stream — no training draw uses it."""
    if payload.sharded_dir is not None:
        sharded.load(payload, policy.forward, optimizer)
    else:
        with torch.no_grad():
            for name, p in trainable_state(policy.generate):
                p.copy_(payload.model_state[name].to(p.device, p.dtype))
        if optimizer is not None:
            optimizer.load_state_dict(payload.optimizer_state)
    rng = payload.rng_state
    per_rank = rng.get("per_rank", [rng])
    if policy.dist.rank < len(per_rank):
        files.restore_rng_state(per_rank[policy.dist.rank])
