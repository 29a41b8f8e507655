"""amft_lib.run.stages and amft_lib.run.preflight (mirror test, the parts without a cluster): evaluate_stage
reads the training config typed and validated — a broken config is one ConfigError before anything is scored
or written — and preflight sizes each GPU stage's pod from its world size and writes its report."""

from __future__ import annotations

import json

import pytest

from amft_lib.config import ConfigError, TrainConfig, config_to_dict
from amft_lib.run.layout import RunRoot
from amft_lib.run.preflight import Check, checks_markdown, stage_world_size, task_pods
from amft_lib.run.settings import defaults
from amft_lib.run.stages import evaluate_stage


def _evaluate(tmp_path, config: dict):
    run = RunRoot.resolve(str(tmp_path / "s3"), "r-1")
    return run, evaluate_stage(
        run, str(tmp_path / "data"), json.dumps(config), model=str(tmp_path / "m"), base_model=str(tmp_path / "b"),
        warm_start_model=str(tmp_path / "w"), train_run=str(tmp_path / "t"), registry_model_name="amft",
        registry_tracking_uri="", metric="accuracy", threshold=0.0, max_regression=0.0, pass_k=2, n_samples=2,
        max_examples=1, html_path=str(tmp_path / "r.html"), markdown_path=str(tmp_path / "r.md"))


@pytest.mark.parametrize(("key", "value", "match"), [
    ("rollout", {"max_new_tokens": 0}, "max_new_tokens"),  # out of range: typed validation refuses it
    ("not_a_section", {}, "not_a_section"),  # unknown keys are refused, not ignored
])
def test_evaluate_stage_refuses_a_bad_training_config_before_scoring(tmp_path, key, value, match):
    config = config_to_dict(TrainConfig())
    config[key] = {**config.get(key, {}), **value}
    with pytest.raises(ConfigError, match=match):
        _evaluate(tmp_path, config)
    assert not (tmp_path / "s3").exists() and not (tmp_path / "r.md").exists()


def test_stage_world_size_and_pods_follow_the_parameters():
    values = {**defaults(), "p4_train_num_nodes": 2, "p4_train_nproc_per_node": 4}
    assert stage_world_size(values, "train") == 8 and stage_world_size(values, "warm_start") == 1
    pods = task_pods(values)
    gpus = str(values["p0_gpu_count"])  # strings: KFP resolves resource placeholders as strings
    assert pods["warm_start"].gpus == gpus != "0" and pods["evaluate"].gpus == gpus  # one process: in its pod
    assert pods["train"].gpus == "0"  # 8 processes: launched elsewhere, the task pod only waits


def test_checks_markdown_says_failed_and_keeps_the_table_intact():
    text = checks_markdown([Check("s3", True, "reachable"), Check("model", False, "a|b missing")])
    assert text.startswith("# Preflight: FAILED")
    assert "| model | **failed** | a/b missing |" in text  # a `|` in a detail would break the table
    assert checks_markdown([Check("s3", True, "ok")]).startswith("# Preflight: passed")
