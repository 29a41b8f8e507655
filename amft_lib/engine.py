"""How the policy's forward/backward runs: autocast, fp32 attention, torch.compile, CPU threads.

Why a module of its own: training (trainer, warm start), rollouts and evaluation all run the same
model, and each measured speed-up (issue 25, tiny model on this 2-core AVX-512-BF16 CPU) comes with
a condition that must be decided once, in one place, from `EngineConfig` (config.py):

- bf16 autocast alone gains nothing on CPU: bf16 attention's backward is 3.4x slower than fp32's.
  With attention kept in fp32 (attention.sdpa_amft) and the forward/backward compiled,
  the SFT step ran 2.1x faster with the loss curve within 0.006 over 300 steps.
- torch.compile costs tens of seconds per graph on 2 cores. It pays off only for stages that run
  enough steps (`engine.compile_min_steps`), and only if shapes do not keep changing: sequences are
  padded to a multiple of `engine.length_bucket` and rows to a multiple of 8 (`BucketedForward`), so a
  run sees a handful of graphs instead of one per batch shape.
- Two threads are 1.8x faster when the other core is idle and 0.47x when it is busy, so the thread
  count is decided from measured load (`decide_threads`, a pure function) unless forced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from amft_lib.attention import use_amft_attention
from amft_lib.config import EngineConfig

log = logging.getLogger(__name__)

ROW_BUCKET = 8  # compiled forwards see row counts rounded up to a multiple of this


# ── precision ────────────────────────────────────────────────────────────────────────────────────


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes bf16 natively (AVX-512 BF16 or AMX-BF16). Without them CPU bf16 matmuls
    are emulated and slower than fp32, so `engine.precision=auto` stays fp32 there."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(setting: str, device_type: str, compiled: bool, bf16_capable: bool) -> str:
    """The precision a stage runs at: `fp32` or `bf16-mixed`.

    `auto` is bf16-mixed only where it was measured to win: a compiled forward on a CPU with native bf16
    (eager bf16 on CPU gained nothing); fp32 otherwise, GPU included (an explicit bf16-mixed turns it on)."""
    if setting != "auto":
        return setting
    return "bf16-mixed" if device_type == "cpu" and compiled and bf16_capable else "fp32"


def autocast(precision: str, device_type: str = "cuda"):
    """bf16 autocast for `bf16-mixed` (attention stays fp32 on CPU, see `sdpa_fp32`); fp32 otherwise.

    On CUDA this is what `bf16-mixed` always did. On CPU it is new in issue 25 and only used by the
    training forwards (attention.sdpa_amft keeps attention fp32): decoding stays fp32 (Engine.gpu_only_autocast)."""
    if precision != "bf16-mixed":
        return contextlib.nullcontext()
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    if device_type == "cpu":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ── compile ──────────────────────────────────────────────────────────────────────────────────────


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple` (>= 1)."""
    return -(-n // multiple) * multiple


@dataclass
class _Logits:
    """What completion_logprobs reads from a forward's output."""

    logits: torch.Tensor


class BucketedForward(torch.nn.Module):
    """A compiled causal LM whose inputs are padded to shape buckets before the call and whose logits
    are cut back after it.

    Why: a compiled graph is specialised to its input shapes; the trainer's batches change length every
    step, and recompiling (tens of seconds on 2 cores) would eat the gain. Padding is appended on the
    right (later positions, which a causal model's earlier positions never attend to) and as extra rows,
    all with attention mask 1 so no row is fully masked (NaN-free); their logits are sliced away, so they
    get no gradient and change no real logit beyond float reassociation."""

    def __init__(self, model: torch.nn.Module, length_bucket: int, compile_kwargs: dict | None = None,
                 dynamic_length: bool = True) -> None:
        super().__init__()
        self.model = model
        self.length_bucket = length_bucket
        self.dynamic_length = dynamic_length
        self.compile_kwargs = compile_kwargs or {}
        self.compiled: Callable | None = None  # built at the first forward: a stage that fails early skips inductor
        self.shapes: set[tuple[int, int]] = set()  # the padded shapes seen (one graph each, at most)
        self.compile_s = 0.0  # wall time of the calls that met a new shape (compilation dominates them)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                use_cache: bool = False) -> Any:
        if not torch.is_grad_enabled():  # rare no-grad forwards (H*, π_old with ppo_epochs > 1): no graph of their own
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False)
        n, t = input_ids.shape
        rows, width = round_up(n, ROW_BUCKET), round_up(t, self.length_bucket)
        if (rows, width) != (n, t):
            input_ids = _pad2d(input_ids, rows, width, 0)
            attention_mask = _pad2d(attention_mask, rows, width, 1)
            last = position_ids[:, -1:]
            tail = last + torch.arange(1, width - t + 1, device=position_ids.device)
            position_ids = _pad2d(torch.cat([position_ids, tail], dim=1), rows, width, 0)
        if self.dynamic_length:  # one graph for every length bucket (mark_dynamic: no static-then-dynamic recompile)
            for x in (input_ids, attention_mask, position_ids):
                torch._dynamo.mark_dynamic(x, 1)
        new = (rows, width) not in self.shapes
        t0 = time.perf_counter()
        if self.compiled is None:
            self.compiled = torch.compile(self.model, **self.compile_kwargs)
        out = self.compiled(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
        if new:
            self.shapes.add((rows, width))
            self.compile_s += time.perf_counter() - t0
            log.info("engine: compiled the forward for %d rows x %d positions (%.1f s so far)", rows, width,
                     self.compile_s)
        return _Logits(out.logits[:n, :t])


def _pad2d(x: torch.Tensor, rows: int, width: int, value: int) -> torch.Tensor:
    """x [n, t] padded with `value` to [rows, width] (new columns on the right, new rows at the bottom)."""
    n, t = x.shape
    if (n, t) == (rows, width):
        return x
    out = torch.full((rows, width), value, dtype=x.dtype, device=x.device)
    out[:n, :t] = x
    return out


# ── threads ──────────────────────────────────────────────────────────────────────────────────────


def decide_threads(usable_cpus: int, busy_cpus: float, max_threads: int = 0) -> int:
    """How many intra-op threads to use, from the CPUs this process may run on and how many of them
    other work keeps busy (in CPUs, e.g. 0.9 = one core ~90 % busy).

    Why: on the 2-core box two threads were 1.8x faster than one when the other core was idle, but 0.47x
    when another process kept it busy (each thread then waits for the slower one at every op). A thread
    is added only for a core that is at least half idle; `max_threads` > 0 caps the result."""
    idle = max(0.0, usable_cpus - max(0.0, busy_cpus))
    n = max(1, min(usable_cpus, int(idle + 0.5)))
    return min(n, max_threads) if max_threads > 0 else n


def read_cpu_times(stat_text: str) -> tuple[int, int]:
    """(busy, total) jiffies from the aggregate `cpu` line of /proc/stat (idle and iowait count as idle)."""
    for line in stat_text.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            total = sum(values[:8])  # guest time is already inside user/nice
            return total - idle, total
    raise ValueError("no aggregate cpu line in /proc/stat")


def busy_cpus_from(before: tuple[int, int], after: tuple[int, int], n_cpus: int) -> float:
    """CPUs kept busy between two /proc/stat readings (busy share x number of CPUs)."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return 0.0 if total <= 0 else n_cpus * busy / total


def measure_busy_cpus(window_s: float = 0.1, stat_path: str = "/proc/stat") -> float | None:
    """How many CPUs other processes keep busy, sampled over `window_s` while this one sleeps (so its own
    use is not counted). None where /proc/stat cannot be read (then one thread is the safe choice)."""
    try:
        before = read_cpu_times(Path(stat_path).read_text(encoding="ascii"))
        time.sleep(window_s)
        after = read_cpu_times(Path(stat_path).read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None
    return busy_cpus_from(before, after, os.cpu_count() or 1)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; a container's cpuset shows here)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def choose_threads(setting: int, measure: Callable[[], float | None] | None = None) -> tuple[int, str]:
    """(threads, why). `setting` > 0 forces it; 0 (auto) respects an explicit OMP_NUM_THREADS (the
    operator's or the test harness's choice) and otherwise decides from measured load."""
    if setting > 0:
        return setting, "engine.threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    busy = (measure or measure_busy_cpus)()
    if busy is None:
        return 1, "load unknown"
    cpus = usable_cpus()
    return decide_threads(cpus, busy), f"{busy:.2f} of {cpus} CPUs busy"


_DECIDED: dict[str, tuple[int, str]] = {}  # this process's measured decision, made once


def process_threads(setting: int) -> tuple[int, str]:
    """choose_threads, with the measured (auto) decision made once per process and reused.

    Why once: the thread count changes how float sums are split, so two stages run in one process (a test
    comparing a run with its resume, a notebook) must not get different counts because the load moved
    between them. Pipeline stages are processes of their own and each decides afresh."""
    if setting > 0 or os.environ.get("OMP_NUM_THREADS", "").strip():
        return choose_threads(setting)
    if "auto" not in _DECIDED:
        _DECIDED["auto"] = choose_threads(0)
    threads, why = _DECIDED["auto"]
    return threads, f"{why}, decided at this process's first stage"


# ── the resolved engine of one stage ─────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Engine:
    """What `EngineConfig` resolved to for one stage on one device: the single object the loops ask."""

    precision: str = "fp32"  # fp32 | bf16-mixed (resolved from engine.precision)
    device_type: str = "cpu"
    compile: bool = False
    length_bucket: int = 16
    kv_cache: str = "preallocated"
    threads: int = 0  # 0: left as it was

    def autocast(self):
        """Context for training forwards (the ones that backpropagate or feed a loss)."""
        return autocast(self.precision, self.device_type)

    def gpu_only_autocast(self):
        """Context for generation (and the meta step's forward-mode derivatives): bf16 on CUDA as before; fp32
        on CPU, where rollouts must be the tokens an fp32 policy samples (the decode identity tests) and the
        tiny model's decode gains nothing."""
        return autocast(self.precision, "cuda") if self.device_type == "cuda" else contextlib.nullcontext()

    def use_threads(self) -> None:
        """Set the process's intra-op thread count (0: leave it). A stage runs in its own process (pod,
        torchrun rank or CLI), so this is the stage's setting, not a test's or library caller's surprise."""
        if self.threads > 0:
            torch.set_num_threads(self.threads)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module training forwards go through: compiled (and shape-bucketed) if planned. Attention stays
        fp32 under CPU bf16 through `attention.sdpa_amft`, which load_policy switches every SDPA model to."""
        use_amft_attention(model)  # a model loaded elsewhere (tests, benches) gets it too; idempotent
        if not self.compile:
            return model
        return BucketedForward(model, self.length_bucket)


EAGER = Engine()  # what a loop without an engine config runs: today's behaviour


def plan(cfg: EngineConfig, device: torch.device | str, *, steps: int, world_size: int = 1) -> Engine:
    """Resolve `cfg` for a stage that will run `steps` training steps on `device`.

    Compile only when the stage is long enough to repay it (`compile_min_steps`) and runs in one process
    (DDP/FSDP2 wrappers are left eager: compiled distributed training is not measured here)."""
    device_type = torch.device(device).type
    compiled = cfg.compile == "always" or (cfg.compile == "auto" and steps >= cfg.compile_min_steps)
    compiled = compiled and world_size == 1
    precision = resolve_precision(cfg.precision, device_type, compiled, device_type == "cpu" and cpu_has_bf16())
    threads = 0
    if device_type == "cpu":
        threads, why = process_threads(cfg.threads)
        log.info("engine: %d CPU thread(s) (%s)", threads, why)
    planned = Engine(precision=precision, device_type=device_type, compile=compiled,
                     length_bucket=cfg.length_bucket, kv_cache=cfg.kv_cache, threads=threads)
    log.info("engine: precision %s, compile %s (%d steps, compile_min_steps %d), KV cache %s", precision,
             "on" if compiled else "off", steps, cfg.compile_min_steps, cfg.kv_cache)
    return planned


@contextlib.contextmanager
def decoding(cfg: EngineConfig, device: torch.device | str) -> Iterator[None]:
    """For stages that only decode (evaluation): the engine's threads and KV cache for the block. Nothing
    is compiled and CPU decoding stays fp32, so greedy scores are those of the eager fp32 model."""
    from amft_lib.rollout import kv_cache_mode

    plan(cfg, device, steps=0).use_threads()
    with kv_cache_mode(cfg.kv_cache):
        yield
