"""The TrainJob log tail (amft_lib.run.trainjob_logs) and the watcher using it, against a fake API server.

The fake stands in for the Kubernetes API server alone (none runs here): the two `CoreV1Api` methods
the tail calls, answering with real `kubernetes.client` model objects (V1PodList, V1Pod) and pod logs
in the kubelet's `timestamps=True` form; errors are real `ApiException`s. Like the kubelet under a
slow poll, it may return lines the tail has already seen: the tail must print each line once.
"""

from __future__ import annotations

import datetime as dt
import logging

import pytest
from kubernetes.client import ApiException, V1ObjectMeta, V1Pod, V1PodList, V1PodStatus
from test_trainjob_watch import COMPLETE, FAILED, MANIFEST, NAME, NAMESPACE, RUNNING, Clock, FakeCustomObjectsApi

from amft_lib.run.trainjob_logs import PodLogTail, pad_nanoseconds, split_timestamps
from amft_lib.run.trainjob_watch import TrainJobFailed, run_trainjob

NODE0 = f"jobset.sigs.k8s.io/jobset-name={NAME},jobset.sigs.k8s.io/replicatedjob-name=node," \
        "batch.kubernetes.io/job-completion-index=0"


def stamp(second: int, fraction: str = "5") -> str:
    return f"2026-12-02T20:00:{second:02d}.{fraction}Z"


def pod(name: str, *, node: int = 0, phase: str = "Running", created: int = 0) -> V1Pod:
    labels = {"jobset.sigs.k8s.io/jobset-name": NAME, "jobset.sigs.k8s.io/replicatedjob-name": "node",
              "batch.kubernetes.io/job-completion-index": str(node)}
    return V1Pod(metadata=V1ObjectMeta(name=name, labels=labels,
                                       creation_timestamp=dt.datetime(2026, 12, 2, 20, created, tzinfo=dt.UTC)),
                 status=V1PodStatus(phase=phase))


class FakeCoreV1Api:
    """Pods and their logs (lists of (second, line)); every call is recorded with its arguments."""

    def __init__(self) -> None:
        self.pods: list[V1Pod] = []
        self.logs: dict[str, list[tuple[int, str]]] = {}
        self.errors: list[Exception] = []
        self.calls: list[tuple[str, str, dict]] = []

    def list_namespaced_pod(self, namespace, label_selector=""):
        self.calls.append(("list", namespace, {"label_selector": label_selector}))
        if self.errors:
            raise self.errors.pop(0)
        wanted = dict(part.split("=", 1) for part in label_selector.split(","))
        return V1PodList(items=[p for p in self.pods if wanted.items() <= p.metadata.labels.items()])

    def read_namespaced_pod_log(self, name, namespace, container="", **kwargs):
        self.calls.append(("read", name, {"container": container, **kwargs}))
        lines = self.logs.get(name, [])
        if "tail_lines" in kwargs:
            lines = lines[-kwargs["tail_lines"]:]
        # timestamps=True prefixes each line; since_seconds is honoured loosely (everything comes back)
        return "".join(f"{stamp(s)} {text}\n" if kwargs.get("timestamps") else f"{text}\n" for s, text in lines)


def tail_of(core: FakeCoreV1Api) -> tuple[PodLogTail, list[str]]:
    printed: list[str] = []
    clock = Clock()
    return PodLogTail(core, NAMESPACE, NAME, emit=printed.append, clock=clock), printed


def test_the_node0_log_is_printed_once_as_it_grows_and_a_replaced_pod_starts_over():
    core = FakeCoreV1Api()
    tail, printed = tail_of(core)
    tail.poll()  # no pod yet: nothing, no error
    assert printed == [] and core.calls[-1] == ("list", NAMESPACE, {"label_selector": NODE0})

    core.pods = [pod(f"{NAME}-node-0-0-a"), pod(f"{NAME}-node-0-1-b", node=1)]
    core.logs[f"{NAME}-node-0-0-a"] = [(1, "step 1/10 loss=2.31"), (2, "step 2/10 loss=2.10")]
    core.logs[f"{NAME}-node-0-1-b"] = [(1, "rank 4 is quiet")]
    tail.poll()
    assert printed == [f"[{NAME}-node-0-0-a] step 1/10 loss=2.31", f"[{NAME}-node-0-0-a] step 2/10 loss=2.10"]
    first = core.calls[-1]
    assert first[1] == f"{NAME}-node-0-0-a" and first[2]["container"] == "node" and "tail_lines" in first[2]

    core.logs[f"{NAME}-node-0-0-a"] += [(3, "step 3/10 loss=1.95")]
    tail.clock.now += 15
    tail.poll()  # the fake returns all three lines again: only the new one is printed
    assert printed[2:] == [f"[{NAME}-node-0-0-a] step 3/10 loss=1.95"]
    assert core.calls[-1][2]["since_seconds"] == 20 and "tail_lines" not in core.calls[-1][2]

    core.pods.append(pod(f"{NAME}-node-0-0-c", created=5))  # node 0 restarted in a new pod
    core.logs[f"{NAME}-node-0-0-c"] = [(1, "resuming from step 3")]
    tail.poll()
    assert printed[3:] == [f"[{NAME}-node-0-0-c] (node 0 now runs in a new pod)",
                           f"[{NAME}-node-0-0-c] resuming from step 3"]


def test_lines_sharing_a_timestamp_are_each_printed_once():
    """A burst of lines can carry one timestamp; a read that ends inside the burst must not lose the rest."""
    core = FakeCoreV1Api()
    core.pods = [pod(f"{NAME}-node-0-0-a")]
    core.logs[f"{NAME}-node-0-0-a"] = [(1, "a"), (2, "b1"), (2, "b2")]
    tail, printed = tail_of(core)
    tail.poll()
    core.logs[f"{NAME}-node-0-0-a"] += [(2, "b3"), (3, "c")]
    tail.poll()
    assert [line.split("] ", 1)[1] for line in printed] == ["a", "b1", "b2", "b3", "c"]


def test_no_log_access_is_said_once_and_never_fails(caplog):
    core = FakeCoreV1Api()
    core.pods = [pod(f"{NAME}-node-0-0-a")]
    core.errors = [ApiException(status=400, reason="ContainerCreating")]
    tail, printed = tail_of(core)
    with caplog.at_level(logging.WARNING, logger="amft_lib.run.trainjob_logs"):
        tail.poll()  # 400: the container is not up yet, quietly retried
        assert caplog.text == "" and not tail.disabled
        core.errors = [ApiException(status=403, reason="Forbidden")]
        tail.poll()
        calls = len(core.calls)
        tail.poll()
        assert tail.failed_pods() == []
    assert len(core.calls) == calls, "a tail without RBAC stops calling the API"
    assert caplog.text.count("pods list and pods/log get") == 1 and printed == []


def test_timestamps_order_as_times_even_when_the_api_trims_zeros():
    assert pad_nanoseconds("2026-12-02T20:00:01.5Z") == "2026-12-02T20:00:01.500000000Z"
    assert pad_nanoseconds("2026-12-02T20:00:01Z") == "2026-12-02T20:00:01.000000000Z"
    assert pad_nanoseconds("2026-12-02T20:00:01.5Z") > pad_nanoseconds("2026-12-02T20:00:01.123456789Z")
    pairs = split_timestamps(f"{stamp(1)} a b\nno stamp here\n")
    assert pairs == [("2026-12-02T20:00:01.500000000Z", "a b"), ("", "no stamp here")]


def test_a_failed_job_reports_the_failed_pods_last_lines():
    api = FakeCustomObjectsApi([RUNNING, FAILED])
    core = FakeCoreV1Api()
    core.pods = [pod(f"{NAME}-node-0-0-a"), pod(f"{NAME}-node-0-1-b", node=1, phase="Failed")]
    core.logs[f"{NAME}-node-0-0-a"] = [(1, "step 1/10")]
    core.logs[f"{NAME}-node-0-1-b"] = [(1, "Traceback (most recent call last):"), (2, '  File "x.py", line 1'),
                                       (3, "torch.OutOfMemoryError: CUDA out of memory"), (4, "exiting")]
    tail, printed = tail_of(core)
    clock = Clock()
    with pytest.raises(TrainJobFailed) as err:
        run_trainjob(api, MANIFEST, timeout_s=3600, poll_s=10, sleep=clock.sleep, clock=clock, logs=tail)
    message = str(err.value)
    assert message.startswith(f"trainjob {NAMESPACE}/{NAME} failed: JobsFailed: ")
    assert f"; {NAME}-node-0-1-b: torch.OutOfMemoryError: CUDA out of memory (kept for its pod logs)" in message
    assert printed[0] == f"[{NAME}-node-0-0-a] step 1/10"
    assert f"── last 4 lines of failed pod {NAME}-node-0-1-b ──" in printed
    assert printed[-1] == f"[{NAME}-node-0-1-b] exiting"


def test_a_complete_job_prints_its_last_lines_before_it_is_deleted():
    api = FakeCustomObjectsApi([COMPLETE])
    core = FakeCoreV1Api()
    core.pods = [pod(f"{NAME}-node-0-0-a")]
    core.logs[f"{NAME}-node-0-0-a"] = [(9, "run summary: final test_id=0.41")]
    tail, printed = tail_of(core)
    clock = Clock()
    run_trainjob(api, MANIFEST, timeout_s=3600, poll_s=10, sleep=clock.sleep, clock=clock, logs=tail)
    assert printed == [f"[{NAME}-node-0-0-a] run summary: final test_id=0.41"]
    assert api.verbs()[-1] == "delete"
