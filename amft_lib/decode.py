"""A KV cache that is allocated once per generate call instead of grown by concatenation.

Why: transformers' DynamicCache appends every new token's keys and values with `torch.cat`, copying the
whole cache of every layer at every step (O(T^2) bytes per sequence); on the tiny model that was 33 % of
`generate`'s time (issue 25). `PreallocatedCache` writes each step into a buffer sized for prompt +
max_new_tokens and hands attention a view of the filled prefix: the same shapes and values DynamicCache
hands it, so the logits, and therefore greedy and seeded-sampled tokens, are the ones `generate` gives
with its default cache (tests/unit/test_decode.py checks token identity).

Why inside `generate` rather than a loop of our own: sampling stays transformers' code (logits
processors, the per-row Gumbel sampler of rollout.sample_completions, stopping, padding after EOS), so
the reproducibility contract of `row_seeds` cannot drift from it.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One layer's keys/values in a buffer of `capacity` positions; `keys`/`values` are views of the
    filled prefix (what DynamicLayer would hold). Grows by doubling if a caller exceeds the capacity."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._k = self._buffer(key_states, max(self.capacity, key_states.shape[-2]))
        self._v = self._buffer(value_states, max(self.capacity, value_states.shape[-2]))
        self.keys, self.values = self._k[..., :0, :], self._v[..., :0, :]
        self.is_initialized = True

    @staticmethod
    def _buffer(like: torch.Tensor, capacity: int) -> torch.Tensor:
        batch, heads, _, dim = like.shape
        return like.new_empty((batch, heads, capacity, dim))

    def _grow(self, needed: int) -> None:
        size = max(needed, 2 * self._k.shape[-2])
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = self._buffer(old, size)
            new[..., : self.length, :] = old[..., : self.length, :]
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[-2]:
            self._grow(end)
        self._k[..., self.length : end, :] = key_states
        self._v[..., self.length : end, :] = value_states
        self.length = end
        self.keys, self.values = self._k[..., :end, :], self._v[..., :end, :]
        return self.keys, self.values

    def reset(self) -> None:
        self.length = 0
        self._k = self._v = None
        super().reset()


class PreallocatedCache(DynamicCache):
    """A DynamicCache whose layers are `PreallocatedLayer`s of `capacity` positions (created lazily, one
    per decoder layer, as DynamicCache's are)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.layer_class_to_replicate = lambda: PreallocatedLayer(capacity)


def supports_preallocated_cache(model: torch.nn.Module) -> bool:
    """Whether `model` uses plain full-attention layers (Llama, SmolLM2, Qwen2 without sliding windows):
    the only kind PreallocatedLayer stands in for. Others (sliding windows, linear attention) keep
    transformers' own cache."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return False
    text = config.get_text_config(decoder=True)
    layer_types = getattr(text, "layer_types", None)
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return False
    return layer_types is None or all(t == "full_attention" for t in layer_types)
