"""Stop run: fail the pipeline with a readable message (the `dsl.Else` of a gate).

KFP v2 has no built-in "fail" step. A gate task succeeds so its report stays attached; this task
then turns the gate's verdict into a failed run, which the run summary and the UI show as such.
"""

from kfp import dsl

from components import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def stop_run(reason: str, details: str = ""):
    """Raise, failing the run.

    Args:
        reason: what stopped the run, e.g. "data validation failed".
        details: e.g. the failed checks.
    """
    raise RuntimeError(f"{reason}: {details}" if details else reason)


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(stop_run, "stop_run.yaml")
