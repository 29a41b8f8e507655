"""The KFP components: each compiles on its own, uses our image without pip installs at start, has
its folder files, and — where cheap — does its job when its `.python_func` is called directly with
local paths (storage treats a local folder like an S3 prefix, so the run root is a temp dir here;
the real SeaweedFS path is covered end to end in tests/integration/test_pipeline_local.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kfp import compiler, dsl

from amft_lib.run import scale_out, settings
from amft_lib.run.layout import RunRoot, put_json
from amft_lib.run.summary import summarize_run, summary_markdown
from components.evaluate import evaluate
from components.preflight import preflight
from components.prepare_data import prepare_data
from components.register import register
from components.run_summary import run_summary
from components.stop_run import stop_run
from components.train import train
from components.validate_data import validate_data
from components.warm_start import warm_start

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = {c.name: c for c in (preflight, prepare_data, validate_data, stop_run, warm_start, train, evaluate,
                                  register, run_summary)}
GPU = {"warm-start", "train", "evaluate"}


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_component_compiles_with_our_image_and_no_pip_install(name, tmp_path):
    from components import CPU_IMAGE, CUDA_IMAGE

    path = tmp_path / f"{name}.yaml"
    compiler.Compiler().compile(COMPONENTS[name], str(path))
    spec = yaml.safe_load(path.read_text())
    (ex,) = spec["deploymentSpec"]["executors"].values()
    assert ex["container"]["image"] == (CUDA_IMAGE if name in GPU else CPU_IMAGE)
    assert "pip install" not in " ".join(ex["container"]["command"])


@pytest.mark.parametrize("folder", ["preflight", "prepare_data", "validate_data", "stop_run", "warm_start", "train",
                                    "evaluate", "register", "run_summary"])
def test_component_folder_layout(folder):
    """One folder per component (STYLE.md habit 7): code, metadata, README; the component stays thin."""
    base = ROOT / "components" / folder
    for file in ("__init__.py", "component.py", "metadata.yaml", "README.md"):
        assert (base / file).is_file(), f"components/{folder}/{file} is missing"
    meta = yaml.safe_load((base / "metadata.yaml").read_text())
    assert meta["name"] == folder and meta["stability"] and meta["dependencies"]
    body = (base / "component.py").read_text().split("@dsl.component", 1)[1].split('if __name__ == "__main__"')[0]
    code = body.split('"""', 2)[2] if '"""' in body else body  # after the docstring
    lines = [ln for ln in code.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert len(lines) <= 25, f"{folder}: {len(lines)} lines; keep the component thin (logic goes in amft_lib.run)"
    readme = (base / "README.md").read_text()
    spec = COMPONENTS[meta["name"].replace("_", "-")].component_spec
    listed = re.findall(r"^\| `(\w+)` \|", readme.split("## Inputs", 1)[1].split("## Outputs", 1)[0], re.M)
    assert listed == list(spec.inputs or {}), f"components/{folder}/README.md: Inputs table out of date"


def test_images_come_from_the_environment_at_compile_time(tmp_path):
    env = {**os.environ, "AMFT_IMAGE_CPU": "registry.test/amft:cpu@sha256:abc",
           "AMFT_IMAGE_CUDA": "registry.test/amft:cuda@sha256:def"}
    out = tmp_path / "p.yaml"
    subprocess.run([sys.executable, "-m", "amft_lib.cli", "pipeline", "compile", "--out", str(out)], cwd=ROOT,
                   env=env, check=True, capture_output=True)
    images = {name: ex["container"]["image"]
              for name, ex in next(yaml.safe_load_all(out.read_text()))["deploymentSpec"]["executors"].items()}
    cuda = "registry.test/amft:cuda@sha256:def"
    assert images["exec-train"] == images["exec-warm-start"] == images["exec-evaluate"] == cuda
    assert images["exec-register"] == images["exec-preflight"] == "registry.test/amft:cpu@sha256:abc"


def test_stop_run_fails_with_the_reason():
    with pytest.raises(RuntimeError, match="data validation failed: see report"):
        stop_run.python_func(reason="data validation failed", details="see report")


# ── python_func on small local inputs ──────────────────────────────────────────────────────────


def artifact(cls, tmp_path: Path, name: str):
    return cls(name=name, uri=str(tmp_path / "artifacts" / name))


# Every preflight input by its pipeline name: the table's defaults, then a small tiny-model run.
PREFLIGHT_KNOBS = {name: settings.SETTINGS[name].default for name in preflight.component_spec.inputs
                   if name in settings.SETTINGS} | dict(
    p3_model_name="tiny", p3_model_settings=["model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2"],
    p3_model_max_new_tokens=24, p3_warm_start_warmup_steps=5, p3_warm_start_final_sft_steps=2,
    p3_warm_start_rs_samples=2, p3_warm_start_rs_max_prompts=4, p4_train_max_steps=4, p4_train_lr=1e-3,
    p4_train_meta_interval=2, p4_train_checkpoint_every=2, p4_train_overrides=["eval_every=2"])


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_preflight_resolves_the_run_and_both_configs(tmp_path, tracking_uri):
    report = artifact(dsl.Markdown, tmp_path, "report")
    Path(report.path).parent.mkdir(parents=True)
    out = preflight.python_func(report=report, job_id="job-123", **{
        **PREFLIGHT_KNOBS, "p0_s3_root": str(tmp_path / "s3"), "p6_registry_tracking_uri": tracking_uri})
    assert out.run_id == "job-123"
    assert out.run_root == str(tmp_path / "s3" / "runs" / "job-123")
    train_cfg = json.loads(out.train_config)
    # named knobs, then model_settings, then the stage's overrides
    assert train_cfg["max_steps"] == 4 and train_cfg["eval_every"] == 2 and train_cfg["model"]["tiny_hidden"] == 32
    assert json.loads(out.warm_start_config)["warmup_steps"] == 5
    text = Path(report.path).read_text()
    assert "Preflight: passed" in text and "| s3 | ok |" in text and "| registry | ok |" in text
    assert Path(RunRoot.at(out.run_root).preflight).is_file()


def test_preflight_reports_every_problem_before_failing(tmp_path, tracking_uri):
    report = artifact(dsl.Markdown, tmp_path, "report")
    Path(report.path).parent.mkdir(parents=True)
    knobs = {**PREFLIGHT_KNOBS, "p4_train_mu_init": 0.99, "p3_model_name": str(tmp_path / "no-such-model"),
             "p0_s3_root": str(tmp_path / "s3"), "p0_run_id": "bad id!", "p6_registry_tracking_uri": tracking_uri}
    with pytest.raises(RuntimeError, match="preflight failed") as err:
        preflight.python_func(report=report, job_id="", **knobs)
    assert "mu_init=0.99" in str(err.value) and "run id" in str(err.value) and "no-such-model" in str(err.value)
    assert "p3_model_name" in str(err.value)  # the error names the pipeline parameter
    text = Path(report.path).read_text()
    assert "FAILED" in text and "| config | **failed** |" in text and "| registry | ok |" in text


def test_preflight_sizes_each_gpu_task_pod_for_where_its_processes_run(tmp_path, tracking_uri):
    """Training on 2 processes launches them (a TrainJob on a cluster), so the train task's own pod asks
    for no GPU and a launcher's CPU slice; the warm start (1 process) and evaluation keep the GPU shape."""
    report = artifact(dsl.Markdown, tmp_path, "report")
    Path(report.path).parent.mkdir(parents=True)
    knobs = {**PREFLIGHT_KNOBS, "p0_s3_root": str(tmp_path / "s3"), "p6_registry_tracking_uri": tracking_uri,
             "p0_gpu_count": 2, "p0_gpu_cpu_request": "16", "p0_gpu_memory_request": "64Gi",
             "p4_train_nproc_per_node": 2, "p4_train_distributed_strategy": "ddp"}
    out = preflight.python_func(report=report, job_id="job-pods", **knobs)
    assert (out.train_gpus, out.train_cpu, out.train_memory) == ("0", scale_out.LAUNCHER_CPU, scale_out.LAUNCHER_MEMORY)
    for stage in ("warm_start", "evaluate"):
        assert tuple(getattr(out, f"{stage}_{f}") for f in ("gpus", "cpu", "memory")) == ("2", "16", "64Gi"), stage
    assert "the task's own pod requests no GPU" in Path(report.path).read_text()
    # one process per GPU: more processes per node than the pool's GPUs is refused before anything runs
    with pytest.raises(RuntimeError, match=r"p4_train_nproc_per_node=4 > p0_gpu_count=2"):
        preflight.python_func(report=report, job_id="job-pods-2", **{**knobs, "p4_train_nproc_per_node": 4})
    with pytest.raises(RuntimeError, match=r"p0_trainjob_timeout_h=0: must be a number of hours > 0"):
        preflight.python_func(report=report, job_id="job-pods-3", **{**knobs, "p0_trainjob_timeout_h": 0})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    """prepare_data's python_func on a small generated dataset, publishing to a local run root."""
    tmp = tmp_path_factory.mktemp("prepare")
    run_root = str(tmp / "runs" / "r1")
    dataset, stats = artifact(dsl.Dataset, tmp, "dataset"), artifact(dsl.Metrics, tmp, "stats")
    prepare_data.python_func(dataset=dataset, stats=stats, run_root=run_root, s3_endpoint_url="", train_size=120,
                             val_size=12, test_id_size=12, test_ood_size=12)
    return {"tmp": tmp, "run_root": run_root, "dataset": dataset, "stats": stats}


def test_prepare_data_writes_the_dataset_and_publishes_it(prepared):
    dataset, run_root = prepared["dataset"], Path(prepared["run_root"])
    assert (Path(dataset.path) / "card.json").is_file()
    assert sorted(p.name for p in (run_root / "data").iterdir()) == sorted(p.name for p in Path(dataset.path).iterdir())
    assert prepared["stats"].metadata["rows_train"] == 120
    assert dataset.metadata["rows"]["test_ood"] == 12


@pytest.mark.parametrize("min_train, passed", [(100, True), (10_000, False)])
def test_validate_data_gate(prepared, min_train, passed, tmp_path):
    outs = {name: artifact(cls, tmp_path, name) for name, cls in
            (("report", dsl.HTML), ("report_md", dsl.Markdown), ("stats", dsl.Metrics))}
    for a in outs.values():
        Path(a.path).parent.mkdir(parents=True, exist_ok=True)
    run_root = str(tmp_path / "run")
    # a dict parameter arrives with float numbers from KFP; the component must cope
    result = validate_data.python_func(dataset=prepared["dataset"], run_root=run_root, s3_endpoint_url="",
                                       min_rows={"train": float(min_train), "val": 10.0}, **outs)
    assert result is passed
    gate = json.loads(Path(RunRoot.at(run_root).gate).read_text())
    assert gate["passed"] is passed and (gate["failed_checks"] == []) is passed
    assert "<html" in Path(outs["report"].path).read_text().lower()
    assert (Path(run_root) / "validation" / "report.md").is_file()
    assert outs["stats"].metadata["passed"] == (1.0 if passed else 0.0)


def test_run_summary_survives_an_empty_run_root(tmp_path):
    summary = artifact(dsl.Markdown, tmp_path, "summary")
    Path(summary.path).parent.mkdir(parents=True)
    status = dsl.PipelineTaskFinalStatus(state="FAILED", pipeline_job_resource_name="job", pipeline_task_name="t",
                                         error_code=1, error_message="Task preflight failed.")
    run_summary.python_func(summary=summary, status=status, s3_root=str(tmp_path / "s3"), run_id="", job_id="j1",
                            s3_endpoint_url="")
    text = Path(summary.path).read_text()
    assert "AMFT run j1: FAILED" in text and "Task preflight failed." in text
    written = json.loads(Path(RunRoot.resolve(str(tmp_path / "s3"), "j1").summary).read_text())
    assert written["state"] == "FAILED" and written["stages"] == {}


def test_run_summary_reads_what_the_stages_left(prepared, tmp_path):
    run_root = Path(prepared["run_root"])
    run = RunRoot.at(str(run_root))
    put_json(run.eval_metrics, {
        "blessed": True, "reason": "blessed: ok",
        "test_id": {"accuracy": 0.25, "pass_at_k": 0.5, "n": 12}, "test_ood": {"accuracy": 0.1, "n": 12},
        "comparisons": {"base": {"test_id": {"accuracy": 0.0}}, "warm_start": {"test_id": {"accuracy": 0.125}}}})
    put_json(run.registry, {"registered": True, "name": "amft-gp", "version": "3"})
    Path(run.lineage).write_text("{}")
    summary = summarize_run(str(prepared["tmp"]), "r1", "", "SUCCEEDED")
    assert summary["accuracy"]["final"]["test_id"]["accuracy"] == 0.25
    assert summary["accuracy"]["base"]["test_id"]["accuracy"] == 0.0
    assert summary["stages"]["lineage"]["command"] == "amft lineage amft-gp:3 --verify"
    text = summary_markdown(summary)
    assert "| final | 0.2500 | 0.5000 | 0.1000 |" in text and "amft-gp version 3" in text


def test_configs_reject_unknown_override_keys():
    from amft_lib.config import ConfigError

    with pytest.raises(ConfigError, match=r"controller\.no_such_knob"):
        settings.build_configs({"p4_train_overrides": ["controller.no_such_knob=1"]})
    with pytest.raises(ConfigError, match="p9_nothing"):
        settings.build_configs({"p9_nothing": 1})


def test_stable_header_sorts_dict_defaults():
    text = "# Inputs:\n#    x: dict [Default: {'b': 1.0, 'a': [{'z': 1, 'y': 2}]}]\nroot: {}\n"
    expected = "# Inputs:\n#    x: dict [Default: {'a': [{'y': 2, 'z': 1}], 'b': 1.0}]\nroot: {}\n"
    from pipelines.build import stable_header

    assert stable_header(text) == expected
