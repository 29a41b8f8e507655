"""Named sets of pipeline parameters for `amft pipeline run-local --profile NAME`.

Every entry is a pipeline parameter (`amft pipeline params` shows each with its description and
its `local` value), so `--set` overrides any of them.
"""

from __future__ import annotations

from typing import Any

# What `bash scripts/demo.sh` runs: Countdown (3 numbers 1..20 to a target ≤ 100; test_ood: targets 101..200)
# with the tiny character-level model, sized so the whole DAG fits ≈ 300 s on 2 idle CPU cores once the
# faster engine (issue 25 item 1: compiled bf16 SFT steps ≈ 2.1×, decoding ≈ 1.5×) is in. Why Countdown and not
# General Points: GP's test_ood (J/Q/K = 11/12/13) is structurally 0 for a model that never saw a card above
# 10, and its ~566 ID hands leave ~100 unseen ones per split; Countdown's test_ood is reachable (warm start:
# greedy ≈ 0.01-0.02, pass@8 ≈ 0.06) and it has 2000 unseen instances per eval split. The choice, the
# measurements (val, 500 prompts, seeds 0/1/2) and the time arithmetic are in the issue-25 report and README.
# Countdown's data sizes are the generator's (12,000 train prompts of which 2000 carry a demonstration, 2000
# per eval split): the p1_data_*_size settings are General Points only; evaluation scores the first
# p5_eval_max_examples rows of each test split, the warm start the first eval_prompts val rows.
LOCAL: dict[str, Any] = {
    "p1_data_task": "countdown",
    "p3_model_name": "tiny",
    "p3_model_settings": ["model.tiny_hidden=128", "model.tiny_layers=2", "model.tiny_heads=4", "device=cpu"],
    "p3_model_max_new_tokens": 72,  # the longest Countdown route is ~60 characters
    # 400 SFT steps on the 2000 demonstrations (≈ 13 epochs at batch 64): val 0.100 / 0.152 / 0.124 for
    # seeds 0 / 1 / 2 (500 prompts); the final SFT then added +0.015 [−0.003, +0.035] (kept by keep_better)
    "p3_warm_start_warmup_steps": 400,
    "p3_warm_start_final_sft_steps": 50,  # at 0.1 × lr; kept only if val does not drop (warm_start.keep_better)
    "p3_warm_start_rs_samples": 8,
    # 1024 samples, ≈ 50 accepted (acceptance ≈ 0.05): on val (500 prompts, seeds 0/1) the final SFT on
    # demonstrations alone scored like the one with ~100 accepted samples, so half the sampling time is enough
    "p3_warm_start_rs_max_prompts": 128,
    "p3_warm_start_checkpoint_every": 100,
    # 500 val prompts: keep_better compares after-warm-up and final SFT on them (SE ≈ 0.014 at 0.1)
    "p3_warm_start_overrides": ["batch_size=64", "entropy_prompts=16", "eval_prompts=500"],
    "p4_train_max_steps": 16,  # 16 × 64 rollouts, meta steps at 0 and 8
    "p4_train_lr": 2e-4,
    "p4_train_mu_init": 0.5,  # configs/tiny_countdown.yaml's value
    "p4_train_meta_interval": 8,
    "p4_train_checkpoint_every": 8,
    "p4_train_overrides": ["eval_every=8", "eval_prompts=500", "rollout.prompts_per_step=8", "rollout.group_size=8",
                           "loss.sft_batch_size=32", "controller.meta_val_prompts=32", "controller.meta_val_group=4",
                           "controller.entropy_tolerance=0.05"],  # configs/tiny_countdown.yaml's (measured there)
    "p5_eval_n_samples": 0,  # greedy pass@1 only: per-instance 0/1 on 1000 rows buys more CI than pass@k on fewer
    "p5_eval_max_examples": 1000,  # per test split: a paired change of ≈ ±0.02 is resolved (CI half-width)
    "p5_eval_threshold": 0.01,
    "p6_registry_model_name": "amft-countdown",
}

# A tiny model (hidden 32, one layer) and a handful of steps per stage: the whole DAG in about a
# minute, for end-to-end tests (tests/integration/test_pipeline_local.py, the Airflow DAG test).
TEST: dict[str, Any] = {
    "p1_data_train_size": 120, "p1_data_val_size": 20, "p1_data_test_id_size": 16, "p1_data_test_ood_size": 16,
    "p3_model_name": "tiny",
    "p3_model_settings": ["model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2", "device=cpu"],
    "p3_model_max_new_tokens": 24,
    "p3_warm_start_warmup_steps": 10, "p3_warm_start_final_sft_steps": 4, "p3_warm_start_rs_samples": 2,
    "p3_warm_start_rs_max_prompts": 8, "p3_warm_start_checkpoint_every": 2,
    "p3_warm_start_overrides": ["batch_size=8", "entropy_prompts=4", "entropy_group=2", "eval_prompts=8"],
    "p4_train_max_steps": 8, "p4_train_lr": 1e-2, "p4_train_checkpoint_every": 2, "p4_train_meta_interval": 2,
    "p4_train_overrides": ["eval_every=4", "eval_prompts=4", "rollout.prompts_per_step=2", "rollout.group_size=2",
                           "loss.sft_batch_size=4", "controller.meta_val_prompts=2", "controller.meta_val_group=2"],
    "p5_eval_n_samples": 0, "p5_eval_max_examples": 8,  # greedy accuracy only; pass@k has its own unit tests
}

PROFILES: dict[str, dict[str, Any]] = {"local": LOCAL, "test": TEST, "default": {}}
