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
    from amft_lib.run.layout import RunRoot, use_s3_endpoint
    from amft_lib.run.stages import validate_stage

    use_s3_endpoint(s3_endpoint_url)
    out = validate_stage(RunRoot.at(run_root), dataset.path, html_path=report.path, markdown_path=report_md.path,
                         min_rows=min_rows, max_prompt_tokens=max_prompt_tokens)
    for key, value in out.metrics.items():
        stats.log_metric(key, value)
    report_md.metadata.update(out.metadata["report_md"])  # Metrics metadata must stay numeric for the UI
    return out.value

if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(validate_data, "validate_data.yaml")
