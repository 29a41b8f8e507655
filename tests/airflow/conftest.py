"""Fixtures for the Airflow DAG tests. They run in the Airflow virtualenv (.venv-airflow, built by
scripts/bootstrap_airflow.sh), not the project's: that one holds neither Airflow nor the other way round.

Airflow reads its configuration when first imported, so AIRFLOW_HOME (a temp dir), a SQLite
metadata DB and the DAG folder are set here, before anything imports airflow. The DAG folder holds
one file that builds the test DAGs with `build_dag` (short poke interval and retry delay), the way a
platform team would wrap the DAG with its own settings.

Real services: SeaweedFS through the project's own `amft s3 serve` (main .venv), which also runs
`amft pipeline run-local` for the local-mode test, and an MLflow tracking server on SQLite (`mlflow
server` from the main .venv) for the approval's @champion. The KFP API server is the one fake (fake_kfp.py).
"""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAG_DIR = REPO / "pipelines" / "airflow"
MAIN_VENV_BIN = REPO / ".venv" / "bin"
AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="amft-airflow-home-"))
DAGS_FOLDER = AIRFLOW_HOME / "dags"
os.environ.update({
    "AIRFLOW_HOME": str(AIRFLOW_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{AIRFLOW_HOME / 'airflow.db'}",
    "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
    "AIRFLOW__CORE__ALLOWED_DESERIALIZATION_CLASSES": "airflow.*",
    "OMP_NUM_THREADS": "1",
    "AMFT_AIRFLOW_SCHEDULE": "none",
})
sys.path.insert(0, str(DAG_DIR))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TEST_DAGS = f'''
"""Test DAGs: the retraining DAG with waits and retries short enough for a test."""
import sys
sys.path.insert(0, {str(DAG_DIR)!r})
from amft_retraining import build_dag

amft_test_kfp = build_dag("amft_test_kfp", schedule=None, poke_interval_s=0.2, retry_delay_s=0.2, retries=2,
                          wait_timeout_s=120)
amft_test_local = build_dag("amft_test_local", schedule=None, mode="local", retries=0, wait_timeout_s=900)
amft_test_kfp_timeout = build_dag("amft_test_kfp_timeout", schedule=None, poke_interval_s=0.2, retry_delay_s=0.2,
                                  retries=2, wait_timeout_s=2)
amft_test_kfp_approval = build_dag("amft_test_kfp_approval", schedule=None, poke_interval_s=0.2, retry_delay_s=0.2,
                                   retries=0, wait_timeout_s=120, approval=True, approval_timeout_s=300)
'''


def pytest_sessionfinish(session, exitstatus) -> None:
    shutil.rmtree(AIRFLOW_HOME, ignore_errors=True)  # mkdtemp above: pytest does not clean it


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """`airflow db migrate` into the temp AIRFLOW_HOME (SQLite, ~3 s) and the test DAG folder."""
    DAGS_FOLDER.mkdir(parents=True, exist_ok=True)
    (DAGS_FOLDER / "amft_test_dags.py").write_text(TEST_DAGS, encoding="utf-8")
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True,
                   stdout=subprocess.DEVNULL, env=os.environ.copy())
    return AIRFLOW_HOME


@pytest.fixture(scope="session")
def test_dags(airflow_db):
    """{dag_id: DAG} from the test DAG folder, parsed the way the DAG processor parses it."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert not bag.import_errors, bag.import_errors
    return bag.dags


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> dict[str, str]:
    """A real SeaweedFS (auth on, 127.0.0.1) via `amft s3 serve` from the project venv; yields the
    AWS_* settings from its s3.env."""
    amft = MAIN_VENV_BIN / "amft"
    if not amft.exists():
        pytest.fail(f"{amft} missing: run scripts/bootstrap.sh (scripts/test.sh does) before the Airflow tests")
    data = tmp_path_factory.mktemp("seaweedfs")
    log = (data / "serve.log").open("w")
    proc = subprocess.Popen([str(amft), "s3", "serve", "--data-dir", str(data), "--port", str(_free_port())],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while "Ctrl-C to stop." not in (data / "serve.log").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"amft s3 serve did not come up:\n{(data / 'serve.log').read_text()[-2000:]}")
        time.sleep(0.2)
    env = {}
    for line in (data / "s3.env").read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = shlex.split(value)[0] if value else ""
    yield env
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def fake(monkeypatch):
    """A fake KFP API server (fake_kfp.py) with a bearer token, as the Connection `amft_kfp`."""
    from fake_kfp import FakeKfp

    token = f"kfp-token-{uuid.uuid4().hex}"
    with FakeKfp(token=token) as server:
        monkeypatch.setenv("AIRFLOW_CONN_AMFT_KFP", json.dumps({"conn_type": "http", "host": server.url,
                                                                "password": token}))
        yield server


@pytest.fixture
def root() -> str:
    """A fresh S3 root for one test's runs."""
    return f"s3://amft/airflow-tests/{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real MLflow tracking server (SQLite store) from the project venv; yields its URL. Slow to
    start on a busy machine (~40 s), so one per session."""
    mlflow = MAIN_VENV_BIN / "mlflow"
    if not mlflow.exists():
        pytest.fail(f"{mlflow} missing: run scripts/bootstrap.sh before the Airflow tests")
    import requests

    data = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = (data / "server.log").open("w")
    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{data / 'mlflow.db'}",
                             "--default-artifact-root", str(data / "artifacts"), "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if requests.get(f"{url}/health", timeout=5).ok:
                break
        except requests.RequestException:  # not listening yet, or still starting up
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)  # the server and its uvicorn workers
            pytest.fail(f"mlflow server did not come up:\n{(data / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.fixture
def s3_client(s3):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL_S3"], aws_access_key_id=s3["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=s3["AWS_SECRET_ACCESS_KEY"], region_name=s3["AWS_DEFAULT_REGION"],
                        config=Config(s3={"addressing_style": "path"}))


@pytest.fixture
def s3_connection(s3, monkeypatch) -> dict[str, str]:
    """The Airflow Connection `amft_s3`, from the environment (AIRFLOW_CONN_*), as a platform would set it."""
    conn = {"conn_type": "aws", "login": s3["AWS_ACCESS_KEY_ID"], "password": s3["AWS_SECRET_ACCESS_KEY"],
            "extra": {"endpoint_url": s3["AWS_ENDPOINT_URL_S3"], "region_name": s3["AWS_DEFAULT_REGION"]}}
    monkeypatch.setenv("AIRFLOW_CONN_AMFT_S3", json.dumps(conn))
    # boto3 must get the keys from the connection, not from an inherited environment
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    return s3


def run_dag(dag, conf: dict) -> tuple[str, dict[str, str], dict[str, dict[str, object]]]:
    """dag.test() one run; returns (run state, {task_id: state}, {task_id: {xcom key: value}})."""
    from airflow.models.xcom import XComModel
    from airflow.sdk.serde import deserialize
    from airflow.utils.session import create_session

    dr = dag.test(run_conf=conf)
    with create_session() as session:
        states = {ti.task_id: str(ti.state) for ti in dr.get_task_instances(session=session)}
        xcoms: dict[str, dict[str, object]] = {}
        for row in session.scalars(XComModel.get_many(run_id=dr.run_id, dag_ids=dag.dag_id)):
            # decoded as a downstream task's xcom_pull decodes it (XComModel.deserialize_value would
            # json-decode a pushed string once more: "7" → 7)
            xcoms.setdefault(row.task_id, {})[row.key] = deserialize(row.value)
    return str(dr.state), states, xcoms
