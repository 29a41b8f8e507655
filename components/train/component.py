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
):
    """Train and publish the final model.

    Args:
        train_config: TrainConfig as JSON (preflight's output).
        target_entropy: H* from the warm start; the controller's entropy term steers towards it.
        run_root: s3://…/runs/<run id>; checkpoints go to <run_root>/checkpoints/.
    """
    import json
    import shutil

    from amft_lib import checkpoint, storage
    from amft_lib.config import TrainConfig, config_from_dict
    from amft_lib.dataset import read_rows
    from amft_lib.pipeline_commands import (
        TRAIN_RESULT_FILE,
        arm_train_fault,
        publish,
        put_json,
        training_report_html,
        use_s3_endpoint,
    )
    from amft_lib.trainer import train as run_train

    use_s3_endpoint(s3_endpoint_url)
    cfg = config_from_dict(json.loads(train_config), TrainConfig)
    cfg.data.path = storage.join(run_root, "data")  # the durable copy; rows are read from the local artifact
    cfg.controller.target_entropy = target_entropy
    done = [step for step, _, complete in checkpoint.list_checkpoints(run_root) if complete]
    arm_train_fault(run_root)
    result = run_train(cfg, run_dir.path, init_model=warm_start_model.path, splits=read_rows(dataset.path),
                       progress=False, checkpoint_root=run_root, resume="auto")
    shutil.move(str(result.model_dir), model.path)
    summary = {"steps": result.steps, "mu_final": result.mu_final, "target_entropy": result.target_entropy,
               "val_accuracy_initial": result.val_accuracy_initial, "val_accuracy_final": result.val_accuracy_final,
               "val_reward_initial": result.val_reward_initial, "val_reward_final": result.val_reward_final,
               "resumed_from_step": max(done, default=0), "elapsed_s": result.elapsed_s,
               "method": cfg.controller.method}
    with open(curves.path, "w", encoding="utf-8") as f:
        f.write(training_report_html(run_dir.path, summary))
    publish(run_dir.path, storage.join(run_root, "train"))
    publish(model.path, storage.join(run_root, "model"))
    put_json(storage.join(run_root, TRAIN_RESULT_FILE), summary)
    model.metadata.update({"uri": storage.join(run_root, "model"), "method": cfg.controller.method})
    for key, value in summary.items():
        if isinstance(value, int | float) and value == value:
            stats.log_metric(key, float(value))


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(train, "train.yaml")
