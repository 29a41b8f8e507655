"""The training loop on the real `tiny` model: every method runs, the contract is honoured, runs
are reproducible, and parameters really move. Tiny budgets (cleanrl style), not timed."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amft_lib.config import METHODS, TrainConfig, apply_overrides, load_config
from amft_lib.optim import lr_factor
from amft_lib.tasks.general_points import generate_rows
from amft_lib.trainer import run_train

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = {"step", "mu", "entropy", "target_entropy", "sft_loss", "rl_loss", "reward_mean", "reward_std",
            "meta_grad", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
TIMING = {"tokens_per_s", "elapsed_s", "time_rollout_s", "time_update_s", "time_meta_s"}


@pytest.fixture(scope="module")
def splits():
    return {"train": generate_rows(64, "face10", 1, "train"), "val": generate_rows(8, "face10", 2, "val")}


def small_cfg(method: str, steps: int = 3, **extra) -> TrainConfig:
    over = [f"controller.method={method}", f"max_steps={steps}", "eval_every=0", "eval_prompts=4",
            "model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2",
            "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=12",
            "loss.sft_batch_size=4", "controller.meta_interval=1", "controller.meta_val_prompts=2",
            "controller.meta_val_group=2", "controller.switch_step=2", "optim.lr=1e-2"]
    over += [f"{k}={v}" for k, v in extra.items()]
    return apply_overrides(TrainConfig(), over)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_writes_the_contract(method, splits, tmp_path):
    res = run_train(small_cfg(method), tmp_path, splits=splits, progress=False)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    steps = [r for r in rows if not r.get("final")]
    assert len(steps) == 3 and all(set(r) >= CONTRACT for r in steps)
    mus = [r["mu"] for r in steps]
    if method == "sft":
        assert mus == [1.0, 1.0, 1.0] and all(r["rl_loss"] is None for r in steps)
    elif method == "grpo":
        assert mus == [0.0, 0.0, 0.0] and all(r["sft_loss"] is None for r in steps)
    elif method == "sft_grpo":
        assert mus == [1.0, 1.0, 0.0]  # switch_step=2
    elif method == "fixed":
        assert mus == [0.5, 0.5, 0.5]
    elif method == "chord":  # cosine decay 0.9 → 0.05 over 100 steps (defaults): 0.9, then a little lower
        assert mus[0] == pytest.approx(0.9) and mus[0] > mus[1] > mus[2] > 0.85
    elif method == "hpt":  # μ = share of prompts with no correct rollout; an untrained model solves none
        assert all(m == 1.0 for m, r in zip(mus, steps) if r["reward_mean"] == 0.0)
    if method in ("meta", "amft"):
        ctl_rows = read_jsonl(tmp_path / "controller.jsonl")
        assert len(ctl_rows) == 3  # meta_interval=1
        logged = {"meta_grad", "raw_meta_grad", "grad_rl_norm", "grad_sft_norm", "lookahead", "meta_grad_se",
                  "meta_grad_t", "delta_mu", "reason", "n_groups", "estimator", "entropy_delta"} - (
                      {"entropy_delta"} if method == "meta" else set())
        assert all(logged <= set(r) for r in ctl_rows)
        assert all(math.isfinite(r["meta_grad_se"]) and math.isfinite(r["meta_grad_t"]) for r in ctl_rows)
        assert all(r["n_groups"] == 2 and r["estimator"] == "central_difference" and r["reason"] for r in ctl_rows)
        assert all(r["meta_grad"] is not None for r in steps)
    elif method == "gac":  # μ from the measured noise of both gradients, every step
        ctl_rows = read_jsonl(tmp_path / "controller.jsonl")
        assert len(ctl_rows) == 3 and all(r["var_rl"] >= 0 and r["var_sft"] > 0 for r in ctl_rows)
        assert all(abs(r["mu_next"] - r["mu"]) <= 0.05 + 1e-12 for r in ctl_rows)  # gac_cap
        assert [r["mu"] for r in ctl_rows[1:]] == [r["mu_next"] for r in ctl_rows[:-1]]
    else:
        assert not (tmp_path / "controller.jsonl").read_text()
    assert (res.model_dir / "model.safetensors").exists() and (res.model_dir / "tokenizer.json").exists()
    assert all(r["target_entropy"] > 0 for r in steps)


def test_amft_moves_mu_and_changes_parameters(splits, tmp_path):
    from amft_lib.config import ModelConfig
    from amft_lib.model import load_policy

    cfg = small_cfg("amft", steps=4)
    init, _ = load_policy(ModelConfig(**{**cfg.model.__dict__}), seed=cfg.seed)
    res = run_train(cfg, tmp_path, splits=splits, progress=False)
    steps = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if not r.get("final")]
    assert steps[-1]["mu_next"] != pytest.approx(cfg.controller.mu_init, abs=1e-6)
    trained = load_file(res.model_dir / "model.safetensors")
    before = init.state_dict()
    changed = [k for k, v in trained.items() if k in before and not torch.equal(v, before[k])]
    assert len(changed) >= len(trained) // 2, "most parameter tensors must have been updated"


def test_same_seed_same_metrics(splits, tmp_path):
    def run(d):
        run_train(small_cfg("amft"), d, splits=splits, progress=False)
        return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(d / "metrics.jsonl")]

    assert run(tmp_path / "a") == run(tmp_path / "b")


def test_lora_training_only_moves_adapters(splits, tmp_path):
    res = run_train(small_cfg("amft", steps=2, **{"model.lora": "true", "model.lora_r": 2}), tmp_path, splits=splits,
                progress=False)
    assert res.steps == 2
    assert "lora" not in " ".join(load_file(res.model_dir / "model.safetensors"))  # saved merged
    adapter = load_file(res.model_dir.with_name("adapter") / "adapter_model.safetensors")  # and the adapter alone
    assert adapter and all("lora_" in name for name in adapter)


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 4, 20, 0.1) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_factor(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert lr_factor(12, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    from amft_lib.config import WarmStartConfig

    cls = WarmStartConfig if "warm_start" in path.name else TrainConfig
    load_config(path, cls)
    assert path.read_text().startswith("# amft "), "configs start with the command that runs them"


def test_config_errors_name_file_and_key(tmp_path):
    from amft_lib.config import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("controller:\n  eta_muu: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: controller: unknown key\(s\) eta_muu"):
        load_config(bad)
    bad.write_text("rollout:\n  group_size: 1\n")
    with pytest.raises(ConfigError, match="group_size=1"):
        load_config(bad)
    bad.write_text("max_steps: ten\n")
    with pytest.raises(ConfigError, match="max_steps='ten': expected an integer"):
        load_config(bad)


def test_cli_tiny_budget(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "amft_lib.cli", "train", "--config", str(ROOT / "configs/tiny_gp.yaml"),
           "--out", str(out), "--max-steps", "1", "--no-progress", "--method", "grpo",
           "--set", "data.train_size=40", "--set", "data.val_size=8", "--set", "eval_prompts=4",
           "--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=2", "--set", "rollout.max_new_tokens=8",
           "--set", "model.tiny_hidden=32", "--set", "model.tiny_layers=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "method=grpo steps=1" in proc.stdout
    assert (out / "model" / "model.safetensors").exists()
    bad = subprocess.run([sys.executable, "-m", "amft_lib.cli", "train", "--out", str(out), "--set", "seed=x"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "seed='x': expected an integer" in bad.stderr


def test_periodic_evaluation_does_not_change_training(splits, tmp_path):
    """Evaluation samples on a forked RNG: evaluating every step must leave the trajectory untouched."""
    skip = TIMING | {"val_reward", "val_accuracy", "config_hash"}  # the hash covers eval_every itself

    def run(d, every):
        run_train(small_cfg("amft", steps=4, eval_every=every), d, splits=splits, progress=False)
        rows = read_jsonl(d / "metrics.jsonl")
        return [{k: v for k, v in r.items() if k not in skip} for r in rows], rows

    quiet, _ = run(tmp_path / "quiet", 0)
    busy, raw = run(tmp_path / "busy", 1)
    assert quiet == busy
    assert sum(r["val_reward"] is not None for r in raw) == 4  # steps 1..3 plus the final record


def test_adam_lookahead_runs_and_logs_half_sample_agreement(splits, tmp_path):
    """meta_lookahead=adam: SGD at step 0 (no second moment yet), Adam afterwards; ∇U halves logged (the
    backward estimator, the only one that builds ∇U)."""
    run_train(small_cfg("amft", steps=3, **{"controller.meta_lookahead": "adam", "controller.meta_estimator":
                                            "backward", "controller.meta_update": "raw"}),
              tmp_path, splits=splits, progress=False)
    rows = read_jsonl(tmp_path / "controller.jsonl")
    assert [r["lookahead"] for r in rows] == ["sgd", "adam", "adam"]
    assert all(-1.0 <= r["half_cosine"] <= 1.0 for r in rows)  # meta_val_prompts=2: one prompt per half


def test_a_deliberately_skipped_first_step_does_not_warn_about_the_scheduler(tmp_path, recwarn):
    """grpo on rewards that are all equal: zero gradient, the optimizer step is skipped on purpose and the
    LR schedule still advances — without torch's "lr_scheduler.step() before optimizer.step()" warning."""
    import warnings

    from amft_lib.config import apply_overrides

    cfg = apply_overrides(TrainConfig(), ["controller.method=grpo", "max_steps=1", "model.tiny_hidden=32",
                                          "model.tiny_layers=1", "model.tiny_heads=2", "rollout.max_new_tokens=4",
                                          "rollout.prompts_per_step=2", "rollout.group_size=2", "eval_every=0",
                                          "eval_prompts=0"])
    rows = generate_rows(6, "face10", 0, "train")
    warnings.simplefilter("always")
    run_train(cfg, tmp_path / "run", splits={"train": rows}, progress=False)
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def test_the_three_estimators_give_the_same_first_meta_gradient_in_training(splits, tmp_path, monkeypatch):
    """Step 0 of the same seed (same θ, same validation rollouts): m by JVP, by central difference and by the
    old backward ∇U agree (float32; the central difference to its O(step²) truncation).

    An untrained tiny model solves no General Points hand, so every reward is 0 and m = 0 whatever the
    estimator: the verifier is replaced by a deterministic stand-in (reward = parity of the characters' code sum) so the
    rollouts carry a signal. It tests the estimators' plumbing, not the verifier (tested on its own)."""
    from amft_lib import trainer

    def parity_reward(task, answers, texts):
        return torch.tensor([float(sum(map(ord, t)) % 2) for t in texts]), [True] * len(texts)

    monkeypatch.setattr(trainer, "score_completions", parity_reward)
    m = {}
    for est, update in (("jvp", "evidence"), ("central_difference", "evidence"), ("backward", "raw")):
        run_train(small_cfg("meta", steps=1, **{"controller.meta_estimator": est, "controller.meta_update": update,
                                                "controller.meta_val_prompts": 4}),
                  tmp_path / est, splits=splits, progress=False)
        m[est] = read_jsonl(tmp_path / est / "controller.jsonl")[0]["raw_meta_grad"]
    assert m["jvp"] != 0.0, "degenerate: no reward signal on the validation rollouts"
    assert m["backward"] == pytest.approx(m["jvp"], rel=1e-4)
    assert m["central_difference"] == pytest.approx(m["jvp"], rel=1e-2)


def test_pooled_meta_steps_hold_mu_until_the_pool_decides(splits, tmp_path):
    """controller.meta_accumulate=2, a meta step every step: steps 0 and 2 pool (the meta term holds: μ moves by
    the entropy term alone), steps 1 and 3 decide on the pooled t, and the log says which is which."""
    run_train(small_cfg("amft", steps=4, **{"controller.meta_accumulate": 2}), tmp_path, splits=splits,
              progress=False)
    rows = read_jsonl(tmp_path / "controller.jsonl")
    assert [r["meta_pooled"] for r in rows] == [1, 2, 1, 2]
    for r in rows[0::2]:
        assert r["reason"].startswith("pooling meta step 1/2") and r["delta_mu"] == 0.0
        assert r["meta_pooled_t"] is None and "terms" not in r
        assert r["mu_next"] == pytest.approx(min(0.95, max(0.05, r["mu"] + r["entropy_delta"])))
    for r in rows[1::2]:
        assert r["reason"].startswith("pooled 2 meta steps (4 group terms)")
        assert r["meta_pooled_t"] is not None and math.isfinite(r["meta_pooled_t"])
