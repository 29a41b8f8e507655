"""`amft lineage NAME:V --verify` proves the model (issue 21 item 2), against a real SeaweedFS and a
real MLflow registry on SQLite: every tampering of the run root, the registry's artifacts, the
record or its signature makes it exit 1 with a `verify: FAILED <object> …` line naming what
changed, then a summary line; the untouched run verifies ok and says how much it checked.

One registered run per module (building it — tiny models, one MLflow registration — is the slow
part); each row of TAMPER changes a copy of one thing and the fixture puts the original bytes back.
The rows count toward the project's bad-input total (one row, one case).

The run root is assembled from the files each stage writes (tiny models saved by the library,
the real configs, a real parquet dataset) rather than by running the training: lineage reads
files, and a full pipeline run per module would cost minutes (tests/integration/
test_pipeline_local.py runs the real DAG and checks its lineage verifies).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from amft_lib import cli, lineage, registry, storage
from amft_lib.run.layout import RunRoot

KEY = "k" * 8 + "lineage-signing-key-for-tests-0123456789"
OTHER_KEY = "o" * 8 + "another-signing-key-for-tests-012345678"
NAME = "gp-lineage-tamper"


@dataclass
class Run:
    """The registered run every row verifies: its run root, registry and artifacts location."""

    root: RunRoot
    tracking: str
    ref: registry.ModelRef
    tmp: Path

    @property
    def record_uri(self) -> str:
        return self.root.lineage


@pytest.fixture(scope="module")
def env(s3_server, tmp_path_factory) -> Iterator[None]:
    """S3 and the signing key for the whole module (the per-test `s3` fixture is function-scoped)."""
    mp = pytest.MonkeyPatch()
    for name in [n for n in os.environ if n.startswith("AWS_") or n == "MLFLOW_S3_ENDPOINT_URL"]:
        mp.delenv(name)
    for name, value in {**s3_server.settings.env(), "AWS_CONFIG_FILE": os.devnull,
                        "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true",
                        "AWS_MAX_ATTEMPTS": "3", lineage.SIGNING_KEY_ENV: KEY}.items():
        mp.setenv(name, value)
    yield
    mp.undo()


def _save_model(seed: int, out: Path) -> Path:
    from amft_lib.config import ModelConfig
    from amft_lib.model import load_policy, save_policy

    model, tok = load_policy(ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2), seed=seed)
    return save_policy(model, tok, out)


def _upload_dir(local: Path, uri: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.put_file(path, storage.join(uri, path.relative_to(local).as_posix()))


def _put_json(uri: str, obj: object) -> None:
    storage.put_bytes(uri, json.dumps(obj, sort_keys=True).encode())


METRICS = {"blessed": True, "reason": "blessed: first model",
           "test_id": {"accuracy": 0.0, "pass_at_k": 0.25, "n": 4, "k": 4, "format_error_rate": 0.5},
           "test_ood": {"accuracy": 0.0, "pass_at_k": 0.0, "n": 4, "k": 4, "format_error_rate": 0.75}}


@pytest.fixture(scope="module")
def run(env, s3_server, tmp_path_factory) -> Run:
    """A run root on SeaweedFS as the stages leave it, its lineage record (signed), registered in
    MLflow with artifacts on SeaweedFS, and the registry copy hashed into the record."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from amft_lib.config import TrainConfig, WarmStartConfig, config_to_dict
    from amft_lib.run.layout import put_json
    from amft_lib.run.summary import record_registry_copy, write_run_lineage

    tmp = tmp_path_factory.mktemp("lineage-tamper")
    root = RunRoot.resolve(s3_server.settings.uri("tests", f"lineage-tamper-{os.getpid()}-{time.time_ns()}"),
                           "run-tamper")
    for split in ("train", "test_id"):
        local = tmp / f"{split}.parquet"
        pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["1 2 3 4", "5 6 7 8"], "answer": ["24", "24"]}), local)
        storage.put_file(local, storage.join(root.data, f"{split}.parquet"))
    _put_json(root.data_card, {"task": "general_points", "source": "generated", "inputs": [],
                               "splits": {"train": {"rows": 2}, "test_id": {"rows": 2}}})
    _put_json(root.gate, {"passed": True, "statistics": {"success_percent": 100.0}})
    _upload_dir(_save_model(0, tmp / "base"), root.base_model)
    _upload_dir(_save_model(1, tmp / "warm"), root.warm_start_model)
    _upload_dir(_save_model(2, tmp / "final"), root.model)
    storage.put_bytes(root.warm_start_config, yaml.safe_dump(config_to_dict(WarmStartConfig())).encode())
    storage.put_bytes(storage.join(root.train, "config.yaml"), yaml.safe_dump(config_to_dict(TrainConfig())).encode())
    _put_json(root.warm_start_stats, {"target_entropy": 0.7, "rejection_sampling": {"acceptance_rate": 0.5}})
    mu = b'{"step": 0, "mu": 0.5}\n{"final": true, "mu": 0.6}\n'
    storage.put_bytes(storage.join(root.train, "metrics.jsonl"), mu)
    put_json(root.eval_metrics, METRICS)

    tracking = f"sqlite:///{tmp / 'mlflow.db'}"
    lineage_uri = write_run_lineage(root)
    result = registry.register_model(tmp / "final", METRICS, NAME, root.run_id,
                                     lineage_uri=lineage_uri, tracking_uri=tracking,
                                     artifact_root=storage.join(root.s3_root, "mlflow"), experiment="amft-tamper")
    assert result.created and result.version == "1"
    assert record_registry_copy(lineage_uri, result, tracking) is True
    assert record_registry_copy(lineage_uri, result, tracking) is False  # sealed once; a retry keeps it
    ref = registry.resolve(f"{NAME}:1", tracking)
    assert ref.artifact_uri.startswith("s3://")
    return Run(root, tracking, ref, tmp)


def _verify(run: Run, capsys, *args: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = cli.main(["lineage", f"{NAME}:1", "--tracking-uri", run.tracking, "--verify", *args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, [ln for ln in captured.out.splitlines() if ln.startswith("verify: ")]


# ── the record: what it holds ───────────────────────────────────────────────────────────────────


@pytest.mark.s3
def test_record_holds_every_object_of_the_model(run):
    record = lineage.read_lineage(run.record_uri)
    names = {e["name"] for e in record["objects"]}
    assert names == {"model", "warm_start_model", "train_config", "warm_start_config", "eval_metrics",
                     lineage.REGISTRY_OBJECT}
    model_files = {e["path"] for e in record["objects"] if e["name"] == "model"}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= model_files
    for entry in record["objects"]:
        assert len(entry["sha256"]) == 64 and entry["bytes"] > 0
    local_weights = run.tmp / "final" / "model.safetensors"
    [weights] = [e for e in record["objects"] if e["name"] == "model" and e["path"] == "model.safetensors"]
    assert weights["sha256"] == storage.sha256_file(local_weights)
    registry_paths = {e["path"] for e in record["objects"] if e["name"] == lineage.REGISTRY_OBJECT}
    assert {"MLmodel", "model/model.safetensors"} <= registry_paths
    assert record["registry"]["version"] == "1" and record["run_root"] == run.root.uri
    assert record["signature"]["alg"] == "hmac-sha256"
    text = storage.get_bytes(run.record_uri).decode()
    assert KEY not in text  # the key signs the record and never enters it
    # the registry run's copy was replaced by the sealed record
    assert lineage.parse_lineage(registry.logged_lineage(run.ref, run.tracking), "copy") == record


@pytest.mark.s3
def test_untouched_run_verifies_ok_and_counts_what_it_checked(run, capsys):
    code, lines = _verify(run, capsys)
    assert code == 0, lines
    [ok] = lines
    record = lineage.read_lineage(run.record_uri)
    n_files = len(record["inputs"]) + len(record["objects"])
    assert ok.startswith(f"verify: ok ({len({e['name'] for e in record['inputs'] + record['objects']}) + 3} object(s), "
                         f"{n_files} file(s), ")
    assert "signature valid (key id " in ok and "registry's copy of models:/gp-lineage-tamper/1" in ok


@pytest.mark.s3
def test_without_the_key_a_signed_record_says_not_checked(run, capsys, monkeypatch):
    monkeypatch.delenv(lineage.SIGNING_KEY_ENV)
    code, lines = _verify(run, capsys)
    assert code == 0 and f"signature signed (not checked: no {lineage.SIGNING_KEY_ENV})" in lines[-1]


# ── tampering: one row each ─────────────────────────────────────────────────────────────────────


def _flip_byte(uri: str, offset: int = -100) -> None:
    data = bytearray(storage.get_bytes(uri))
    data[offset] ^= 0x01
    storage.put_bytes(uri, bytes(data))


def _edit_record(change: Callable[[dict], None], *, resign: bool = False) -> Callable[[Run], None]:
    """Rewrite lineage.json with `change` applied; the signature stays as it was unless `resign`."""
    def apply(run: Run) -> None:
        record = lineage.read_lineage(run.record_uri)
        change(record)
        if resign:
            record["signature"] = lineage.sign_record(record, KEY.encode())
        storage.put_bytes(run.record_uri, json.dumps(record, indent=2).encode())
    return apply


def _set_dataset_entry(**fields: object) -> Callable[[dict], None]:
    def change(record: dict) -> None:
        record["inputs"][0].update(fields)
        record["inputs"][0].pop("group", None)
    return change


def _local_input(kind: str) -> Callable[[Run], None]:
    """Point the first data file at a local FIFO, a symlink out of its folder, or /dev/zero; the
    record is re-signed so only the bounded, regular-file reading can catch it."""
    def apply(run: Run) -> None:
        folder = run.tmp / f"input-{kind}"
        folder.mkdir(exist_ok=True)
        target = folder / "train.parquet"
        if target.exists() or target.is_symlink():
            target.unlink()
        if kind == "fifo":
            os.mkfifo(target)
        elif kind == "symlink":
            target.symlink_to("/dev/zero")
        path = "/dev/zero" if kind == "devzero" else str(target)
        _edit_record(_set_dataset_entry(uri=path), resign=True)(run)
    return apply


def _registry_artifact(run: Run, path: str) -> str:
    return storage.join(run.ref.artifact_uri, path)


def _set_tag(run: Run) -> None:
    registry.get_client(run.tracking).set_model_version_tag(NAME, "1", "amft.eval.test_id.accuracy", "0.99")


def _drop_objects(name: str) -> Callable[[dict], None]:
    def change(record: dict) -> None:
        record["objects"] = [e for e in record["objects"] if e["name"] != name]
    return change


def _bytes_of(name: str, path: str, value: int) -> Callable[[dict], None]:
    def change(record: dict) -> None:
        for entry in record["objects"]:
            if entry["name"] == name and entry.get("path") == path:
                entry["bytes"] = value
    return change


def _swap_registry_weights(run: Run) -> None:
    """Flip a byte of the registry's weights and rewrite their hash in the record to match: only the
    tie between the registry copy and the run root's model (same weights bytes) can catch it."""
    uri = _registry_artifact(run, "model/model.safetensors")
    _flip_byte(uri)
    sha = storage.sha256_bytes(storage.get_bytes(uri))

    def change(record: dict) -> None:
        for entry in record["objects"]:
            if entry["name"] == lineage.REGISTRY_OBJECT and entry["path"] == "model/model.safetensors":
                entry["sha256"] = sha
    _edit_record(change)(run)


@dataclass(frozen=True)
class Tamper:
    """One row: what is changed, the key the verifier holds, and what a FAILED line must say."""

    id: str
    apply: Callable[[Run], None]
    expect: tuple[str, ...]  # substrings of one `verify: FAILED` line
    key: str | None = None  # None: verify without a key, so the signature is not what catches it


TAMPER = [
    Tamper("run-root-weights-byte-flip", lambda r: _flip_byte(r.root.path("model", "model.safetensors")),
           ("FAILED model ", "/model/model.safetensors: sha256 mismatch")),
    Tamper("registry-artifact-byte-flip", lambda r: _flip_byte(_registry_artifact(r, "model/model.safetensors")),
           (f"FAILED {lineage.REGISTRY_OBJECT} ", "/model/model.safetensors: sha256 mismatch")),
    Tamper("registry-tokenizer-changed",
           lambda r: storage.put_bytes(_registry_artifact(r, "components/tokenizer/tokenizer_config.json"), b"{}"),
           (f"FAILED {lineage.REGISTRY_OBJECT} ", "tokenizer_config.json: sha256 mismatch")),
    Tamper("registry-artifact-added", lambda r: storage.put_bytes(_registry_artifact(r, "model/evil.py"), b"x"),
           (f"FAILED {lineage.REGISTRY_OBJECT} ", "/model/evil.py: unexpected file")),
    Tamper("registry-mlmodel-deleted", lambda r: storage.delete(_registry_artifact(r, "MLmodel")),
           (f"FAILED {lineage.REGISTRY_OBJECT} ", "/MLmodel: missing")),
    Tamper("metrics-edited-in-record",
           _edit_record(lambda rec: rec["eval"]["test_id"].update(accuracy=0.99)),
           ("FAILED eval ", "eval.test_id.accuracy: the record says 0.99, the evaluation artifact says 0.0")),
    Tamper("metrics-artifact-edited",
           lambda r: _put_json(r.root.eval_metrics, {**METRICS, "test_id": {**METRICS["test_id"], "accuracy": 0.99}}),
           ("FAILED eval_metrics ", "/eval/metrics.json: sha256 mismatch")),
    Tamper("registry-eval-tag-edited", _set_tag,
           ("FAILED registry tag amft.eval.test_id.accuracy: 0.99, the evaluation artifact says 0.0",)),
    Tamper("data-sha-rewritten", _edit_record(lambda rec: rec["inputs"][0].update(sha256="0" * 64)),
           ("FAILED dataset ", "sha256 mismatch (expected sha256 " + "0" * 64)),
    Tamper("data-file-changed", lambda r: _flip_byte(storage.join(r.root.data, "train.parquet"), 10),
           ("FAILED dataset ", "/data/train.parquet: sha256 mismatch")),
    Tamper("data-file-added", lambda r: storage.put_bytes(storage.join(r.root.data, "extra.parquet"), b"PAR1"),
           ("FAILED dataset ", "/data/extra.parquet: unexpected file")),
    Tamper("warm-start-weights-changed",
           lambda r: storage.put_file(r.tmp / "base" / "model.safetensors",
                                      r.root.path("warm_start", "model", "model.safetensors")),
           ("FAILED warm_start_model ", "/warm_start/model/model.safetensors: sha256 mismatch")),
    Tamper("warm-start-weights-grown",
           lambda r: storage.put_bytes(r.root.path("warm_start", "model", "model.safetensors"), b"\0" * 400_000),
           ("FAILED warm_start_model ", "size mismatch: 400000 bytes, more than the recorded")),
    Tamper("training-config-edited",
           lambda r: storage.put_bytes(storage.join(r.root.train, "config.yaml"), storage.get_bytes(
               storage.join(r.root.train, "config.yaml")).replace(b"seed: 0", b"seed: 7", 1)),
           ("FAILED train_config ", "/train/config.yaml: sha256 mismatch")),
    Tamper("warm-start-config-deleted", lambda r: storage.delete(r.root.warm_start_config),
           ("FAILED warm_start_config ", "/warm_start/config.yaml: missing")),
    Tamper("run-root-model-file-deleted", lambda r: storage.delete(r.root.path("model", "config.json")),
           ("FAILED model ", "/model/config.json: missing")),
    Tamper("inputs-emptied", _edit_record(lambda rec: rec.update(inputs=[])),
           ("FAILED inputs -: empty: the record names no data files",)),
    Tamper("model-files-dropped-from-record", _edit_record(_drop_objects("model")),
           ("FAILED model -: not recorded",)),
    Tamper("registry-copy-dropped-from-record", _edit_record(_drop_objects(lineage.REGISTRY_OBJECT)),
           (f"FAILED {lineage.REGISTRY_OBJECT} -: not recorded",)),
    Tamper("registry-weights-rehashed-in-record", _swap_registry_weights,
           (f"FAILED {lineage.REGISTRY_OBJECT} model/model.safetensors: differs from the run root's "
            "model.safetensors",)),
    Tamper("record-input-entry-malformed", _edit_record(lambda rec: rec["inputs"].insert(0, "train.parquet")),
           ("FAILED record inputs[0]: malformed entry: not an object",)),
    Tamper("record-sha256-not-hex", _edit_record(lambda rec: rec["objects"][0].update(sha256="../../etc/passwd")),
           ("FAILED record objects[0]: malformed entry: sha256 is not 64 hex digits",)),
    Tamper("record-registry-not-an-object", _edit_record(lambda rec: rec.update(registry="gp:1")),
           ("FAILED record registry: malformed: not an object",)),
    Tamper("record-of-another-version", _edit_record(lambda rec: rec["registry"].update(version="7")),
           ("FAILED registry models:/gp-lineage-tamper/1: the record belongs to gp-lineage-tamper version 7",)),
    Tamper("recorded-size-shrunk", _edit_record(_bytes_of("model", "model.safetensors", 1000), resign=True),
           ("FAILED model ", "size mismatch: ", "more than the recorded 1000"), key=KEY),
    Tamper("input-dev-zero", _local_input("devzero"),
           ("FAILED dataset /dev/zero: refused: a character device, not a regular file",), key=KEY),
    Tamper("input-symlink-out", _local_input("symlink"),
           ("FAILED dataset ", "train.parquet: refused: a symlink to /dev/zero, outside its folder"), key=KEY),
    Tamper("input-fifo", _local_input("fifo"),
           ("FAILED dataset ", "train.parquet: refused: a FIFO, not a regular file"), key=KEY),
    Tamper("logged-copy-differs", _edit_record(lambda rec: rec.update(created_at="2000-01-01T00:00:00Z"),
                                               resign=True),
           ("FAILED lineage copy models:/gp-lineage-tamper/1 lineage/lineage.json: differs from the record at",),
           key=KEY),
    Tamper("signature-other-key", lambda r: None,
           ("FAILED signature hmac-sha256: mismatch: signed with another key",), key=OTHER_KEY),
    Tamper("record-tampered-not-resigned", _edit_record(lambda rec: rec.update(created_at="2000-01-01T00:00:00Z")),
           ("FAILED signature hmac-sha256: mismatch: the record was changed after it was signed",), key=KEY),
    Tamper("signature-stripped", _edit_record(lambda rec: rec.pop("signature")),
           ("FAILED signature hmac-sha256: missing: the record is unsigned but "
            f"{lineage.SIGNING_KEY_ENV} is set",), key=KEY),
    Tamper("signature-forged", _edit_record(lambda rec: rec["signature"].update(hmac="0" * 64)),
           ("FAILED signature hmac-sha256: mismatch: the record was changed after it was signed",), key=KEY),
]


def _listing(run: Run) -> dict[str, str]:
    """uri → ETag (an MD5 on SeaweedFS) of every object a row may touch: run root and registry artifacts."""
    return {uri: etag for base in (run.root.uri, run.ref.artifact_uri) for uri, _, etag in storage.list_objects(base)}


@pytest.fixture(scope="module")
def snapshot(run) -> dict[str, tuple[str, bytes]]:
    return {uri: (etag, storage.get_bytes(uri)) for uri, etag in _listing(run).items()}


@pytest.fixture
def pristine(run, snapshot) -> Iterator[Run]:
    """The run, put back after the row: objects added are deleted, changed or deleted ones rewritten."""
    yield run
    for uri, etag in _listing(run).items():
        if uri not in snapshot:
            storage.delete(uri)
        elif etag != snapshot[uri][0]:
            storage.put_bytes(uri, snapshot[uri][1])
    now = _listing(run)
    for uri, (_, data) in snapshot.items():
        if uri not in now:
            storage.put_bytes(uri, data)
    registry.get_client(run.tracking).set_model_version_tag(
        NAME, "1", "amft.eval.test_id.accuracy", str(METRICS["test_id"]["accuracy"]))


@pytest.mark.s3
@pytest.mark.parametrize("case", TAMPER, ids=[t.id for t in TAMPER])
def test_tampering_is_caught_naming_the_object(case: Tamper, pristine, capsys, monkeypatch):
    case.apply(pristine)
    if case.key is None:
        monkeypatch.delenv(lineage.SIGNING_KEY_ENV)
    else:
        monkeypatch.setenv(lineage.SIGNING_KEY_ENV, case.key)
    started = time.monotonic()
    code, lines = _verify(pristine, capsys)
    assert time.monotonic() - started < 30  # bounded: /dev/zero, a FIFO or a grown object never stall it
    assert code == 1, lines
    failed = lines[:-1]
    assert failed and all(ln.startswith("verify: FAILED ") for ln in failed)
    assert any(all(part in ln for part in case.expect) for ln in failed), "\n".join(lines)
    assert lines[-1].startswith(f"verify: FAILED {len(failed)} mismatch(es); ")


@pytest.mark.s3
def test_restored_run_verifies_again(run, capsys):
    """The rows above put every byte back: the same command passes again (and the table did not
    leak into other tests)."""
    code, lines = _verify(run, capsys)
    assert code == 0, lines
