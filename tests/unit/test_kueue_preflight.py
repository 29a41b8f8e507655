"""Preflight's Kueue check (amft_lib/run/kueue.py) against a fake Kubernetes API server: no API server or
Kueue can run here, so a small class stands in for `CustomObjectsApi`, serving objects shaped as Kueue
serves them (a LocalQueue with its `Active` condition, a WorkloadPriorityClass) and raising real
`kubernetes.client.ApiException`s. The fake serves one API version, so the version fallback is exercised."""

from __future__ import annotations

import pytest
from kubernetes.client import ApiException

from amft_lib.run.kueue import GROUP, KueueError, check_kueue


def local_queue(name: str, cluster_queue: str, active: str = "True", reason: str = "Ready",
                message: str = "Can submit new workloads to clusterQueue") -> dict:
    return {"apiVersion": f"{GROUP}/v1beta1", "kind": "LocalQueue", "metadata": {"name": name, "namespace": "team-a"},
            "spec": {"clusterQueue": cluster_queue},
            "status": {"admittedWorkloads": 0, "conditions": [
                {"type": "Active", "status": active, "reason": reason, "message": message,
                 "lastTransitionTime": "2026-12-01T00:00:00Z"}]}}


class FakeKueueApi:
    """Serves `objects` {(plural, name): body} under `served` versions only; `deny` answers 403."""

    def __init__(self, objects: dict, served: tuple[str, ...] = ("v1beta1",), deny: bool = False) -> None:
        self.objects, self.served, self.deny, self.calls = objects, served, deny, []

    def _answer(self, version: str, plural: str, name: str) -> dict:
        self.calls.append((version, plural, name))
        if self.deny:
            raise ApiException(status=403, reason="Forbidden")
        if version not in self.served or (plural, name) not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        return self.objects[(plural, name)]

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        assert group == GROUP and namespace == "team-a"
        return self._answer(version, plural, name)

    def get_cluster_custom_object(self, group, version, plural, name):
        assert group == GROUP
        return self._answer(version, plural, name)


def test_an_active_queue_and_its_priority_class_pass_with_what_they_are():
    api = FakeKueueApi({("localqueues", "gpu"): local_queue("gpu", "cluster-gpu"),
                        ("workloadpriorityclasses", "high"): {"kind": "WorkloadPriorityClass", "value": 1000}})
    detail = check_kueue(api, "team-a", "gpu", "high")
    assert detail == ("LocalQueue team-a/gpu → ClusterQueue cluster-gpu, active; WorkloadPriorityClass high "
                      "(value 1000)")
    assert [c[0] for c in api.calls] == ["v1beta2", "v1beta1", "v1beta2", "v1beta1"]  # newest first, then older


@pytest.mark.parametrize("objects, queue, pc, match", [
    ({}, "gpu-typo", "", r"p0_kueue_queue=gpu-typo: no LocalQueue 'gpu-typo' in namespace 'team-a' \(is Kueue"),
    ({("localqueues", "gpu"): local_queue("gpu", "cq", active="False", reason="ClusterQueueIsInactive",
                                          message="Can't submit new workloads to clusterQueue")}, "gpu", "",
     r"LocalQueue team-a/gpu admits no work \(ClusterQueueIsInactive: Can't submit new workloads to clusterQueue\)"),
    ({("localqueues", "gpu"): local_queue("gpu", "cq")}, "gpu", "urgent",
     r"p0_kueue_priority_class=urgent: no WorkloadPriorityClass 'urgent'"),
])
def test_a_queue_that_would_leave_the_trainjob_pending_is_refused_in_one_line(objects, queue, pc, match):
    with pytest.raises(KueueError, match=match) as err:
        check_kueue(FakeKueueApi(objects), "team-a", queue, pc)
    assert "\n" not in str(err.value)


def test_rbac_that_forbids_reading_kueue_is_not_a_failed_run():
    assert check_kueue(FakeKueueApi({}, deny=True), "team-a", "gpu") == (
        "not checked: the service account may not read kueue.x-k8s.io objects (403)")
    assert check_kueue(FakeKueueApi({}), "team-a", "") == "not used (p0_kueue_queue is empty)"


def test_other_api_errors_are_not_swallowed():
    class Broken(FakeKueueApi):
        def get_namespaced_custom_object(self, *a):
            raise ApiException(status=500, reason="Internal Server Error")

    with pytest.raises(ApiException):
        check_kueue(Broken({}), "team-a", "gpu")


def test_preflight_outside_a_pod_says_it_did_not_check(tmp_path, monkeypatch):
    from amft_lib.run import scale_out
    from amft_lib.run.preflight import run_preflight

    monkeypatch.setattr(scale_out, "SERVICE_ACCOUNT_NAMESPACE", str(tmp_path / "no-such-file"))
    result = run_preflight({"p0_s3_root": str(tmp_path / "s3"), "p0_run_id": "kq-1", "p3_model_name": "tiny",
                            "p0_kueue_queue": "gpu"})
    checks = {c.name: c for c in result.checks}
    assert checks["kueue"].ok and checks["kueue"].detail == "not checked: not running in a Kubernetes pod"


def test_a_priority_class_the_role_cannot_read_keeps_the_queue_check():
    class QueueOnly(FakeKueueApi):
        def get_cluster_custom_object(self, group, version, plural, name):
            raise ApiException(status=403, reason="Forbidden")  # a namespaced Role cannot grant cluster objects

    api = QueueOnly({("localqueues", "gpu"): local_queue("gpu", "cq")})
    assert check_kueue(api, "team-a", "gpu", "high") == (
        "LocalQueue team-a/gpu → ClusterQueue cq, active; WorkloadPriorityClass high not checked: the service "
        "account may not read kueue.x-k8s.io objects (403)")
