"""amft_lib.lineage's pure parts and local-file rules: the signature over the canonical record,
bounded regular-file hashing (a FIFO, /dev/zero or a symlink out never read), and the metrics
comparison. The S3 + MLflow side is tests/integration/test_lineage*.py."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from amft_lib import lineage

KEY = b"0123456789abcdef0123456789abcdef"


def _record() -> dict:
    return {"run_id": "r1", "eval": {"test_id": {"accuracy": 0.25}}, "inputs": [{"name": "dataset", "uri": "/d/x",
                                                                                "sha256": "a" * 64}]}


def test_signature_covers_the_canonical_record_not_its_layout():
    record = _record()
    record["signature"] = lineage.sign_record(record, KEY)
    relaid = json.loads(json.dumps(record, indent=4))  # another layout, the same record
    assert lineage.check_signature(relaid, KEY) == (f"valid (key id {lineage.key_id(KEY)})", None)
    relaid["eval"]["test_id"]["accuracy"] = 0.99
    assert lineage.check_signature(relaid, KEY) == ("INVALID", "mismatch: the record was changed after it was signed")
    status, problem = lineage.check_signature(record, b"another key, long enough to be one!!")
    assert status == "INVALID" and problem.startswith("mismatch: signed with another key (key id ")


def test_unsigned_and_unchecked_are_said_so():
    assert lineage.check_signature(_record(), None) == ("unsigned", None)
    assert lineage.check_signature(_record(), KEY)[1] == (
        f"missing: the record is unsigned but {lineage.SIGNING_KEY_ENV} is set")
    signed = {**_record(), "signature": lineage.sign_record(_record(), KEY)}
    assert lineage.check_signature(signed, None) == (f"signed (not checked: no {lineage.SIGNING_KEY_ENV})", None)


def test_write_signs_with_the_key_and_never_writes_it(tmp_path, monkeypatch):
    key = "s" * 40
    monkeypatch.setenv(lineage.SIGNING_KEY_ENV, key)
    uri = lineage.write_lineage({**_record(), "note": f"leaked {key}"}, str(tmp_path / "lineage.json"))
    text = Path(uri).read_text()
    assert key not in text and "leaked ***" in text  # the scrubber knows the variable's value
    assert lineage.check_signature(lineage.read_lineage(uri), key.encode())[1] is None
    monkeypatch.delenv(lineage.SIGNING_KEY_ENV)
    lineage.write_lineage(lineage.read_lineage(uri), uri)  # rewritten without a key: the old signature goes
    assert "signature" not in lineage.read_lineage(uri)


def test_a_short_key_is_refused_with_one_line(monkeypatch):
    monkeypatch.setenv(lineage.SIGNING_KEY_ENV, "short")
    with pytest.raises(lineage.LineageKeyError, match=f"^{lineage.SIGNING_KEY_ENV}: shorter than 32 characters"):
        lineage.signing_key()


def test_hashing_is_bounded_and_regular_files_only(tmp_path):
    data = tmp_path / "d" / "f.bin"
    data.parent.mkdir()
    data.write_bytes(b"x" * 5000)
    assert lineage.hash_object(str(data), limit=5000) == (hashlib.sha256(b"x" * 5000).hexdigest(), 5000)
    with pytest.raises(lineage.SizeExceededError, match="more than the recorded 4999 bytes"):
        lineage.hash_object(str(data), limit=4999)
    os.mkfifo(tmp_path / "d" / "fifo")
    (tmp_path / "d" / "zero").symlink_to("/dev/zero")
    (tmp_path / "d" / "inside").symlink_to(data)
    started = time.monotonic()
    for path, why in (("/dev/zero", "a character device, not a regular file"),
                      (tmp_path / "d" / "fifo", "a FIFO, not a regular file"),
                      (tmp_path / "d" / "zero", "a symlink to /dev/zero, outside its folder")):
        with pytest.raises(lineage.UnsafeObjectError, match=why):
            lineage.hash_object(str(path), limit=None, inside=str(tmp_path / "d"))
    assert time.monotonic() - started < 5  # nothing blocked on the FIFO or read /dev/zero
    # a symlink that stays inside its folder is the file it names
    assert lineage.hash_object(str(tmp_path / "d" / "inside"), inside=str(tmp_path / "d"))[1] == 5000


def test_describe_inputs_refuses_a_device_link_in_a_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").symlink_to("/dev/zero")
    with pytest.raises(lineage.UnsafeObjectError, match=r"^model .*model.safetensors: a symlink to /dev/zero"):
        lineage.describe_inputs("model", str(folder))
    (folder / "model.safetensors").unlink()
    [entry] = lineage.describe_inputs("model", str(folder))
    assert entry["path"] == "config.json" and entry["bytes"] == 2 and entry["group"] == str(folder)


def test_compare_metrics_names_each_leaf():
    recorded = {"blessed": True, "test_id": {"accuracy": 0.99, "n": 4}}
    artifact = {"blessed": True, "test_id": {"accuracy": 0.0, "n": 4}, "test_ood": {"accuracy": 0.5}}
    assert lineage.compare_metrics(recorded, artifact) == [
        "eval.test_id.accuracy: the record says 0.99, the evaluation artifact says 0.0",
        "eval.test_ood.accuracy: the record says '(absent)', the evaluation artifact says 0.5",
    ]
    assert lineage.compare_metrics(artifact, json.loads(json.dumps(artifact))) == []


def test_audit_of_an_empty_record_names_what_is_missing():
    audit = lineage.audit_lineage({"run_id": "r", "inputs": [], "objects": []}, registered=("m", "1"))
    assert [str(m) for m in audit.mismatches] == [
        "inputs -: empty: the record names no data files",
        *[f"{n} -: not recorded" for n in (*lineage.REQUIRED_OBJECTS, lineage.REGISTRY_OBJECT)],
        "registry models:/m/1: the record belongs to None version None",
    ]
