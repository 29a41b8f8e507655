"""Evaluate: pass@1 / pass@k on the ID and OOD test splits for the trained model, the base model,
the warm-start model and the current champion; decide the blessing (amft_lib.evaluate.run_evaluate,
as `amft evaluate`).

The return value (blessed) is what the pipeline's registration gate branches on. It is the single
`Output` rather than a named output on purpose: kfp.local cannot resolve a named output of a
sibling task in a `dsl.If` condition and silently skips the branch (kfp 2.17.3). The comparison table and the
training curves are in the HTML/Markdown reports; metrics.json lands in <run root>/eval/.
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def evaluate(
    metrics: Output[Metrics],
    report: Output[HTML],
    report_md: Output[Markdown],
    model: Input[Model],
    base_model: Input[Model],
    warm_start_model: Input[Model],
    train_run: Input[Artifact],
    dataset: Input[Dataset],
    train_config: str,
    run_root: str,
    s3_endpoint_url: str,
    registry_model_name: str,
    registry_tracking_uri: str = "",
    metric: str = "test_id.accuracy",
    threshold: float = 0.0,
    max_regression: float = 0.0,
    warm_start_check: bool = True,
    pass_k: int = 4,
    n_samples: int = 8,
    max_examples: int = 0,
) -> bool:
    """Score the candidate against base, warm start and champion (models:/<name>@champion).

    Args:
        train_config: TrainConfig JSON; decoding follows it (max_new_tokens, chat template, seed).
        metric: gating metric SPLIT.FIELD; blessed when >= threshold and no split regresses by more
            than max_regression vs the champion (skipped on the first run).
        warm_start_check: also not blessed when significantly worse than the warm start (paired, per instance).
        max_examples: prompts per split (0 = all).
    """
    from amft_lib.run.layout import RunRoot, use_s3_endpoint
    from amft_lib.run.stages import evaluate_stage

    use_s3_endpoint(s3_endpoint_url)
    out = evaluate_stage(
        RunRoot.at(run_root), dataset.path, train_config, model=model.path, base_model=base_model.path,
        warm_start_model=warm_start_model.path, train_run=train_run.path, registry_model_name=registry_model_name,
        registry_tracking_uri=registry_tracking_uri, metric=metric, threshold=threshold,
        max_regression=max_regression, warm_start_check=warm_start_check,
        pass_k=pass_k, n_samples=n_samples, max_examples=max_examples,
        html_path=report.path, markdown_path=report_md.path)
    for key, value in out.metrics.items():
        metrics.log_metric(key, value)
    report.metadata.update(out.metadata["report"])  # Metrics metadata must stay numeric for the UI
    return out.value

if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(evaluate, "evaluate.yaml")
