"""Register: write the run's lineage record, then register the blessed model in the MLflow registry
and move the `champion` alias (amft_lib.registry.register_model, as `amft register`).

Runs only inside the pipeline's `dsl.If(blessed)`. Idempotent on the run id, so a retry returns
the version the first attempt created. The result goes to <run root>/registry.json.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Input, Model

from components import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register(
    model: Input[Model],
    run_id: str,
    run_root: str,
    s3_root: str,
    s3_endpoint_url: str,
    registry_model_name: str,
    registry_tracking_uri: str = "",
    registry_artifact_root: str = "",
    registry_alias: str = "champion",
) -> NamedTuple("Outputs", [("registered", bool), ("version", str), ("model_uri", str),
                            ("logged_model_id", str)]):
    """Register the model with its provenance tags and lineage.

    Args:
        run_id: the resolved run id (preflight's output); the registry is idempotent on it.
        registry_tracking_uri: MLflow tracking URI; empty uses $MLFLOW_TRACKING_URI.
        registry_artifact_root: where a new MLflow experiment keeps artifacts; empty uses <s3_root>/mlflow.
        registry_alias: alias the new version gets (champion, or candidate to leave @champion to an approval).
    """
    from collections import namedtuple

    from amft_lib.run.layout import RunRoot, use_s3_endpoint
    from amft_lib.run.stages import register_stage

    use_s3_endpoint(s3_endpoint_url)
    result = register_stage(RunRoot(run_root, run_id), model.path, s3_root=s3_root,
                            registry_model_name=registry_model_name, registry_tracking_uri=registry_tracking_uri,
                            registry_artifact_root=registry_artifact_root, registry_alias=registry_alias)
    return namedtuple("Outputs", ["registered", "version", "model_uri", "logged_model_id"])(
        result.registered, result.version or "", result.model_uri or "", result.logged_model_id or "")

if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(register, "register.yaml")
