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
    from amft_lib.run.layout import use_s3_endpoint
    from amft_lib.run.stages import summary_stage

    use_s3_endpoint(s3_endpoint_url)
    summary_stage(s3_root, run_id, job_id, state=status.state, error=status.error_message or "",
                  kfp_job=status.pipeline_job_resource_name, markdown_path=summary.path)

if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(run_summary, "run_summary.yaml")
