"""Run summary: the pipeline's exit handler. Runs whatever happened (success, a failed gate, a
crashed stage) and writes what the run did — stages reached, base vs warm start vs final accuracy,
blessing, registered version, lineage command — as a Markdown artifact and <run root>/summary.json.

It may only read pipeline parameters (an exit task cannot consume the tasks it guards), so it
resolves the run root itself and reads the stage records the other components left there.
"""

from kfp import dsl
from kfp.dsl import Markdown, Output

from components import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def run_summary(
    summary: Output[Markdown],
    status: dsl.PipelineTaskFinalStatus,
    s3_root: str,
    run_id: str,
    job_id: str,
    s3_endpoint_url: str,
):
    """Summarise the run; never fails because of what the run left behind.

    Args:
        status: the final state of the tasks inside the exit handler (filled in by KFP).
        run_id / job_id: as given to preflight; the explicit run id wins.
    """
    import contextlib

    from amft_lib import storage
    from amft_lib.pipeline_commands import SUMMARY_FILE, put_json, summarize_run, summary_markdown, use_s3_endpoint

    use_s3_endpoint(s3_endpoint_url)
    result = summarize_run(s3_root, run_id, job_id, status.state, status.error_message or "")
    result["kfp_job"] = status.pipeline_job_resource_name
    with open(summary.path, "w", encoding="utf-8") as f:
        f.write(summary_markdown(result))
    if result.get("run_root"):
        with contextlib.suppress(storage.StorageError):  # S3 down is reported in the artifact, not fatal here
            put_json(storage.join(result["run_root"], SUMMARY_FILE), result)


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(run_summary, "run_summary.yaml")
