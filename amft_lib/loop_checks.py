"""The checks both training loops (trainer, warm start) run before a byte is written, and the seeding
and device choice they make right after.

Everything a user can get wrong — the output folder, the model, the device, the data and its task,
and under torchrun the world size against the global batches — is refused here with one UserError
(ConfigError, DataError, ModelError) before anything is created: a refused run leaves no trace.
What each loop needs beyond that (demonstrations, H* at the rollout temperature, a checkpoint to
resume) it checks itself, right after `check_loop_inputs`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from amft_lib import distributed
from amft_lib.config import ConfigError, DataConfig, DistributedConfig, ModelConfig
from amft_lib.data.schema import unwritable_ancestor
from amft_lib.dataset import check_task, load_splits
from amft_lib.model import check_model_source


@dataclass(frozen=True)
class LoopInputs:
    """The checked inputs of a training loop: where it writes, the model it starts from, its rows."""

    out: Path
    model_cfg: ModelConfig  # the config's model, or the one `init_model` names
    train_rows: list[dict]
    demo_rows: list[dict]  # the train rows that carry a demonstration
    val_rows: list[dict]
    eval_rows: list[dict]  # the first `eval_prompts` validation rows: what each evaluation scores


def check_loop_inputs(out_dir: str | Path, model_cfg: ModelConfig, init_model: str | None, device: str,
                      data_cfg: DataConfig, splits: dict[str, list[dict]] | None, eval_prompts: int) -> LoopInputs:
    """Output folder, model source, device, then the data (loaded unless `splits` is given) and its task,
    in that order (the first problem is the one reported)."""
    out = Path(out_dir)
    model_cfg = model_cfg if init_model is None else replace(model_cfg, name=str(init_model))
    check_out_dir(out)
    check_model_source(model_cfg)
    check_device(device)
    splits = splits if splits is not None else load_splits(data_cfg)
    check_task(splits, data_cfg.task, data_cfg.path)
    train_rows = splits.get("train", [])
    val_rows = splits.get("val", [])
    return LoopInputs(out, model_cfg, train_rows, [r for r in train_rows if r.get("demonstration")], val_rows,
                      val_rows[:eval_prompts])


def check_loop_world(strategy: DistributedConfig, **global_batches: int) -> None:
    """Under torchrun: a valid distributed strategy, and every global batch (name → size) divisible by
    the world size (each rank takes an equal block), checked before any work."""
    _, world, _ = distributed.world_from_env()
    distributed.resolve_strategy(strategy, world)
    if world > 1:
        distributed.check_divisible(world, **global_batches)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_device(name: str) -> None:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda': no CUDA device is visible here; use device=auto or cpu")


def check_out_dir(out: Path, what: str = "output") -> None:
    """ConfigError unless `out` is (or can be created as) a writable directory; creates nothing."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{what} {out}: exists and is not a directory; give a directory (it is created if missing)")
    found = unwritable_ancestor(out)
    if found is not None:
        probe, is_dir = found
        why = f"permission denied (cannot write in {probe})" if is_dir else f"{probe} is not a directory"
        raise ConfigError(f"{what} {out}: {why}")
