"""The deferrable wait, the timeout and the approval gate, through Airflow's dag.test() against the
FAKE KFP API server (fake_kfp.py; a real one needs Kubernetes) with REAL SeaweedFS, a REAL MLflow
tracking server on SQLite (the approval moves its @champion) and Airflow's own HITL response handler
(the function behind the Required Actions UI and the HITL REST API) giving the human's answer.

dag.test() runs a deferred task's trigger inline and keeps the task instance QUEUED meanwhile (a real
deployment shows DEFERRED); either way no task instance is RUNNING — holding a worker slot — while
the KFP run is."""

import asyncio
import json
import threading
import time
import uuid

import pytest
import requests
from conftest import run_dag
from fake_kfp import Outcome

pytestmark = pytest.mark.s3


def write_summary(s3_client, name: str = "amft-gp", version: str = "7", alias: str = "champion"):
    """What the pipeline's exit handler writes when the run ends (summary.json under the run root)."""

    def on_finish(run: dict) -> None:
        params = run["runtime_config"]["parameters"]
        run_root = f"{params['p0_s3_root']}/runs/{params['p0_run_id']}"
        summary = {"run_id": params["p0_run_id"], "run_root": run_root, "state": run["state"], "error": "",
                   "stages": {"eval": {"blessed": True, "reason": "blessed: test_id.accuracy=0.41 ≥ 0.0"},
                              "register": {"registered": True, "name": name, "version": version, "alias": alias,
                                           "logged_model_id": "m-0123abcd"}},
                   "accuracy": {"final": {"test_id": {"accuracy": 0.41}}}}
        bucket, _, key = f"{run_root}/summary.json"[5:].partition("/")
        s3_client.put_object(Bucket=bucket, Key=key, Body=json.dumps(summary).encode())

    return on_finish


def ti_states(dag_id: str) -> dict[str, str]:
    """{task_id: state} of the DAG's newest run, read from Airflow's database."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == dag_id).all()
        newest = max((ti.run_id for ti in tis), default=None)
        return {ti.task_id: str(ti.state) for ti in tis if ti.run_id == newest}


def test_waiting_holds_no_worker_slot(test_dags, fake, s3_connection, s3_client, root):
    """While the KFP run is RUNNING (every GET the trigger makes), no task instance is running."""
    seen: list[dict[str, str]] = []
    fake.outcome = Outcome(script=["RUNNING"] * 4 + ["SUCCEEDED"])
    fake.on_finish = write_summary(s3_client)
    fake.on_get = lambda run: seen.append(ti_states("amft_test_kfp")) if run["state"] == "RUNNING" else None
    state, tasks, xcoms = run_dag(test_dags["amft_test_kfp"], {"p0_s3_root": root})

    assert state == "success", tasks
    assert len(seen) == 4  # polled while RUNNING, then saw SUCCEEDED
    for snapshot in seen:
        assert "running" not in snapshot.values(), snapshot
        assert snapshot["wait_for_run"] in ("deferred", "queued"), snapshot  # dag.test parks it QUEUED
        assert snapshot["submit"] == "success"  # the run id was in XCom before the wait deferred
    assert xcoms["wait_for_run"]["return_value"] == {"state": "SUCCEEDED", "reason": ""}
    assert fake.terminated() == []


def test_the_trigger_reattaches_from_what_airflow_stores(fake):
    """After a triggerer or scheduler restart Airflow rebuilds the trigger from its stored classpath and
    kwargs: rebuilt that way it polls the same run to its end; the stored kwargs hold no token."""
    import amft_kfp
    import amft_kfp_wait
    from airflow.sdk._shared.module_loading import import_string

    client = amft_kfp.kfp_client(amft_kfp.KfpTarget(host=fake.url, token=fake.token))
    fake.outcome = Outcome(script=["RUNNING", "RUNNING", "FAILED"], error="OOMKilled")
    run = amft_kfp.submit_or_attach(client, name="r-reattach", package=amft_kfp_wait.Path(
        __file__).resolve().parents[2] / "pipelines" / "amft_pipeline.yaml", arguments={}, experiment="amft")
    classpath, kwargs = amft_kfp_wait.KfpRunTrigger(run.run_id, "amft_kfp", 0.05, time.time() + 60,
                                                    "r-reattach").serialize()
    assert fake.token not in json.dumps(kwargs)
    rebuilt = import_string(classpath)(**kwargs)

    async def first_event():
        async for event in rebuilt.run():
            return event.payload

    assert asyncio.run(first_event()) == {"status": "done", "state": "FAILED", "reason": "OOMKilled"}


def _running_run(fake, name: str) -> str:
    import amft_kfp
    import amft_kfp_wait

    client = amft_kfp.kfp_client(amft_kfp.KfpTarget(host=fake.url, token=fake.token))
    fake.outcome = Outcome(script=["RUNNING"])  # runs until someone stops it
    return amft_kfp.submit_or_attach(client, name=name, package=amft_kfp_wait.Path(__file__).resolve().parents[2]
                                     / "pipelines" / "amft_pipeline.yaml", arguments={}, experiment="amft").run_id


def _in_the_triggerer(trigger, how: str) -> None:
    """Run `trigger` in Airflow's own TriggerRunner.run_trigger (the triggerer's code path) and stop it the way
    the triggerer does: "user" = a person acted on the task (cancel_triggers, Airflow's user-action message);
    "shutdown" = the triggerer stops or hands the trigger to another one (a plain cancel)."""
    from airflow.jobs.triggerer_job_runner import TriggerRunner

    async def main() -> None:
        runner = TriggerRunner()
        runner.triggers[1] = {"name": "wait", "events": 0}
        task = asyncio.create_task(runner.run_trigger(1, trigger))
        runner.triggers[1]["task"] = task
        await asyncio.sleep(0.3)  # polling
        if how == "user":
            runner.to_cancel.append(1)
            await runner.cancel_triggers()
        else:
            task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


@pytest.mark.parametrize(("how", "setting", "terminated"),
                         [("user", True, True), ("shutdown", True, False), ("user", False, False)])
def test_a_person_stopping_the_wait_terminates_the_run_but_a_triggerer_restart_does_not(fake, monkeypatch, how,
                                                                                        setting, terminated):
    """on_kill: marking the waiting task failed / succeeded, clearing it or failing its DAG run stops the GPUs;
    a triggerer restart or redistribution must not (the trigger is rebuilt elsewhere and re-attaches), and
    terminate_on_kill=False keeps the run going."""
    import amft_kfp_wait

    monkeypatch.setenv("AIRFLOW_DISABLE_GREENBACK_PORTAL", "true")
    run_id = _running_run(fake, f"r-kill-{how}-{setting}")
    trigger = amft_kfp_wait.KfpRunTrigger(run_id, "amft_kfp", 0.05, time.time() + 60, "r", terminate_on_kill=setting)
    assert trigger.serialize()[1]["terminate_on_kill"] is setting  # survives a triggerer restart
    _in_the_triggerer(trigger, how)
    assert fake.terminated() == ([run_id] if terminated else [])
    if terminated:  # once more, on a run that already ended: nothing to terminate
        asyncio.run(trigger.on_kill())
        assert fake.terminated() == [run_id]


def test_timeout_terminates_the_kfp_run(test_dags, fake, s3_connection, s3_client, root, capfd):
    fake.outcome = Outcome(script=["RUNNING"])  # runs until someone stops it
    state, tasks, _ = run_dag(test_dags["amft_test_kfp_timeout"], {"p0_s3_root": root})

    assert state == "failed"
    assert tasks["wait_for_run"] == "failed" and tasks["run_summary"] == "upstream_failed"
    (run_id,) = fake.runs
    assert fake.terminated() == [run_id]  # once: the failure is final, not retried into a second terminate
    import amft_kfp

    client = amft_kfp.kfp_client(amft_kfp.KfpTarget(host=fake.url, token=fake.token))
    assert client.get_run(run_id).state == "CANCELED"  # what the server reports once its pods stopped
    logs = "".join(capfd.readouterr())
    assert "did not finish within 2 s of its submission (it was RUNNING); terminated it" in logs


# ── the approval gate ─────────────────────────────────────────────────────────────────────────────


def _mlflow(url: str, method: str, path: str, **kw) -> dict:
    resp = requests.request(method, f"{url}/api/2.0/mlflow/{path}", timeout=30, **kw)
    resp.raise_for_status()
    return resp.json()


def registry_with_candidate(url: str, name: str) -> None:
    """What two pipeline runs leave in the registry: version 1 @champion, version 2 @candidate."""
    _mlflow(url, "POST", "registered-models/create", json={"name": name})
    for _ in range(2):
        _mlflow(url, "POST", "model-versions/create", json={"name": name, "source": "s3://amft/models/x"})
    _mlflow(url, "POST", "registered-models/alias", json={"name": name, "alias": "champion", "version": "1"})
    _mlflow(url, "POST", "registered-models/alias", json={"name": name, "alias": "candidate", "version": "2"})


def champion(url: str, name: str) -> str:
    return _mlflow(url, "GET", "registered-models/alias", params={"name": name, "alias": "champion"})[
        "model_version"]["version"]


def answer_when_asked(dag_id: str, option: str, asked: list, errors: list) -> threading.Thread:
    """A reviewer: waits until the approval task awaits input, then answers through Airflow's own HITL
    response handler (what the Required Actions UI calls). If that fails, the waiting task is failed so
    dag.test() (which waits for a human forever) ends and the test reports the error."""
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.api_fastapi.core_api.datamodels.hitl import UpdateHITLDetailPayload
    from airflow.api_fastapi.core_api.routes.public.hitl import update_hitl_detail
    from airflow.models.hitl import HITLDetail
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    def waiting(session):
        return session.query(TaskInstance).filter(TaskInstance.dag_id == dag_id,
                                                  TaskInstance.task_id == "approve_champion",
                                                  TaskInstance.state == "awaiting_input").first()

    def reviewer() -> None:
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                with create_session() as session:
                    ti = waiting(session)
                    if ti is not None:
                        asked.append(session.query(HITLDetail).filter(HITLDetail.ti_id == ti.id).one().subject)
                        update_hitl_detail(dag_id=dag_id, dag_run_id=ti.run_id, task_id="approve_champion",
                                           update_hitl_detail_payload=UpdateHITLDetailPayload(
                                               chosen_options=[option]),
                                           user=SimpleAuthManagerUser(username="reviewer", role="admin"),
                                           session=session)
                        return
                time.sleep(0.3)
            raise TimeoutError("approve_champion never asked for input")
        except BaseException as exc:
            errors.append(exc)
            with create_session() as session:
                ti = waiting(session)
                if ti is not None:
                    ti.state = "failed"

    thread = threading.Thread(target=reviewer, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("option", "moved"), [("Approve", True), ("Reject", False)])
def test_approval_gates_the_champion(test_dags, fake, s3_connection, s3_client, root, mlflow_server, monkeypatch,
                                     option, moved):
    name = f"amft-gp-{option.lower()}-{uuid.uuid4().hex[:6]}"
    registry_with_candidate(mlflow_server, name)
    monkeypatch.setenv("AIRFLOW_CONN_AMFT_MLFLOW", json.dumps({"conn_type": "http", "host": mlflow_server}))
    fake.on_finish = write_summary(s3_client, name=name, version="2", alias="candidate")
    asked: list = []
    errors: list = []
    reviewer = answer_when_asked("amft_test_kfp_approval", option, asked, errors)
    state, tasks, xcoms = run_dag(test_dags["amft_test_kfp_approval"], {"p0_s3_root": root})
    reviewer.join(timeout=5)
    assert errors == []

    assert state == "success", tasks
    # the pipeline was asked to register under the candidate alias, leaving @champion to the approval
    assert fake.created()[0]["body"]["runtime_config"]["parameters"]["p6_registry_alias"] == "candidate"
    assert asked == [f"AMFT: make {name} version 2 the champion?"]
    assert tasks["approve_champion"] == "success"
    if moved:
        assert tasks["promote_champion"] == "success"
        assert xcoms["promote_champion"]["return_value"] == {"moved": True, "previous": 1, "version": 2}
        assert champion(mlflow_server, name) == "2"
    else:
        assert tasks["promote_champion"] == "skipped"
        assert champion(mlflow_server, name) == "1"


def test_no_approval_is_asked_when_nothing_was_registered(test_dags, fake, s3_connection, s3_client, root):
    def not_blessed(run: dict) -> None:
        params = run["runtime_config"]["parameters"]
        run_root = f"{params['p0_s3_root']}/runs/{params['p0_run_id']}"
        summary = {"run_id": params["p0_run_id"], "run_root": run_root, "state": run["state"], "error": "",
                   "stages": {"eval": {"blessed": False, "reason": "not blessed: 0.01 < 0.5"}}}
        bucket, _, key = f"{run_root}/summary.json"[5:].partition("/")
        s3_client.put_object(Bucket=bucket, Key=key, Body=json.dumps(summary).encode())

    fake.on_finish = not_blessed
    state, tasks, _ = run_dag(test_dags["amft_test_kfp_approval"], {"p0_s3_root": root})
    assert state == "success"
    assert tasks["registered_as_candidate"] == "success"
    assert tasks["approve_champion"] == "skipped" and tasks["promote_champion"] == "skipped"
