"""The whole DAG under kfp.local (SubprocessRunner) against a real SeaweedFS and an MLflow SQLite
registry, with a tiny model (hidden 32, one layer) and a handful of steps per stage.

Four runs, each shared by the tests that read it:
- happy path: every stage succeeds, the model is registered as champion and its lineage verifies;
- the happy path again, same seed, same state dir and registry: the byte-identical model is not blessed,
  no version 2 is added and @champion stays (identity is model content, not a folder listing);
- bad data (through the `amft pipeline run-local` CLI, which starts and stops its own SeaweedFS):
  the validation gate stops the run and no GPU stage runs;
- an impossible blessing threshold plus a warm-start and a training task that each SIGKILL
  themselves once after their first checkpoint: KFP's retry brings them back, they resume from the
  checkpoint (the warm start ends bitwise where the happy path's did), and the unblessed model is
  not registered.
"""

from __future__ import annotations

import json
import os
import shlex
import uuid
from pathlib import Path

import pytest

from amft_lib import cli, lineage, registry, storage
from amft_lib.run.stages import FAULT_ENV, WARM_START_FAULT_ENV
from amft_lib.s3server import EmbeddedS3
from pipelines import local as pc
from pipelines.profiles import TEST

pytestmark = [pytest.mark.s3, pytest.mark.slow]

TRAIN_STEPS = TEST["p4_train_max_steps"]
TINY = TEST


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory) -> str:
    """One SQLite registry for the module (its schema takes seconds to create); runs use distinct names."""
    return f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"


def run_pipeline(state_dir: Path, s3_server: EmbeddedS3, registry_uri: str | None, **overrides) -> pc.LocalRun:
    """One run; `registry_uri` None keeps run-local's own registry in the state dir (as the demo does)."""
    run_id = f"t-{uuid.uuid4().hex[:8]}"
    arguments = {**TINY, "p0_run_id": run_id, "p0_s3_root": s3_server.settings.uri("tests", "pipeline"),
                 "p6_registry_model_name": f"gp-{run_id}", **overrides}
    if registry_uri:
        arguments["p6_registry_tracking_uri"] = registry_uri
    return pc.run_local(state_dir, arguments, s3_settings=s3_server.settings, threads=1)


@pytest.fixture(scope="module")
def happy(tmp_path_factory, s3_server) -> pc.LocalRun:
    return run_pipeline(tmp_path_factory.mktemp("happy"), s3_server, None)


@pytest.fixture(scope="module")
def unblessed_and_killed(tmp_path_factory, s3_server, registry_uri) -> pc.LocalRun:
    os.environ[FAULT_ENV] = "1"  # the tasks inherit it; only the train task acts on it
    os.environ[WARM_START_FAULT_ENV] = "1"  # and this one only the warm-start task
    try:
        return run_pipeline(tmp_path_factory.mktemp("killed"), s3_server, registry_uri, p5_eval_threshold=1.0)
    finally:
        del os.environ[FAULT_ENV], os.environ[WARM_START_FAULT_ENV]


def stage_states(run: pc.LocalRun) -> dict[str, str]:
    return {name: task["status"] for name, task in run.tasks.items()}


def read_json(uri: str) -> dict:
    return json.loads(storage.get_bytes(uri))


# ── happy path ──────────────────────────────────────────────────────────────────────────────────


def test_happy_path_runs_every_stage_once(happy):
    assert happy.state == "SUCCEEDED", happy.error
    assert stage_states(happy) == {name: "SUCCESS" for name in (
        "preflight", "prepare-data", "validate-data", "warm-start", "train", "evaluate", "register", "run-summary")}
    assert all(task["attempts"] == 1 for task in happy.tasks.values())


def test_happy_path_registers_the_champion_with_a_verifiable_lineage(happy, s3):
    reg = happy.summary["stages"]["register"]
    assert reg["registered"] is True and reg["version"] == "1"
    ref = registry.resolve(f"{reg['name']}@champion", happy.tracking_uri)
    assert ref.version == "1" and ref.tags[registry.RUN_ID_TAG] == happy.summary["run_id"]
    record = lineage.read_lineage(ref.tags[registry.LINEAGE_TAG])
    assert record["registry"]["version"] == "1" and record["validation"]["passed"] is True
    assert record["base_model"]["id"] == "tiny" and record["base_model"]["sha256"]
    assert len(record["checkpoints"]) >= 1
    assert record["mu_summary"]["final"] == pytest.approx(happy.summary["stages"]["train"]["mu_final"])
    assert lineage.verify_lineage(record) == []
    # the command the summary (and run-local's closing print) shows works exactly as printed
    command = happy.summary["stages"]["lineage"]["command"]
    assert command.startswith(f"amft lineage {reg['name']}:1 --state-dir ") and command.endswith(" --verify")
    assert command in pc.local_report(happy, happy.pipeline_root.parent.parent)
    assert cli.main(shlex.split(command)[1:]) == 0


def test_training_params_and_curves_are_in_mlflow(happy):
    """One MLflow run per pipeline run, the train stage nested in it with the config as params and one
    point per training step of every curve (what TRL users get from report_to="mlflow")."""
    from amft_lib import tracking

    client = registry.get_client(happy.tracking_uri)
    exp = client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    run_id = happy.summary["run_id"]
    (train_run,) = client.search_runs([exp], filter_string=f"tags.`amft.run_id` = '{run_id}' and "
                                      "tags.`amft.stage` = 'train'")
    assert train_run.info.status == "FINISHED"
    assert train_run.data.tags["mlflow.parentRunId"] == tracking.pipeline_run(client, run_id)
    assert train_run.data.params["max_steps"] == str(TRAIN_STEPS) and "controller.mu_init" in train_run.data.params
    for curve in ("mu", "entropy", "sft_loss", "reward_mean"):
        assert [m.step for m in client.get_metric_history(train_run.info.run_id, curve)] == list(range(TRAIN_STEPS))


def test_happy_path_leaves_the_documented_s3_layout(happy, s3):
    root = happy.summary["run_root"]
    for rel in ("data/card.json", "validation/report.md", "validation/gate.json", "warm_start/stats.json",
                "warm_start/model/config.json", "base_model/config.json", "train/metrics.jsonl",
                "train/result.json", "model/config.json", "checkpoints/LATEST", "eval/metrics.json",
                "eval/report.html", "lineage.json", "registry.json", "summary.json"):
        assert storage.exists(storage.join(root, rel)), rel
    stored = read_json(storage.join(root, "summary.json"))  # written by the exit handler
    assert stored["state"] == "SUCCEEDED"
    assert set(stored["accuracy"]) >= {"base", "warm_start", "final"}
    steps = [json.loads(line)["step"] for line in storage.get_bytes(storage.join(root, "train/metrics.jsonl"))
             .decode().splitlines() if not json.loads(line).get("final")]
    assert steps == list(range(TRAIN_STEPS))


def test_no_credentials_in_task_outputs_or_summaries(happy, s3):
    """Keys reach the tasks through the environment only: not as parameters, not in any output."""
    secret = s3.secret_access_key
    for path in happy.pipeline_root.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            assert secret.encode() not in path.read_bytes(), path
    text = pc.local_report(happy, happy.pipeline_root.parent.parent)
    assert secret not in text and secret not in json.dumps(happy.summary)
    assert secret.encode() not in storage.get_bytes(storage.join(happy.summary["run_root"], "lineage.json"))


def test_a_same_seed_rerun_adds_no_version_and_keeps_the_champion(happy, s3_server):
    """The rerun trains byte-identical weights; its evaluation stages the candidate from S3 (the staged copy
    carries `.amft-source.json`) and downloads the champion from MLflow (re-saved by save_pretrained), so the
    folders' listings differ while the models do not (issue 21: this used to add version 2)."""
    name = happy.summary["stages"]["register"]["name"]
    again = run_pipeline(happy.pipeline_root.parent.parent, s3_server, None, p6_registry_model_name=name)
    assert again.state == "SUCCEEDED", again.error
    stages = again.summary["stages"]
    assert stages["eval"]["blessed"] is False and "identical to the champion" in stages["eval"]["reason"], stages
    assert not (stages.get("register") or {}).get("registered"), stages  # the register step is skipped
    versions = registry.get_client(happy.tracking_uri).search_model_versions(f"name = '{name}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert registry.resolve(f"{name}@champion", happy.tracking_uri).version == "1"


# ── bad data: the gate stops the run before any GPU stage ─────────────────────────────────────────


def test_bad_data_stops_at_the_gate_and_services_stop(tmp_path, capsys, monkeypatch):
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    state = tmp_path / "state"
    settings = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in TINY.items()]
    # 20 training rows against the suite's minimum of 100: the dataset breaks the contract
    settings += ["p1_data_train_size=20", "p0_run_id=bad-data", "p0_s3_root=s3://amft/local"]
    code = cli.main(["pipeline", "run-local", "--state-dir", str(state), "--profile", "default", "--threads", "1",
                     *[arg for s in settings for arg in ("--set", s)]])
    out = capsys.readouterr().out
    assert code == 1
    report = out[out.index("AMFT local pipeline run"):]
    assert "FAILED" in report and "validation gate: FAILED" in report
    for line in ("warm-start      not run", "train           not run", "register        not run"):
        assert line in report
    assert "stop-run        FAILURE" in report and "run-summary     SUCCESS" in report
    # run-local stopped its SeaweedFS; the data survives a restart and tells the same story
    server = EmbeddedS3(state / "s3")
    settings_ = server.start()
    try:
        for key, value in settings_.env().items():
            monkeypatch.setenv(key, value)
        root = "s3://amft/local/runs/bad-data"
        gate = read_json(f"{root}/validation/gate.json")
        assert gate["passed"] is False and gate["failed_checks"]
        assert storage.exists(f"{root}/validation/report.html")
        assert not storage.list_prefix(f"{root}/warm_start") and not storage.list_prefix(f"{root}/checkpoints")
        assert read_json(f"{root}/summary.json")["state"] == "FAILED"
    finally:
        server.stop()


# ── a killed training task resumes; an unblessed model is not registered ────────────────────────


def test_killed_training_task_is_retried_and_resumes_from_its_checkpoint(unblessed_and_killed, s3):
    run = unblessed_and_killed
    assert run.tasks["train"]["attempts"] == 2 and run.tasks["train"]["status"] == "SUCCESS"
    root = run.summary["run_root"]
    assert storage.exists(storage.join(root, "faults/train-killed"))
    result = read_json(storage.join(root, "train/result.json"))
    assert 0 < result["resumed_from_step"] < TRAIN_STEPS and result["steps"] == TRAIN_STEPS
    # the resumed run's log holds every step exactly once (cut at the checkpoint, then continued)
    records = [json.loads(line) for line in storage.get_bytes(storage.join(root, "train/metrics.jsonl"))
               .decode().splitlines()]
    assert [r["step"] for r in records if not r.get("final")] == list(range(TRAIN_STEPS))


def test_killed_warm_start_task_is_retried_and_ends_bitwise_where_the_uninterrupted_one_did(
        unblessed_and_killed, happy, s3):
    run = unblessed_and_killed
    assert run.tasks["warm-start"]["attempts"] == 2 and run.tasks["warm-start"]["status"] == "SUCCESS"
    root, happy_root = run.summary["run_root"], happy.summary["run_root"]
    assert storage.exists(storage.join(root, "faults/warm-start-killed"))
    assert storage.exists(storage.join(root, "warm_start/checkpoints/LATEST"))
    # same data, seed and settings as the happy path's warm start, which was never interrupted
    for rel in ("warm_start/model/model.safetensors", "warm_start/accepted.parquet", "warm_start/sft_history.jsonl"):
        assert storage.get_bytes(storage.join(root, rel)) == storage.get_bytes(storage.join(happy_root, rel)), rel
    stats, happy_stats = read_json(storage.join(root, "warm_start/stats.json")), read_json(
        storage.join(happy_root, "warm_start/stats.json"))
    assert {**stats, "elapsed_s": 0} == {**happy_stats, "elapsed_s": 0}


def test_unblessed_model_is_not_registered(unblessed_and_killed, registry_uri):
    run = unblessed_and_killed
    assert run.state == "SUCCEEDED", run.error  # not blessed is an outcome, not a failure
    assert "register" not in run.tasks and "register" not in run.summary["stages"]
    assert run.summary["stages"]["eval"]["blessed"] is False
    assert "below the threshold 1.0000" in run.summary["stages"]["eval"]["reason"]
    name = f"gp-{run.summary['run_id']}"
    with pytest.raises(LookupError):
        registry.resolve(f"{name}@champion", registry_uri)
    with pytest.raises(LookupError):
        registry.resolve(name, registry_uri)
