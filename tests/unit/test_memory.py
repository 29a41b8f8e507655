"""The memory estimate preflight uses: hand-worked bytes, real 7B parameter counts from a config on the
meta device (nothing allocated), and the 80 GB verdicts the issue asks for."""

import pytest

from amft_lib import controller as ctl
from amft_lib.config import TrainConfig, apply_overrides
from amft_lib.errors import UserError
from amft_lib.memory import (
    ActivationSpec,
    GiB,
    MemoryBudgetError,
    activation_bytes,
    check_fits,
    count_parameters,
    estimate_for_train_config,
    estimate_training_memory,
)


def qwen25_7b():
    # Qwen2.5-7B's published config.json numbers
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)


def test_hand_worked_bytes_fp32_full_finetune():
    # 1000 fp32 params, all trainable, no meta step, no activations, no overhead:
    # weights 4·1000, grads 3 buffers·4·1000, AdamW 2 moments·4·1000
    est = estimate_training_memory(1000, 1000, dtype="float32", meta_step=False, overhead_bytes=0)
    assert (est.weights, est.grads, est.optimizer, est.master_weights, est.meta_step) == (4000, 12000, 8000, 0, 0)
    assert est.total == 24000


def test_meta_step_bytes_per_param_before_and_after():
    # bf16 full fine-tune with fp32 master weights, per trainable param:
    # weights 2 + master 4 + grads 3·2 + AdamW 2·4 = 20; meta step ∇U 2 + 2 per copy of θ
    per_param = {}
    for mode, copies in [("before (θ' + saved θ)", 2), *ctl.LOOKAHEAD_COPIES.items()]:
        est = estimate_training_memory(10**6, 10**6, dtype="bfloat16", lookahead_copies=copies, overhead_bytes=0)
        per_param[mode] = est.total / 10**6
    assert per_param == {"before (θ' + saved θ)": 26, "lookahead": 24, "lookahead_undo": 22, "current": 22}


def test_lora_adapters_are_fp32_and_have_no_master_copy():
    est = estimate_training_memory(10**6, 10**3, dtype="bfloat16", lora=True, meta_step=False, overhead_bytes=0)
    assert est.weights == (10**6 - 10**3) * 2 + 10**3 * 4
    assert est.master_weights == 0 and est.optimizer == 2 * 4 * 10**3


def test_qwen25_7b_parameter_count_from_config_without_weights():
    full = count_parameters(qwen25_7b())
    assert full.total == full.trainable == 7_615_616_512
    lora = count_parameters(qwen25_7b(), lora_r=16,
                            lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    # per layer: q,o 16·(3584+3584), k,v 16·(3584+512), up,down 16·(3584+18944) = 1,081,344; × 28 layers
    assert lora.trainable == 28 * 1_081_344
    assert lora.total == full.total + lora.trainable


def _cfg(*over: str) -> TrainConfig:
    return apply_overrides(TrainConfig(), ["model.dtype=bfloat16", "model.gradient_checkpointing=true", *over])


def test_7b_full_finetune_is_refused_on_80_gib_with_the_numbers():
    est = estimate_for_train_config(_cfg(), qwen25_7b())
    with pytest.raises(MemoryBudgetError) as err:
        check_fits(est, 80, parameter="p0_gpu_memory_gib")
    msg = str(err.value)
    assert isinstance(err.value, UserError)
    assert "p0_gpu_memory_gib is 80 GiB" in msg and f"needs {est.total / GiB:.1f} GiB" in msg
    for part in ("weights", "master_weights", "grads", "optimizer", "meta_step", "activations"):
        assert part in msg
    assert est.total / GiB > 150  # not a near miss: weights+master+grads+AdamW alone are 20 B/param


def test_7b_lora_fits_on_80_gib_and_needs_checkpointing_at_the_default_micro_batch():
    est = estimate_for_train_config(_cfg("model.lora=true"), qwen25_7b())
    check_fits(est, 80)  # passes
    assert 15.2e9 < est.weights < 15.5e9  # 7.6 B bf16 weights (+ 30 M fp32 adapters) = 14.3 GiB
    no_ckpt = estimate_for_train_config(_cfg("model.lora=true", "model.gradient_checkpointing=false"), qwen25_7b())
    with pytest.raises(MemoryBudgetError):
        check_fits(no_ckpt, 80)


def test_checkpointing_keeps_only_layer_inputs():
    spec = ActivationSpec(micro_batch_size=1, seq_len=1, hidden_size=10, intermediate_size=20, num_layers=4,
                          vocab_size=0)
    # no checkpointing: 4 layers · (10·10 + 4·20) values · 2 bytes; with: (4·10 + 180) values · 2 bytes
    assert activation_bytes(spec) == 4 * 180 * 2
    assert activation_bytes(ActivationSpec(**{**spec.__dict__, "gradient_checkpointing": True})) == (40 + 180) * 2


def test_preflight_probe_reads_only_config_json(tmp_path):
    # What preflight runs on a CPU pod: a folder holding only config.json (no weights) is enough.
    from amft_lib.config import WarmStartConfig
    from amft_lib.memory import probe_training_memory

    qwen25_7b().save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    with pytest.raises(MemoryBudgetError, match=r"p0_gpu_memory_gib is 80 GiB"):
        probe_training_memory(_cfg(f"model.name={tmp_path}"), 80)
    assert probe_training_memory(_cfg(f"model.name={tmp_path}", "model.lora=true"), 80).startswith("fits: ")
    ws = apply_overrides(WarmStartConfig(), [f"model.name={tmp_path}", "model.dtype=bfloat16", "model.lora=true",
                                             "model.gradient_checkpointing=true"])
    assert probe_training_memory(ws, 80).startswith("fits: ")  # the warm start has no meta step


def test_shipped_7b_lora_config_fits_80_gib():
    from pathlib import Path

    from amft_lib.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "byo_7b_lora.yaml")
    est = estimate_for_train_config(cfg, qwen25_7b())
    check_fits(est, 80)
    assert 20 < est.total / GiB < 26  # the figure the config's header states (~23 GiB)


def test_fsdp_shards_the_parameter_state_and_adds_the_gathered_layers():
    # hand-worked: 1000 fp32 params, all trainable, 4 shards, 100 params gathered at a time
    one = estimate_training_memory(1000, 1000, dtype="float32", meta_step=False, overhead_bytes=0)
    four = estimate_training_memory(1000, 1000, dtype="float32", meta_step=False, overhead_bytes=0, shards=4,
                                    gathered_params=100)
    assert four.weights == 4000 // 4 + 100 * 4
    assert (four.grads, four.optimizer) == (one.grads // 4, one.optimizer // 4)


def test_7b_full_finetune_fits_80_gib_on_8_fsdp_ranks_not_on_8_ddp_ranks():
    """The plan refused on one GPU fits when FSDP2 shards it over 8 GPUs; DDP replicas don't. Sampling with
    the whole model gathered adds one full bf16 copy of the weights (less the layers gathered anyway)."""
    fsdp = estimate_for_train_config(_cfg("distributed.strategy=fsdp", "distributed.fsdp_gather_for_sampling=false"),
                                     qwen25_7b(), world_size=8)
    gather = estimate_for_train_config(_cfg("distributed.strategy=fsdp"), qwen25_7b(), world_size=8)
    assert gather.total - fsdp.total == gather.weights - fsdp.weights > 10 * GiB  # 15.2 GB less 2 layers + root
    ddp = estimate_for_train_config(_cfg("distributed.strategy=ddp"), qwen25_7b(), world_size=8)
    single = estimate_for_train_config(_cfg(), qwen25_7b())
    assert ddp.total == single.total
    check_fits(fsdp, 80, parameter="p0_gpu_memory_gib")
    with pytest.raises(MemoryBudgetError):
        check_fits(ddp, 80, parameter="p0_gpu_memory_gib")
    assert fsdp.optimizer == -(-single.optimizer // 8) and fsdp.activations == single.activations
    print(f"7B full fine-tune: {single.total / GiB:.1f} GiB on 1 GPU; on 8 FSDP2 ranks {fsdp.total / GiB:.1f} GiB "
          f"per GPU (layer-wise sampling), {gather.total / GiB:.1f} GiB (gathered sampling)")


def test_the_per_rollout_meta_step_counts_fewer_buffers_than_the_backward_one():
    """bf16 full fine-tune, 20 bytes/param before the meta step (see above), lookahead_undo (no θ copy): the
    backward ∇U keeps 3 θ-sized buffers (6 bytes/param), the per-rollout ones 1 (2)."""
    per_param = {est: estimate_training_memory(10**6, 10**6, dtype="bfloat16", meta_buffers=n,
                                               overhead_bytes=0).total / 10**6
                 for est, n in ctl.META_BUFFERS.items()}
    assert per_param == {"backward": 26, "jvp": 22, "central_difference": 22}
    # at 7B: the per-rollout meta step saves 4 bytes/param = 28 GB per GPU over the backward one
    assert (per_param["backward"] - per_param["jvp"]) * 7e9 / 1e9 == 28


def test_estimate_for_a_train_config_follows_the_estimator():
    from transformers import LlamaConfig

    from amft_lib.config import TrainConfig

    hf = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     vocab_size=256)
    sizes = {}
    for est, update, at in (("backward", "raw", "lookahead"), ("jvp", "evidence", "lookahead"),
                            ("central_difference", "evidence", "lookahead"), ("central_difference", "evidence",
                                                                              "current")):
        cfg = TrainConfig()
        cfg.controller.meta_estimator, cfg.controller.meta_update, cfg.controller.meta_eval_at = est, update, at
        sizes[est, at] = estimate_for_train_config(cfg, hf).meta_step
    # lookahead: θ's copy + the estimator's buffers (3 or 1); current: the central difference's own copy + v
    assert sizes["backward", "lookahead"] == 2 * sizes["jvp", "lookahead"] > 0
    assert sizes["central_difference", "lookahead"] == sizes["jvp", "lookahead"] == sizes["central_difference",
                                                                                          "current"]


def test_gac_counts_its_half_batch_gradients():
    """gac measures gradient noise from two half-batch gradients per loss (trainer.gradient_halves): 3 more
    θ-sized buffers at the peak than the other methods, in the gradients' dtype, sharded like them."""
    from transformers import LlamaConfig

    from amft_lib.config import TrainConfig

    hf = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     vocab_size=256)
    est = {}
    for method in ("fixed", "gac"):
        cfg = TrainConfig()
        cfg.controller.method = method
        est[method] = estimate_for_train_config(cfg, hf)
    trainable = count_parameters(hf).trainable
    assert est["gac"].grads - est["fixed"].grads == 3 * 4 * trainable  # fp32: 4 bytes each
    assert est["gac"].total - est["fixed"].total == 3 * 4 * trainable
    assert est["gac"].meta_step == est["fixed"].meta_step == 0  # gac samples no validation rollouts
