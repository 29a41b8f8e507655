"""Warm start: SFT warm-up → rejection sampling → SFT on demonstrations ∪ accepted samples
(amft_lib.warm_start.run_warm_start, as `amft warm-start`). Runs on a GPU node.

Also snapshots the base model it started from (`base_model`), so the evaluation compares against
exactly that model and the lineage record can hash it. H* (the warm-start policy's token entropy)
is returned for the training controller. Outputs are published to <run root>/warm_start/ and
<run root>/base_model/.
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
    import dataclasses
    import json
    import shutil
    import tempfile

    from amft_lib import storage
    from amft_lib.config import WarmStartConfig, config_from_dict
    from amft_lib.dataset import read_rows
    from amft_lib.model import load_policy, save_policy
    from amft_lib.pipeline_commands import publish, use_s3_endpoint
    from amft_lib.warm_start import run_warm_start

    use_s3_endpoint(s3_endpoint_url)
    cfg = config_from_dict(json.loads(warm_start_config), WarmStartConfig)
    cfg.data.path = storage.join(run_root, "data")  # the durable copy; rows are read from the local artifact
    policy, tokenizer = load_policy(dataclasses.replace(cfg.model, lora=False), device="cpu", seed=cfg.seed)
    save_policy(policy, tokenizer, base_model.path)
    del policy
    with tempfile.TemporaryDirectory(prefix="amft-warm-start-") as tmp:
        result = run_warm_start(cfg, tmp, splits=read_rows(dataset.path), init_model=base_model.path)
        shutil.copytree(result.model_dir, model.path)
        publish(tmp, storage.join(run_root, "warm_start"))
    publish(base_model.path, storage.join(run_root, "base_model"))
    base_model.metadata.update({"model_name": cfg.model.name, "uri": storage.join(run_root, "base_model")})
    model.metadata.update({"target_entropy": result.target_entropy,
                           "uri": storage.join(run_root, "warm_start", "model")})
    stats.log_metric("acceptance_rate", result.acceptance_rate)
    stats.log_metric(f"pass_at_{cfg.rs_samples}", result.pass_at_k)
    stats.log_metric("target_entropy", result.target_entropy)
    for phase, accuracy in result.val_accuracy.items():
        stats.log_metric(f"val_accuracy_{phase}", accuracy)
    return float(result.target_entropy)


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(warm_start, "warm_start.yaml")
