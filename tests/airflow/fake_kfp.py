"""A FAKE Kubeflow Pipelines API server on 127.0.0.1, for the Airflow DAG tests.

Why a fake: a real KFP API server needs Kubernetes, Argo/MySQL and its object store, none of which
run on this machine; this is the one part of the DAG's path that the tests cannot run for real.
Everything else they touch is real: kfp.Client 2.17.3 and its generated REST client
(kfp_server_api), Airflow, and SeaweedFS for S3.

What it speaks, checked against kfp 2.17.3's client (kfp/client/client.py) and kfp_server_api's
run_service_api.py / experiment_service_api.py / healthz_service_api.py and the V2beta1* models:
  GET  /apis/v2beta1/healthz                → {"multi_user": false}         (kfp.Client() calls it)
  GET  /apis/v2beta1/experiments?filter=…   → {"experiments": […], "total_size": n}
       (create_experiment first looks the name up: filter = {"predicates": [{"operation": 1 |
       "EQUALS", "key": "display_name", "stringValue": NAME}]})
  POST /apis/v2beta1/experiments            body V2beta1Experiment → the experiment with its id
  POST /apis/v2beta1/runs                   body V2beta1Run {display_name, experiment_id,
       pipeline_spec, runtime_config{parameters}} → the run with run_id, state PENDING, created_at
  GET  /apis/v2beta1/runs?experiment_id=…&filter=…&sort_by=…&page_size=…&page_token=…
                                            → {"runs": […], "total_size": n, "next_page_token": ""}
  GET  /apis/v2beta1/runs/{run_id}          → the run; each GET advances it along its `script`
       (e.g. RUNNING → SUCCEEDED; the last state stays). A FAILED run carries `error`
       (google.rpc.Status) and a failed entry in run_details.task_details, as the real server reports
       a failed task. `on_get(run)` is called on each GET (a test observes Airflow meanwhile).
  POST /apis/v2beta1/runs/{run_id}:terminate → {} (kfp.Client.terminate_run); the run is CANCELED
       from then on, as the real server reports a terminated run once its pods stopped.
Requests are recorded (method, path, query, whether the bearer token matched) for assertions.
Faults: `fail_create_after_storing` answers 503 to a create *after* storing the run (the API timed
out but the run exists), `fail_get` answers 503 to the next N GETs of a run.
"""

import dataclasses
import datetime as dt
import json
import threading
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

EPOCH = "1970-01-01T00:00:00Z"  # what KFP returns for "not yet" (finished_at of a running run)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclasses.dataclass
class Outcome:
    """How a created run behaves: the states successive GETs return, and for a failure the error."""

    script: list[str] = dataclasses.field(default_factory=lambda: ["RUNNING", "SUCCEEDED"])
    error: str = ""
    failed_task: str = ""
    task_error: str = ""


class FakeKfp:
    def __init__(self, token: str = "") -> None:
        self.token = token
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.outcome = Outcome()
        self.on_finish: Callable[[dict[str, Any]], None] | None = None  # e.g. write summary.json to S3
        self.on_get: Callable[[dict[str, Any]], None] | None = None  # called on each GET of a run
        self.fail_create_after_storing = 0
        self.fail_get = 0
        self._scripts: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FakeKfp":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def created(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == "POST" and r["path"] == "/apis/v2beta1/runs"]

    def terminated(self) -> list[str]:
        """Run ids that were asked to terminate, in order."""
        return [r["path"].rsplit("/", 1)[1].removesuffix(":terminate") for r in self.requests
                if r["method"] == "POST" and r["path"].endswith(":terminate")]

    # ── API ──────────────────────────────────────────────────────────────────────────────────

    def handle(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        if path == "/apis/v2beta1/healthz" and method == "GET":
            return 200, {"multi_user": False, "pipeline_store": "database"}
        if path == "/apis/v2beta1/experiments":
            if method == "GET":
                found = [e for e in self.experiments.values() if _matches(e, query.get("filter"))]
                return 200, ({"experiments": found, "total_size": len(found)} if found else {})
            exp = {"experiment_id": str(uuid.uuid4()), "display_name": body["display_name"],
                   "description": body.get("description") or "", "created_at": _now(),
                   "namespace": body.get("namespace") or "", "storage_state": "AVAILABLE"}
            self.experiments[exp["experiment_id"]] = exp
            return 200, exp
        if path == "/apis/v2beta1/runs":
            if method == "GET":
                found = [r for r in self.runs.values() if _matches(r, query.get("filter"))
                         and (not query.get("experiment_id") or r["experiment_id"] == query["experiment_id"])]
                found.sort(key=lambda r: r["created_at"], reverse=query.get("sort_by", "").endswith("desc"))
                return 200, {"runs": found, "total_size": len(found), "next_page_token": ""}
            return self._create(body)
        if path.startswith("/apis/v2beta1/runs/") and path.endswith(":terminate") and method == "POST":
            run_id = path.rsplit("/", 1)[1].removesuffix(":terminate")
            if run_id not in self.runs:
                return 404, {"code": 5, "message": f"Run {run_id} not found", "details": []}
            self._scripts[run_id] = ["CANCELED"]
            return 200, {}
        if path.startswith("/apis/v2beta1/runs/") and method == "GET":
            run_id = path.rsplit("/", 1)[1]
            if run_id not in self.runs:
                return 404, {"code": 5, "message": f"Run {run_id} not found", "details": []}
            if self.fail_get:
                self.fail_get -= 1
                return 503, {"code": 14, "message": "upstream connect error (fake)"}
            run = self._advance(run_id)
            if self.on_get:
                self.on_get(run)
            return 200, run
        return 404, {"code": 5, "message": f"fake KFP: no route {method} {path}"}

    def _create(self, body: dict[str, Any]) -> tuple[int, Any]:
        run = {"run_id": str(uuid.uuid4()), "display_name": body["display_name"],
               "experiment_id": body["experiment_id"], "storage_state": "AVAILABLE",
               "pipeline_spec": body.get("pipeline_spec"), "runtime_config": body.get("runtime_config") or {},
               "created_at": _now(), "scheduled_at": _now(), "finished_at": EPOCH, "state": "PENDING",
               "state_history": [{"update_time": _now(), "state": "PENDING"}]}
        self.runs[run["run_id"]] = run
        self._scripts[run["run_id"]] = list(self.outcome.script)
        if self.fail_create_after_storing:
            self.fail_create_after_storing -= 1
            return 503, {"code": 14, "message": "the request timed out (fake), but the run was created"}
        return 200, run

    def _advance(self, run_id: str) -> dict[str, Any]:
        run, script = self.runs[run_id], self._scripts[run_id]
        if script:
            run["state"] = script.pop(0)
            run["state_history"].append({"update_time": _now(), "state": run["state"]})
            if run["state"] in ("SUCCEEDED", "FAILED", "CANCELED"):
                run["finished_at"] = _now()
                if run["state"] == "FAILED":
                    self._fail(run)
                if self.on_finish:
                    self.on_finish(run)
        return run

    def _fail(self, run: dict[str, Any]) -> None:
        out = self.outcome
        if out.error:
            run["error"] = {"code": 2, "message": out.error, "details": []}
        if out.failed_task:
            run["run_details"] = {"task_details": [
                {"run_id": run["run_id"], "task_id": str(uuid.uuid4()), "display_name": "preflight",
                 "state": "SUCCEEDED", "create_time": run["created_at"]},
                {"run_id": run["run_id"], "task_id": str(uuid.uuid4()), "display_name": out.failed_task,
                 "state": "FAILED", "create_time": run["created_at"],
                 "error": {"code": 2, "message": out.task_error, "details": []}},
            ]}

    # ── HTTP plumbing ────────────────────────────────────────────────────────────────────────

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                url = urlparse(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null") if length else None
                auth = self.headers.get("Authorization") or ""
                with fake._lock:
                    fake.requests.append({"method": method, "path": url.path, "query": query,
                                          "bearer_ok": auth == f"Bearer {fake.token}" if fake.token else True,
                                          "body": body})
                    if fake.token and auth != f"Bearer {fake.token}":
                        status, payload = 401, {"code": 16, "message": "unauthenticated"}
                    else:
                        status, payload = fake.handle(method, url.path, query, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

        return Handler


def _matches(obj: dict[str, Any], flt: str | None) -> bool:
    """The subset of KFP's filter protobuf the client sends: EQUALS on a string field."""
    if not flt:
        return True
    for pred in json.loads(flt).get("predicates", []):
        if pred.get("operation") not in (1, "EQUALS"):
            raise ValueError(f"fake KFP: unsupported filter operation {pred.get('operation')!r}")
        if obj.get(pred["key"]) != pred.get("stringValue"):
            return False
    return True
