"""Per-GPU memory estimate of an AMFT training plan, so preflight can refuse one that cannot fit.

Pure arithmetic over parameter counts; `count_parameters` gets those counts from a model *config*
by building the model on the `meta` device (no weights are allocated or read), so a CPU pod can
estimate a 7B model in ~0.1 s.

What the trainer holds (amft_lib/trainer.py, controller.py), per trainable parameter, with t the
trainable dtype's bytes (4 for fp32 and for peft's LoRA adapters, 2 for bf16 full fine-tuning):

    weights      frozen·bytes(dtype) + trainable·t
    master       4·trainable when bf16 weights keep fp32 master weights (model.master_weights)
    grads        3·t·trainable: g_RL, g_SFT and the mixed .grad the optimizer reads (rl_gradient,
                 sft_gradient and the update loop keep all three alive at once)
    AdamW        2·s·trainable (exp_avg, exp_avg_sq), s = 4 with master weights, else t
    meta step    (buffers + copies)·t·trainable on meta steps: the estimator's θ-sized buffers
                 (`controller.META_BUFFERS`: backward ∇U 3 — two half-sample estimates and their mean —, jvp and
                 central difference 1 — the direction ∂θ'/∂μ) plus the lookahead's full copies of θ
                 (`controller.LOOKAHEAD_COPIES`). At 7B full fine-tune in bf16 the per-rollout meta step saves
                 2·2 = 4 bytes/param over the backward one: 28 GB per GPU (e.g. lookahead_undo: 6 → 2 bytes/param).
    gac          +3·t·trainable for method gac: each gradient comes as two half-batch gradients
                 (trainer.gradient_halves); while the second loss's halves are recombined, its two halves, their
                 mean-to-be and the first loss's half difference are alive beside g_RL — 3 buffers over the 3 above
    activations  per micro-batch, see `activation_bytes`
    overhead     CUDA context, cuBLAS workspaces, allocator fragmentation (a flat 2 GiB)

Peak = the sum (the meta step happens while g_RL, g_SFT and the optimizer state are alive).
Tensor-sized temporaries (one parameter's worth) are ignored; `torch.autograd.grad` returns all
gradients of a micro-batch at once, counted in the 3 (or 4 on meta steps) gradient buffers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from amft_lib.errors import UserError

GiB = 1 << 30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
GRAD_BUFFERS = 3  # g_RL, g_SFT, mixed .grad
NOISE_BUFFERS = 3  # gac: the second loss's two half-batch gradients and the first loss's half difference (see above)
OVERHEAD_BYTES = 2 * GiB


class MemoryBudgetError(UserError):
    """The plan needs more GPU memory than the GPU has; the message carries the breakdown."""


@dataclasses.dataclass(frozen=True)
class ParamCount:
    total: int  # every parameter of the (frozen + trainable) model
    trainable: int  # what the optimizer updates: all of them, or the LoRA adapters only

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    """The shapes activation memory depends on (one micro-batch: loss.micro_batch_size sequences)."""

    micro_batch_size: int
    seq_len: int  # prompt + completion tokens per sequence
    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    gradient_checkpointing: bool = False


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, by what holds them. `total` is the peak the plan needs."""

    weights: int
    master_weights: int
    grads: int
    optimizer: int
    meta_step: int
    activations: int
    reference_model: int = 0  # frozen copy for the KL penalty (loss.kl_beta > 0)
    overhead: int = OVERHEAD_BYTES
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return (self.weights + self.master_weights + self.grads + self.optimizer + self.meta_step
                + self.activations + self.reference_model + self.overhead)

    def breakdown(self) -> dict[str, float]:
        """GiB per component, for reports and messages."""
        parts = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "notes"}
        return {k: round(v / GiB, 2) for k, v in parts.items() if v} | {"total": round(self.total / GiB, 2)}

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in self.breakdown().items() if k != "total")
        return f"{self.total / GiB:.1f} GiB per GPU ({parts})"


def activation_bytes(spec: ActivationSpec, act_bytes: int = 2) -> int:
    """Activation memory of one forward/backward over a micro-batch (a heuristic; ±30 %).

    Per token and decoder layer, a Llama/Qwen block keeps ~10·h values for attention and the norms
    (q, k, v, the attention output, residuals; SDPA/flash attention keeps no L×L matrix) and ~4·i for
    the SwiGLU MLP (gate, up, act(gate), their product). With gradient checkpointing only each layer's
    input (h values) is kept, plus one layer recomputed at a time. The logits are the other big term:
    [tokens, V] in the model dtype, their fp32 upcast, and the fp32 log-softmax kept for backward.
    """
    tokens = spec.micro_batch_size * spec.seq_len
    per_layer = 10 * spec.hidden_size + 4 * spec.intermediate_size  # values per token
    if spec.gradient_checkpointing:
        layers = tokens * (spec.num_layers * spec.hidden_size + per_layer) * act_bytes
    else:
        layers = tokens * spec.num_layers * per_layer * act_bytes
    logits = tokens * spec.vocab_size * (act_bytes + 4 + 4)
    return layers + logits


def estimate_training_memory(
    n_params: int,
    trainable_params: int,
    *,
    dtype: str = "bfloat16",
    master_weights: bool = True,
    lora: bool = False,
    meta_step: bool = True,
    lookahead_copies: int = 0,
    meta_buffers: int = 1,
    activations: ActivationSpec | None = None,
    kl_reference: bool = False,
    noise_buffers: int = 0,
    overhead_bytes: int = OVERHEAD_BYTES,
    shards: int = 1,
    gathered_params: int = 0,
) -> MemoryEstimate:
    """Peak bytes per GPU for one training process.

    dtype: model.dtype. master_weights: model.master_weights (bf16 only). lora: trainable params are
    peft adapters, which peft keeps in fp32 whatever the base dtype. meta_step: the method computes the
    meta-gradient (meta, amft). lookahead_copies: full copies of θ the lookahead keeps (see
    controller.LOOKAHEAD_COPIES); meta_buffers: the estimator's θ-sized buffers (controller.META_BUFFERS).
    activations: None counts none (e.g. a parameter-only estimate). noise_buffers: θ-sized gradients gac's
    half-batch noise estimate keeps beside the usual three (NOISE_BUFFERS).
    shards: FSDP2 world size: weights, master weights, the gradient buffers, AdamW, the meta step's
    copies and the reference model are split over it; `gathered_params` (full, unsharded) come on top
    while they are all-gathered — the whole model while sampling with distributed.fsdp_gather_for_sampling,
    otherwise two decoder layers (one computing, one prefetched) plus the root group (embeddings, LM head).
    DDP (and one process) is shards=1: every rank holds everything.
    """
    if trainable_params > n_params:
        raise ValueError(f"trainable_params={trainable_params} > n_params={n_params}")
    wb = BYTES[dtype]
    low_precision = wb < 4
    tb = 4 if lora else wb  # peft autocasts adapters to fp32 (get_peft_model(autocast_adapter_dtype=True))
    use_master = master_weights and low_precision and tb < 4
    sb = 4 if use_master else tb
    frozen = n_params - trainable_params
    notes = []
    if low_precision and not lora and not master_weights:
        notes.append("bf16 weights without master weights: updates below bf16 resolution are lost")
    if shards < 1:
        raise ValueError(f"shards={shards}: must be >= 1")

    def per_rank(n: int) -> int:
        return -(-n // shards)

    weights = per_rank(frozen * wb + trainable_params * tb) + (gathered_params * wb if shards > 1 else 0)
    return MemoryEstimate(
        weights=weights,
        master_weights=per_rank(4 * trainable_params) if use_master else 0,
        grads=per_rank((GRAD_BUFFERS + noise_buffers) * tb * trainable_params),
        optimizer=per_rank(2 * sb * trainable_params),
        meta_step=per_rank((meta_buffers + lookahead_copies) * tb * trainable_params) if meta_step else 0,
        activations=activation_bytes(activations, 2 if low_precision else wb) if activations else 0,
        reference_model=per_rank(n_params * wb) if kl_reference else 0,
        overhead=overhead_bytes,
        notes=tuple(notes),
    )


def check_fits(estimate: MemoryEstimate, gpu_memory_gib: float, *, parameter: str = "the GPU memory parameter",
               hints: Sequence[str] = ()) -> None:
    """Raise MemoryBudgetError (a UserError) with the numbers when `estimate` exceeds the GPU."""
    need = estimate.total / GiB
    if need <= gpu_memory_gib:
        return
    fixes = "; ".join(hints) if hints else (
        "try model.lora=true, model.gradient_checkpointing=true, a smaller loss.micro_batch_size, or a GPU with more "
        "memory"
    )
    raise MemoryBudgetError(
        f"training plan needs {estimate.summary()} but {parameter} is {gpu_memory_gib:g} GiB; {fixes}"
    )


# ── parameter counts from a config (no weights) ────────────────────────────────────────────────────


def count_parameters(config, *, lora_r: int = 0, lora_targets: Sequence[str] = ()) -> ParamCount:
    """Parameters of `AutoModelForCausalLM.from_config(config)`, built on the meta device (nothing
    allocated). With lora_r > 0, trainable = r·(in + out) for every nn.Linear whose name ends in one of
    `lora_targets` — exactly the A (r×in) and B (out×r) matrices peft adds."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors are counted once
    if lora_r <= 0:
        return ParamCount(total, total)
    targets = set(lora_targets)
    lora = sum(
        lora_r * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )
    return ParamCount(total + lora, lora)


def estimate_for_train_config(cfg, hf_config, *, prompt_tokens: int = 256, world_size: int = 1) -> MemoryEstimate:
    """The estimate for a TrainConfig (or WarmStartConfig) and the base model's HF config.

    prompt_tokens: the prompt length budgeted per sequence (General Points prompts are ~100 tokens with a
    BPE tokenizer); the completion adds rollout.max_new_tokens (or max_new_tokens).
    world_size: processes the run will have (nodes × processes per node); with distributed.strategy
    fsdp the parameter state is sharded over them (ddp and auto keep full replicas).
    """
    from amft_lib import controller as ctl

    m = cfg.model
    count = count_parameters(hf_config, lora_r=m.lora_r if m.lora else 0, lora_targets=m.lora_targets)
    controller = getattr(cfg, "controller", None)
    meta = controller is not None and controller.method in ctl.USES_META
    copies = ctl.LOOKAHEAD_COPIES.get(controller.meta_eval_at, 0) if meta else 0
    buffers = ctl.META_BUFFERS[controller.meta_estimator] if meta else 0
    if meta and controller.meta_estimator == "central_difference" and controller.meta_eval_at == "current":
        buffers += 1  # its shift restores θ from a copy when no lookahead restore surrounds it
    loss = getattr(cfg, "loss", None)
    micro = loss.micro_batch_size if loss is not None else cfg.micro_batch_size
    new_tokens = cfg.rollout.max_new_tokens if hasattr(cfg, "rollout") else cfg.max_new_tokens
    spec = ActivationSpec(
        micro_batch_size=micro,
        seq_len=prompt_tokens + new_tokens,
        hidden_size=hf_config.hidden_size,
        intermediate_size=getattr(hf_config, "intermediate_size", 4 * hf_config.hidden_size),
        num_layers=hf_config.num_hidden_layers,
        vocab_size=hf_config.vocab_size,
        gradient_checkpointing=m.gradient_checkpointing,
    )
    dist = getattr(cfg, "distributed", None)
    shards = world_size if dist is not None and dist.strategy == "fsdp" and world_size > 1 else 1
    layers = hf_config.num_hidden_layers
    embedding = hf_config.vocab_size * hf_config.hidden_size
    root = embedding * (1 if getattr(hf_config, "tie_word_embeddings", False) else 2)
    per_layer = max(0, count.total - root) // max(1, layers)
    # sampling with the whole model gathered (distributed.fsdp_gather_for_sampling) holds all of it at once
    gathered = count.total if shards > 1 and dist.fsdp_gather_for_sampling else 2 * per_layer + root
    return estimate_training_memory(
        count.total, count.trainable, dtype=m.dtype, master_weights=m.master_weights, lora=m.lora,
        meta_step=meta, lookahead_copies=copies, meta_buffers=buffers, activations=spec,
        kl_reference=loss is not None and loss.kl_beta > 0,
        noise_buffers=NOISE_BUFFERS if controller is not None and controller.method in ctl.USES_NOISE else 0,
        shards=shards, gathered_params=gathered,
    )


def probe_training_memory(cfg, gpu_memory_gib: float, *, parameter: str = "p0_gpu_memory_gib",
                          world_size: int = 1) -> str:
    """Preflight: estimate `cfg` against the GPU; one-line detail, or MemoryBudgetError with the numbers.

    Reads only the model's config (model_source.read_model_config), never its weights. world_size: the
    processes the run will have (FSDP shards over them, see `estimate_for_train_config`).
    """
    from amft_lib.model_source import read_model_config

    if cfg.model.name == "tiny":
        return "built-in tiny model: a few MB"
    hf_config = read_model_config(cfg.model.name, cfg.model.allow_download)
    est = estimate_for_train_config(cfg, hf_config, world_size=world_size)
    check_fits(est, gpu_memory_gib, parameter=parameter)
    return f"fits: {est.summary()} of {gpu_memory_gib:g} GiB"
