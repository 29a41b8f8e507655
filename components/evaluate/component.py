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

from components import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
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
    pass_k: int = 4,
    n_samples: int = 8,
    max_examples: int = 0,
) -> bool:
    """Score the candidate against base, warm start and champion (models:/<name>@champion).

    Args:
        train_config: TrainConfig JSON; decoding follows it (max_new_tokens, chat template, seed).
        metric: gating metric SPLIT.FIELD; blessed when >= threshold and no split regresses by more
            than max_regression vs the champion (skipped on the first run).
        max_examples: prompts per split (0 = all).
    """
    import json

    from amft_lib import storage
    from amft_lib.evaluate import EvalConfig, run_evaluate
    from amft_lib.pipeline_commands import use_s3_endpoint

    use_s3_endpoint(s3_endpoint_url)
    cfg = json.loads(train_config)
    out = storage.join(run_root, "eval")
    result = run_evaluate(EvalConfig(
        model=model.path, data=dataset.path, out_dir=out, base_model=base_model.path,
        warm_start_model=warm_start_model.path, champion_model=f"models:/{registry_model_name}@champion",
        run_dir=train_run.path, tracking_uri=registry_tracking_uri or None, metric=metric, threshold=threshold,
        max_regression=max_regression, pass_k=pass_k, n_samples=n_samples, max_examples=max_examples,
        max_new_tokens=cfg["rollout"]["max_new_tokens"], chat_template=cfg["model"]["chat_template"],
        seed=cfg["seed"], device=cfg["device"]))
    storage.get_file(storage.join(out, "report.html"), report.path)
    storage.get_file(storage.join(out, "report.md"), report_md.path)
    for split in ("test_id", "test_ood"):
        for field in ("accuracy", "pass_at_k", "format_error_rate"):
            value = (result.metrics.get(split) or {}).get(field)
            if isinstance(value, int | float):
                metrics.log_metric(f"{split}_{field}", float(value))
    metrics.log_metric("blessed", 1.0 if result.blessed else 0.0)
    report.metadata["reason"] = result.reason  # Metrics metadata must stay numeric for the UI
    print(result.reason)
    return result.blessed


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(evaluate, "evaluate.yaml")
