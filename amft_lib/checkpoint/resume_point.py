"""Where a run resumes from, and whether this launch may continue it: the resume rules of both loops.

`find_resume_point` picks the checkpoint (the newest verified one under the run root, or one named
URI) and applies the config-hash rule; `check_world` decides whether this launch's world size and
strategy can continue it. What "verified" means (manifest, sha256, safe loading) is `files.py`'s.
"""

from __future__ import annotations

import logging
from typing import Any

from amft_lib.checkpoint import files
from amft_lib.config import ConfigError
from amft_lib.distributed import Dist

log = logging.getLogger(__name__)


def find_resume_point(root: str | None, resume: str, cfg_hash: str, force: bool, force_restart: bool = False):
    """(uri, step, payload) of the checkpoint to resume from, or None to start fresh.

    `resume` is "auto" (the newest verified checkpoint under `root`; corrupt-only refused unless
    `force_restart`) or one checkpoint URI. A config-hash mismatch is refused unless `force` — then
    this run's config wins, and the log says so (torchtune's rule)."""
    if resume == "auto":
        if not root:
            raise ConfigError("resume='auto' needs a checkpoint root (--checkpoint-root)")
        return files.resume(root, cfg_hash, force=force, force_restart=force_restart)
    step, payload = files.load_checkpoint(resume)
    saved = payload.trainer_state.get("config_hash")
    if saved != cfg_hash:
        if not force:
            raise files.ConfigMismatchError(
                f"{resume} was written with config hash {str(saved)[:12]}…, this run has {cfg_hash[:12]}…; "
                "pass force_resume (--force-resume) to continue with this run's config"
            )
        log.warning("config hash differs from %s; this run's config wins", resume)
    return resume, step, payload


def root_of(checkpoint_uri: str) -> str | None:
    """The run root of `<root>/checkpoints/step-NNNNNNN` (None if the URI does not have that shape)."""
    parts = checkpoint_uri.rstrip("/").rsplit("/", 2)
    return parts[0] if len(parts) == 3 and parts[1] == files.CHECKPOINTS else None


def check_world(uri: str, trainer_state: dict[str, Any], dist: Dist, *, elastic: bool = False) -> str:
    """Refuse a checkpoint this launch cannot continue: any change of world size or strategy when not
    `elastic`; with `elastic`, only a 1-process checkpoint under FSDP2 (no sharded state to reshard).
    Returns "" for the same layout, else one line saying what changed (for the resume log)."""
    saved_world = int(trainer_state.get("world_size", 1))
    saved_strategy = trainer_state.get("strategy", "none")
    if saved_world == dist.world_size and (saved_world == 1 or saved_strategy == dist.strategy):
        return ""
    if not elastic:
        raise files.CheckpointError(
            f"{uri} was written by {saved_world} process(es) with distributed.strategy={saved_strategy}; this run "
            f"has {dist.world_size} with {dist.strategy}: relaunch with the same nnodes × nproc-per-node and "
            "strategy (the warm start does not change world size on resume), or start a new run root")
    if saved_world == 1 and dist.strategy == "fsdp":
        raise files.CheckpointError(
            f"{uri} was written by 1 process (whole tensors, no DCP shards): resume it under ddp or in one "
            "process, then continue under fsdp from that run's next checkpoint")
    return (f"written by {saved_world} process(es) ({saved_strategy}), continuing on {dist.world_size} "
            f"({dist.strategy})")
