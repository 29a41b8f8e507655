"""Checkpoints of a `torchrun` run: model and optimizer as `torch.distributed.checkpoint` (DCP) shards,
one RNG state per rank, and the same small states and manifest rules as `files.py`.

Layout (manifest ``"layout": "dcp"``, ``"world_size"``, ``"strategy"``)::

    <root>/checkpoints/step-0000200/dcp/.metadata          DCP index (rank 0)
                                    dcp/__R_0.distcp        rank R's shard of model + optimizer
                                    rng-0000R.pt            rank R's RNG state (weights_only)
                                    scheduler.pt, controller.json, trainer_state.json   (rank 0)
                                    MANIFEST.json           rank 0, after every rank's files are up
    <root>/checkpoints/LATEST

Why DCP: under FSDP2 no rank holds the whole model, and gathering it onto one rank to write
safetensors would need the whole model (and optimizer, 3× larger) in one host's memory. DCP writes
each rank's shard in parallel and loads it back onto the same sharding. Every rank stages its own
files in a local temp folder and uploads them, so nodes need no shared filesystem.

Nothing from the run root is unpickled freely (DESIGN.md): stock DCP reads `.metadata` with
`pickle.load` and non-tensor items (the optimizer's param groups) with `torch.load(weights_only=False)`,
so a crafted checkpoint would run code in every training pod. `load` goes through `safe_dcp`: the
metadata through an unpickler that admits only DCP's own metadata classes, a non-tensor item only if
`torch.load(weights_only=True)` accepts it; tensors are read with weights_only already, and the RNG
files go through `torch.load(weights_only=True)` (files.py).

Training resumes under another world size or strategy (`check_world(elastic=True)`): DCP reshards
model and optimizer onto whatever sharding loads them (FSDP2 on M ranks, DDP, or one plain process), the
data cursors are global (every rank takes its block of the same global batch), and no training draw uses
the per-rank RNG streams (rollouts are seeded per row), so the run continues on the same trajectory up to
float reduction order. A 1-process checkpoint (safetensors + a full optimizer state) resumes under DDP
(every rank loads it whole) but not under FSDP2. The warm start keeps the strict rule: its rejection
sampling's partial blocks are per rank.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from amft_lib.checkpoint import files as ckpt
from amft_lib.distributed import Dist


def save(root: str, step: int, dist: Dist, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *,
         scheduler_state: dict[str, Any], controller_state: dict[str, Any], trainer_state: dict[str, Any],
         config_hash: str, keep_last: int, metric: float | None) -> str:
    """Collective: every rank calls it. Returns the checkpoint URI (on every rank)."""
    import torch.distributed.checkpoint as dcp

    uri = ckpt.checkpoint_uri(root, step)
    present = ckpt.prepare_step(root, step) if dist.is_main else {}
    dist.barrier()  # a repeated step's old folder is gone before anyone uploads into it
    with tempfile.TemporaryDirectory(prefix="amft-ckpt-") as staging:
        dcp.save(_state(model, optimizer),
                 storage_writer=dcp.FileSystemWriter(os.path.join(staging, ckpt.DCP_DIR)))
        torch.save(ckpt.capture_rng_state(), os.path.join(staging, ckpt.rng_file(dist.rank)))
        if dist.is_main:
            ckpt.stage_states(staging, scheduler_state, controller_state, trainer_state)
        files = ckpt.upload_and_hash(staging, uri)
    every: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(every, files)
    if dist.is_main:  # manifest last, after every rank's files are up; then LATEST and retention
        merged = {name: entry for part in every for name, entry in part.items()}
        ckpt.commit_checkpoint(root, step, merged, config_hash, present=present, keep_last=keep_last, metric=metric,
                               extra={"layout": ckpt.SHARDED, "world_size": dist.world_size,
                                      "strategy": dist.strategy})
    dist.barrier()  # nobody trains on past a checkpoint that is not committed yet
    return uri


def load(payload: ckpt.CheckpointPayload, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Collective: load the DCP shards into the (wrapped) model and the optimizer. This rank's RNG
    state is left to the caller (`payload.rng_state["per_rank"][rank]`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    from amft_lib.checkpoint.safe_dcp import SafeLoadPlanner, SafeReader

    SafeReader(payload.sharded_dir).read_metadata()  # refused metadata: one line here, not DCP's wrapped error
    state = _state(model, optimizer)  # the target sharding (get_state_dict initialises the optimizer state)
    dcp.load(state, storage_reader=SafeReader(payload.sharded_dir), planner=SafeLoadPlanner())
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ckpt.release(payload)


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """What DCP saves: the model's (sharded) state dict, and the optimizer's when there is one."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:  # the warm start's rejection sampling: no optimizer between its SFT phases
        return {"model": get_model_state_dict(model)}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}
