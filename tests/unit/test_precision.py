"""bf16 weights for real, fp32 master weights, gradient checkpointing, and the copy-free lookahead."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from amft_lib.config import ModelConfig, TrainConfig, apply_overrides
from amft_lib.controller import compute_meta_gradient
from amft_lib.model import load_policy, trainable_parameters
from amft_lib.optim import MasterWeightAdamW, build_optimizer
from amft_lib.policy import sft_gradient
from amft_lib.rollout import demonstration_batch
from amft_lib.tasks.general_points import generate_rows
from amft_lib.trainer import run_train

SMALL = {"tiny_hidden": 32, "tiny_layers": 2, "tiny_heads": 2}


def test_bf16_training_step_on_cpu(tmp_path):
    splits = {"train": generate_rows(16, "face10", 1, "train"), "val": generate_rows(4, "face10", 2, "val")}
    cfg = apply_overrides(TrainConfig(), [
        "model.dtype=bfloat16", "model.gradient_checkpointing=true", "controller.method=amft", "max_steps=2",
        "eval_every=0", "eval_prompts=2", "model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2",
        "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=8", "loss.sft_batch_size=4",
        "controller.meta_interval=1", "controller.meta_val_prompts=2", "controller.meta_val_group=2",
        "optim.lr=1e-3", "device=cpu",
    ])
    run_train(cfg, tmp_path, splits=splits, progress=False)
    steps = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][:-1]
    assert len(steps) == 2
    for r in steps:
        assert math.isfinite(r["sft_loss"]) and math.isfinite(r["rl_loss"]) and math.isfinite(r["grad_norm"])
        assert r["meta_grad"] is not None and math.isfinite(r["meta_grad"])  # the meta step ran in bf16
    with safe_open(str(tmp_path / "model" / "model.safetensors"), "pt") as f:
        names = f.keys()
        dtypes = {f.get_tensor(k).dtype for k in names}
    assert dtypes == {torch.bfloat16}  # the weights really are bf16, not fp32 under autocast


def test_bf16_load_gives_bf16_weights_and_master_weight_optimizer():
    model, _ = load_policy(ModelConfig(name="tiny", dtype="bfloat16", **SMALL))
    params = trainable_parameters(model)
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert isinstance(build_optimizer(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0), MasterWeightAdamW)
    plain = build_optimizer(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0, master_weights=False)
    assert type(plain) is torch.optim.AdamW


def test_master_weights_keep_updates_that_bf16_rounds_away():
    # a weight of 1.0 in bf16 has a resolution of 2^-7 ≈ 0.0078; Adam moves it by ~lr = 1e-3 per step
    lost = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    kept = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt_lost = torch.optim.AdamW([lost], lr=1e-3, weight_decay=0.0)
    opt_kept = MasterWeightAdamW([kept], lr=1e-3, weight_decay=0.0)
    for _ in range(20):
        for p, opt in ((lost, opt_lost), (kept, opt_kept)):
            p.grad = torch.ones_like(p)
            opt.step()
    assert torch.equal(lost, torch.ones_like(lost))  # 20 steps of 1e-3 all rounded away
    master = opt_kept.state[kept]["master"]
    assert master.dtype == torch.float32 and master[0].item() == pytest.approx(1 - 20e-3, abs=1e-4)
    assert kept[0].item() == pytest.approx(0.98, abs=4e-3)  # the bf16 copy follows the master
    # round trip through a state dict keeps the master weights and moments in fp32
    fresh = MasterWeightAdamW([torch.nn.Parameter(kept.detach().clone())], lr=1e-3)
    fresh.load_state_dict(opt_kept.state_dict())
    st = next(iter(fresh.state.values()))
    assert st["master"].dtype == st["exp_avg"].dtype == torch.float32
    assert torch.equal(st["master"], master)


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_gradient(lora):
    rows = generate_rows(4, "face10", 3, "train")
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)  # peft draws the LoRA A matrices from the global RNG
        model, tok = load_policy(ModelConfig(name="tiny", gradient_checkpointing=ckpt, lora=lora, **SMALL), seed=0)
        model.train()
        assert model.is_activation_checkpointing is ckpt
        batch = demonstration_batch(tok, [r["prompt"] for r in rows], [r["demonstration"] for r in rows], 32)
        g, _ = sft_gradient(model, trainable_parameters(model), batch, micro_batch_size=64)
        grads.append(g)
    assert any(g.abs().sum() > 0 for g in grads[1])  # checkpointed layers still pass gradients (LoRA too)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_lookahead_undo_matches_lookahead_without_a_copy():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(50)), torch.nn.Parameter(torch.randn(7, 3))]
    g_rl = [torch.randn_like(p) for p in params]
    g_sft = [torch.randn_like(p) for p in params]
    target = [torch.randn_like(p) for p in params]

    def grad_u():  # ∇U of U(θ) = −½‖θ − target‖², evaluated wherever θ currently is
        return [(t - p).detach() for p, t in zip(params, target, strict=True)]

    before = [p.detach().clone() for p in params]
    exact = compute_meta_gradient(params, g_rl, g_sft, 0.3, 0.1, grad_u, eval_at="lookahead")
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    undo = compute_meta_gradient(params, g_rl, g_sft, 0.3, 0.1, grad_u, eval_at="lookahead_undo")
    assert undo.raw_meta_grad == pytest.approx(exact.raw_meta_grad, rel=1e-6)
    for a, b in zip(before, params, strict=True):  # θ − d + d: at most one rounding unit away
        assert torch.all((a - b).abs() <= torch.finfo(torch.float32).eps * a.abs().clamp(min=1.0) * 2)


def test_bf16_resume_restores_fp32_master_weights_bitwise(tmp_path):
    # A resumed bf16 run must continue from the fp32 master weights, not from their bf16 rounding (torch's
    # Optimizer.load_state_dict would cast them to the parameter dtype): weights end bitwise equal.
    from safetensors.torch import load_file

    splits = {"train": generate_rows(16, "face10", 1, "train"), "val": generate_rows(4, "face10", 2, "val")}
    over = ["model.dtype=bfloat16", "controller.method=amft", "max_steps=3", "eval_every=0", "eval_prompts=2",
            "model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2", "rollout.prompts_per_step=2",
            "rollout.group_size=2", "rollout.max_new_tokens=6", "loss.sft_batch_size=4", "controller.meta_interval=2",
            "controller.meta_val_prompts=2", "controller.meta_val_group=2", "optim.lr=1e-4", "device=cpu",
            "checkpoint_every=1"]
    full = apply_overrides(TrainConfig(), over)
    run_train(full, tmp_path / "a", splits=splits, progress=False, checkpoint_root=str(tmp_path / "root_a"))
    # the first 3 steps sit in the LR warm-up (optim.warmup_steps=5), so max_steps does not change their LR
    short = apply_overrides(full, ["max_steps=2"])
    run_train(short, tmp_path / "b", splits=splits, progress=False, checkpoint_root=str(tmp_path / "root_b"))
    run_train(full, tmp_path / "b", splits=splits, progress=False, checkpoint_root=str(tmp_path / "root_b"),
          resume=str(tmp_path / "root_b" / "checkpoints" / "step-0000002"), force_resume=True)
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
