"""Preflight's look at Kueue: does the LocalQueue the GPU work will be labelled with exist and admit work?

Why before any GPU task: a TrainJob labelled with a LocalQueue that does not exist, or whose ClusterQueue is
inactive, is not rejected — Kueue leaves its Workload pending, and the run waits until `p0_trainjob_timeout_h`
(hours) before anyone learns of the typo. Preflight asks the API server instead, in one GET per object:

- `kueue.x-k8s.io/<version>/namespaces/<ns>/localqueues/<p0_kueue_queue>`: missing → refused, naming the
  parameter; its `Active` condition `False` (e.g. reason ClusterQueueIsInactive) → refused with Kueue's message;
- `kueue.x-k8s.io/<version>/workloadpriorityclasses/<p0_kueue_priority_class>` (cluster-scoped): missing → refused.

Versions are tried newest first (v1beta2, then v1beta1): a 404 in every served version means the object (or
Kueue) is not there. A 401/403 means the pipeline's service account may not read them: preflight passes with
"not checked" rather than failing a run on RBAC it does not need for anything else. Outside a cluster (local
runs) nothing is checked.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from amft_lib.errors import UserError

GROUP = "kueue.x-k8s.io"
VERSIONS = ("v1beta2", "v1beta1")


class KueueError(UserError):
    """The Kueue objects a run names do not exist or do not admit work."""


class NotChecked(Exception):
    """The API server would not say (401/403)."""


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def _get(fetch: Callable[[str], dict]) -> dict | None:
    """The object from the first served version that has it; None when every version answers 404."""
    for version in VERSIONS:
        try:
            return fetch(version)
        except Exception as exc:  # kubernetes.client.ApiException; the client is not imported here
            status = _status(exc)
            if status == 404:
                continue
            if status in (401, 403):
                raise NotChecked(f"the service account may not read {GROUP} objects ({status})") from None
            raise
    return None


def _active(queue: dict) -> tuple[bool, str]:
    """The LocalQueue's `Active` condition: (admits work, why not). No condition yet: assume it does."""
    for cond in (queue.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Active" and str(cond.get("status")) == "False":
            return False, f"{cond.get('reason') or 'Inactive'}: {' '.join(str(cond.get('message') or '').split())}"
    return True, ""


def check_kueue(api: Any, namespace: str, queue: str, priority_class: str = "") -> str:
    """One line for preflight; raises KueueError naming the parameter. `api`: a kubernetes CustomObjectsApi."""
    if not queue:
        return "not used (p0_kueue_queue is empty)"
    try:
        found = _get(lambda v: api.get_namespaced_custom_object(GROUP, v, namespace, "localqueues", queue))
        if found is None:
            raise KueueError(f"p0_kueue_queue={queue}: no LocalQueue {queue!r} in namespace {namespace!r} (is Kueue "
                             f"installed? `kubectl get localqueues -n {namespace}` lists the queues there)")
        active, why = _active(found)
        if not active:
            raise KueueError(f"p0_kueue_queue={queue}: LocalQueue {namespace}/{queue} admits no work ({why})")
        cluster_queue = (found.get("spec") or {}).get("clusterQueue", "?")
        detail = f"LocalQueue {namespace}/{queue} → ClusterQueue {cluster_queue}, active"
    except NotChecked as exc:
        return f"not checked: {exc}"
    if priority_class:  # cluster-scoped: a namespaced Role cannot grant it (pipelines/rbac/trainjob-launcher.yaml)
        try:
            pc = _get(lambda v: api.get_cluster_custom_object(GROUP, v, "workloadpriorityclasses", priority_class))
        except NotChecked as exc:
            return f"{detail}; WorkloadPriorityClass {priority_class} not checked: {exc}"
        if pc is None:
            raise KueueError(f"p0_kueue_priority_class={priority_class}: no WorkloadPriorityClass "
                             f"{priority_class!r} (`kubectl get workloadpriorityclasses` lists them)")
        detail += f"; WorkloadPriorityClass {priority_class} (value {pc.get('value', '?')})"
    return detail


def probe_kueue(queue: str, priority_class: str = "") -> str:
    """`check_kueue` from inside the pipeline's pod (its service account and namespace); outside a pod it says
    it did not check."""
    from amft_lib.run import scale_out

    if not os.path.exists(scale_out.SERVICE_ACCOUNT_NAMESPACE):
        return "not checked: not running in a Kubernetes pod"
    from kubernetes import client, config

    config.load_incluster_config()
    return check_kueue(client.CustomObjectsApi(), scale_out.pod_namespace(), queue, priority_class or "")
