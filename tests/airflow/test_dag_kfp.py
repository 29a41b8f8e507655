"""The retraining DAG against a FAKE KFP API server (fake_kfp.py: a real KFP API server needs a
Kubernetes cluster, which cannot run here) and a REAL SeaweedFS, through Airflow's dag.test().

What is real: Airflow 3 (scheduler loop of dag.test, retries, sensor reschedules, XCom, Connections
from AIRFLOW_CONN_*), kfp.Client 2.17.3 and its REST client, the compiled pipeline YAML it sends,
boto3 against SeaweedFS with auth on. What the fake stands in for: the KFP API server, and the
pipeline's exit handler writing summary.json (the fake writes it when a run finishes).
"""

import json
import time

import pytest
from conftest import run_dag
from fake_kfp import Outcome

pytestmark = pytest.mark.s3


def write_summary(s3_client, *, registered: bool = True):
    """What the pipeline's exit handler does when the run ends: summary.json under the run root."""

    def on_finish(run: dict) -> None:
        params = run["runtime_config"]["parameters"]
        run_root = f"{params['p0_s3_root']}/runs/{params['p0_run_id']}"
        stages = {"eval": {"blessed": registered, "reason": "blessed: test_id.accuracy=0.41 ≥ 0.0"}}
        if registered:
            stages["register"] = {"registered": True, "name": "amft-gp", "version": "7"}
            stages["lineage"] = {"uri": f"{run_root}/lineage.json", "command": "amft lineage amft-gp:7 --verify"}
        summary = {"run_id": params["p0_run_id"], "run_root": run_root, "state": run["state"],
                   "error": "" if run["state"] == "SUCCEEDED" else "validate-data failed", "stages": stages,
                   "accuracy": {"final": {"test_id": {"accuracy": 0.41}}}}
        bucket, _, key = f"{run_root}/summary.json"[5:].partition("/")
        s3_client.put_object(Bucket=bucket, Key=key, Body=json.dumps(summary).encode())

    return on_finish


def test_submits_once_and_puts_the_summary_in_xcom(test_dags, fake, s3_connection, s3_client, root, capfd,
                                                   monkeypatch):
    fake.on_finish = write_summary(s3_client)
    # platform-wide values in the Variable; the run's Params win over them
    monkeypatch.setenv("AIRFLOW_VAR_AMFT_PIPELINE_PARAMS", json.dumps({"p4_train_max_steps": 10,
                                                                       "p6_registry_model_name": "amft-gp"}))
    state, tasks, xcoms = run_dag(test_dags["amft_test_kfp"], {"p0_s3_root": root, "p4_train_max_steps": 50})

    assert state == "success", tasks
    assert len(fake.created()) == 1
    handle = xcoms["submit"]["return_value"]
    assert handle["name"].startswith("amft_test_kfp-manual__") and handle["attached"] is False
    body = fake.created()[0]["body"]
    assert body["display_name"] == handle["name"]
    # the compiled package, sent as kfp sends a spec with a platform part (secrets, GPU settings)
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "amft-pipeline"
    assert "platform_spec" in body["pipeline_spec"]
    # Params reach the run under their pipeline names; the run id (S3 folder) is the run name.
    assert body["runtime_config"]["parameters"] == {"p0_s3_root": root, "p4_train_max_steps": 50,
                                                    "p6_registry_model_name": "amft-gp", "p0_run_id": handle["name"]}
    summary = xcoms["run_summary"]
    assert summary["registered_version"] == "7" and summary["blessed"] is True
    assert summary["return_value"]["registered_version"] == "7"
    assert summary["lineage_uri"] == f"{root}/runs/{handle['name']}/lineage.json"
    assert summary["return_value"]["state"] == "SUCCEEDED"
    # The token went to the server as a bearer header on every call, and nowhere else.
    assert fake.requests and all(r["bearer_ok"] for r in fake.requests)
    out = capfd.readouterr()
    logs = out.out + out.err
    assert fake.token not in logs and s3_connection["AWS_SECRET_ACCESS_KEY"] not in logs
    assert fake.token not in json.dumps(xcoms)


def test_retry_reattaches_instead_of_submitting_twice(test_dags, fake, s3_connection, s3_client, root, capfd):
    # The API stores the run and then times out (503) on the create; the next GET of the run fails
    # too. Airflow retries `submit` (finds the run by name) and the sensor (keeps polling it).
    fake.fail_create_after_storing = 1
    fake.fail_get = 1
    fake.on_finish = write_summary(s3_client)
    state, tasks, xcoms = run_dag(test_dags["amft_test_kfp"], {"p0_s3_root": root})

    assert state == "success", tasks
    assert len(fake.created()) == 1 and len(fake.runs) == 1
    handle = xcoms["submit"]["return_value"]
    assert handle["attached"] is True and handle["kfp_run_id"] == next(iter(fake.runs))
    assert xcoms["run_summary"]["return_value"]["registered_version"] == "7"
    logs = "".join(capfd.readouterr())
    assert "503" in logs and fake.token not in logs  # the failed try's error is logged, the token is not


def test_failed_run_fails_the_dag_with_its_reason(test_dags, fake, s3_connection, s3_client, root, capfd):
    fake.outcome = Outcome(script=["RUNNING", "FAILED"], failed_task="validate-data",
                           task_error="validation gate failed: 2 of 14 expectations (min_rows train=3 < 100)")
    fake.on_finish = write_summary(s3_client, registered=False)
    state, tasks, xcoms = run_dag(test_dags["amft_test_kfp"], {"p0_s3_root": root})

    assert state == "failed"
    assert tasks["run_summary"] == "failed" and tasks["wait_for_run"] == "success"
    assert len(fake.created()) == 1  # a failed run is not resubmitted unless resubmit_failed is set
    assert xcoms["run_summary"]["state"] == "FAILED" and xcoms["run_summary"]["registered_version"] is None
    logs = "".join(capfd.readouterr())
    assert "ended FAILED: task validate-data: validation gate failed: 2 of 14 expectations" in logs


def test_skips_when_no_new_data_since_the_last_successful_run(test_dags, fake, s3_connection, s3_client, root):
    fake.on_finish = write_summary(s3_client)
    prefix = f"{root}/incoming/"
    bucket, _, key = prefix[5:].partition("/")
    s3_client.put_object(Bucket=bucket, Key=key + "batch-1.jsonl", Body=b'{"prompt": "1 2 3 4"}\n')
    # S3 keeps LastModified to the second and an object of the watermark's second counts as new (an
    # extra run rather than a missed batch): let the next run start in a later second
    time.sleep(1.1)
    conf = {"p0_s3_root": root, "data_prefix": prefix}

    state, tasks, xcoms = run_dag(test_dags["amft_test_kfp"], conf)  # new object since any earlier success
    assert state == "success" and tasks["run_summary"] == "success"
    assert xcoms["check_new_data"]["return_value"]["new"] == 1
    assert len(fake.created()) == 1

    state, tasks, _ = run_dag(test_dags["amft_test_kfp"], conf)  # nothing new since the run above
    assert state == "success"
    assert {tasks[t] for t in ("submit", "wait_for_run", "run_summary")} == {"skipped"}
    assert len(fake.created()) == 1

    s3_client.put_object(Bucket=bucket, Key=key + "batch-2.jsonl", Body=b'{"prompt": "5 6 7 8"}\n')
    state, tasks, xcoms = run_dag(test_dags["amft_test_kfp"], conf)
    assert state == "success" and tasks["run_summary"] == "success"
    assert xcoms["check_new_data"]["return_value"]["new"] == 1  # batch-2 only
    assert len(fake.created()) == 2

    state, tasks, _ = run_dag(test_dags["amft_test_kfp"], {**conf, "skip_if_no_new_data": False})
    assert state == "success" and tasks["submit"] == "success" and len(fake.created()) == 3


def test_resubmit_failed_creates_a_new_run_only_when_asked(fake):
    """submit_or_attach through the real kfp.Client: a run of this name that ended FAILED is
    re-attached by default (the DAG then fails with its reason); with resubmit_failed a new run of
    the same name is created (same p0_run_id, so training resumes from the failed run's checkpoints)."""
    import amft_kfp
    from conftest import REPO

    client = amft_kfp.kfp_client(amft_kfp.KfpTarget(host=fake.url, token=fake.token))
    package = REPO / "pipelines" / "amft_pipeline.yaml"
    fake.outcome = Outcome(script=["FAILED"], error="OOMKilled")
    first = amft_kfp.submit_or_attach(client, name="r1", package=package, arguments={"p0_run_id": "r1"},
                                      experiment="amft")
    assert not first.attached and client.get_run(first.run_id).state == "FAILED"
    again = amft_kfp.submit_or_attach(client, name="r1", package=package, arguments={}, experiment="amft")
    assert again.attached and again.run_id == first.run_id and again.state == "FAILED"
    assert amft_kfp.failure_reason(client.get_run(first.run_id)) == "OOMKilled"
    fresh = amft_kfp.submit_or_attach(client, name="r1", package=package, arguments={"p0_run_id": "r1"},
                                      experiment="amft", resubmit_failed=True)
    assert not fresh.attached and fresh.run_id != first.run_id and len(fake.created()) == 2
    # the newest run of the name is the one a later retry attaches to
    assert amft_kfp.submit_or_attach(client, name="r1", package=package, arguments={},
                                     experiment="amft").run_id == fresh.run_id
