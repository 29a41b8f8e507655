"""Where a GPU stage's processes run (train, warm start): in the task's own pod, under a local
`torchrun`, or as a Kubeflow Trainer v2 TrainJob of `num_nodes` × `nproc_per_node` processes.

    1 process                  in-pod: the stage's library call in the KFP task's process (unchanged)
    N > 1, launcher=torchrun   `python -m torch.distributed.run --standalone --nproc-per-node N -m amft_lib.cli
                               stage train-worker --run-root …` as a subprocess of the task (run-local, kfp.local)
    N > 1, launcher=trainjob   a TrainJob whose pods run `torchrun -m amft_lib.cli stage train-worker …`;
                               the task only launches and watches it (cluster)

(`warm-start-worker` for the warm start.) Both launched forms meet at the run root: the launcher
writes `<run>/launch/<stage>.json` (the resolved config, the init model's URI), every rank reads it and
the data from the run root, and rank 0 publishes exactly what the in-pod path publishes (train: model/,
train/, train/result.json; warm start: warm_start/ with its result.json); the launcher then fills its
KFP outputs from there. Nothing but the run root crosses the process (or pod) boundary.

Why the TrainJob's placement and resources are parameters, not `dsl.TaskConfig` passthroughs: whether
a TrainJob runs is decided at run time (from p4_train_num_nodes × p4_train_nproc_per_node), while a
passthrough's `apply_to_task` is fixed at compile time — forwarding RESOURCES with apply_to_task=True
doubles the GPU request whenever a TrainJob runs, with False the in-pod path gets no GPU. The node
selector, tolerations and GPU shape already are pipeline parameters (p0_gpu_*), so passing them on is
one source of truth that kfp.local, `.python_func` and the compiled YAML all show; a TaskConfig is
filled only by the KFP backend's driver, so that path could not be run or tested off-cluster. ENV
passthrough would also forward the task's secret-backed variables; the TrainJob instead names the
secrets (valueFrom.secretKeyRef) itself.

The launching task's own pod is sized at run time too (`task_pod`, from preflight's outputs): a TrainJob
launcher asks for no GPU and a small CPU/memory slice while its job holds the GPUs, so a pool with
exactly the nodes the job needs cannot deadlock on the launcher's request.
"""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from amft_lib.errors import UserError
from amft_lib.run.layout import RunRoot
from amft_lib.run.trainjob_logs import last_error_line

log = logging.getLogger(__name__)

LAUNCHERS = ("torchrun", "trainjob")
TRAIN, WARM_START = "train", "warm_start"
# stage → its `amft stage …` worker command, and the prefix of its pipeline parameters (named in errors)
WORKERS = {TRAIN: "train-worker", WARM_START: "warm-start-worker"}
PARAMETER_PREFIX = {TRAIN: "p4_train", WARM_START: "p3_warm_start"}
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
REGISTRY_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class ScaleOutError(UserError):
    """The scale-out parameters cannot work together, or the launched workers failed."""


@dataclass(frozen=True)
class ScaleOut:
    """`num_nodes` × `nproc_per_node` processes, started by `launcher` when there is more than one."""

    num_nodes: int = 1
    nproc_per_node: int = 1
    launcher: str = "torchrun"

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.nproc_per_node


@dataclass(frozen=True)
class ClusterJob:
    """What a TrainJob needs besides the process counts: the image, the secrets' *names*, the S3
    endpoint, and the GPU pool's placement and per-node shape (the pipeline's p0_* parameters).
    `timeout_s` bounds the launcher's wait (3 days by default) and is the job's activeDeadlineSeconds;
    `kueue_queue` / `kueue_priority_class` label it for Kueue (amft_lib.run.trainjob); `service_account`
    "" runs the pods under the namespace's default account, which needs no Kubernetes API rights."""

    image: str
    s3_secret: str
    registry_secret: str = ""
    s3_endpoint_url: str = ""
    gpus_per_node: int = 0
    cpu_per_node: str = "1"
    memory_per_node: str = "4Gi"
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()
    service_account: str = ""
    shm_size: str = "16Gi"
    timeout_s: float = 3 * 24 * 3600.0
    poll_s: float = 15.0
    kueue_queue: str = ""  # LocalQueue (label kueue.x-k8s.io/queue-name); "" = not admitted through Kueue
    kueue_priority_class: str = ""  # WorkloadPriorityClass (label kueue.x-k8s.io/priority-class)


# The launching task's pod while a TrainJob does the work: it only creates, watches and deletes the job.
LAUNCHER_CPU, LAUNCHER_MEMORY = "1", "2Gi"


@dataclass(frozen=True)
class PodRequest:
    """A GPU stage task's own pod resources, as strings: KFP's driver reads a resource placeholder's
    value with GetStringValue (backend/src/v2/driver/resolve.go), so an integer-typed input resolves
    to "" and the GPU limit is silently dropped."""

    gpus: str
    cpu: str
    memory: str


def task_pod(world_size: int, gpus: int, cpu: str, memory: str) -> PodRequest:
    """What the stage task's pod requests: the GPU shape when it trains in-pod (one process), almost
    nothing when it launches `world_size` processes elsewhere (their pods get the GPU shape)."""
    if world_size == 1:
        return PodRequest(str(gpus), cpu, memory)
    return PodRequest("0", LAUNCHER_CPU, LAUNCHER_MEMORY)


def check_scale_out(num_nodes: Any, nproc_per_node: Any, strategy: str, launcher: str = "torchrun",
                    gpus_per_node: int = 0, stage: str = TRAIN) -> ScaleOut:
    """The validated ScaleOut, or a one-line ScaleOutError naming the stage's pipeline parameter to fix."""
    p = PARAMETER_PREFIX[stage]
    for name, value in ((f"{p}_num_nodes", num_nodes), (f"{p}_nproc_per_node", nproc_per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ScaleOutError(f"{name}={value!r}: must be a whole number ≥ 1")
    if launcher not in LAUNCHERS:
        raise ScaleOutError(f"launcher={launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    scale = ScaleOut(num_nodes, nproc_per_node, launcher)
    if scale.world_size > 1 and strategy == "none":
        raise ScaleOutError(f"{p}_distributed_strategy=none with {scale.world_size} processes: each would train "
                            "its own copy; use auto, ddp or fsdp")
    if launcher == "torchrun" and num_nodes > 1:
        raise ScaleOutError(f"{p}_num_nodes={num_nodes}: a local run has one node; use {p}_nproc_per_node "
                            "for more processes")
    if launcher == "trainjob" and gpus_per_node and nproc_per_node > gpus_per_node:
        raise ScaleOutError(f"{p}_nproc_per_node={nproc_per_node} > p0_gpu_count={gpus_per_node}: one process "
                            "per GPU (raise p0_gpu_count or lower the processes)")
    return scale


def worker_args(run: RunRoot, stage: str = TRAIN) -> list[str]:
    """The worker's arguments after the launcher (`torchrun … <these>`): the run root is all it needs."""
    return ["-m", "amft_lib.cli", "stage", WORKERS[stage], "--run-root", run.uri]


def run_torchrun(run: RunRoot, nproc_per_node: int, *, stage: str = TRAIN,
                 env: Mapping[str, str] | None = None) -> None:
    """Run the workers under a single-node torchrun as a subprocess of this task, streaming their output.

    `python -m torch.distributed.run` is `torchrun` without relying on PATH (kfp.local tasks run with
    the venv's interpreter, not its bin/). Raises ScaleOutError with the exit code and the last error
    line the workers printed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
           *worker_args(run, stage)]
    log.info("launching %d processes: torchrun --standalone --nproc-per-node=%d %s", nproc_per_node, nproc_per_node,
             " ".join(worker_args(run, stage)))
    tail: collections.deque[str] = collections.deque(maxlen=200)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                          env={**os.environ, **(env or {})}) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            tail.append(line.rstrip("\n"))
        code = proc.wait()
    if code != 0:
        raise ScaleOutError(f"torchrun workers exited with {code}: {last_error_line(tail)}")


def trainjob_for(run: RunRoot, scale: ScaleOut, job: ClusterJob, namespace: str, launch_hash: str = "",
                 stage: str = TRAIN) -> dict:
    """The TrainJob manifest of this run's `stage` (a pure function of its arguments). `launch_hash`
    (of the launch spec) labels the job, so a retry can tell its own job from one started with other
    settings under the same run id (LAUNCH_LABEL, amft_lib.run.trainjob_watch)."""
    from amft_lib.run.trainjob import kueue_labels, resources_per_node, secret_env, trainjob_manifest, trainjob_name
    from amft_lib.run.trainjob_watch import LAUNCH_LABEL

    env = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if job.s3_endpoint_url:
        env.update(AWS_ENDPOINT_URL_S3=job.s3_endpoint_url, MLFLOW_S3_ENDPOINT_URL=job.s3_endpoint_url)
    secrets = secret_env(job.s3_secret, S3_KEYS)
    if job.registry_secret:  # optional, as on the KFP task: an MLflow server without auth needs none
        secrets += secret_env(job.registry_secret, REGISTRY_KEYS, optional=True)
    return trainjob_manifest(
        name=trainjob_name(run.run_id, stage), namespace=namespace, image=job.image,
        command=["python", "-m", "torch.distributed.run"], args=worker_args(run, stage), num_nodes=scale.num_nodes,
        nproc_per_node=scale.nproc_per_node,
        resources=resources_per_node(gpus=job.gpus_per_node, cpu=job.cpu_per_node, memory=job.memory_per_node),
        env=env, secret_env_vars=secrets, node_selector=job.node_selector, tolerations=job.tolerations,
        service_account=job.service_account, shm_size=job.shm_size,
        labels={"app.kubernetes.io/part-of": "amft-pipeline", "amft.pipeline/stage": stage.replace("_", "-"),
                **({LAUNCH_LABEL: launch_hash} if launch_hash else {}),
                **kueue_labels(job.kueue_queue, job.kueue_priority_class, queue_param="p0_kueue_queue",
                               priority_param="p0_kueue_priority_class")},
        active_deadline_s=job.timeout_s)


def pod_namespace() -> str:
    """The namespace this pod runs in, from its service account (what the pipeline's TrainJobs and Kueue
    LocalQueue live in)."""
    with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as f:
        return f.read().strip()


def launch_trainjob(run: RunRoot, scale: ScaleOut, job: ClusterJob, api: Any = None, namespace: str = "",
                    stage: str = TRAIN, core: Any = None) -> None:
    """Create (or re-attach to) `stage`'s TrainJob and wait for it (amft_lib.run.trainjob_watch),
    following its node-0 pod's log (amft_lib.run.trainjob_logs; `core` is a CoreV1Api, None: no logs).
    In a pod, the API clients and namespace come from the pod's service account."""
    from amft_lib.run.trainjob_logs import PodLogTail
    from amft_lib.run.trainjob_watch import run_trainjob

    if api is None:
        from kubernetes import client, config

        config.load_incluster_config()
        api, core = client.CustomObjectsApi(), client.CoreV1Api()
    namespace = namespace or pod_namespace()
    import json

    from amft_lib import storage

    # what defines the training, not resumed_from_step: a retry (more checkpoints by then) is the same job
    spec = json.loads(storage.get_bytes(run.launch_spec(stage)))
    launch_hash = storage.sha256_bytes(json.dumps([spec["config"], spec["init_model"]], sort_keys=True).encode())[:16]
    manifest = trainjob_for(run, scale, job, namespace, launch_hash, stage)
    logs = PodLogTail(core, namespace, manifest["metadata"]["name"]) if core is not None else None
    run_trainjob(api, manifest, timeout_s=job.timeout_s, poll_s=job.poll_s, logs=logs)
