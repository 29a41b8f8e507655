"""amft_lib.run.layout (mirror test): the run root's names, run ids, stage records (sorted, secrets redacted),
model pointers and staging, on a local run root (S3 behaves the same through amft_lib.storage)."""

from __future__ import annotations

import json

import pytest

from amft_lib.run import layout
from amft_lib.run.layout import RunError, RunRoot


def test_resolve_prefers_the_explicit_run_id_and_checks_it():
    run = RunRoot.resolve("s3://b/amft/", "r-1", job_id="job-9")
    assert (run.uri, run.run_id) == ("s3://b/amft/runs/r-1", "r-1")
    assert RunRoot.resolve("s3://b/amft", "", job_id="job-9").run_id == "job-9"  # else the KFP job id
    with pytest.raises(RunError, match=r"run id '\.\./x'"):
        RunRoot.resolve("s3://b/amft", "../x")
    with pytest.raises(RunError, match="s3_root is empty"):
        RunRoot.resolve("  ", "r-1")
    assert RunRoot.at("s3://b/amft/runs/r-1/").run_id == "r-1"


def test_every_contract_path_is_under_the_run_root():
    run = RunRoot.resolve("s3://b/amft", "r-1")
    names = [n for n, v in vars(RunRoot).items() if isinstance(v, property)]
    paths = {n: getattr(run, n) for n in names}
    shared = {"s3_root", "score_cache", "mlflow_artifacts"}  # shared by every run under the same S3 root
    assert len(names) > 10 and shared <= set(paths)
    assert all(p.startswith(run.uri + "/") for n, p in paths.items() if n not in shared)
    assert all(paths[n].startswith("s3://b/amft") and not paths[n].startswith(run.uri) for n in shared)
    assert len(set(paths.values())) == len(paths)  # one name per file or folder
    assert paths["warm_start_stats"] == "s3://b/amft/runs/r-1/warm_start/stats.json"


def test_stage_records_are_sorted_and_redacted(tmp_path):
    record = {"b": 1, "a": {"endpoint": "https://user:hunter2hunter2@s3.example.com/bucket"}}
    layout.put_json(str(tmp_path / "rec.json"), record)
    text = (tmp_path / "rec.json").read_text()
    assert "hunter2hunter2" not in text and text.index('"a"') < text.index('"b"')
    assert json.loads(layout.json_bytes({"x": 1})) == {"x": 1}


def test_publish_copies_a_folder_and_pointers_lead_back_to_it(tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\x00\x01")
    root = tmp_path / "root" / "model"
    written = layout.publish(src, str(root))
    assert written == [str(root / "config.json"), str(root / "sub" / "w.bin")]
    assert (root / "sub" / "w.bin").read_bytes() == b"\x00\x01"
    artifact = tmp_path / "artifact"
    layout.write_pointer(artifact, str(root), step=3)
    assert json.loads((artifact / layout.POINTER_FILE).read_text()) == {"uri": str(root), "step": 3}
    assert layout.model_uri(artifact) == str(root) and layout.open_model(artifact, tmp_path / "stage") == str(root)
    assert layout.model_uri(src) == str(src)  # an artifact holding the files is its own location
    assert layout.stage_model(str(src), tmp_path / "unused") == str(src)
