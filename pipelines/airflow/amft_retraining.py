"""AMFT scheduled retraining: an Airflow 3 DAG that runs the compiled Kubeflow pipeline.

```
check_new_data ──▶ submit ──▶ wait_for_run ──▶ run_summary
(skip the rest      (create, or   (deferred: the    (summary.json → XCom: blessed,
 when no new data)   re-attach)    triggerer polls   registered version, lineage URI;
                                   KFP; on timeout   fail with the run's reason)
                                   terminate it)          │ with approval:
                                                          ▼
              registered_as_candidate ──▶ approve_champion ──▶ promote_champion
              (skip unless registered      (ApprovalOperator)   (@champion → the candidate,
               as @candidate)                                    via MLflow's REST API)
```

Waiting holds no worker slot: `wait_for_run` defers to a trigger (amft_kfp_wait.py) that polls the KFP
API from the triggerer; when AMFT_AIRFLOW_WAIT_TIMEOUT_S has passed since submission the KFP run is
terminated and the task fails. With AMFT_AIRFLOW_APPROVAL=1 the pipeline registers the blessed model
under the `candidate` alias (p6_registry_alias) and a person approves (or rejects) moving @champion
to it in Airflow's Required Actions view; approve → @champion moves, reject → it stays.

Drop-in: copy this file, `amft_kfp.py`, `amft_kfp_wait.py` (beside it) and the compiled `pipelines/amft_pipeline.yaml`
into the DAG folder (or set AMFT_PIPELINE_PACKAGE). The Airflow environment needs `kfp` and
`boto3` (requirements/airflow.txt), not the amft package: parsing this file imports neither kfp nor
torch.

Set at parse time by environment variables (Airflow reads them when it parses the file):
  AMFT_AIRFLOW_SCHEDULE   cron or preset, default "0 3 * * *"; "none" = manual/API triggers only
  AMFT_AIRFLOW_MODE       default mode for runs: "kfp" (a KFP API server) or "local"
  AMFT_PIPELINE_PACKAGE   the compiled pipeline YAML (default: amft_pipeline.yaml beside this file,
                          then ../amft_pipeline.yaml, i.e. the repository's copy)
  AMFT_AIRFLOW_WAIT_TIMEOUT_S, AMFT_AIRFLOW_POKE_INTERVAL_S   how long / how often to wait (48 h / 60 s)
  AMFT_AIRFLOW_APPROVAL   "1": register as candidate and let a person approve @champion (default off)

Per run (Params, editable in the trigger form or `conf`):
  every pipeline parameter under its own name (p0_s3_root, p4_train_max_steps, … as
  `amft pipeline params` lists them): empty = the Airflow Variable `amft_pipeline_params` (a JSON
  object of platform-wide values), else the compiled default. p0_run_id defaults to the KFP run
  name, `<dag_id>-<airflow run id>`, so the run's S3 folder is known before it starts.
  mode, kfp_conn_id, kfp_experiment, s3_conn_id, data_prefix, skip_if_no_new_data,
  resubmit_failed, local_state_dir, local_threads, amft_bin (see `_airflow_params`).

Connections (credentials never appear in Params, XCom or logs; Airflow masks connection passwords):
  amft_kfp  host = KFP API endpoint (http(s)://host[:port][/path]); password = bearer token
            (optional); extra {"namespace": "...", "verify_ssl": true, "ssl_ca_cert": "/path"}
  amft_s3   (type aws) login = access key id, password = secret key,
            extra {"endpoint_url": "...", "region_name": "..."}; absent = boto3's default chain
  amft_mlflow  (approval only) host = MLflow tracking server URL; login/password = basic auth, or
            password alone = bearer token

Idempotence: the KFP run is named after the Airflow run. A retried `submit` finds the run its
first try created (even when the API timed out after creating it) and waits for that one.
"""

import datetime as dt
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from airflow.sdk import Param, dag, get_current_context, task

HERE = Path(__file__).resolve().parent
try:
    import amft_kfp
except ModuleNotFoundError:  # imported from outside the DAG folder (tests, a wrapper DAG file)
    sys.path.insert(0, str(HERE))
    import amft_kfp
from amft_kfp_wait import WaitForKfpRun  # noqa: E402 (after the DAG folder is on sys.path)

log = logging.getLogger(__name__)

PARAMS_VARIABLE = "amft_pipeline_params"
LOCAL, KFP = "local", "kfp"
CHAMPION, CANDIDATE = "champion", "candidate"
APPROVAL_BODY = """Run {{ ti.xcom_pull(task_ids='run_summary', key='return_value')['run_name'] }} registered
**{{ ti.xcom_pull(task_ids='run_summary', key='registered_name') }} version
{{ ti.xcom_pull(task_ids='run_summary', key='registered_version') }}** as @candidate.

- blessing: {{ ti.xcom_pull(task_ids='run_summary', key='return_value')['blessing_reason'] }}
- accuracy: {{ ti.xcom_pull(task_ids='run_summary', key='return_value')['accuracy'] }}
- lineage: {{ ti.xcom_pull(task_ids='run_summary', key='lineage_uri') }}

Approve moves @champion to it (the next retraining is compared against it); Reject leaves @champion
where it is."""


def default_package() -> Path:
    """The compiled pipeline: $AMFT_PIPELINE_PACKAGE, else beside this file, else the repository's."""
    if os.environ.get("AMFT_PIPELINE_PACKAGE"):
        return Path(os.environ["AMFT_PIPELINE_PACKAGE"])
    for candidate in (HERE / "amft_pipeline.yaml", HERE.parent / "amft_pipeline.yaml"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"no compiled pipeline beside {HERE}: copy pipelines/amft_pipeline.yaml there or set "
                            "AMFT_PIPELINE_PACKAGE")


def default_amft_bin() -> str:
    """For local mode: $AMFT_BIN, else `amft` on PATH, else the repository's .venv/bin/amft."""
    repo_venv = HERE.parent.parent / ".venv" / "bin" / "amft"
    return os.environ.get("AMFT_BIN") or shutil.which("amft") or str(repo_venv)


def _schedule_from_env() -> str | None:
    value = os.environ.get("AMFT_AIRFLOW_SCHEDULE", "0 3 * * *").strip()
    return None if value.lower() in ("", "none", "null") else value


def _airflow_params(mode: str) -> dict[str, Param]:
    """Run-time settings of the DAG itself (not pipeline parameters: those start with p<digit>_)."""
    return {
        "mode": Param(mode, enum=[KFP, LOCAL], section="Run",
                      description="kfp: submit to the KFP API server of connection kfp_conn_id. local: run "
                      "`amft pipeline run-local` on this worker (embedded SeaweedFS + MLflow, no cluster)."),
        "kfp_conn_id": Param("amft_kfp", type="string", section="Run", description="Connection of the KFP API"),
        "terminate_on_kill": Param(True, type="boolean", section="Run",
                                   description="A person failing, clearing or marking succeeded the waiting task "
                                   "(or failing the DAG run) also terminates the KFP run. Off: the run keeps going."),
        "kfp_experiment": Param("amft", type="string", section="Run",
                                description="KFP experiment (created if missing)"),
        "s3_conn_id": Param("amft_s3", type="string", section="Run",
                            description="Connection for S3 (data prefix, run summary); missing = boto3 defaults"),
        "data_prefix": Param("", type="string", section="Data freshness",
                             description="s3://bucket/prefix (or a local folder) whose new objects trigger "
                             "retraining; empty = no check, always run"),
        "skip_if_no_new_data": Param(True, type="boolean", section="Data freshness",
                                     description="skip the run when nothing under data_prefix changed since the "
                                     "start of the last successful DAG run"),
        "resubmit_failed": Param(False, type="boolean", section="Run",
                                 description="when this Airflow run's KFP run already ended FAILED/CANCELED, a "
                                 "retry submits a new one (same p0_run_id: training resumes) instead of re-attaching"),
        "local_state_dir": Param("", type="string", section="Local mode",
                                 description="state dir of run-local (S3 data, MLflow DB); empty = "
                                 "$AIRFLOW_HOME/amft-local"),
        "local_threads": Param(1, type="integer", minimum=1, section="Local mode",
                               description="OMP/torch threads per local task"),
        "amft_bin": Param("", type="string", section="Local mode",
                          description="the amft executable; empty = $AMFT_BIN, `amft` on PATH, repo .venv"),
        "mlflow_conn_id": Param("amft_mlflow", type="string", section="Approval",
                                description="Connection of the MLflow server whose @champion the approval moves"),
    }


def _pipeline_params(params: dict[str, "amft_kfp.PipelineParam"]) -> dict[str, Param]:
    return {
        name: Param(None, type=["null", p.json_type], section=f"Pipeline {name.split('_', 1)[0]}",
                    description=(p.description + " " if p.description else "")
                    + f"(empty: Variable {PARAMS_VARIABLE}, else the compiled default {p.default!r})")
        for name, p in params.items()
    }


def _connection(conn_id: str, required: bool) -> object | None:
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return Connection.get(conn_id)
    except AirflowNotFoundException:
        if required:
            raise
        log.info("no connection %r: using boto3's default credentials", conn_id)
        return None


def _s3(conn_id: str, endpoint_url: str = "") -> "amft_kfp.S3Target":
    return amft_kfp.s3_target(_connection(conn_id, required=False), endpoint_url)


def build_dag(
    dag_id: str = "amft_retraining",
    *,
    schedule: str | None = "0 3 * * *",
    mode: str = KFP,
    package: str | Path | None = None,
    start_date: dt.datetime = dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    poke_interval_s: float = 60.0,
    wait_timeout_s: float = 48 * 3600.0,
    retries: int = 2,
    retry_delay_s: float = 120.0,
    approval: bool = False,
    approval_timeout_s: float | None = 7 * 24 * 3600.0,
):
    """The retraining DAG. Parse-time settings are arguments, so a platform team can also write a
    three-line DAG file calling this with its own dag_id and schedule. `approval`: register the
    blessed model as `candidate` and move @champion only after a person approves (ApprovalOperator;
    no answer within `approval_timeout_s` counts as a reject)."""
    package = Path(package) if package else default_package()
    pipeline_params = amft_kfp.read_package_params(package)
    retry_delay = dt.timedelta(seconds=retry_delay_s)

    @dag(
        dag_id=dag_id,
        schedule=schedule,
        start_date=start_date,
        catchup=False,
        max_active_runs=1,  # two retrainings of one model at once would race for the champion alias
        params={**_airflow_params(mode), **_pipeline_params(pipeline_params)},
        tags=["amft", "kubeflow", "retraining"],
        doc_md=__doc__,
    )
    def amft_retraining():
        # ── Step 1: data freshness ── a short circuit: False skips every later task (the DAG run
        # still succeeds, so the next run's watermark moves on).
        @task.short_circuit(task_id="check_new_data")
        def check_new_data() -> dict | bool:
            ctx = get_current_context()
            p = ctx["params"]
            prefix = (p["data_prefix"] or "").strip()
            if not prefix:
                log.info("no data_prefix set: freshness check off, running")
                return {"checked": False}
            prev = ctx.get("prev_start_date_success")
            since = dt.datetime.fromisoformat(prev.isoformat()) if isinstance(prev, dt.datetime) else None
            s3 = _s3(p["s3_conn_id"]) if prefix.startswith("s3://") else None
            fresh = amft_kfp.check_freshness(prefix, since, s3)
            log.info("%s: %d of %d objects newer than %s (newest %s)", prefix, fresh.new, fresh.total,
                     fresh.since or "the first run", fresh.newest or "-")
            if fresh.changed or not p["skip_if_no_new_data"]:
                return {"checked": True, "prefix": fresh.prefix, "since": fresh.since, "new": fresh.new,
                        "total": fresh.total, "newest": fresh.newest}
            log.info("nothing new under %s since the last successful run: skipping retraining", prefix)
            return False

        # ── Step 2: submit (or re-attach) ── retried on API errors; the run name makes it idempotent.
        @task(task_id="submit", retries=retries, retry_delay=retry_delay,
              execution_timeout=dt.timedelta(seconds=wait_timeout_s + 600))
        def submit() -> dict:
            from airflow.sdk import Variable

            ctx = get_current_context()
            p = ctx["params"]
            name = amft_kfp.run_name(ctx["dag"].dag_id, ctx["dag_run"].run_id)
            platform = Variable.get(PARAMS_VARIABLE, default=None, deserialize_json=True) or {}
            arguments = amft_kfp.merge_arguments(pipeline_params, platform,
                                                 {k: p.get(k) for k in pipeline_params})
            arguments.setdefault("p0_run_id", name)
            if approval and "p6_registry_alias" in pipeline_params:  # @champion waits for the approval
                arguments.setdefault("p6_registry_alias", CANDIDATE)
            handle = {"mode": p["mode"], "name": name, "amft_run_id": arguments["p0_run_id"],
                      "submitted_at": time.time()}
            if p["mode"] == LOCAL:
                state_dir = Path(p["local_state_dir"] or Path(os.environ.get("AIRFLOW_HOME", "~/airflow"))
                                 / "amft-local").expanduser()
                record = state_dir / "airflow-records" / f"{name}.json"
                done = amft_kfp.run_local(p["amft_bin"] or default_amft_bin(), state_dir, arguments, record,
                                          threads=p["local_threads"], timeout_s=wait_timeout_s)
                return {**handle, "record": str(record), "state": done["state"]}
            target = amft_kfp.kfp_target(_connection(p["kfp_conn_id"], required=True))
            run = amft_kfp.submit_or_attach(
                amft_kfp.kfp_client(target), name=name, package=package, arguments=arguments,
                experiment=p["kfp_experiment"], namespace=target.namespace, resubmit_failed=p["resubmit_failed"])
            default = {k: v.default for k, v in pipeline_params.items()}
            return {**handle, "kfp_run_id": run.run_id, "experiment_id": run.experiment_id, "attached": run.attached,
                    "s3_root": arguments.get("p0_s3_root", default.get("p0_s3_root")),
                    "s3_endpoint_url": arguments.get("p0_s3_endpoint_url", default.get("p0_s3_endpoint_url")) or ""}

        # ── Step 3: wait ── deferred: no worker slot while the KFP run runs (amft_kfp_wait.py); on the
        # deadline the KFP run is terminated.

        # ── Step 4: run summary → XCom; fail the DAG run with the KFP run's reason.
        @task(task_id="run_summary", retries=retries, retry_delay=retry_delay)
        def run_summary(handle: dict, final: dict) -> dict:
            import json

            from airflow.sdk.exceptions import AirflowFailException

            ti = get_current_context()["ti"]
            p = get_current_context()["params"]
            error = ""
            if handle["mode"] == LOCAL:
                record = json.loads(Path(handle["record"]).read_text(encoding="utf-8"))
                summary, error = record.get("summary"), record.get("error") or ""
            else:
                summary = amft_kfp.read_summary(handle["s3_root"], handle["amft_run_id"],
                                                _s3(p["s3_conn_id"], handle["s3_endpoint_url"]))
            out = {"state": final["state"], "run_name": handle["name"], "kfp_run_id": handle.get("kfp_run_id"),
                   **amft_kfp.summary_outputs(summary or {})}
            for key in ("state", "kfp_run_id", "blessed", "registered_name", "registered_version", "lineage_uri"):
                ti.xcom_push(key=key, value=out[key])
            if final["state"] != amft_kfp.SUCCEEDED:
                reason = final["reason"] or error or (summary or {}).get("error") or "no reason recorded"
                raise AirflowFailException(f"AMFT run {handle['name']} (KFP run {handle.get('kfp_run_id') or '-'}) "
                                           f"ended {final['state']}: {reason}")
            if summary is None:  # the exit handler writes it; retry in case S3 is slow to show it
                raise RuntimeError(f"run succeeded but {handle['s3_root']}/runs/{handle['amft_run_id']}/"
                                   f"{amft_kfp.SUMMARY_FILE} is missing")
            log.info("run %s: blessed=%s, registered %s:%s, lineage %s", out["amft_run_id"], out["blessed"],
                     out["registered_name"], out["registered_version"], out["lineage_uri"])
            return out

        # ── Step 5 (approval): registered as candidate → a person approves → @champion moves.
        @task.short_circuit(task_id="registered_as_candidate")
        def registered_as_candidate(out: dict) -> bool:
            if out.get("registered_version") is None:
                log.info("nothing registered (blessed=%s): no approval to ask for", out.get("blessed"))
                return False
            if out.get("registered_alias") not in (None, CANDIDATE):
                log.info("registered under @%s, not as candidate: nothing to approve", out["registered_alias"])
                return False
            return True

        @task(task_id="promote_champion", retries=retries, retry_delay=retry_delay)
        def promote_champion(out: dict) -> dict:
            p = get_current_context()["params"]
            target = amft_kfp.mlflow_target(_connection(p["mlflow_conn_id"], required=True))
            return amft_kfp.promote(target, out["registered_name"], out["registered_version"], CHAMPION)

        handle = submit()
        check_new_data() >> handle
        final = WaitForKfpRun(task_id="wait_for_run", handle=handle, poll_interval_s=poke_interval_s,
                              wait_timeout_s=wait_timeout_s, retries=retries, retry_delay=retry_delay)
        out = run_summary(handle, final.output)
        if approval:
            from airflow.providers.standard.operators.hitl import ApprovalOperator

            ask = ApprovalOperator(
                task_id="approve_champion", subject="AMFT: make {{ ti.xcom_pull(task_ids='run_summary', "
                "key='registered_name') }} version {{ ti.xcom_pull(task_ids='run_summary', "
                "key='registered_version') }} the champion?",
                body=APPROVAL_BODY, response_timeout=dt.timedelta(seconds=approval_timeout_s)
                if approval_timeout_s else None)
            registered_as_candidate(out) >> ask >> promote_champion(out)

    return amft_retraining()


amft_retraining = build_dag(
    schedule=_schedule_from_env(),
    mode=os.environ.get("AMFT_AIRFLOW_MODE", KFP),
    poke_interval_s=float(os.environ.get("AMFT_AIRFLOW_POKE_INTERVAL_S", 60)),
    wait_timeout_s=float(os.environ.get("AMFT_AIRFLOW_WAIT_TIMEOUT_S", 48 * 3600)),
    approval=os.environ.get("AMFT_AIRFLOW_APPROVAL", "").strip().lower() in ("1", "true", "yes", "on"),
)
