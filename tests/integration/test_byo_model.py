"""Bring your own model: a Qwen2-architecture model (random weights, built from a config) saved to a folder and
to an s3:// prefix on the real SeaweedFS; `amft warm-start`, `amft train` and `amft evaluate` run on each
source, the S3 copy is staged once with every file's sha256, and preflight's probes accept both."""

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from amft_lib import cli, storage
from amft_lib.memory import count_parameters
from amft_lib.model_source import ModelSourceError, probe_model_source, read_model_config, resolve_model
from amft_lib.tasks.general_points import generate_rows

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    """A small random Qwen2 model + a character tokenizer saved as PreTrainedTokenizerFast (AutoTokenizer
    would swap in Qwen2's class, which drops spaces: DESIGN.md), and a dataset with every split."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from amft_lib.model import build_char_tokenizer

    root = tmp_path_factory.mktemp("byo")
    tok = build_char_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(root / "qwen2-byo")
    tok.save_pretrained(root / "qwen2-byo")
    data = root / "data"
    data.mkdir()
    rows = [*generate_rows(16, "face10", 1, "train"), *generate_rows(4, "face10", 2, "val"),
            *generate_rows(2, "face10", 3, "test_id"), *generate_rows(2, "face_ranks", 4, "test_ood")]
    pq.write_table(pa.Table.from_pylist(rows), data / "data.parquet")
    return {"model": root / "qwen2-byo", "data": data}


@pytest.fixture
def source(request, byo, s3_prefix, tmp_path, monkeypatch):
    monkeypatch.setenv("AMFT_CACHE_DIR", str(tmp_path / "cache"))
    if request.param == "dir":
        return str(byo["model"])
    uri = storage.join(s3_prefix, "models", "qwen2-byo") + "/"
    for path in sorted(byo["model"].iterdir()):
        storage.put_file(str(path), storage.join(uri, path.name))
    return uri


def _run(argv: list[str]) -> None:
    assert cli.main(argv) == 0, argv


@pytest.mark.parametrize("source", ["dir", "s3"], indirect=True)
def test_warm_start_train_evaluate_on_a_byo_model(source, byo, tmp_path):
    data = str(byo["data"])
    assert "p3_model" not in probe_model_source(source)  # accepted: a one-line detail, no error
    counted = count_parameters(read_model_config(source))  # the memory estimate reads config.json only
    assert counted.total > 0
    from amft_lib.config import ModelConfig
    from amft_lib.model import load_policy

    model, tok = load_policy(ModelConfig(name=source))
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert tok.decode(tok.encode("8 * 3 = 24", add_special_tokens=False)) == "8 * 3 = 24"  # spaces survive

    _run(["warm-start", "--model", source, "--data", data, "--out", str(tmp_path / "ws"),
          "--set", "device=cpu", "--set", "warmup_steps=2", "--set", "batch_size=4", "--set", "rs_samples=2",
          "--set", "rs_max_prompts=2", "--set", "final_sft_steps=1", "--set", "max_new_tokens=6",
          "--set", "entropy_prompts=2", "--set", "entropy_group=2", "--set", "eval_prompts=2"])
    _run(["train", "--model", source, "--data", data, "--out", str(tmp_path / "train"), "--max-steps", "2",
          "--no-progress", "--set", "device=cpu", "--set", "eval_every=0", "--set", "eval_prompts=2",
          "--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=2",
          "--set", "rollout.max_new_tokens=6", "--set", "loss.sft_batch_size=4", "--set", "controller.meta_interval=1",
          "--set", "controller.meta_val_prompts=2", "--set", "controller.meta_val_group=2"])
    _run(["evaluate", "--model", source, "--data", data, "--out", str(tmp_path / "eval"), "--max-new-tokens", "4",
          "--n-samples", "0", "--device", "cpu"])

    assert (tmp_path / "ws" / "model" / "model.safetensors").exists()
    steps = [json.loads(x) for x in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in steps if not r.get("final")]) == 2
    saved = json.loads((tmp_path / "train" / "model" / "config.json").read_text())
    assert saved["model_type"] == "qwen2"  # trained the user's architecture, not the built-in Llama
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["test_id"]["n"] == 2

    resolved = resolve_model(source)
    local = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in byo["model"].iterdir()}
    assert {f.path: f.sha256 for f in resolved.files} == local  # every file's sha256, as lineage records it
    if source.startswith("s3://"):
        staged = [p for p in (tmp_path / "cache" / "models").iterdir() if p.name.startswith("s3-")]
        assert len(staged) == 1, staged  # warm start, train and this resolve shared one staged copy
        assert resolved.kind == "s3" and resolved.local_dir == staged[0]
        assert resolved.revision.startswith("listing-sha256:")


def test_s3_prefix_without_a_model_is_refused_with_the_parameter(s3_prefix):
    storage.put_bytes(storage.join(s3_prefix, "empty", "README"), b"no model here")
    with pytest.raises(ModelSourceError, match=r"p3_model_name / model\.name=.*none named config\.json"):
        probe_model_source(storage.join(s3_prefix, "empty"))


def test_a_changed_object_is_a_new_cache_entry(byo, s3_prefix, tmp_path):
    uri = storage.join(s3_prefix, "m")
    for path in sorted(byo["model"].iterdir()):
        storage.put_file(str(path), storage.join(uri, path.name))
    first = resolve_model(uri, cache_dir=tmp_path)
    again = resolve_model(uri, cache_dir=tmp_path)
    assert again.local_dir == first.local_dir  # staged once
    cfg = json.loads(Path(first.local_dir, "config.json").read_text())
    cfg["note"] = "edited"
    storage.put_bytes(storage.join(uri, "config.json"), json.dumps(cfg).encode())
    changed = resolve_model(uri, cache_dir=tmp_path)
    assert changed.local_dir != first.local_dir
    assert json.loads(Path(changed.local_dir, "config.json").read_text())["note"] == "edited"


def test_an_s3_model_with_custom_code_or_only_pickles_is_refused_before_staging(byo, s3_prefix, tmp_path):
    """Preflight's S3 probe reads the config files (not the weights): `auto_map` is refused naming the
    object and key; a folder with only pickle weights is refused from the listing; staging (what the
    warm-start stage does before publishing the base model) refuses the same folder."""
    from amft_lib.model_files import ModelFilesError

    evil = storage.join(s3_prefix, "evil")
    for path in sorted(byo["model"].iterdir()):
        storage.put_file(str(path), storage.join(evil, path.name))
    cfg = json.loads((byo["model"] / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    storage.put_bytes(storage.join(evil, "config.json"), json.dumps(cfg).encode())
    for call in (lambda: probe_model_source(evil), lambda: read_model_config(evil),
                 lambda: resolve_model(evil, cache_dir=tmp_path)):
        with pytest.raises(ModelFilesError, match=r"evil/config\.json: key 'auto_map' names custom code"):
            call()

    pickled = storage.join(s3_prefix, "pickled")
    storage.put_file(str(byo["model"] / "config.json"), storage.join(pickled, "config.json"))
    storage.put_bytes(storage.join(pickled, "pytorch_model.bin"), b"\x80\x04")
    with pytest.raises(ModelFilesError, match=r"pickle-format weights only \(pytorch_model\.bin\)"):
        probe_model_source(pickled)


def _upload_with(byo, uri: str, weights: bytes | None = None, config: dict | None = None) -> str:
    for path in sorted(byo["model"].iterdir()):
        storage.put_file(str(path), storage.join(uri, path.name))
    if weights is not None:
        storage.put_bytes(storage.join(uri, "model.safetensors"), weights)
    if config is not None:
        storage.put_bytes(storage.join(uri, "config.json"), json.dumps(config).encode())
    return uri


def test_preflight_reads_an_s3_models_safetensors_headers_without_downloading_it(byo, s3_prefix):
    """A truncated upload, a header that lies about its size, and a config.json whose sizes disagree with the
    weights all fail preflight's S3 probe with one line naming the object; the good folder passes and says how
    many tensors it checked. Only ranged reads of the headers: the weights are never downloaded."""
    from amft_lib.model_files import ModelFilesError

    good = (byo["model"] / "model.safetensors").read_bytes()
    detail = probe_model_source(_upload_with(byo, storage.join(s3_prefix, "ok")))
    assert "tensors whose safetensors headers match config.json and its architecture" in detail
    cut = _upload_with(byo, storage.join(s3_prefix, "cut"), weights=good[: len(good) - 100])
    with pytest.raises(ModelFilesError, match=r"cut/model\.safetensors: truncated safetensors file"):
        probe_model_source(cut)
    liar = _upload_with(byo, storage.join(s3_prefix, "liar"), weights=(10**12).to_bytes(8, "little") + good[8:])
    with pytest.raises(ModelFilesError, match=r"liar/model\.safetensors: safetensors header claims 1000000000000"):
        probe_model_source(liar)
    cfg = json.loads((byo["model"] / "config.json").read_text())
    wrong = _upload_with(byo, storage.join(s3_prefix, "wrong"), config={**cfg, "num_hidden_layers": 4})
    with pytest.raises(ModelFilesError, match=r"wrong/config\.json: num_hidden_layers=4 but the weights hold 1"):
        probe_model_source(wrong)
    shape = _upload_with(byo, storage.join(s3_prefix, "shape"), config={**cfg, "intermediate_size": 96})
    with pytest.raises(ModelFilesError, match=r"shape/config\.json: the architecture wants .* of shape"):
        probe_model_source(shape)
