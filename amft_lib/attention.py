"""The attention function our models run: transformers' SDPA, with one measured exception.

Under CPU bf16 autocast, q, k and v go to SDPA in fp32 with autocast off: SDPA's bf16 backward was 3.4x
slower than fp32's on this CPU and ate the whole gain of the bf16 matmuls around it (issue 25). The
projections before and after stay bf16 (autocast casts them). Everything else (fp32 forwards, decoding,
GPUs) is SDPA exactly as before, with SDPA's own masks, so a model switched to `sdpa_amft` computes
bit for bit what a `sdpa` model does.
"""

from __future__ import annotations

import torch

ATTENTION = "sdpa_amft"  # the attn_implementation name registered with transformers


def sdpa_amft(module, query, key, value, attention_mask, *args, **kwargs):
    """The registered attention function (signature of transformers' sdpa_attention_forward)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    device_type = query.device.type
    if device_type == "cpu" and torch.is_autocast_enabled(device_type):
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        with torch.autocast(device_type=device_type, enabled=False):
            return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                          *args, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def use_amft_attention(model: torch.nn.Module) -> bool:
    """Switch a model (and its nested configs) that uses `sdpa` to `sdpa_amft`; eager/flash models are left
    alone. Returns whether it switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, sdpa_amft)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the masks SDPA gets, so the numbers are SDPA's
    switched = False
    for sub in model.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and getattr(cfg, "_attn_implementation", None) == "sdpa":
            cfg._attn_implementation = ATTENTION
            switched = True
    return switched
