"""amft_lib.run.stages and amft_lib.run.preflight (mirror test, the parts without a cluster): evaluate_stage
reads the training config typed and validated — a broken config is one ConfigError before anything is scored
or written — and preflight sizes each GPU stage's pod from its world size and writes its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amft_lib.config import ConfigError, TrainConfig, config_to_dict
from amft_lib.run.layout import RunRoot
from amft_lib.run.preflight import Check, checks_markdown, stage_world_size, task_pods
from amft_lib.run.settings import defaults
from amft_lib.run.stages import evaluate_stage


def _evaluate(tmp_path, config: dict):
    run = RunRoot.resolve(str(tmp_path / "s3"), "r-1")
    return run, evaluate_stage(
        run, str(tmp_path / "data"), json.dumps(config), model=str(tmp_path / "m"), base_model=str(tmp_path / "b"),
        warm_start_model=str(tmp_path / "w"), train_run=str(tmp_path / "t"), registry_model_name="amft",
        registry_tracking_uri="", metric="accuracy", threshold=0.0, max_regression=0.0, pass_k=2, n_samples=2,
        max_examples=1, html_path=str(tmp_path / "r.html"), markdown_path=str(tmp_path / "r.md"))


@pytest.mark.parametrize(("key", "value", "match"), [
    ("rollout", {"max_new_tokens": 0}, "max_new_tokens"),  # out of range: typed validation refuses it
    ("not_a_section", {}, "not_a_section"),  # unknown keys are refused, not ignored
])
def test_evaluate_stage_refuses_a_bad_training_config_before_scoring(tmp_path, key, value, match):
    config = config_to_dict(TrainConfig())
    config[key] = {**config.get(key, {}), **value}
    with pytest.raises(ConfigError, match=match):
        _evaluate(tmp_path, config)
    assert not (tmp_path / "s3").exists() and not (tmp_path / "r.md").exists()


def test_stage_world_size_and_pods_follow_the_parameters():
    values = {**defaults(), "p4_train_num_nodes": 2, "p4_train_nproc_per_node": 4}
    assert stage_world_size(values, "train") == 8 and stage_world_size(values, "warm_start") == 1
    pods = task_pods(values)
    gpus = str(values["p0_gpu_count"])  # strings: KFP resolves resource placeholders as strings
    assert pods["warm_start"].gpus == gpus != "0" and pods["evaluate"].gpus == gpus  # one process: in its pod
    assert pods["train"].gpus == "0"  # 8 processes: launched elsewhere, the task pod only waits


def test_checks_markdown_says_failed_and_keeps_the_table_intact():
    text = checks_markdown([Check("s3", True, "reachable"), Check("model", False, "a|b missing")])
    assert text.startswith("# Preflight: FAILED")
    assert "| model | **failed** | a/b missing |" in text  # a `|` in a detail would break the table
    assert checks_markdown([Check("s3", True, "ok")]).startswith("# Preflight: passed")


@pytest.fixture
def gated(tmp_path):
    """A prepared dataset and a run root whose gate record passed it (as validate_stage writes it)."""
    from amft_lib.data.prepare import PrepareConfig, run_prepare
    from amft_lib.dataset import card_digest
    from amft_lib.run.layout import put_json

    data = tmp_path / "data"
    run_prepare(PrepareConfig(out_dir=str(data), train_size=20, val_size=4, test_id_size=4, test_ood_size=4))
    run = RunRoot.resolve(str(tmp_path / "s3"), "r-1")
    put_json(run.gate, {"passed": True, "failed_checks": [], "card_sha256": card_digest(data)})
    return run, data


def test_a_gpu_stage_reads_only_the_dataset_the_gate_passed(gated):
    import hashlib

    import pyarrow.parquet as pq

    from amft_lib.data.schema import DataError
    from amft_lib.dataset import card_digest, read_rows
    from amft_lib.run.stages import check_gated

    run, data = gated
    pinned = check_gated(run, data)  # untouched: allowed, and the card the gate validated is returned
    assert pinned == card_digest(data)
    # Rewrite a split file AND its card together: read_rows alone has no other reference and accepts it ...
    card = json.loads((data / "card.json").read_text())
    train = data / card["splits"]["train"]["file"]
    table = pq.read_table(train)
    pq.write_table(table.slice(1), train)
    card["splits"]["train"]["sha256"] = hashlib.sha256(train.read_bytes()).hexdigest()
    (data / "card.json").write_text(json.dumps(card))
    assert len(read_rows(data)["train"]) == table.num_rows - 1
    # ... the gate record does not
    with pytest.raises(DataError, match=r"card\.json: sha256 .* is not the card the data gate validated"):
        check_gated(run, data)
    assert card_digest(data) != json.loads(Path(run.gate).read_text())["card_sha256"]
    # a stage that checked the gate *before* the rewrite reads with the digest it got: the swapped card is
    # refused on the bytes read_rows parses, so there is no window between the check and the read
    with pytest.raises(DataError, match=r"card\.json: sha256 .* is not the card the data gate validated"):
        read_rows(data, pinned)
    (data / "card.json").unlink()
    with pytest.raises(DataError, match=r"card\.json: the data gate validated a dataset card .* there is none"):
        read_rows(data, pinned)


def test_the_gate_records_the_card_it_validated(tmp_path):
    """validate_stage writes the digest of the card bytes the suite read (run_validate's), so the record
    cannot name a card that arrived after the validation."""
    from amft_lib.data.prepare import PrepareConfig, run_prepare
    from amft_lib.data.validate import ValidateConfig, run_validate
    from amft_lib.dataset import card_digest

    data = tmp_path / "data"
    run_prepare(PrepareConfig(out_dir=str(data), train_size=20, val_size=4, test_id_size=4, test_ood_size=4))
    result = run_validate(ValidateConfig(dataset=str(data), out_dir=str(tmp_path / "v"), min_rows={"train": 1}))
    assert result.card_sha256 == card_digest(data)
    one = sorted(data.glob("*.parquet"))[0]
    assert run_validate(ValidateConfig(dataset=str(one), out_dir=str(tmp_path / "v1"))).card_sha256 is None


def test_a_failed_or_missing_gate_record(gated, caplog):
    from amft_lib.data.schema import DataError
    from amft_lib.run.layout import put_json
    from amft_lib.run.stages import check_gated

    run, data = gated
    put_json(run.gate, {"passed": False, "failed_checks": ["unique_ids"], "card_sha256": "x"})
    with pytest.raises(DataError, match=r"did not pass.*unique_ids"):
        check_gated(run, data)
    import os

    os.remove(run.gate)
    assert check_gated(run, data) is None  # outside the pipeline (no gate ran): allowed, and said
    assert "no data-gate record" in caplog.text
