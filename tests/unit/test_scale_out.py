"""How the train stage scales out (amft_lib.run.scale_out, amft_lib.run.stages.train_stage):
parameter checks that name the pipeline parameter, the local torchrun launcher as a real subprocess,
and the launcher side of the train stage filling its KFP outputs from what rank 0 published.

The one stand-in: `test_launched_train_stage_fills_its_outputs_from_the_run_root` replaces the
launch (the torchrun subprocess here; the TrainJob path shares the code after it) with a function
that publishes what rank 0 of the workers publishes; everything else runs for real on a local run
root. The multi-process training itself is covered in tests/integration/test_train_torchrun.py, the
TrainJob launch against a fake API server in tests/unit/test_trainjob_watch.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amft_lib.config import TrainConfig, config_to_dict
from amft_lib.run import stages
from amft_lib.run.layout import POINTER_FILE, RunRoot, put_json
from amft_lib.run.scale_out import ClusterJob, ScaleOutError, check_scale_out, last_error_line, run_torchrun


@pytest.mark.parametrize("args, message", [
    ((0, 1, "auto"), "p4_train_num_nodes=0: must be a whole number ≥ 1"),
    ((1, -1, "auto"), "p4_train_nproc_per_node=-1"),
    ((1, True, "auto"), "p4_train_nproc_per_node=True"),
    ((1, 2, "none"), "p4_train_distributed_strategy=none with 2 processes"),
    ((2, 1, "ddp", "torchrun"), "p4_train_num_nodes=2: a local run has one node"),
    ((1, 8, "ddp", "trainjob", 4), "p4_train_nproc_per_node=8 > p0_gpu_count=4"),
    ((1, 1, "auto", "slurm"), "launcher='slurm'"),
])
def test_bad_scale_out_names_the_parameter(args, message):
    with pytest.raises(ScaleOutError, match=message):
        check_scale_out(*args)


def test_the_warm_start_errors_name_its_own_parameters():
    with pytest.raises(ScaleOutError, match="p3_warm_start_distributed_strategy=none with 4 processes"):
        check_scale_out(2, 2, "none", "trainjob", stage="warm_start")
    with pytest.raises(ScaleOutError, match="p3_warm_start_nproc_per_node=0"):
        check_scale_out(1, 0, "auto", stage="warm_start")


def test_good_scale_out():
    assert check_scale_out(1, 1, "none").world_size == 1  # today's in-pod path, strategy irrelevant
    assert check_scale_out(1, 2, "auto").world_size == 2
    assert check_scale_out(4, 8, "fsdp", "trainjob", 8).world_size == 32


def test_last_error_line_prefers_the_cli_error_then_the_exception():
    out = ["[rank0]: Traceback (most recent call last):", "[rank0]: ValueError: bad shape", "W1202 torchrun: failed"]
    assert last_error_line(out) == "[rank0]: ValueError: bad shape"
    assert last_error_line([*out, "error: s3://b/runs/r/launch/train.json: no launch spec"]).startswith("error: s3://")
    assert last_error_line(["", "just this"]) == "just this"
    assert last_error_line([]) == "no output"


def test_local_torchrun_failure_reports_exit_code_and_the_workers_error(tmp_path, capsys):
    """Real `python -m torch.distributed.run --standalone --nproc-per-node 2` of `amft stage train-worker`
    on a run root without a launch spec: both ranks fail with the CLI's one-line error, torchrun exits
    non-zero, and the stage error carries both (the output was streamed meanwhile)."""
    run = RunRoot.at(str(tmp_path / "runs" / "r1"))
    with pytest.raises(ScaleOutError) as err:
        run_torchrun(run, 2, env={"OMP_NUM_THREADS": "1"})
    message = str(err.value)
    assert message.startswith("torchrun workers exited with 1: ")
    assert "launch/train.json: no launch spec" in message and "\n" not in message
    assert "no launch spec" in capsys.readouterr().out


def test_the_worker_command_exists():
    from amft_lib import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["stage", "train-worker", "--help"])
    assert exit_.value.code == 0


# ── the launcher side of the train stage ──────────────────────────────────────────────────────


def train_config_json(strategy: str) -> str:
    data = config_to_dict(TrainConfig())
    data["distributed"]["strategy"] = strategy
    return json.dumps(data)


@pytest.fixture
def run(tmp_path) -> RunRoot:
    run = RunRoot.at(str(tmp_path / "runs" / "r1"))
    put_json(run.warm_start_stats, {"target_entropy_temperature": 1.0})
    return run


def test_launched_train_stage_fills_its_outputs_from_the_run_root(run, tmp_path, monkeypatch):
    launched = {}

    def publish_like_rank_0(run_: RunRoot, nproc_per_node: int, stage: str) -> None:
        """Stand-in for the workers: what rank 0 publishes (for real: tests/integration/test_train_torchrun.py)."""
        launched.update(nproc=nproc_per_node, stage=stage, spec=json.loads(Path(run_.launch_spec(stage)).read_text()))
        train = Path(run_.train)
        train.mkdir(parents=True)
        (train / "metrics.jsonl").write_text(json.dumps({"step": 1, "mu": 0.5, "entropy": 1.0, "sft_loss": 2.0}) + "\n")
        Path(run_.model).mkdir(parents=True)
        (Path(run_.model) / "config.json").write_text("{}")
        put_json(run_.train_result, {"steps": 4, "mu_final": 0.4, "method": "amft", "elapsed_s": 1.5,
                                     "val_accuracy_final": 0.25})

    monkeypatch.setattr(stages, "run_torchrun", publish_like_rank_0)
    monkeypatch.setattr("amft_lib.trainer.run_train", lambda *a, **k: pytest.fail("the launcher must not train itself"))
    init = tmp_path / "warm_model_artifact"
    init.mkdir()
    (init / POINTER_FILE).write_text(json.dumps({"uri": "s3://amft/pipelines/runs/r1/warm_start/model"}))
    out_dir = tmp_path / "kfp"
    outcome = stages.train_stage(
        run, str(tmp_path / "no-dataset-needed"), train_config_json("ddp"), target_entropy=0.7, init_model=str(init),
        run_dir=str(out_dir / "run_dir"), model_dir=str(out_dir / "model"), curves_path=str(out_dir / "curves.html"),
        nproc_per_node=2)

    assert launched["nproc"] == 2 and launched["stage"] == "train"
    spec = launched["spec"]
    assert spec["init_model"] == "s3://amft/pipelines/runs/r1/warm_start/model"  # the pointer's URI, not the file
    assert spec["config"]["controller"]["target_entropy"] == 0.7
    assert spec["config"]["distributed"]["strategy"] == "ddp" and spec["config"]["data"]["path"] == run.data
    # the KFP outputs, as the in-pod path writes them
    assert json.loads((out_dir / "model" / POINTER_FILE).read_text())["uri"] == run.model
    assert (out_dir / "run_dir" / "metrics.jsonl").is_file()
    assert "<html" in (out_dir / "curves.html").read_text().lower()
    assert outcome.metrics["steps"] == 4.0 and outcome.metadata["model"] == {"uri": run.model, "method": "amft"}


def test_trainjob_launcher_without_cluster_settings_is_refused(run, tmp_path):
    with pytest.raises(ScaleOutError, match="launcher=trainjob needs the cluster settings"):
        stages.train_stage(run, "", train_config_json("auto"), target_entropy=0.7, init_model=str(tmp_path),
                           run_dir=str(tmp_path / "a"), model_dir=str(tmp_path / "b"), curves_path=str(tmp_path / "c"),
                           num_nodes=1, nproc_per_node=2, launcher="trainjob")


def test_trainjob_needs_an_s3_run_root(run, tmp_path):
    """A TrainJob's pods cannot see the launcher pod's files: a local run root is refused up front."""
    with pytest.raises(ScaleOutError, match=r"run root .*: a TrainJob's pods read their inputs from S3"):
        stages.train_stage(run, "", train_config_json("auto"), target_entropy=0.7, init_model=str(tmp_path),
                           run_dir=str(tmp_path / "a"), model_dir=str(tmp_path / "b"), curves_path=str(tmp_path / "c"),
                           num_nodes=2, nproc_per_node=1, launcher="trainjob",
                           cluster=ClusterJob(image="img", s3_secret="amft-s3"))
    assert not Path(run.launch_spec("train")).exists()


def test_more_processes_with_strategy_none_fail_before_anything_runs(run, tmp_path):
    with pytest.raises(ScaleOutError, match="p4_train_distributed_strategy=none with 2 processes"):
        stages.train_stage(run, "", train_config_json("none"), target_entropy=0.7, init_model=str(tmp_path),
                           run_dir=str(tmp_path / "a"), model_dir=str(tmp_path / "b"), curves_path=str(tmp_path / "c"),
                           nproc_per_node=2)
    assert not Path(run.launch_spec("train")).exists()
