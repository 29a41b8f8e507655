"""Prepare data: generate General Points or ingest a user file, dedup, split by canonical key,
decontaminate, write parquet + card (amft_lib.data.prepare.run_prepare, as `amft data prepare`).

The dataset is the KFP `Dataset` artifact and is also published to <run root>/data/, where
training configs, lineage records and auditors find it after the run.
"""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from components import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def prepare_data(
    dataset: Output[Dataset],
    stats: Output[Metrics],
    run_root: str,
    s3_endpoint_url: str,
    task: str = "general_points",
    input_uri: str = "",
    train_size: int = 8000,
    val_size: int = 200,
    test_id_size: int = 200,
    test_ood_size: int = 200,
    seed: int = 1234,
):
    """Write the prepared dataset.

    Args:
        run_root: s3://…/runs/<run id> from preflight.
        task: general_points (generated) or math (ingested from input_uri).
        input_uri: user JSONL/parquet (local path or s3://); empty generates General Points.
        train_size, val_size, test_id_size, test_ood_size: generated rows per split.
        seed: generator and split-hash seed.
    """
    from amft_lib.run.layout import RunRoot, use_s3_endpoint
    from amft_lib.run.stages import prepare_stage

    use_s3_endpoint(s3_endpoint_url)
    out = prepare_stage(RunRoot.at(run_root), dataset.path, task=task, input_uri=input_uri, train_size=train_size,
                        val_size=val_size, test_id_size=test_id_size, test_ood_size=test_ood_size, seed=seed)
    dataset.metadata.update(out.metadata["dataset"])
    for key, value in out.metrics.items():
        stats.log_metric(key, value)

if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(prepare_data, "prepare_data.yaml")
