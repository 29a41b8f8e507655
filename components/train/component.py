"""Train: the single AMFT loop from the warm-start model (amft_lib.trainer.train, as `amft train`).
Runs on a GPU node.

Checkpoints (weights, optimizer, RNG, data cursors and the μ controller state) go to the run root
every `checkpoint_every` steps with `resume="auto"`: a retried task — or a new pipeline run given
the same run id — continues from the newest verified checkpoint instead of starting over. The
model, the run's logs (metrics.jsonl: μ, entropy, reward, losses per step) and an HTML page of the
training curves are KFP artifacts and are published to <run root>/model/ and <run root>/train/.

Scale-out: with `num_nodes` × `nproc_per_node` > 1 the task launches the processes instead of
training itself — `launcher="trainjob"` creates a Kubeflow Trainer v2 TrainJob (runtime
torch-distributed) on the GPU pool and watches it, `launcher="torchrun"` runs a local torchrun — and
fills the same outputs from what rank 0 published to the run root (amft_lib.run.scale_out). The
TrainJob's placement and shape are plain inputs rather than dsl.TaskConfig passthroughs; the
scale_out module's docstring says why.
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def train(
    model: Output[Model],
    run_dir: Output[Artifact],
    stats: Output[Metrics],
    curves: Output[HTML],
    warm_start_model: Input[Model],
    dataset: Input[Dataset],
    train_config: str,
    target_entropy: float,
    run_root: str,
    s3_endpoint_url: str,
    registry_tracking_uri: str = "",
    num_nodes: int = 1,
    nproc_per_node: int = 1,
    launcher: str = "torchrun",
    image: str = "",
    s3_secret: str = "",
    registry_secret: str = "",
    gpus_per_node: int = 0,
    cpu_per_node: str = "1",
    memory_per_node: str = "4Gi",
    node_selector: dict = {},  # noqa: B006 (a KFP default)
    tolerations: list = [],  # noqa: B006
    trainjob_timeout_h: float = 72.0,
    kueue_queue: str = "",
    kueue_priority_class: str = "",
):
    """Train and publish the final model.

    Args:
        train_config: TrainConfig as JSON (preflight's output).
        target_entropy: H* from the warm start; the controller's entropy term steers towards it.
        run_root: s3://…/runs/<run id>; checkpoints go to <run_root>/checkpoints/.
        registry_tracking_uri: MLflow tracking URI for the training curves; empty uses $MLFLOW_TRACKING_URI.
        num_nodes: training nodes (a TrainJob's numNodes; 1 locally).
        nproc_per_node: training processes per node; num_nodes × nproc_per_node = 1 trains in this pod.
        launcher: how more than one process starts: torchrun (a local subprocess) or trainjob (Kubeflow Trainer).
        image: the TrainJob's image (trainjob only).
        s3_secret: Kubernetes secret with the S3 keys, read by the TrainJob's pods (trainjob only).
        registry_secret: Kubernetes secret with MLflow credentials, optional (trainjob only).
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
    from amft_lib.run.stages import train_stage

    use_s3_endpoint(s3_endpoint_url)
    cluster = ClusterJob(image, s3_secret, registry_secret, s3_endpoint_url, gpus_per_node, cpu_per_node,
                         memory_per_node, node_selector, tolerations,
                         timeout_s=trainjob_timeout_h * 3600, kueue_queue=kueue_queue,
                         kueue_priority_class=kueue_priority_class) if launcher == "trainjob" else None
    out = train_stage(RunRoot.at(run_root), dataset.path, train_config, target_entropy=target_entropy,
                      init_model=warm_start_model.path, run_dir=run_dir.path, model_dir=model.path,
                      curves_path=curves.path, tracking_uri=registry_tracking_uri, num_nodes=num_nodes,
                      nproc_per_node=nproc_per_node, launcher=launcher, cluster=cluster)
    model.metadata.update(out.metadata["model"])
    for key, value in out.metrics.items():
        stats.log_metric(key, value)

if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(train, "train.yaml")
