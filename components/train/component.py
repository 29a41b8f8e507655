"""Train: the single AMFT loop from the warm-start model (amft_lib.trainer.train, as `amft train`).
Runs on a GPU node.

Checkpoints (weights, optimizer, RNG, data cursors and the μ controller state) go to the run root
every `checkpoint_every` steps with `resume="auto"`: a retried task — or a new pipeline run given
the same run id — continues from the newest verified checkpoint instead of starting over. The
model, the run's logs (metrics.jsonl: μ, entropy, reward, losses per step) and an HTML page of the
training curves are KFP artifacts and are published to <run root>/model/ and <run root>/train/.
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
):
    """Train and publish the final model.

    Args:
        train_config: TrainConfig as JSON (preflight's output).
        target_entropy: H* from the warm start; the controller's entropy term steers towards it.
        run_root: s3://…/runs/<run id>; checkpoints go to <run_root>/checkpoints/.
        registry_tracking_uri: MLflow tracking URI for the training curves; empty uses $MLFLOW_TRACKING_URI.
    """
    from amft_lib.run.layout import RunRoot, use_s3_endpoint
    from amft_lib.run.stages import train_stage

    use_s3_endpoint(s3_endpoint_url)
    out = train_stage(RunRoot.at(run_root), dataset.path, train_config, target_entropy=target_entropy,
                      init_model=warm_start_model.path, run_dir=run_dir.path, model_dir=model.path,
                      curves_path=curves.path, tracking_uri=registry_tracking_uri)
    model.metadata.update(out.metadata["model"])
    for key, value in out.metrics.items():
        stats.log_metric(key, value)

if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(train, "train.yaml")
