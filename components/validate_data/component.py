"""Validate data: the Great Expectations gate (amft_lib.data.validate.run_validate, as `amft data validate`).

Returns `passed` (the single `Output`, see components/evaluate for why), which the pipeline
branches on with `dsl.If`: on False the run stops before
any GPU work, with this task's HTML/Markdown report in the UI and under <run root>/validation/.
The task itself succeeds on a failed validation; failing is the gate's job, so the report is
always attached.
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Output

from components import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def validate_data(
    report: Output[HTML],
    report_md: Output[Markdown],
    stats: Output[Metrics],
    dataset: Input[Dataset],
    run_root: str,
    s3_endpoint_url: str,
    min_rows: dict,
    max_prompt_tokens: int = 2048,
) -> bool:
    """Run the task's GX suite over the prepared dataset.

    Args:
        min_rows: minimum rows per split, e.g. {"train": 100, "val": 10, "test_id": 10}.
        max_prompt_tokens: longest prompt accepted (characters without a tokenizer).
    """
    import shutil
    import tempfile

    from amft_lib import storage
    from amft_lib.data.validate import ValidateConfig, run_validate
    from amft_lib.pipeline_commands import GATE_FILE, publish, put_json, use_s3_endpoint

    use_s3_endpoint(s3_endpoint_url)
    with tempfile.TemporaryDirectory(prefix="amft-validate-") as tmp:
        # KFP passes a dict parameter's numbers as floats; the suite wants integer row counts
        rows = {split: int(n) for split, n in min_rows.items()}
        result = run_validate(ValidateConfig(dataset=dataset.path, out_dir=tmp, min_rows=rows,
                                             max_prompt_tokens=max_prompt_tokens))
        shutil.copyfile(result.html_path, report.path)
        shutil.copyfile(result.markdown_path, report_md.path)
        publish(tmp, storage.join(run_root, "validation"))
    failed = [f.check for f in result.failures]
    put_json(storage.join(run_root, GATE_FILE),
             {"passed": result.passed, "failed_checks": failed, "statistics": result.statistics})
    for key in ("evaluated_expectations", "successful_expectations", "unsuccessful_expectations", "success_percent"):
        if isinstance(result.statistics.get(key), int | float):
            stats.log_metric(key, float(result.statistics[key]))
    stats.log_metric("passed", 1.0 if result.passed else 0.0)
    report_md.metadata["failed_checks"] = failed  # Metrics metadata must stay numeric for the UI
    print(f"validation {'passed' if result.passed else 'FAILED'}; failed checks: {', '.join(failed) or 'none'}")
    return result.passed


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(validate_data, "validate_data.yaml")
