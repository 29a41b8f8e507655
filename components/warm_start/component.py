"""Warm start: SFT warm-up → rejection sampling → SFT on demonstrations ∪ accepted samples
(amft_lib.warm_start.run_warm_start, as `amft warm-start`). Runs on a GPU node.

Also snapshots the base model it started from (`base_model`), so the evaluation compares against
exactly that model and the lineage record can hash it. H* (the warm-start policy's token entropy)
is returned for the training controller. Outputs are published to <run root>/warm_start/ and
<run root>/base_model/. With `checkpoint_every` > 0 (pipeline parameter p3_warm_start_checkpoint_every)
it checkpoints to <run root>/warm_start/checkpoints/, and a retried task resumes from the newest one.
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
) -> float:
    """Build the warm-start model; returns H* (nats/token).

    Args:
        warm_start_config: WarmStartConfig as JSON (preflight's output).
        run_root: s3://…/runs/<run id>.
    """
    from amft_lib.run.layout import RunRoot, use_s3_endpoint
    from amft_lib.run.stages import warm_start_stage

    use_s3_endpoint(s3_endpoint_url)
    out = warm_start_stage(RunRoot.at(run_root), dataset.path, warm_start_config, model_dir=model.path,
                           base_model_dir=base_model.path)
    model.metadata.update(out.metadata["model"])
    base_model.metadata.update(out.metadata["base_model"])
    for key, value in out.metrics.items():
        stats.log_metric(key, value)
    return out.value

if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(warm_start, "warm_start.yaml")
