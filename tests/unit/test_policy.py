"""amft_lib.policy (mirror test; it was training.py) and amft_lib.loop_checks, the two modules both training
loops share: the chunked SFT gradient is the exact full-batch gradient, gradients are taken out of `.grad`, and
the input checks refuse before anything is written. Real `tiny` model, float64 where numbers are compared."""

from __future__ import annotations

import os

import pytest
import torch

from amft_lib.config import ConfigError, DataConfig, DistributedConfig, ModelConfig
from amft_lib.data.schema import DataError
from amft_lib.loop_checks import check_loop_inputs, check_loop_world, check_out_dir, resolve_device
from amft_lib.losses import sft_loss
from amft_lib.model import load_policy, save_policy, trainable_parameters
from amft_lib.optim import lr_factor
from amft_lib.policy import Policy, save_final_policy, sft_gradient, take_grads
from amft_lib.rollout import completion_logprobs, demonstration_batch

TINY = ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2, dtype="float64")


def _batch(tok):
    prompts = ["1 2 3 4", "5 5 5 1", "2 2", "9 8 7 6"]
    demos = ["(1+2+3)*4", "5*5-5/1+4", "2*2", "9+8+7"]
    return demonstration_batch(tok, prompts, demos, max_tokens=16)


def test_sft_gradient_in_chunks_is_the_exact_full_batch_gradient():
    model, tok = load_policy(TINY, seed=0)
    params = trainable_parameters(model)
    batch = _batch(tok)
    # reference: one backward of the token-mean NLL over the whole batch
    logprobs, _ = completion_logprobs(model, batch)
    loss = sft_loss(logprobs, batch.completion_mask.to(logprobs.dtype))
    expected = torch.autograd.grad(loss, params)
    for mb in (1, 3, 4):  # uneven chunks are weighted by their token share
        grads, value = sft_gradient(model, params, batch, micro_batch_size=mb)
        assert value == pytest.approx(float(loss), rel=1e-12)
        for g, e in zip(grads, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
        assert all(p.grad is None for p in params)  # taken out: the next gradient starts from nothing


def test_take_grads_gives_zeros_where_no_loss_reached_and_clears_grad():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    (a * 3.0).sum().backward()
    grads = take_grads([a, b])
    assert grads[0].tolist() == [3.0, 3.0] and grads[1].tolist() == [0.0, 0.0, 0.0]
    assert a.grad is None and b.grad is None


def test_save_final_policy_writes_a_model_that_loads_back_equal(tmp_path):
    model, tok = load_policy(TINY, seed=0)
    save_final_policy(Policy(model, model, tok), TINY, tmp_path / "model")
    again, _ = load_policy(ModelConfig(name=str(tmp_path / "model"), dtype="float64"))
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_lr_factor_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    # warm-up 4 steps: (step+1)/4; then cosine from 1 at step 4 to 0.1 at step 14 (half-way at step 9: 0.55)
    assert [lr_factor(s, 4, 14, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(9, 4, 14, 0.1) == pytest.approx(0.55)
    assert lr_factor(14, 4, 14, 0.1) == pytest.approx(0.1) == lr_factor(50, 4, 14, 0.1)


def _rows(task="general_points", demo=True):
    row = {"id": "r", "task": task, "prompt": "p", "answer": "a", "demonstration": "d" if demo else None}
    return {"train": [row, {**row, "id": "s", "demonstration": None}], "val": [dict(row, id=f"v{i}") for i in range(5)]}


def test_check_loop_inputs_splits_rows_and_takes_the_first_eval_prompts(tmp_path):
    data = DataConfig(task="general_points")
    inputs = check_loop_inputs(tmp_path / "out", TINY, None, "cpu", data, _rows(), eval_prompts=3)
    assert [r["id"] for r in inputs.demo_rows] == ["r"] and len(inputs.train_rows) == 2
    assert [r["id"] for r in inputs.eval_rows] == ["v0", "v1", "v2"] and len(inputs.val_rows) == 5
    assert inputs.model_cfg is TINY and not (tmp_path / "out").exists()  # checked, nothing created
    save_policy(*load_policy(TINY), tmp_path / "warm")  # init_model is checked as a real model folder
    moved = check_loop_inputs(tmp_path / "out", TINY, str(tmp_path / "warm"), "cpu", data, _rows(), eval_prompts=3)
    assert moved.model_cfg.name == str(tmp_path / "warm")  # init_model replaces the config's model


def test_check_loop_inputs_refuses_in_order_output_then_data(tmp_path):
    data = DataConfig(task="general_points")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        check_loop_inputs(tmp_path / "file", TINY, None, "cpu", data, _rows(task="countdown"), eval_prompts=3)
    with pytest.raises(DataError, match="countdown"):
        check_loop_inputs(tmp_path / "out", TINY, None, "cpu", data, _rows(task="countdown"), eval_prompts=3)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_check_out_dir_refuses_an_unwritable_parent(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="permission denied"):
        check_out_dir(locked / "run")


def test_check_loop_world_in_one_process_checks_the_strategy_only(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    check_loop_world(DistributedConfig(), batch_size=3)  # 3 is fine for one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="batch_size"):
        check_loop_world(DistributedConfig(strategy="ddp"), batch_size=3)  # 3 prompts do not split over 2 ranks
    assert resolve_device("cpu") == torch.device("cpu")
