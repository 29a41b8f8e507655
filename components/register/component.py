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
) -> NamedTuple("Outputs", [("registered", bool), ("version", str), ("model_uri", str)]):
    """Register the model with its provenance tags and lineage.

    Args:
        registry_tracking_uri: MLflow tracking URI; empty uses $MLFLOW_TRACKING_URI.
        registry_artifact_root: where a new MLflow experiment keeps artifacts; empty uses <s3_root>/mlflow.
    """
    from collections import namedtuple

    from amft_lib import storage
    from amft_lib.pipeline_commands import REGISTRY_FILE, put_json, use_s3_endpoint, write_run_lineage
    from amft_lib.registry import read_eval_metrics, register_model

    use_s3_endpoint(s3_endpoint_url)
    lineage_uri = write_run_lineage(run_root, run_id)
    result = register_model(
        model.path, read_eval_metrics(storage.join(run_root, "eval")), registry_model_name, run_id,
        lineage_uri=lineage_uri, tracking_uri=registry_tracking_uri or None,
        artifact_root=registry_artifact_root or storage.join(s3_root.rstrip("/"), "mlflow"))
    put_json(storage.join(run_root, REGISTRY_FILE), {
        "registered": result.registered, "name": result.name, "version": result.version, "created": result.created,
        "model_uri": result.model_uri, "alias_moved": result.alias_moved, "reason": result.reason})
    return namedtuple("Outputs", ["registered", "version", "model_uri"])(
        result.registered, result.version or "", result.model_uri or "")


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(register, "register.yaml")
