"""The warm-start stage's local scale-out path for real: `warm_start_stage(..., nproc_per_node=2)`
publishes the base model, runs `amft stage warm-start-worker` under a 2-rank torchrun (CPU, gloo, DDP)
on a tiny model, and ends with what the single-process path leaves: base_model/, warm_start/ (model/,
stats.json, accepted.parquet …) under the run root, H* as the task's value and its KFP pointers. No
mocks; a local run root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amft_lib.config import WarmStartConfig, apply_overrides, config_to_dict, load_config
from amft_lib.run import stages
from amft_lib.run.layout import POINTER_FILE, RunRoot

ROOT = Path(__file__).resolve().parents[2]
# The file, not importlib.util.find_spec (see test_train_torchrun.py).
pytestmark = pytest.mark.skipif(not (ROOT / "amft_lib" / "distributed.py").is_file(),
                                reason="the distributed trainer (amft_lib/distributed.py) is not on this branch yet")

TINY = ["warmup_steps=4", "final_sft_steps=2", "batch_size=4", "rs_samples=2", "rs_max_prompts=4",
        "entropy_prompts=2", "entropy_group=2", "eval_prompts=4", "max_new_tokens=16", "device=cpu",
        "model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2"]


def run_stage(tmp: Path, strategy: str, **scale):
    run = RunRoot.at(str(tmp / "runs" / "w1"))
    dataset = tmp / "dataset"
    stages.prepare_stage(run, str(dataset), task="general_points", input_uri="", train_size=48, val_size=8,
                         test_id_size=4, test_ood_size=4, seed=3)
    cfg = apply_overrides(load_config(ROOT / "configs" / "tiny_warm_start.yaml", WarmStartConfig),
                          [*TINY, f"distributed.strategy={strategy}", "distributed.backend=gloo"])
    out = tmp / "kfp"
    outcome = stages.warm_start_stage(run, str(dataset), json.dumps(config_to_dict(cfg)), model_dir=str(out / "model"),
                                      base_model_dir=str(out / "base_model"), **scale)
    return run, out, outcome


def files(folder: str) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file()}


def test_two_rank_warm_start_publishes_what_the_in_pod_path_does(tmp_path, capsys):
    run, out, outcome = run_stage(tmp_path / "torchrun", "ddp", nproc_per_node=2)
    streamed = capsys.readouterr().out
    assert "rank 1/2" in streamed and "rank 0 published warm_start/" in streamed
    single, _, single_outcome = run_stage(tmp_path / "in_pod", "none")

    assert files(run.base_model) == files(single.base_model)
    assert files(single.warm_start) <= files(run.warm_start)  # + result.json for the launching task
    assert any(f.endswith(".safetensors") for f in files(run.warm_start_model))
    stats = json.loads(Path(run.warm_start_stats).read_text())
    assert outcome.value == pytest.approx(stats["target_entropy"]) and outcome.value > 0
    assert set(outcome.metrics) == set(single_outcome.metrics)
    assert json.loads((out / "model" / POINTER_FILE).read_text())["uri"] == run.warm_start_model
    assert json.loads((out / "base_model" / POINTER_FILE).read_text())["uri"] == run.base_model
