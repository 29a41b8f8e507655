"""The Kubeflow Trainer v2 `TrainJob` a GPU stage (train, warm start) launches for a multi-process run, as a dict.

Why a pure function: the manifest is what a cluster admits or refuses, and the only way to know it is
right without a cluster is to validate it against the CRD's OpenAPI schema
(tests/specs/kubeflow-trainer/, tests/unit/test_trainjob.py). Building it from plain values — no
Kubernetes client, no kfp, no environment reads — keeps that test exact and the watcher
(`amft_lib.run.trainjob_watch`) free of manifest details.

Shape (trainer.kubeflow.org/v1alpha1, Trainer v2.3): `spec.runtimeRef` names the ClusterTrainingRuntime
(`torch-distributed`: a JobSet with one replicated job `node` whose container is `node`); `spec.trainer`
carries image, command, args, env, numNodes, numProcPerNode and resourcesPerNode; everything pod-level
(node selector, tolerations, the /dev/shm volume and its mount, service account) goes through
`spec.runtimePatches[]` — the older `podSpecOverrides` is gone from the CRD. The runtime's torch plugin
sets `PET_NNODES`, `PET_NPROC_PER_NODE`, `PET_NODE_RANK`, `PET_MASTER_ADDR` and `PET_MASTER_PORT`, which
`torchrun` reads, so the command is a bare `torchrun -m …`; those names are refused in `env`.

Kueue: a cluster that admits GPU work through Kueue finds the LocalQueue in the TrainJob's label
`kueue.x-k8s.io/queue-name` and the WorkloadPriorityClass in `kueue.x-k8s.io/priority-class`
(Kueue's pkg/controller/constants: QueueLabel, WorkloadPriorityClassLabel); Kueue then manages the
TrainJob as one workload (it suspends and resumes it), so the labels go on the TrainJob only, never on
its pods (those would be admitted a second time by Kueue's pod integration). No queue, no labels.
`spec.activeDeadlineSeconds` bounds the job on the cluster's side too (counted from its start, and
reset when Kueue resumes it), so a job whose launcher died cannot hold GPUs past the timeout.

Secrets: credentials enter only as `valueFrom.secretKeyRef` (a secret's *name* and key); there is no
parameter that takes a value, so no value can reach the manifest, the API server's audit log or ours.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from amft_lib.errors import UserError

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
RUNTIME = "torch-distributed"
# The stock runtime's replicated job and its container (specs/kubeflow-trainer/torch_distributed_runtime.yaml).
NODE = "node"
PATCH_MANAGER = "amft.pipeline/train-launcher"
# torchrun's settings, owned by the runtime's torch plugin (it refuses a TrainJob that sets them).
RESERVED_ENV = frozenset({"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                          "PET_MASTER_PORT"})
# RFC 1035 label (the CRD's CEL rule). Kept to 40 characters, not 63: JobSet derives pod hostnames
# `<name>-node-<i>-<j>` and the master address `<name>-node-0-0.<name>` from it, and those must fit too.
NAME_MAX = 40
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
# A Kubernetes label value: at most 63 characters, alphanumerics at both ends, '-', '_', '.' inside.
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


class TrainJobError(UserError):
    """A TrainJob cannot be built from these values, or the cluster refused or failed it."""


def trainjob_name(run_id: str, stage: str) -> str:
    """A stable, valid TrainJob name for (`run_id`, `stage`): the same run and stage always give the
    same name, which is what makes a retried launcher find (re-attach to) its own job.

    Lower-cased, every other character replaced by '-', prefixed `amft-`; when that is longer than
    NAME_MAX the tail is cut and an 8-hex digest of the full id keeps distinct runs distinct."""
    if not run_id.strip() or not stage.strip():
        raise TrainJobError(f"trainjob name: run id {run_id!r} and stage {stage!r} must both be non-empty")
    slug = re.sub(r"[^a-z0-9]+", "-", f"amft-{run_id}-{stage}".lower()).strip("-")
    if len(slug) > NAME_MAX:
        digest = hashlib.sha256(f"{run_id}/{stage}".encode()).hexdigest()[:8]
        slug = f"{slug[:NAME_MAX - 9].rstrip('-')}-{digest}"
    return slug


def secret_env(secret: str, keys: Sequence[str], *, optional: bool = False) -> list[dict[str, Any]]:
    """Env entries that read each key of Kubernetes secret `secret` into the variable of the same name."""
    if not secret.strip():
        raise TrainJobError("secret name is empty: name the Kubernetes secret that holds the credentials")
    return [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": optional}}}
            for key in keys]


def kueue_labels(queue: str = "", priority_class: str = "", *, queue_param: str = "kueue queue",
                 priority_param: str = "kueue priority class") -> dict[str, str]:
    """Kueue's labels for a job or pod admitted through LocalQueue `queue` with WorkloadPriorityClass
    `priority_class`; {} for no queue (today's behaviour). A priority class without a queue is refused:
    Kueue ignores a job without a queue, so the class would silently do nothing. The `*_param` names
    are what an error calls the values (the pipeline parameter's name)."""
    queue, priority_class = queue.strip(), priority_class.strip()
    for name, value in ((queue_param, queue), (priority_param, priority_class)):
        if value and not _LABEL_VALUE.match(value):
            raise TrainJobError(f"{name}={value!r}: not a Kubernetes label value (at most 63 characters: letters, "
                                "digits, '-', '_', '.', starting and ending with a letter or digit)")
    if priority_class and not queue:
        raise TrainJobError(f"{priority_param}={priority_class!r} needs {queue_param}: Kueue ignores a job "
                            "without a queue")
    labels = {KUEUE_QUEUE_LABEL: queue} if queue else {}
    if priority_class:
        labels[KUEUE_PRIORITY_LABEL] = priority_class
    return labels


def resources_per_node(*, gpus: int, cpu: str, memory: str, gpu_resource: str = "nvidia.com/gpu") -> dict[str, Any]:
    """`resourcesPerNode` of a node: CPU and memory requested, GPUs (an extended resource: request ==
    limit) as a limit; none when `gpus` is 0 (a CPU-only TrainJob)."""
    if gpus < 0:
        raise TrainJobError(f"gpus per node={gpus}: must be 0 or more")
    out: dict[str, Any] = {"requests": {"cpu": str(cpu), "memory": str(memory)}}
    if gpus:
        out["limits"] = {gpu_resource: gpus}
    return out


def trainjob_manifest(
    *,
    name: str,
    namespace: str,
    image: str,
    command: Sequence[str],
    args: Sequence[str] = (),
    num_nodes: int = 1,
    nproc_per_node: int = 1,
    resources: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    secret_env_vars: Sequence[Mapping[str, Any]] = (),
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] = (),
    service_account: str = "",
    shm_size: str = "",
    labels: Mapping[str, str] | None = None,
    runtime: str = RUNTIME,
    active_deadline_s: float = 0,
) -> dict[str, Any]:
    """The TrainJob manifest (a dict ready for `CustomObjectsApi.create_namespaced_custom_object`).

    `env` holds plain (non-secret) variables; credentials come only through `secret_env_vars`
    (`secret_env(...)` entries: valueFrom.secretKeyRef), and a literal value there is refused.
    `shm_size` mounts a memory-backed /dev/shm of that size ("" for none; NCCL and DataLoader workers
    need more than a pod's 64 MiB default). `active_deadline_s` > 0 sets spec.activeDeadlineSeconds
    (rounded up to whole seconds). Raises TrainJobError naming the bad parameter.
    """
    _check(name, namespace, image, command, num_nodes, nproc_per_node, runtime)
    container: dict[str, Any] = {"name": NODE}
    pod: dict[str, Any] = {}
    if node_selector:
        pod["nodeSelector"] = {str(k): str(v) for k, v in node_selector.items()}
    if tolerations:
        pod["tolerations"] = [dict(t) for t in tolerations]
    if service_account:
        pod["serviceAccountName"] = service_account
    if shm_size:
        pod["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}}]
        container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if len(container) > 1:
        pod["containers"] = [container]
    trainer: dict[str, Any] = {"image": image, "command": list(command), "args": [str(a) for a in args],
                               "numNodes": num_nodes, "numProcPerNode": nproc_per_node,
                               "env": _env(env or {}, secret_env_vars)}
    if resources:
        trainer["resourcesPerNode"] = dict(resources)
    spec: dict[str, Any] = {"runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": runtime},
                            "trainer": trainer}
    if active_deadline_s:
        if isinstance(active_deadline_s, bool) or not active_deadline_s > 0:
            raise TrainJobError(f"active deadline={active_deadline_s!r} s: must be more than 0")
        spec["activeDeadlineSeconds"] = math.ceil(active_deadline_s)
    if pod:
        spec["runtimePatches"] = [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
            "replicatedJobs": [{"name": NODE, "template": {"spec": {"template": {"spec": pod}}}}]}}}}]
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels:
        metadata["labels"] = {str(k): str(v) for k, v in labels.items()}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": metadata, "spec": spec}


def _check(name: str, namespace: str, image: str, command: Sequence[str], num_nodes: int, nproc_per_node: int,
           runtime: str) -> None:
    """The rules the API server would apply (schema and CEL) plus our own, as one-line errors."""
    if not _NAME.match(name) or len(name) > NAME_MAX:
        raise TrainJobError(f"trainjob name={name!r}: use a lower-case RFC 1035 label of at most {NAME_MAX} "
                            "characters (trainjob_name() builds one)")
    if not namespace.strip():
        raise TrainJobError("namespace is empty: name the namespace the TrainJob runs in")
    if not image.strip():
        raise TrainJobError("image is empty: name the training image (e.g. AMFT_IMAGE_CUDA)")
    if not command:
        raise TrainJobError("command is empty: name the training entry point (e.g. torchrun -m amft_lib.cli …)")
    for label, value in (("num_nodes", num_nodes), ("nproc_per_node", nproc_per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TrainJobError(f"{label}={value!r}: must be a whole number ≥ 1")
    if not runtime.strip():
        raise TrainJobError("runtime is empty: name the ClusterTrainingRuntime (e.g. torch-distributed)")


def _env(plain: Mapping[str, str], secret_vars: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain variables first, then secret references; names unique, valid and not torchrun's."""
    out = [{"name": str(k), "value": str(v)} for k, v in plain.items()]
    for entry in secret_vars:
        ref = (entry.get("valueFrom") or {}).get("secretKeyRef") or {}
        if "value" in entry or not ref.get("name") or not ref.get("key"):
            raise TrainJobError(f"secret env {entry.get('name')!r}: give a valueFrom.secretKeyRef (secret name "
                                "and key), never a value")
        out.append(dict(entry))
    names = [e["name"] for e in out]
    for n in names:
        if not _ENV_NAME.match(n):
            raise TrainJobError(f"env name {n!r}: not a valid environment variable name")
        if n in RESERVED_ENV:
            raise TrainJobError(f"env {n}: set by the runtime's torch plugin for torchrun; remove it")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TrainJobError(f"env {duplicates}: each variable may be set once")
    return out
