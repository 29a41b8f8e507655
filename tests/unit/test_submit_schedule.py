"""`amft pipeline submit` and `amft pipeline schedule` against a stand-in of the KFP REST API.

No Kubeflow cluster can run here, so an `http.server` on 127.0.0.1 plays the KFP API server
(v2beta1 experiments, runs and recurring runs, with the same JSON field names) and records every
request. The tests assert what kfp.Client sent: the compiled pipeline and its parameters, a
recurring run with max_concurrency=1, no catch-up and the cron, and that scheduling again under
the same name replaces the old recurring run instead of adding a second one.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from amft_lib import cli
from pipelines.build import parse_params
from pipelines.remote import normalize_cron, schedule_run, submit_run

API = "/apis/v2beta1"


class FakeKFP(ThreadingHTTPServer):
    """Just enough of the KFP v2beta1 API for kfp.Client's submit and schedule calls."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict] = []
        self.experiments: dict[str, dict] = {}
        self.recurring: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def calls(self, method: str, path: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and r["path"] == API + path]


class Handler(BaseHTTPRequestHandler):
    server: FakeKFP

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _reply(self, body: dict, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> tuple[str, dict, dict]:
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else {}
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.server.requests.append({"method": self.command, "path": url.path, "query": query, "body": body,
                                     "auth": self.headers.get("Authorization")})
        return url.path, query, body

    @staticmethod
    def _name_filter(query: dict) -> str | None:
        if "filter" not in query:
            return None
        return json.loads(query["filter"])["predicates"][0]["stringValue"]

    def do_GET(self) -> None:
        path, query, _ = self._record()
        if path == f"{API}/healthz":
            return self._reply({"multi_user": False})
        if path == f"{API}/experiments":
            name = self._name_filter(query)
            found = [e for e in self.server.experiments.values() if name in (None, e["display_name"])]
            return self._reply({"experiments": found, "total_size": len(found)} if found else {})
        if path == f"{API}/recurringruns":
            name = self._name_filter(query)
            found = [r for r in self.server.recurring.values()
                     if name in (None, r["display_name"]) and query.get("experiment_id") in (None, r["experiment_id"])]
            return self._reply({"recurringRuns": found, "total_size": len(found)} if found else {})
        self._reply({"error": "not found"}, 404)

    def do_POST(self) -> None:
        path, _, body = self._record()
        if path == f"{API}/experiments":
            exp = {**body, "experiment_id": f"exp-{uuid.uuid4().hex[:6]}"}
            self.server.experiments[exp["experiment_id"]] = exp
            return self._reply(exp)
        if path == f"{API}/runs":
            run = {**body, "run_id": f"run-{uuid.uuid4().hex[:6]}", "state": "PENDING"}
            self.server.runs[run["run_id"]] = run
            return self._reply(run)
        if path == f"{API}/recurringruns":
            rec = {**body, "recurring_run_id": f"rec-{uuid.uuid4().hex[:6]}", "status": "ENABLED"}
            self.server.recurring[rec["recurring_run_id"]] = rec
            return self._reply(rec)
        self._reply({"error": "not found"}, 404)

    def do_DELETE(self) -> None:
        path, _, _ = self._record()
        prefix = f"{API}/recurringruns/"
        if path.startswith(prefix) and self.server.recurring.pop(path[len(prefix):], None) is not None:
            return self._reply({})
        self._reply({"error": "not found"}, 404)


@pytest.fixture
def kfp_api(monkeypatch) -> Iterator[FakeKFP]:
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent-home")  # no ~/.config/kfp/context.json
    server = FakeKFP()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_submit_sends_the_compiled_pipeline_with_parameters(kfp_api):
    run_id = submit_run(kfp_api.url, {"p4_train_max_steps": 100, "p4_train_mu_init": 0.3}, experiment="amft",
                        run_name="nightly-1")
    (post,) = kfp_api.calls("POST", "/runs")
    body = post["body"]
    assert run_id in kfp_api.runs and body["display_name"] == "nightly-1"
    # the IR travels with its kubernetes platform spec (secrets, GPU pool), not just the DAG
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "amft-pipeline"
    assert "exec-train" in body["pipeline_spec"]["pipeline_spec"]["deploymentSpec"]["executors"]
    executors = body["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert "secretAsEnv" in executors["exec-train"] and "tolerations" in executors["exec-train"]
    assert body["runtime_config"]["parameters"] == {"p4_train_max_steps": 100, "p4_train_mu_init": 0.3}
    (exp,) = kfp_api.experiments.values()
    assert exp["display_name"] == "amft" and body["experiment_id"] == exp["experiment_id"]


def test_schedule_creates_a_recurring_run_with_max_concurrency_1_and_no_catchup(kfp_api):
    new_id, replaced = schedule_run(kfp_api.url, "0 0 3 * * *", {"p6_registry_model_name": "gp"}, name="nightly")
    assert replaced == []
    (post,) = kfp_api.calls("POST", "/recurringruns")
    body = post["body"]
    assert body["display_name"] == "nightly" and new_id in kfp_api.recurring
    assert str(body["max_concurrency"]) == "1"  # int64 in the API: JSON number or string
    assert body["no_catchup"] is True
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert body["mode"] == "ENABLE"
    assert body["runtime_config"]["parameters"] == {"p6_registry_model_name": "gp"}
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "amft-pipeline"


def test_scheduling_again_by_name_replaces_the_old_recurring_run(kfp_api):
    first, _ = schedule_run(kfp_api.url, "0 0 3 * * *", {}, name="nightly")
    other, _ = schedule_run(kfp_api.url, "0 0 5 * * *", {}, name="weekly")
    second, replaced = schedule_run(kfp_api.url, "0 30 4 * * *", {}, name="nightly")
    assert replaced == [first]
    assert set(kfp_api.recurring) == {other, second}  # the other schedule is untouched
    assert kfp_api.recurring[second]["trigger"]["cron_schedule"]["cron"] == "0 30 4 * * *"
    (delete,) = kfp_api.calls("DELETE", f"/recurringruns/{first}")
    # created before the old one is deleted: a failure in between never leaves no schedule
    order = [r["method"] + " " + r["path"] for r in kfp_api.requests]
    assert order.index(delete["method"] + " " + delete["path"]) > max(
        i for i, r in enumerate(kfp_api.requests) if r["method"] == "POST" and r["path"].endswith("/recurringruns"))
    # one experiment, found again by name on later calls
    assert len(kfp_api.experiments) == 1


def test_cli_schedule_and_token_from_the_environment(kfp_api, monkeypatch, capsys):
    monkeypatch.setenv("KFP_TOKEN", "tok-do-not-print-31337")
    code = cli.main(["pipeline", "schedule", "--host", kfp_api.url, "--cron", "15 2 * * *", "--name", "gp-nightly",
                     "--set", "p4_train_max_steps=80", "--set", "p6_registry_model_name=amft-gp"])
    assert code == 0
    (post,) = kfp_api.calls("POST", "/recurringruns")
    assert post["body"]["trigger"]["cron_schedule"]["cron"] == "0 15 2 * * *"  # 5 fields: seconds prepended
    assert post["body"]["runtime_config"]["parameters"] == {"p4_train_max_steps": 80,
                                                             "p6_registry_model_name": "amft-gp"}
    assert all(r["auth"] == "Bearer tok-do-not-print-31337" for r in kfp_api.requests)
    out = capsys.readouterr()
    assert "tok-do-not-print-31337" not in out.out + out.err
    assert "max_concurrency=1" in out.out


def test_cli_submit_rejects_an_unknown_parameter(kfp_api, capsys):
    assert cli.main(["pipeline", "submit", "--host", kfp_api.url, "--set", "p4_train_maxsteps=3"]) == 2
    assert "unknown pipeline parameter 'p4_train_maxsteps'" in capsys.readouterr().err
    assert kfp_api.requests == []


def test_cli_reports_an_unreachable_server_in_one_line(capsys, monkeypatch):
    monkeypatch.setenv("KFP_TOKEN", "tok-secret-424242")
    server = FakeKFP()  # bound, then closed: nothing listens on that port any more
    url = server.url
    server.server_close()
    assert cli.main(["pipeline", "submit", "--host", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: submit to http://127.0.0.1:") and err.count("\n") == 1
    assert "tok-secret-424242" not in err


def test_parameters_are_typed_from_the_pipeline_signature():
    from pipelines.amft_pipeline import amft_pipeline

    params = parse_params(amft_pipeline, ["p4_train_mu_init=1", "p3_model_name=123",
                                          "p4_train_overrides=[eval_every=5]", "p0_gpu_node_selector={pool: a100}"])
    assert params == {"p4_train_mu_init": 1.0, "p3_model_name": "123", "p4_train_overrides": ["eval_every=5"],
                      "p0_gpu_node_selector": {"pool": "a100"}}
    assert isinstance(params["p4_train_mu_init"], float)  # gates compare floats with float literals
    with pytest.raises(ValueError, match="expected Integer"):
        parse_params(amft_pipeline, ["p4_train_max_steps=ten"])


@pytest.mark.parametrize("expr, expected", [("0 3 * * *", "0 0 3 * * *"), ("*/30 * * * * *", "*/30 * * * * *")])
def test_cron_normalisation(expr, expected):
    assert normalize_cron(expr) == expected
    with pytest.raises(ValueError, match="6 fields"):
        normalize_cron("* *")
