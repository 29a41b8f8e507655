"""Local mode, end to end and offline: dag.test() of the retraining DAG whose submit step runs
`amft pipeline run-local` (the real kfp.local run of every stage on an embedded SeaweedFS and an
MLflow SQLite registry, from the project venv) with the `test` profile of pipelines/profiles.py. The
run ends with the registered model version in XCom.
"""

import importlib.util
import uuid

import pytest
from conftest import MAIN_VENV_BIN, REPO, run_dag

_spec = importlib.util.spec_from_file_location("amft_profiles", REPO / "pipelines" / "profiles.py")
_profiles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_profiles)

pytestmark = [pytest.mark.slow, pytest.mark.s3]

# The `test` profile of `amft pipeline run-local` (whole pipeline in about a minute), blessed at threshold 0
# (the local profile's 0.01 would leave a tiny model unblessed). pipelines/profiles.py imports nothing else.
TINY = {**_profiles.TEST, "p5_eval_threshold": 0.0}


def test_local_mode_runs_the_whole_pipeline_and_puts_the_registered_version_in_xcom(test_dags, tmp_path):
    model = f"gp-airflow-{uuid.uuid4().hex[:6]}"
    conf = {**TINY, "p6_registry_model_name": model, "local_state_dir": str(tmp_path / "state"),
            "amft_bin": str(MAIN_VENV_BIN / "amft"), "local_threads": 1}
    state, tasks, xcoms = run_dag(test_dags["amft_test_local"], conf)

    assert state == "success", tasks
    summary = xcoms["run_summary"]["return_value"]
    assert summary["state"] == "SUCCEEDED" and summary["blessed"] is True
    assert summary["registered"] is True and summary["registered_name"] == model
    assert summary["registered_version"] == "1"  # a fresh model name: its first version
    assert xcoms["run_summary"]["registered_version"] == "1"
    run_name = xcoms["submit"]["return_value"]["name"]
    assert summary["amft_run_id"] == run_name  # p0_run_id = the name derived from the Airflow run
    assert summary["lineage_uri"] == f"s3://amft/local/runs/{run_name}/lineage.json"
    assert (tmp_path / "state" / "airflow-records" / f"{run_name}.json").exists()


STUB = """#!/usr/bin/env python3
# Stands in for `amft` in the fast tests: counts its calls, writes the run record it is told to.
import json, os, sys
args = sys.argv[1:]
record = args[args.index("--record") + 1]
params = json.load(open(args[args.index("--params-file") + 1]))
with open(os.environ["STUB_CALLS"], "a") as fh:
    fh.write(json.dumps(params) + "\\n")
state = os.environ["STUB_STATE"]
json.dump({"state": state, "error": "" if state == "SUCCEEDED" else "Task 'validate-data' failed: gate failed",
           "summary": {"run_id": params["p0_run_id"], "stages": {}}}, open(record, "w"))
sys.exit(0 if state == "SUCCEEDED" else 1)
"""


def test_local_record_reattach_and_failure(tmp_path, monkeypatch):
    """run_local re-attaches to a SUCCEEDED record (no second run) and re-runs after a FAILED one;
    a stub stands in for `amft` here (the real run is the test above)."""
    import json

    import amft_kfp

    stub = tmp_path / "amft"
    stub.write_text(STUB)
    stub.chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("STUB_CALLS", str(calls))
    record = tmp_path / "state" / "airflow-records" / "r1.json"
    monkeypatch.setenv("STUB_STATE", "FAILED")
    done = amft_kfp.run_local(str(stub), tmp_path / "state", {"p0_run_id": "r1"}, record)
    assert done["state"] == "FAILED" and "gate failed" in done["error"]
    monkeypatch.setenv("STUB_STATE", "SUCCEEDED")
    assert amft_kfp.run_local(str(stub), tmp_path / "state", {"p0_run_id": "r1"}, record)["state"] == "SUCCEEDED"
    assert amft_kfp.run_local(str(stub), tmp_path / "state", {"p0_run_id": "r1"}, record)["state"] == "SUCCEEDED"
    assert [json.loads(line) for line in calls.read_text().splitlines()] == [{"p0_run_id": "r1"}] * 2
    assert not list(record.parent.glob(".params-*"))  # the params file is removed after the run


def test_local_failed_run_fails_the_dag_with_its_error(test_dags, tmp_path, monkeypatch, capfd):
    stub = tmp_path / "amft"
    stub.write_text(STUB)
    stub.chmod(0o755)
    monkeypatch.setenv("STUB_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("STUB_STATE", "FAILED")
    state, tasks, xcoms = run_dag(test_dags["amft_test_local"],
                                  {"amft_bin": str(stub), "local_state_dir": str(tmp_path / "state")})
    assert state == "failed" and tasks["run_summary"] == "failed" and tasks["submit"] == "success"
    assert xcoms["run_summary"]["state"] == "FAILED"
    assert "ended FAILED: Task 'validate-data' failed: gate failed" in "".join(capfd.readouterr())
