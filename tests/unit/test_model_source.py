"""One resolver for every model source; offline unless the user opts in (no network is touched here)."""

import hashlib
import json
import os

import pytest

from amft_lib import cli
from amft_lib.config import ModelConfig
from amft_lib.errors import UserError
from amft_lib.model import load_policy
from amft_lib.model_source import ModelSourceError, classify, probe_model_source, resolve_model


@pytest.mark.parametrize(("name", "kind"), [
    ("tiny", "builtin"), ("smollm2-135m", "builtin"), ("s3://models/qwen/", "s3"),
    ("Qwen/Qwen2.5-1.5B-Instruct", "hub"), ("Qwen/Qwen2.5-1.5B-Instruct@main", "hub"), ("/mnt/models/qwen", "local"),
])
def test_classify(name, kind):
    assert classify(name) == kind


def test_an_existing_relative_folder_is_local_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert classify("org/name") == "local"


def test_hub_id_is_refused_offline_and_names_the_parameter():
    for call in (lambda: resolve_model("Qwen/Qwen2.5-1.5B-Instruct"),
                 lambda: probe_model_source("Qwen/Qwen2.5-1.5B-Instruct"),
                 lambda: load_policy(ModelConfig(name="Qwen/Qwen2.5-1.5B-Instruct"))):
        with pytest.raises(ModelSourceError) as err:
            call()
        assert isinstance(err.value, UserError)
        assert "p3_model_allow_download" in str(err.value) and "model.allow_download" in str(err.value)


def test_hub_id_probe_passes_when_opted_in_without_downloading():
    detail = probe_model_source("Qwen/Qwen2.5-1.5B-Instruct", allow_download=True)
    assert "p3_model_allow_download=true" in detail


def test_missing_local_folder_names_the_parameter(tmp_path):
    with pytest.raises(ModelSourceError, match=r"p3_model_name / model.name=.*config\.json does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_local_folder_records_every_file_sha256(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(b"abc")
    r = resolve_model(str(tmp_path))
    assert r.kind == "local" and r.local_dir == tmp_path
    # {"model_type": "llama"} is 23 bytes
    assert [(f.path, f.size) for f in r.files] == [("config.json", 23), ("sub/w.bin", 3)]
    assert r.files[1].sha256 == hashlib.sha256(b"abc").hexdigest()
    assert r.lineage()["files"][1]["sha256"] == r.files[1].sha256
    # preflight's probe checks the directory as a model (model_files): a .bin and no safetensors is refused
    with pytest.raises(UserError, match=r"sub/w\.bin: pickle-format weights only"):
        probe_model_source(str(tmp_path))


def test_cli_refuses_a_hub_id_in_one_line_exit_2(tmp_path, capsys):
    code = cli.main(["train", "--out", str(tmp_path / "o"), "--model", "Qwen/Qwen2.5-1.5B-Instruct",
                     "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "p3_model_allow_download" in err[0]


def test_a_local_source_with_a_link_out_is_refused_before_anything_reads_it(tmp_path):
    """resolve_model is what the warm-start stage calls before copying the base model to the run root
    (and S3): a link to a host file or /dev/zero is refused before hashing or copying."""
    from amft_lib.model_files import ModelFilesError

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    os.symlink("/dev/zero", model / "weights.bin")
    with pytest.raises(ModelFilesError, match=r"weights\.bin: symlink to /dev/zero, outside the model directory"):
        resolve_model(str(model))
    os.unlink(model / "weights.bin")
    (tmp_path / "host.txt").write_text("not part of the model")
    os.symlink(tmp_path / "host.txt", model / "notes.txt")
    with pytest.raises(ModelFilesError, match="outside the model directory"):
        resolve_model(str(model))
