"""amft_lib.model and amft_lib.model_cache (mirror test): the character tokenizer round-trips exactly, the tiny
model is seeded and tied, trainable parameters are what LoRA leaves trainable, a saved policy loads back equal
with its generation length, and the cache folder follows AMFT_CACHE_DIR. Real tiny model and peft."""

from __future__ import annotations

import json

import pytest
import torch

from amft_lib import model_cache
from amft_lib.config import ModelConfig
from amft_lib.model import build_char_tokenizer, load_policy, save_policy, trainable_parameters
from amft_lib.model_files import ModelFilesError

TINY = ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2)


def test_char_tokenizer_is_one_token_per_character_and_round_trips():
    tok = build_char_tokenizer()
    text = "(13 - 1) * 2 = 24\n#### J Q K"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.padding_side == "left" and tok.pad_token_id != tok.eos_token_id


def test_tiny_model_is_seeded_and_ties_its_embeddings():
    a, _ = load_policy(TINY, seed=3)
    b, _ = load_policy(TINY, seed=3)
    c, _ = load_policy(TINY, seed=4)
    first = next(iter(a.state_dict()))
    assert torch.equal(a.state_dict()[first], b.state_dict()[first])
    assert not torch.equal(a.state_dict()[first], c.state_dict()[first])
    assert a.get_input_embeddings().weight is a.get_output_embeddings().weight
    state = torch.random.get_rng_state()
    load_policy(TINY, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG stream is left alone


def test_lora_leaves_only_the_adapters_trainable():
    full, _ = load_policy(TINY, seed=0)
    lora_cfg = ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2, lora=True, lora_r=4)
    lora, _ = load_policy(lora_cfg, seed=0)
    n_full = sum(p.numel() for p in trainable_parameters(full))
    n_lora = sum(p.numel() for p in trainable_parameters(lora))
    assert n_full == sum(p.numel() for p in full.parameters())
    assert 0 < n_lora < n_full
    assert all("lora_" in name for name, p in lora.named_parameters() if p.requires_grad)


def test_a_lora_run_leaves_an_adapter_that_merges_back_to_the_same_model(tmp_path):
    """save_final_policy writes the merged folder and adapter/ beside it; merge_adapter on the base config
    rebuilds a folder with the same content digest (what lets a study keep a few MB in git instead of the
    merged model). An adapter for another rank is refused in one line."""
    from amft_lib.distributed import SINGLE
    from amft_lib.model import merge_adapter
    from amft_lib.model_cache import ModelError
    from amft_lib.model_files import content_digest
    from amft_lib.policy import Policy, save_final_policy

    cfg = ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2, lora=True, lora_r=4)
    model, tok = load_policy(cfg, seed=3)
    with torch.no_grad():  # a trained adapter: B is zero at init, so the merge would be a no-op
        for p in trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.1)
    save_final_policy(Policy.of(model, tok, SINGLE, torch.device("cpu")), cfg, tmp_path / "run" / "model")
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").stat().st_size < (tmp_path / "run" / "model" /
                                                                     "model.safetensors").stat().st_size / 4
    rebuilt = merge_adapter(cfg, adapter, tmp_path / "rebuilt", seed=3)
    assert content_digest(rebuilt) == content_digest(tmp_path / "run" / "model")
    assert content_digest(merge_adapter(cfg, adapter, tmp_path / "other-base", seed=4)) != content_digest(rebuilt)
    with pytest.raises(ModelError, match=r"adapter_model\.safetensors: does not fit model\.name='tiny' with r=8"):
        merge_adapter(ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2, lora=True, lora_r=8),
                      adapter, tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()


def test_saved_policy_loads_back_equal_with_its_generation_length(tmp_path):
    model, tok = load_policy(TINY, seed=0)
    out = save_policy(model, tok, tmp_path / "m", max_new_tokens=37)
    again, tok2 = load_policy(ModelConfig(name=str(out)))
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert tok2.decode(tok2.encode("8 * 3", add_special_tokens=False)) == "8 * 3"
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 37


def test_a_folder_without_weights_is_refused_before_transformers_sees_it(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelFilesError, match=r"no \.safetensors weights found"):
        load_policy(ModelConfig(name=str(tmp_path)))


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AMFT_CACHE_DIR", str(tmp_path))
    assert model_cache.cache_dir() == tmp_path
    monkeypatch.delenv("AMFT_CACHE_DIR")
    assert model_cache.cache_dir().parts[-2:] == (".cache", "amft")
