"""Warm start: SFT warm-up → rejection sampling → SFT on demonstrations ∪ accepted samples
(amft_lib.warm_start.run_warm_start, as `amft warm-start`). Runs on a GPU node.

Also snapshots the base model it started from (`base_model`), so the evaluation compares against
exactly that model and the lineage record can hash it. H* (the warm-start policy's token entropy)
is returned for the training controller. Outputs are published to <run root>/warm_start/ and
<run root>/base_model/. With `checkpoint_every` > 0 (pipeline parameter p3_warm_start_checkpoint_every)
it checkpoints to <run root>/warm_start/checkpoints/, and a retried task resumes from the newest one.
With `num_nodes` × `nproc_per_node` > 1 the task launches the processes (torchrun locally, a Kubeflow
Trainer TrainJob on a cluster) as the train component does (amft_lib.run.scale_out).
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def warm_start(
    model: Output[Model],
    base_model: Output[Model],
    stats: Output[Metrics],
    dataset: Input[Dataset],
    warm_start_config: str,
    run_root: str,
    s3_endpoint_url: str,
    num_nodes: int = 1,
    nproc_per_node: int = 1,
    launcher: str = "torchrun",
    image: str = "",
    s3_secret: str = "",
    gpus_per_node: int = 0,
    cpu_per_node: str = "1",
    memory_per_node: str = "4Gi",
    node_selector: dict = {},  # noqa: B006 (a KFP default)
    tolerations: list = [],  # noqa: B006
    trainjob_timeout_h: float = 72.0,
    kueue_queue: str = "",
    kueue_priority_class: str = "",
) -> float:
    """Build the warm-start model; returns H* (nats/token).

    Args:
        warm_start_config: WarmStartConfig as JSON (preflight's output).
        run_root: s3://…/runs/<run id>.
        num_nodes: warm-start nodes (a TrainJob's numNodes; 1 locally).
        nproc_per_node: processes per node; num_nodes × nproc_per_node = 1 runs in this pod.
        launcher: how more than one process starts: torchrun (a local subprocess) or trainjob (Kubeflow Trainer).
        image: the TrainJob's image (trainjob only).
        s3_secret: Kubernetes secret with the S3 keys, read by the TrainJob's pods (trainjob only).
        gpus_per_node: GPUs of each TrainJob node (trainjob only).
        cpu_per_node: CPU request of each TrainJob node (trainjob only).
        memory_per_node: memory request of each TrainJob node (trainjob only).
        node_selector: node selector of the TrainJob's pods (trainjob only).
        tolerations: tolerations of the TrainJob's pods (trainjob only).
        trainjob_timeout_h: longest the TrainJob may run before it is deleted and the task fails (trainjob only).
        kueue_queue: Kueue LocalQueue labelled on the TrainJob; empty: none (trainjob only).
        kueue_priority_class: Kueue WorkloadPriorityClass labelled on the TrainJob (trainjob only).
    """
    from amft_lib.run.layout import RunRoot, use_s3_endpoint
    from amft_lib.run.scale_out import ClusterJob
    from amft_lib.run.stages import warm_start_stage

    use_s3_endpoint(s3_endpoint_url)
    cluster = ClusterJob(image, s3_secret, "", s3_endpoint_url, gpus_per_node, cpu_per_node, memory_per_node,
                         node_selector, tolerations,
                         timeout_s=trainjob_timeout_h * 3600, kueue_queue=kueue_queue,
                         kueue_priority_class=kueue_priority_class) if launcher == "trainjob" else None
    out = warm_start_stage(RunRoot.at(run_root), dataset.path, warm_start_config, model_dir=model.path,
                           base_model_dir=base_model.path, num_nodes=num_nodes, nproc_per_node=nproc_per_node,
                           launcher=launcher, cluster=cluster)
    model.metadata.update(out.metadata["model"])
    base_model.metadata.update(out.metadata["base_model"])
    for key, value in out.metrics.items():
        stats.log_metric(key, value)
    return out.value

if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(warm_start, "warm_start.yaml")
