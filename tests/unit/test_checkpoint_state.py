"""amft_lib.checkpoint.state (mirror test): the one save and restore both training loops call. A restored
state continues bit-exactly on CPU: weights, optimizer moments and the RNG come back, in one process on a
local run root (the torchrun layout is tests/integration/test_distributed.py's)."""

from __future__ import annotations

import torch

from amft_lib import checkpoint as ckpt
from amft_lib.config import ModelConfig
from amft_lib.model import load_policy, trainable_parameters
from amft_lib.optim import build_optimizer
from amft_lib.policy import Policy

TINY = ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2)


def _policy(seed: int) -> Policy:
    model, tok = load_policy(TINY, seed=seed)
    return Policy(model, model, tok)


def _step(policy: Policy, optimizer) -> torch.Tensor:
    """One AdamW step on a random (seeded by the global RNG) gradient; returns the draw."""
    noise = torch.randn(3)
    for p in trainable_parameters(policy.generate):
        p.grad = torch.full_like(p, float(noise.sum()))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return noise


def test_save_then_restore_continues_exactly_where_the_run_was(tmp_path):
    root = str(tmp_path / "run")
    policy = _policy(0)
    opt = build_optimizer(trainable_parameters(policy.generate), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)
    torch.manual_seed(7)
    _step(policy, opt)
    uri = ckpt.save_training_state(root, 1, policy, opt, trainer_state={"step": 1, "config_hash": "h"},
                                   config_hash="h", keep_last=2, controller_state={"mu": 0.5})
    draw_after = _step(policy, opt)  # the uninterrupted run's next step
    expected = {n: p.detach().clone() for n, p in policy.generate.named_parameters()}

    fresh = _policy(1)  # other weights, an empty optimizer, another RNG position
    fresh_opt = build_optimizer(trainable_parameters(fresh.generate), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)
    torch.manual_seed(99)
    found_uri, step, payload = ckpt.find_resume_point(root, "auto", "h", force=False)
    assert (found_uri, step) == (uri, 1) and payload.controller_state == {"mu": 0.5}
    ckpt.restore_training_state(payload, fresh, fresh_opt)
    assert torch.equal(_step(fresh, fresh_opt), draw_after)  # the RNG came back
    for name, p in fresh.generate.named_parameters():
        assert torch.equal(p, expected[name]), name  # weights and Adam moments came back


def test_optimizer_none_saves_an_empty_optimizer_state(tmp_path):
    policy = _policy(0)
    ckpt.save_training_state(str(tmp_path), 3, policy, None, trainer_state={"step": 3}, config_hash="h", keep_last=1)
    step, payload = ckpt.load_checkpoint(ckpt.checkpoint_uri(str(tmp_path), 3))
    assert step == 3 and payload.optimizer_state == {} and payload.scheduler_state == {}
    assert set(payload.model_state) == {n for n, p in policy.generate.named_parameters() if p.requires_grad}


def test_root_of_finds_the_run_root_of_a_checkpoint_uri():
    assert ckpt.root_of("s3://b/runs/r1/checkpoints/step-0000004") == "s3://b/runs/r1"
    assert ckpt.root_of("/data/run/checkpoints/step-0000004/") == "/data/run"
    assert ckpt.root_of("/data/run/step-0000004") is None
