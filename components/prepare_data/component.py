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
    import tempfile

    from amft_lib import storage
    from amft_lib.data.prepare import PrepareConfig, run_prepare
    from amft_lib.pipeline_commands import fetch_input, publish, use_s3_endpoint

    use_s3_endpoint(s3_endpoint_url)
    with tempfile.TemporaryDirectory(prefix="amft-input-") as tmp:
        local_input = fetch_input(input_uri, tmp) if input_uri else None
        result = run_prepare(PrepareConfig(
            out_dir=dataset.path, task=task, input=local_input, seed=seed, train_size=train_size, val_size=val_size,
            test_id_size=test_id_size, test_ood_size=test_ood_size))
    publish(dataset.path, storage.join(run_root, "data"))
    dataset.metadata.update({"task": result.card.task, "rows": result.rows, "uri": storage.join(run_root, "data")})
    for split, n in result.rows.items():
        stats.log_metric(f"rows_{split}", n)
    for reason, n in result.card.dropped.items():
        stats.log_metric(f"dropped_{reason}", n)


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(prepare_data, "prepare_data.yaml")
