"""The TrainJob watcher (amft_lib.run.trainjob_watch) against a fake Kubernetes API server.

The fake is the only mock here, and it stands in for the API server alone: a small class with the
three `CustomObjectsApi` methods the watcher calls, recording every call and answering reads from a
scripted sequence of TrainJob statuses (shaped like the CRD's `status`: conditions, trainerStatus).
Errors are real `kubernetes.client.ApiException`s, as the client raises them. Time is a fake clock.
"""

from __future__ import annotations

import json
import logging
import re

import pytest
from kubernetes.client import ApiException

from amft_lib.run.trainjob import trainjob_manifest
from amft_lib.run.trainjob_watch import TrainJobError, TrainJobFailed, TrainJobTimeout, run_trainjob

NAME, NAMESPACE = "amft-run-1-train", "kubeflow-user"
MANIFEST = trainjob_manifest(name=NAME, namespace=NAMESPACE, image="img", command=["torchrun"], num_nodes=2,
                             nproc_per_node=4)


def condition(kind: str, status: str = "True", reason: str = "", message: str = "") -> dict:
    return {"type": kind, "status": status, "reason": reason or kind, "message": message,
            "lastTransitionTime": "2026-12-02T20:00:00Z"}


def job(*conditions: dict, trainer: dict | None = None) -> dict:
    status: dict = {"conditions": list(conditions)}
    if trainer:
        status["trainerStatus"] = {"lastUpdatedTime": "2026-12-02T20:00:00Z", **trainer}
    return {**MANIFEST, "status": status}


RUNNING = job(condition("Created", reason="JobSetCreated"))
COMPLETE = job(condition("Created", reason="JobSetCreated"), condition("Complete", reason="JobSetCompleted"))
FAILED = job(condition("Created", reason="JobSetCreated"),
             condition("Failed", reason="JobsFailed", message="job node-1 failed:\n  BackoffLimitExceeded"))


def api_error(status: int, message: str) -> ApiException:
    exc = ApiException(status=status, reason={403: "Forbidden", 404: "Not Found", 409: "Conflict"}.get(status))
    exc.body = json.dumps({"kind": "Status", "message": message})
    return exc


class FakeCustomObjectsApi:
    """Records calls; `create_errors` are raised by successive creates, `reads` answer successive gets
    (the last one repeats)."""

    def __init__(self, reads: list[dict], create_errors: list[Exception] | None = None) -> None:
        self.reads = list(reads)
        self.create_errors = list(create_errors or [])
        self.calls: list[tuple] = []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.calls.append(("create", group, version, namespace, plural, body["metadata"]["name"]))
        if self.create_errors:
            raise self.create_errors.pop(0)
        return {**body, "status": {}}

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("get", group, version, namespace, plural, name))
        return self.reads.pop(0) if len(self.reads) > 1 else self.reads[0]

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self.calls.append(("delete", group, version, namespace, plural, name))
        return {"kind": "Status", "status": "Success"}

    def verbs(self) -> list[str]:
        return [c[0] for c in self.calls]


class Clock:
    """A fake monotonic clock that `sleep` advances."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def watch(api: FakeCustomObjectsApi, **kw):
    clock = Clock()
    return run_trainjob(api, MANIFEST, sleep=clock.sleep, clock=clock, **{"timeout_s": 3600, "poll_s": 10, **kw})


def test_success_creates_follows_and_deletes(caplog):
    api = FakeCustomObjectsApi([RUNNING, RUNNING, job(condition("Created"), trainer={"progressPercentage": 50,
                                                                                    "estimatedRemainingSeconds": 60}),
                                COMPLETE])
    with caplog.at_level(logging.INFO, logger="amft_lib.run.trainjob_watch"):
        final = watch(api)
    assert final["status"]["conditions"][-1]["type"] == "Complete"
    assert api.verbs() == ["create", "get", "get", "get", "get", "delete"]
    assert all(c[1:5] == ("trainer.kubeflow.org", "v1alpha1", NAMESPACE, "trainjobs") for c in api.calls)
    log = caplog.text
    assert "created (2 nodes × 4 processes)" in log
    assert "progress 50%" in log and "~60 s left" in log
    assert "Complete=True (JobSetCompleted)" in log and "deleted (complete)" in log
    # status *changes* are logged, not every poll: the two identical RUNNING reads give one line
    assert log.count("Created=True (JobSetCreated)\n") == 1


def test_failure_raises_one_line_with_the_reason_and_keeps_the_job():
    api = FakeCustomObjectsApi([RUNNING, FAILED])
    with pytest.raises(TrainJobFailed) as err:
        watch(api)
    message = str(err.value)
    assert message == (f"trainjob {NAMESPACE}/{NAME} failed: JobsFailed: job node-1 failed: BackoffLimitExceeded "
                       "(kept for its pod logs)")
    assert "delete" not in api.verbs()


def test_reattaches_to_a_job_an_earlier_attempt_created(caplog):
    """409 AlreadyExists: the retried launcher follows the running job instead of failing or starting another."""
    api = FakeCustomObjectsApi([RUNNING, COMPLETE], create_errors=[api_error(409, "trainjobs \"x\" already exists")])
    with caplog.at_level(logging.INFO, logger="amft_lib.run.trainjob_watch"):
        watch(api)
    assert api.verbs() == ["create", "get", "get", "delete"]
    assert "exists from an earlier attempt (running); re-attaching" in caplog.text


def test_an_earlier_attempts_complete_job_is_reused_without_training_again():
    api = FakeCustomObjectsApi([COMPLETE], create_errors=[api_error(409, "already exists")])
    watch(api)
    assert api.verbs() == ["create", "get", "delete"]


def test_an_earlier_attempts_failed_job_is_replaced(caplog):
    """A retry exists to try again: the failed job is deleted and created anew (resume from checkpoints)."""
    api = FakeCustomObjectsApi([FAILED, RUNNING, COMPLETE],
                               create_errors=[api_error(409, "already exists"), api_error(409, "being deleted")])
    with caplog.at_level(logging.INFO, logger="amft_lib.run.trainjob_watch"):
        watch(api)
    assert api.verbs() == ["create", "get", "delete", "create", "create", "get", "get", "delete"]
    assert "an earlier attempt failed (JobsFailed); replacing it" in caplog.text


def test_timeout_deletes_the_job_and_says_so():
    api = FakeCustomObjectsApi([RUNNING])
    with pytest.raises(TrainJobTimeout, match=r"did not finish within 60 s; deleted it"):
        watch(api, timeout_s=60, poll_s=10)
    assert api.verbs()[0] == "create" and api.verbs()[-1] == "delete"
    assert api.verbs().count("get") == 6  # polls at t = 10 … 60 s


def test_keep_always_keeps_a_finished_job():
    api = FakeCustomObjectsApi([COMPLETE])
    watch(api, keep="always")
    assert "delete" not in api.verbs()
    with pytest.raises(TrainJobError, match="keep='sometimes'"):
        watch(api, keep="sometimes")


@pytest.mark.parametrize("status, hint", [
    (403, "apply pipelines/rbac/trainjob-launcher.yaml"),
    (404, "is Kubeflow Trainer v2 installed"),
    (422, "the API server refused the manifest"),
])
def test_api_errors_are_one_line_with_a_hint(status, hint):
    api = FakeCustomObjectsApi([RUNNING], create_errors=[api_error(status, "trainjobs is forbidden:\nUser x")])
    with pytest.raises(TrainJobError) as err:
        watch(api)
    assert hint in str(err.value) and "\n" not in str(err.value)
    assert f"create failed ({status}: trainjobs is forbidden: User x)" in str(err.value)


def test_a_job_with_other_settings_is_never_attached_to():
    """Same name, different LAUNCH_LABEL (a later run reusing the run id with new parameters): a running
    one is an error (two trainings would race on the checkpoints), a finished one is replaced."""
    from amft_lib.run.trainjob_watch import LAUNCH_LABEL

    ours = {**MANIFEST, "metadata": {**MANIFEST["metadata"], "labels": {LAUNCH_LABEL: "aaaa"}}}
    theirs = {"metadata": {"name": NAME, "labels": {LAUNCH_LABEL: "bbbb"}}}
    clock = Clock()
    running = FakeCustomObjectsApi([{**theirs, "status": RUNNING["status"]}], create_errors=[api_error(409, "x")])
    with pytest.raises(TrainJobError, match="running with other settings"):
        run_trainjob(running, ours, timeout_s=60, sleep=clock.sleep, clock=clock)
    assert "delete" not in running.verbs()
    finished = FakeCustomObjectsApi([{**theirs, "status": COMPLETE["status"]}, COMPLETE],
                                    create_errors=[api_error(409, "x")])
    run_trainjob(finished, ours, timeout_s=60, sleep=clock.sleep, clock=clock)
    assert finished.verbs() == ["create", "get", "delete", "create", "get", "delete"]


def test_launch_trainjob_labels_the_job_with_its_settings_and_a_retry_reattaches(tmp_path):
    """amft_lib.run.scale_out.launch_trainjob end to end against the fake API server (namespace given,
    so no in-cluster config is read): the created body is the stage's manifest with the launch hash; a
    retry with the same launch spec (more checkpoints by then) finds its own running job and follows it."""
    from amft_lib.run.layout import RunRoot, put_json
    from amft_lib.run.scale_out import ClusterJob, ScaleOut, launch_trainjob
    from amft_lib.run.trainjob_watch import LAUNCH_LABEL

    run = RunRoot.at(str(tmp_path / "runs" / "r1"))
    job = ClusterJob(image="img", s3_secret="amft-s3", poll_s=0.0)
    put_json(run.launch_spec("train"), {"config": {"max_steps": 4}, "init_model": "s3://b/m", "resumed_from_step": 0})

    class Recording(FakeCustomObjectsApi):
        def create_namespaced_custom_object(self, group, version, namespace, plural, body):
            self.body = body
            return super().create_namespaced_custom_object(group, version, namespace, plural, body)

    first = Recording([COMPLETE])
    launch_trainjob(run, ScaleOut(1, 2, "trainjob"), job, api=first, namespace="team-a")
    label = first.body["metadata"]["labels"][LAUNCH_LABEL]
    assert re.fullmatch(r"[0-9a-f]{16}", label) and first.body["metadata"]["namespace"] == "team-a"
    assert first.body["metadata"]["name"] == "amft-r1-train"

    put_json(run.launch_spec("train"), {"config": {"max_steps": 4}, "init_model": "s3://b/m", "resumed_from_step": 2})
    own = {"metadata": {"name": "amft-r1-train", "labels": {LAUNCH_LABEL: label}}}
    retry = Recording([{**own, "status": RUNNING["status"]}, COMPLETE], create_errors=[api_error(409, "exists")])
    launch_trainjob(run, ScaleOut(1, 2, "trainjob"), job, api=retry, namespace="team-a")
    assert retry.verbs() == ["create", "get", "get", "delete"]  # re-attached: no second job
