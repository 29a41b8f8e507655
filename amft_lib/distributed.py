"""Running the trainer under `torchrun`: the process group, the wrapped model, and the few global
reductions AMFT needs beyond what DDP / FSDP2 do for the gradients.

Why so little: PyTorch distributed is the engine. DistributedDataParallel all-reduces gradients in
`backward()`, FSDP2 (`fully_shard`) all-gathers parameters for each forward and reduce-scatters the
gradients; both average over ranks. What they do not know about is AMFT's own bookkeeping, and that
is what lives here:

- the global batch is fixed and *sharded* (`Dist.shard`), so a 2-rank run trains on exactly the
  prompts and demonstrations a 1-rank run of the same config sees;
- losses are weighted by their share of the *global* batch and multiplied by the world size, so
  the averaged gradient is the global gradient, not the mean of per-rank means;
- scalars that steer the run (H_t, rewards, losses) are summed across ranks (`Dist.sum`), and the
  meta-gradient's dot products over FSDP2 shards are summed with one all-reduce (`Dist.reduction`);
- μ must be identical on every rank: it is computed from identical reduced numbers, and
  `Dist.spread` measures the spread each step so the logs prove it.

`Dist()` (world size 1) is the single-process default: every method is then a no-op, so the trainer
has one code path.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from amft_lib.config import ConfigError, DistributedConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size and the resolved strategy (none|ddp|fsdp)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"
    gather_for_sampling: bool = True  # fsdp: see `gathered`

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, metrics, progress, the checkpoint manifest and the final model."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Parameters and gradients are FSDP2 shards (DTensors), not full replicas."""
        return self.strategy == "fsdp" and self.world_size > 1

    def shard(self, items: Sequence[T], what: str = "batch") -> list[T]:
        """This rank's contiguous block of a global batch whose size the world size divides (checked
        at start-up by `check_divisible`, so a mismatch here is a bug, not a user error)."""
        n = len(items)
        if n % self.world_size:
            raise ValueError(f"{what} of {n} does not split over {self.world_size} ranks")
        per = n // self.world_size
        return list(items[self.rank * per : (self.rank + 1) * per])

    def offset(self, n: int) -> int:
        """Global index of this rank's first item in a batch of n (for per-row sampling seeds)."""
        return self.rank * (n // self.world_size)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks of a few float64 scalars (one all-reduce)."""
        if self.world_size == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate equally shaped tensors from all ranks along dim 0, in rank order."""
        if self.world_size == 1:
            return tensor
        t = tensor.detach().to(self._comm_device())
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, t)
        return torch.cat(parts).to(tensor.device)

    def spread(self, value: float) -> float:
        """max − min of `value` over ranks (0.0 when every rank agrees): the μ-identical check."""
        if self.world_size == 1:
            return 0.0
        vals = self.gather(torch.tensor([float(value)], dtype=torch.float64))
        return float(vals.max() - vals.min())

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def reduction(self) -> Reduction:
        """How to sum dot products of gradients: FSDP2 shards are partial (sum their local products
        with one all-reduce); DDP gradients are already global replicas (nothing to sum)."""
        if not self.sharded:
            return Reduction()
        return Reduction(local=_to_local, all_sum=self._all_sum_tensor)

    def _all_sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        out = t.to(self._comm_device())
        torch.distributed.all_reduce(out)
        return out.to(t.device)

    def _comm_device(self) -> torch.device:
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "gloo"
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


@dataclass(frozen=True)
class Reduction:
    """`local(t)` → the part of t this rank holds; `all_sum(v)` → v summed over ranks (identity both
    in one process). The controller's dot products take one of these and stay pure functions."""

    local: Any = None
    all_sum: Any = None

    def to_local(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(tensors) if self.local is None else [self.local(t) for t in tensors]

    def total(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.all_sum is None else self.all_sum(v)


def _to_local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun (or a Kubeflow TrainJob's torchrun) sets them."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def resolve_strategy(cfg: DistributedConfig, world_size: int) -> str:
    """none|ddp|fsdp for this launch. One process is always `none` (there is nothing to shard); several
    processes with `none` are refused: each rank would silently train its own copy of the model."""
    if world_size == 1:
        return "none"
    if cfg.strategy == "none":
        raise ConfigError(f"distributed.strategy=none but torchrun started WORLD_SIZE={world_size} processes: every "
                          "rank would train its own copy; set distributed.strategy=ddp, fsdp or auto")
    return "ddp" if cfg.strategy == "auto" else cfg.strategy


def check_divisible(world_size: int, **sizes: int) -> None:
    """Each global batch must split evenly over the ranks, so every rank runs the same number of
    forwards and collectives and the global batch does not depend on the world size."""
    for name, n in sizes.items():
        if n % world_size:
            raise ConfigError(f"{name}={n} does not split over {world_size} ranks: make it a multiple of the "
                              f"world size (nnodes × nproc-per-node = {world_size})")


def init(cfg: DistributedConfig, device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun set up (env://) and pick this rank's device (cuda:LOCAL_RANK)."""
    rank, world, local_rank = world_from_env()
    strategy = resolve_strategy(cfg, world)
    if strategy == "none":
        return Dist(), device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=dt.timedelta(seconds=cfg.timeout_s))
    log.info("rank %d/%d (local %d) on %s: %s over %s", rank, world, local_rank, device, strategy, backend)
    if rank != 0:  # one voice: rank 0 logs progress; the others still report warnings and errors
        logging.getLogger("amft_lib").setLevel(logging.WARNING)
    return Dist(rank, world, local_rank, strategy, cfg.fsdp_gather_for_sampling), device


def shutdown(dist: Dist) -> None:
    if dist.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks FSDP2 shards one by one (HF Llama/Qwen2/Mistral `model.layers`, also
    under a peft wrapper); each is all-gathered only while it runs."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) and module is not model:
            return list(layers)
    raise ConfigError(f"distributed.strategy=fsdp: cannot find the decoder layers of {type(model).__name__} "
                      "(expected a `layers` ModuleList, as in HF Llama/Qwen2)")


def wrap(model: torch.nn.Module, dist: Dist, device: torch.device) -> torch.nn.Module:
    """The module training forwards go through: DDP around the model, or the model itself after
    `fully_shard` (per decoder layer, then the root). Generation uses `unwrap(model)`."""
    if dist.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # buffers (rotary tables) are deterministic from the config: no need to sync them every forward
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       forward_sync_buffers=False)
    if dist.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(model):
            fully_shard(layer)
        # The root group goes on the HF model itself, not on a peft wrapper: peft's generate() calls the
        # inner model's forward, which would skip the wrapper's all-gather of the embeddings.
        root = fully_shard(model.get_base_model() if hasattr(model, "get_base_model") else model)
        # FSDP2 keeps the root's parameters gathered after its forward (a backward usually follows). After a
        # forward without a backward they would stay gathered, and an in-place update of the shards (the meta
        # step's lookahead, the optimizer) would not reach the next forward. Resharding the root too costs
        # one all-gather of the embeddings per backward and removes that hazard.
        root.set_reshard_after_forward(True, recurse=False)
    return model


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Keep every FSDP2 group gathered from its first forward until the block ends, then shard again.

    For sampling: `generate` runs one forward per token, and with per-layer resharding each of them
    all-gathers every layer again (hundreds of all-gathers per rollout, and on CPU/gloo slower than the
    compute). Inside this block the weights are gathered once. Exact either way; costs a full copy of
    the weights per GPU while the block runs (distributed.fsdp_gather_for_sampling=false to avoid it)."""
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in groups:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in groups:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()  # no stale gathered copy outlives the block (the shards change in place next)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a DDP wrapper (for generate, save_pretrained and named parameters)."""
    return getattr(model, "module", model)


SINGLE = Dist()  # one process: every reduction is the identity
