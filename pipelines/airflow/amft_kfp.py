"""What the AMFT Airflow DAG (amft_retraining.py) does besides wiring tasks: read the compiled
pipeline's parameters, merge run arguments, name the KFP run after the Airflow run, create or
re-attach to that run through the KFP REST API, explain a failed run, check an S3 prefix for new
data, read the run summary, and run the same DAG locally through `amft pipeline run-local`.

Import cost matters: the DAG processor imports this module on every parse of the DAG file, so
only the standard library is imported at module level. PyYAML (an Airflow dependency) is imported
when a package is read; kfp and boto3 only inside the functions that talk to a server, i.e. on a
worker. Nothing here imports amft_lib or torch: the Airflow environment is a separate virtualenv
(requirements/airflow.txt) that holds neither.

Secrets: a KFP bearer token and S3 keys travel in `KfpTarget` / `S3Target`, whose `repr` hides
them; nothing here logs them or puts them in an exception message or a return value.
"""

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# KFP v2beta1 run states (kfp_server_api V2beta1RuntimeState). PAUSED and CANCELING are not final.
SUCCEEDED = "SUCCEEDED"
FAILED_STATES = frozenset({"FAILED", "CANCELED", "SKIPPED"})
FINAL_STATES = FAILED_STATES | {SUCCEEDED}
# The amft run id (p0_run_id) names the run's S3 folder: the pipeline accepts this alphabet only.
_RUN_ID_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}")
_JSON_TYPES = {"STRING": "string", "NUMBER_INTEGER": "integer", "NUMBER_DOUBLE": "number", "BOOLEAN": "boolean",
               "STRUCT": "object", "LIST": "array"}
SUMMARY_FILE = "summary.json"  # written by the pipeline's exit handler under <p0_s3_root>/runs/<run id>/


# ── pipeline parameters ─────────────────────────────────────────────────────────────────────────


@dataclasses.dataclass(frozen=True)
class PipelineParam:
    """One input of the compiled pipeline: KFP parameter type (STRING, NUMBER_INTEGER, …) and default."""

    name: str
    kind: str
    default: Any
    description: str = ""

    @property
    def json_type(self) -> str:
        """The JSON-schema type Airflow's Param validates a value against."""
        return _JSON_TYPES.get(self.kind, "string")


def read_package_params(package: str | Path) -> dict[str, PipelineParam]:
    """{name: PipelineParam} from a compiled KFP IR YAML (`amft pipeline compile`), sorted by name.

    The same names `amft pipeline params` prints. Integer defaults come back from the IR as floats
    (1.0); they are turned back into ints here."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~12 ms for our 90 KB package
    with open(package, encoding="utf-8") as fh:
        spec = next(iter(yaml.load_all(fh, Loader=loader)))
    try:
        raw = spec["root"]["inputDefinitions"]["parameters"]
    except (KeyError, TypeError):
        raise ValueError(f"{package}: not a compiled KFP pipeline (no root.inputDefinitions.parameters)") from None
    out = {}
    for name in sorted(raw):
        entry = raw[name] or {}
        kind = entry.get("parameterType", "STRING")
        default = entry.get("defaultValue")
        if kind == "NUMBER_INTEGER" and isinstance(default, float) and default.is_integer():
            default = int(default)
        out[name] = PipelineParam(name, kind, default, entry.get("description", ""))
    return out


def coerce(param: PipelineParam, value: Any) -> Any:
    """`value` checked against the parameter's KFP type; raises ValueError naming the fix."""
    ok = {"STRING": (str,), "NUMBER_INTEGER": (int,), "NUMBER_DOUBLE": (int, float), "BOOLEAN": (bool,),
          "STRUCT": (dict,), "LIST": (list,)}.get(param.kind, (object,))
    if isinstance(value, bool) and param.kind in ("NUMBER_INTEGER", "NUMBER_DOUBLE"):
        ok = ()
    if param.kind == "NUMBER_INTEGER" and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, ok):
        raise ValueError(f"pipeline parameter {param.name}={value!r}: expected {param.json_type}")
    return float(value) if param.kind == "NUMBER_DOUBLE" else value


def merge_arguments(params: Mapping[str, PipelineParam], *layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Pipeline arguments from `layers`, later wins; None means "not set here". Only names the
    pipeline declares are accepted. Unset parameters are left out, so the compiled default (or,
    locally, the local profile) applies."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if value is None:
                continue
            if key not in params:
                raise ValueError(f"unknown pipeline parameter {key!r}; `amft pipeline params` lists them")
            out[key] = coerce(params[key], value)
    return out


def run_name(dag_id: str, airflow_run_id: str) -> str:
    """The KFP run's display name and the amft run id (p0_run_id), derived from the Airflow run.

    Deterministic, so a retried task finds the run its first try created. Characters the pipeline
    refuses in a run id become '-'; a name over 128 characters is cut and given a hash of the
    whole so two long run ids still differ."""
    raw = f"{dag_id}-{airflow_run_id}"
    name = re.sub(r"[^A-Za-z0-9._\-]+", "-", raw).strip("-._") or "airflow-run"
    if not name[0].isalnum():
        name = "r" + name
    if len(name) > 128:
        name = name[:117].rstrip("-._") + "-" + hashlib.sha256(raw.encode()).hexdigest()[:10]
    assert _RUN_ID_OK.fullmatch(name), name
    return name


# ── KFP API ─────────────────────────────────────────────────────────────────────────────────────


@dataclasses.dataclass(frozen=True)
class KfpTarget:
    """Where and as whom to reach the KFP API (from an Airflow Connection; see `kfp_target`)."""

    host: str
    token: str = dataclasses.field(default="", repr=False)
    namespace: str = ""
    verify_ssl: bool = True
    ssl_ca_cert: str = ""


def kfp_target(conn: Any) -> KfpTarget:
    """An Airflow Connection → KfpTarget. host: the API endpoint ('http://ml-pipeline.kubeflow:8888'
    or a host name, the scheme then taken from the connection's schema field as HttpHook does);
    port: optional; password: bearer token (optional); extra: {"namespace", "verify_ssl", "ssl_ca_cert"}."""
    host = (conn.host or "").strip().rstrip("/")
    if not host:
        raise ValueError(f"connection {conn.conn_id!r}: set host to the KFP API endpoint")
    if "://" not in host:
        host = f"{conn.schema or 'http'}://{host}"
    if conn.port and not re.search(r":\d+$", host.split("://", 1)[1].split("/", 1)[0]):
        scheme, rest = host.split("://", 1)
        netloc, _, path = rest.partition("/")
        host = f"{scheme}://{netloc}:{conn.port}" + (f"/{path}" if path else "")
    extra = conn.extra_dejson or {}
    verify = extra.get("verify_ssl", True)
    if isinstance(verify, str):  # the connection form stores text: "false" must not read as True
        verify = verify.strip().lower() not in ("false", "0", "no", "off")
    return KfpTarget(host=host, token=conn.password or "", namespace=str(extra.get("namespace") or ""),
                     verify_ssl=bool(verify), ssl_ca_cert=str(extra.get("ssl_ca_cert") or ""))


def kfp_client(target: KfpTarget) -> Any:
    """kfp.Client for `target` (imports kfp)."""
    import kfp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2 and later"
        return kfp.Client(host=target.host, existing_token=target.token or None,
                          namespace=target.namespace or "kubeflow", verify_ssl=target.verify_ssl,
                          ssl_ca_cert=target.ssl_ca_cert or None)


def runs_named(client: Any, name: str, experiment_id: str) -> list[Any]:
    """Runs of `experiment_id` whose display name is `name`, newest first."""
    flt = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    found, token = [], ""
    while True:
        page = client.list_runs(experiment_id=experiment_id, page_size=100, page_token=token, filter=flt,
                                sort_by="created_at desc")
        found += [r for r in page.runs or [] if r.display_name == name]
        token = page.next_page_token or ""
        if not token:
            break
    epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
    return sorted(found, key=lambda r: _aware(r.created_at) or epoch, reverse=True)


def _aware(value: Any) -> dt.datetime | None:
    if not isinstance(value, dt.datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


@dataclasses.dataclass(frozen=True)
class Submitted:
    """A KFP run this Airflow run owns: its id, and whether it already existed (re-attach)."""

    run_id: str
    experiment_id: str
    attached: bool
    state: str


def submit_or_attach(client: Any, *, name: str, package: str | Path, arguments: Mapping[str, Any],
                     experiment: str, namespace: str = "", resubmit_failed: bool = False) -> Submitted:
    """Create the run `name` from `package`, unless the experiment already has one of that name.

    Why look first: the name is derived from the Airflow run id, so a retried task (worker lost,
    API timeout after the server created the run) finds the run its first try made and waits for
    that one instead of training twice. With `resubmit_failed`, a newest run that ended FAILED /
    CANCELED is not re-attached; a new run of the same name is created (same p0_run_id, so
    training resumes from that run's checkpoints)."""
    exp = client.create_experiment(name=experiment, namespace=namespace or None)  # get-or-create by name
    existing = runs_named(client, name, exp.experiment_id)
    if existing:
        newest = existing[0]
        state = str(newest.state or "")
        if not (resubmit_failed and state in FAILED_STATES):
            log.info("re-attaching to KFP run %s (%s), state %s; not submitting again", newest.run_id, name, state)
            return Submitted(newest.run_id, exp.experiment_id, True, state)
        log.info("newest KFP run named %s ended %s and resubmit_failed is set: submitting a new run", name, state)
    run = client.run_pipeline(experiment_id=exp.experiment_id, job_name=name, pipeline_package_path=str(package),
                              params=dict(arguments))
    log.info("submitted KFP run %s (%s) in experiment %s", run.run_id, name, experiment)
    return Submitted(run.run_id, exp.experiment_id, False, str(run.state or ""))


def failure_reason(run: Any) -> str:
    """Why a KFP run ended badly, from the run's own error and its failed tasks' errors."""
    parts = []
    err = getattr(run, "error", None)
    if err is not None and getattr(err, "message", None):
        parts.append(" ".join(str(err.message).split()))
    details = getattr(run, "run_details", None)
    for task in getattr(details, "task_details", None) or []:
        if str(task.state or "") in FAILED_STATES and getattr(task, "error", None) is not None and task.error.message:
            msg = " ".join(str(task.error.message).split())
            if msg not in parts:
                parts.append(f"task {task.display_name}: {msg}")
    return "; ".join(parts) or f"the run ended {run.state} without an error message"


def run_state(client: Any, run_id: str) -> tuple[str, str]:
    """(state, reason) of KFP run `run_id`: the reason is empty unless the run ended badly."""
    run = client.get_run(run_id)
    state = str(run.state or "")
    return state, (failure_reason(run) if state in FAILED_STATES else "")


def terminate(client: Any, run_id: str) -> str:
    """Ask KFP to terminate run `run_id` (POST …/runs/{id}:terminate; its pods are stopped) unless it
    already ended; returns the state it had."""
    state, _ = run_state(client, run_id)
    if state not in FINAL_STATES:
        client.terminate_run(run_id)
        log.warning("terminated KFP run %s (it was %s)", run_id, state or "not started")
    return state


# ── MLflow: the approval moves @champion ────────────────────────────────────────────────────────


@dataclasses.dataclass(frozen=True)
class MlflowTarget:
    """An MLflow tracking server's REST API (from an Airflow Connection: host = the server URL; login
    and password = basic auth, or password alone = a bearer token). The Airflow venv has no mlflow
    package (it pins other web-framework versions), so the approval talks REST."""

    host: str
    login: str = ""
    password: str = dataclasses.field(default="", repr=False)


def mlflow_target(conn: Any) -> MlflowTarget:
    host = (conn.host or "").strip().rstrip("/")
    if not host:
        raise ValueError(f"connection {conn.conn_id!r}: set host to the MLflow tracking server URL")
    if "://" not in host:
        host = f"{conn.schema or 'http'}://{host}" + (f":{conn.port}" if conn.port else "")
    return MlflowTarget(host=host, login=conn.login or "", password=conn.password or "")


def _mlflow(target: MlflowTarget, method: str, path: str, **kwargs: Any) -> Any:
    import requests

    auth = (target.login, target.password) if target.login else None
    headers = {"Authorization": f"Bearer {target.password}"} if target.password and not target.login else {}
    return requests.request(method, f"{target.host}/api/2.0/mlflow/{path}", auth=auth, headers=headers,
                            timeout=30, **kwargs)


def alias_version(target: MlflowTarget, name: str, alias: str) -> int | None:
    """The version `alias` points at, None when it points nowhere."""
    resp = _mlflow(target, "GET", "registered-models/alias", params={"name": name, "alias": alias})
    if resp.status_code in (400, 404) and "not found" in resp.text.lower():
        return None
    resp.raise_for_status()
    return int(resp.json()["model_version"]["version"])


def promote(target: MlflowTarget, name: str, version: str | int, alias: str = "champion") -> dict[str, Any]:
    """Move `alias` of registered model `name` to `version` after an approval, forward only (as the
    pipeline's registry does: an older candidate never demotes a newer champion)."""
    before = alias_version(target, name, alias)
    if before is not None and before >= int(version):
        log.info("%s@%s is version %s already (>= %s): not moved", name, alias, before, version)
        return {"moved": False, "previous": before, "version": int(version)}
    resp = _mlflow(target, "POST", "registered-models/alias", json={"name": name, "alias": alias,
                                                                    "version": str(version)})
    resp.raise_for_status()
    log.info("moved %s@%s: %s → %s", name, alias, before, version)
    return {"moved": True, "previous": before, "version": int(version)}


# ── S3: freshness check and run summary ─────────────────────────────────────────────────────────


@dataclasses.dataclass(frozen=True)
class S3Target:
    """An S3 endpoint and keys (from an Airflow Connection); empty fields → boto3's default chain."""

    endpoint_url: str = ""
    access_key_id: str = ""
    secret_access_key: str = dataclasses.field(default="", repr=False)
    region: str = ""


def s3_target(conn: Any | None, endpoint_url: str = "") -> S3Target:
    """An Airflow Connection (type aws: login = access key id, password = secret, extra
    {"endpoint_url", "region_name"}) → S3Target. `endpoint_url` fills in when the connection has none
    (the pipeline's p0_s3_endpoint_url). No connection → boto3 finds credentials itself (IRSA, env)."""
    if conn is None:
        return S3Target(endpoint_url=endpoint_url)
    extra = conn.extra_dejson or {}
    return S3Target(endpoint_url=str(extra.get("endpoint_url") or conn.host or endpoint_url or ""),
                    access_key_id=conn.login or "", secret_access_key=conn.password or "",
                    region=str(extra.get("region_name") or ""))


def s3_client(target: S3Target) -> Any:
    """A boto3 S3 client with path-style addressing (SeaweedFS, MinIO; AWS accepts it too)."""
    import boto3
    from botocore.config import Config

    kwargs: dict[str, Any] = {"config": Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3})}
    if target.endpoint_url:
        kwargs["endpoint_url"] = target.endpoint_url
    if target.access_key_id:
        kwargs.update(aws_access_key_id=target.access_key_id, aws_secret_access_key=target.secret_access_key)
    if target.region:
        kwargs["region_name"] = target.region
    return boto3.client("s3", **kwargs)


def split_s3(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' → ('bucket', 'a/b')."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r}: expected s3://BUCKET/PREFIX")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r}: no bucket")
    return bucket, key


@dataclasses.dataclass(frozen=True)
class Freshness:
    """What a look at the data prefix found: objects newer than `since`, of how many."""

    prefix: str
    since: str  # ISO time of the watermark, "" when there is none (first run)
    new: int
    total: int
    newest: str  # ISO time of the newest object, "" when empty

    @property
    def changed(self) -> bool:
        return self.new > 0


def check_freshness(prefix: str, since: dt.datetime | None, s3: S3Target | None = None) -> Freshness:
    """Count objects under `prefix` (s3://… or a local folder) modified after `since`.

    `since` is the start of the last successful DAG run: the start rather than the end, so an
    object written while that run was going counts as new once more instead of being missed.
    No watermark (first run) ⇒ every object is new. S3 keeps LastModified to the whole second, so the
    watermark is cut to its second and an object of that same second counts as new: a rare extra
    run, never a missed batch."""
    since = _aware(since)
    if since is not None:
        since = since.replace(microsecond=0)
    stamps = list(_s3_mtimes(prefix, s3 or S3Target()) if prefix.startswith("s3://") else _local_mtimes(prefix))
    new = [t for t in stamps if since is None or t >= since]
    return Freshness(prefix, since.isoformat() if since else "", len(new), len(stamps),
                     max(stamps).isoformat() if stamps else "")


def _s3_mtimes(prefix: str, target: S3Target) -> Iterator[dt.datetime]:
    bucket, key = split_s3(prefix)
    pages = s3_client(target).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
    for page in pages:
        for obj in page.get("Contents") or []:
            yield _aware(obj["LastModified"])


def _local_mtimes(prefix: str) -> Iterator[dt.datetime]:
    root = Path(prefix.removeprefix("file://"))
    if not root.exists():
        raise FileNotFoundError(f"data prefix {prefix!r} does not exist")
    for path in [root] if root.is_file() else root.rglob("*"):
        if path.is_file():
            yield dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)


def read_summary(s3_root: str, amft_run_id: str, s3: S3Target) -> dict[str, Any] | None:
    """The run summary the pipeline's exit handler wrote, or None when there is none (yet)."""
    bucket, key = split_s3(s3_root.rstrip("/") + f"/runs/{amft_run_id}/{SUMMARY_FILE}")
    client = s3_client(s3)
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    return json.loads(body.decode("utf-8"))


def summary_outputs(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The few facts a downstream task wants from a run summary (each also an XCom key)."""
    stages = summary.get("stages") or {}
    reg = stages.get("register") or {}
    evaluation = stages.get("eval") or {}
    registered = bool(reg.get("registered"))
    return {
        "amft_run_id": summary.get("run_id"),
        "run_root": summary.get("run_root"),
        "blessed": evaluation.get("blessed"),
        "blessing_reason": evaluation.get("reason"),
        "registered": registered,
        "registered_name": reg.get("name") if registered else None,
        "registered_version": reg.get("version") if registered else None,
        "registered_alias": reg.get("alias") if registered else None,
        "logged_model_id": reg.get("logged_model_id") if registered else None,
        "lineage_uri": (stages.get("lineage") or {}).get("uri"),
        "lineage_command": (stages.get("lineage") or {}).get("command"),
        "accuracy": summary.get("accuracy") or {},
    }


# ── local mode ──────────────────────────────────────────────────────────────────────────────────


def run_local(amft_bin: str, state_dir: str | Path, arguments: Mapping[str, Any], record: str | Path, *,
              threads: int | None = None, timeout_s: float | None = None) -> dict[str, Any]:
    """`amft pipeline run-local` (the real kfp.local run on embedded SeaweedFS + MLflow) as a child
    process; its output goes to the task log line by line. Returns the run record it writes
    ({"state", "error", "summary", …}). A record that already says SUCCEEDED is returned without
    running again (a retried task re-attaches to its finished run); otherwise the run is repeated
    with the same p0_run_id, so training resumes from the checkpoints in the state dir's S3."""
    record = Path(record)
    if record.exists():
        done = json.loads(record.read_text(encoding="utf-8"))
        if done.get("state") == SUCCEEDED:
            log.info("local run already SUCCEEDED (%s): re-attaching, not running again", record)
            return done
    record.parent.mkdir(parents=True, exist_ok=True)
    with _params_file(arguments, record.parent) as params_file:
        cmd = [amft_bin, "pipeline", "run-local", "--state-dir", str(state_dir), "--params-file", params_file,
               "--record", str(record)]
        if threads:
            cmd += ["--threads", str(threads)]
        log.info("running: %s", " ".join(cmd))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              errors="replace") as proc:
            deadline = None if timeout_s is None else dt.datetime.now(dt.UTC) + dt.timedelta(seconds=timeout_s)
            assert proc.stdout is not None
            for line in proc.stdout:
                log.info("%s", line.rstrip())
                if deadline and dt.datetime.now(dt.UTC) > deadline:
                    proc.terminate()
                    raise TimeoutError(f"amft pipeline run-local ran past {timeout_s:.0f} s")
            code = proc.wait()
    if not record.exists():
        raise RuntimeError(f"amft pipeline run-local exited {code} without writing its record {record}")
    return json.loads(record.read_text(encoding="utf-8"))


@contextlib.contextmanager
def _params_file(arguments: Mapping[str, Any], folder: Path) -> Iterator[str]:
    fd, path = tempfile.mkstemp(prefix=".params-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(dict(arguments), fh, indent=1, sort_keys=True)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
