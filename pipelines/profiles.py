"""Named sets of pipeline parameters for `amft pipeline run-local --profile NAME`.

Every entry is a pipeline parameter (`amft pipeline params` shows each with its description and
its `local` value), so `--set` overrides any of them.
"""

from __future__ import annotations

from typing import Any

# The tiny character-level model (configs/tiny_*.yaml's size) with budgets sized for 2 CPU cores in
# about 10 minutes: what `bash scripts/demo.sh` runs. The tuning behind each value is in the comments.
LOCAL: dict[str, Any] = {
    "p1_data_train_size": 7000,  # ≤ 95 % of all rows, the validation gate's default share for train
    "p1_data_val_size": 100,
    "p1_data_test_id_size": 200,
    "p1_data_test_ood_size": 100,
    "p3_model_name": "tiny",
    # 2 layers: on unseen hands it generalised as well per SFT step as 4 layers at half the cost
    "p3_model_settings": ["model.tiny_hidden=128", "model.tiny_layers=2", "model.tiny_heads=4", "device=cpu"],
    "p3_model_max_new_tokens": 112,
    "p3_warm_start_warmup_steps": 1400,
    "p3_warm_start_final_sft_steps": 100,
    "p3_warm_start_rs_samples": 4,
    "p3_warm_start_rs_max_prompts": 64,
    "p3_warm_start_overrides": ["batch_size=64", "entropy_prompts=16", "eval_prompts=50"],
    "p4_train_max_steps": 60,
    "p4_train_lr": 2e-4,
    "p4_train_mu_init": 0.7,  # configs/tiny_gp.yaml's value, tuned on val
    "p4_train_checkpoint_every": 20,
    "p4_train_overrides": ["eval_every=20", "eval_prompts=50", "rollout.prompts_per_step=4", "rollout.group_size=4",
                           "loss.sft_batch_size=16", "controller.meta_val_prompts=4"],
    "p5_eval_n_samples": 2,
    "p5_eval_pass_k": 2,
    "p5_eval_threshold": 0.01,
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
