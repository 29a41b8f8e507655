"""The preallocated KV cache (amft_lib/decode.py) gives the tokens transformers' DynamicCache gives.

Identity is exact (torch.equal on token ids): the cache hands attention the same keys and values in the
same shapes, so the logits are bitwise those of `generate` with its default cache. Checked for greedy
decoding, per-row seeded sampling (`row_seeds`: the reproducibility contract of rollouts, including
that a row's tokens do not depend on the batch it is drawn in) and plain sampling from the global RNG,
with top-p and a temperature, across generate-call batch splits.
"""

from __future__ import annotations

import pytest
import torch

from amft_lib.config import ModelConfig
from amft_lib.decode import PreallocatedCache, PreallocatedLayer, supports_preallocated_cache
from amft_lib.model import load_policy
from amft_lib.rollout import kv_cache_mode, row_seeds, sample_completions
from amft_lib.tasks.general_points import generate_rows


@pytest.fixture(scope="module")
def policy():
    model, tok = load_policy(ModelConfig(tiny_hidden=64, tiny_layers=2, tiny_heads=2), seed=3)
    prompts = [r["prompt"] for r in generate_rows(6, "face10", 5, "train")]
    return model, tok, prompts


def _sample(policy, kv_cache: str, mode: str, seed: int = 0, **kw):
    model, tok, prompts = policy
    args = dict(group_size=4, max_new_tokens=24, kv_cache=kv_cache, batch_size=kw.pop("batch_size", 256))
    if mode == "greedy":
        args["greedy"] = True
    elif mode == "seeded":
        args["seeds"] = row_seeds(seed, "rollout", 0, 0, len(prompts) * 4)
    args.update(kw)
    torch.manual_seed(seed)
    return sample_completions(model, tok, prompts, **args)


@pytest.mark.parametrize("mode", ["greedy", "seeded", "global_rng"])
@pytest.mark.parametrize("extra", [{}, {"temperature": 0.7, "top_p": 0.9, "batch_size": 10}])
def test_same_tokens_as_dynamic_cache(policy, mode: str, extra: dict) -> None:
    fast = _sample(policy, "preallocated", mode, **extra)
    slow = _sample(policy, "dynamic", mode, **extra)
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    assert torch.equal(fast.completion_mask, slow.completion_mask)
    assert fast.texts == slow.texts
    if mode != "greedy":  # sampling really sampled: rows of one prompt differ
        assert len(set(fast.texts[:4])) > 1


def test_seeded_rows_do_not_depend_on_their_batch(policy) -> None:
    """row_seeds' contract on the fast path: rows 4..7 sampled alone equal rows 4..7 of the full batch."""
    model, tok, prompts = policy
    seeds = row_seeds(7, "rollout", 3, 0, len(prompts) * 4)
    with kv_cache_mode("preallocated"):
        full = sample_completions(model, tok, prompts, group_size=4, max_new_tokens=24, seeds=seeds)
        part = sample_completions(model, tok, prompts[1:2], group_size=4, max_new_tokens=24, seeds=seeds[4:8])
    assert part.texts == full.texts[4:8]


def test_kv_cache_mode_sets_the_default(policy, monkeypatch) -> None:
    """Policy.sampling() picks the cache through kv_cache_mode; `dynamic` never builds a PreallocatedCache."""
    import amft_lib.decode as decode

    built = []
    monkeypatch.setattr(decode, "PreallocatedCache", lambda n: built.append(n) or PreallocatedCache(n))
    model, tok, prompts = policy
    with kv_cache_mode("dynamic"):
        sample_completions(model, tok, prompts[:1], group_size=2, max_new_tokens=4, greedy=True)
    assert built == []
    sample_completions(model, tok, prompts[:1], group_size=2, max_new_tokens=4, greedy=True)  # default
    assert len(built) == 1 and built[0] > 4  # prompt width + max_new_tokens


def test_layer_matches_concatenation_and_grows() -> None:
    """Written slots equal DynamicLayer's concatenation, also past the initial capacity (doubling)."""
    layer = PreallocatedLayer(capacity=5)
    chunks = [torch.randn(2, 3, n, 4) for n in (3, 1, 1, 1, 4)]
    seen = []
    for c in chunks:
        keys, values = layer.update(c, -c)
        seen.append(c)
        want = torch.cat(seen, dim=-2)
        assert torch.equal(keys, want) and torch.equal(values, -want)
    assert layer.get_seq_length() == 10 and layer._k.shape[-2] >= 10
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.length == 0


def test_supports_only_full_attention_models(policy) -> None:
    model, _, _ = policy
    assert supports_preallocated_cache(model)
    model.config.sliding_window, model.config.use_sliding_window = 16, True
    try:
        assert not supports_preallocated_cache(model)
    finally:
        model.config.sliding_window = None
