"""amft_lib.model_files: the checks that keep model directories data, never code.

Real files throughout: safetensors written by the safetensors library (and by hand where the test
needs a malformed one), a real tiny Llama directory from save_policy, real symlinks and FIFOs,
real chat templates rendered by transformers' sandbox in the forked child.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from amft_lib import model_files as mf
from amft_lib.errors import UserError

LIB = Path(__file__).resolve().parents[2] / "amft_lib"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from amft_lib.config import ModelConfig
    from amft_lib.model import load_policy, save_policy

    model, tok = load_policy(ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=2, tiny_heads=2), seed=0)
    return save_policy(model, tok, tmp_path_factory.mktemp("mf") / "tiny")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _raw(path: Path, header: dict, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


# ── layout ──────────────────────────────────────────────────────────────────────────────────────


def test_links_inside_are_followed_and_links_out_refused(tmp_path: Path) -> None:
    root = tmp_path / "m"
    (root / "sub").mkdir(parents=True)
    (root / "a.json").write_text("{}")
    os.symlink(root / "a.json", root / "sub" / "b.json")  # stays inside: accepted
    assert [p.relative_to(root).as_posix() for p in mf.regular_files(root)] == ["a.json", "sub/b.json"]
    (tmp_path / "secret.txt").write_text("host file")
    os.symlink("../../secret.txt", root / "sub" / "c.txt")
    with pytest.raises(mf.ModelFilesError, match=r"c\.txt: symlink to .*secret\.txt, outside the model directory"):
        mf.regular_files(root)


def test_a_linked_folder_and_special_files_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "m"
    (root / "real").mkdir(parents=True)
    os.symlink(root / "real", root / "alias")
    with pytest.raises(mf.ModelFilesError, match="symlink to a folder"):
        mf.regular_files(root)
    os.unlink(root / "alias")
    os.mkfifo(root / "pipe")
    with pytest.raises(mf.ModelFilesError, match="pipe: not a regular file"):
        mf.regular_files(root)


def test_the_hub_cache_root_admits_snapshot_links_to_its_blobs(tmp_path: Path) -> None:
    """huggingface_hub snapshots are links into ../../blobs: allowed within the hub cache, nowhere else."""
    hub = tmp_path / "hub"
    (hub / "blobs").mkdir(parents=True)
    (hub / "blobs" / "abc").write_text("{}")
    snap = hub / "snapshots" / "rev"
    snap.mkdir(parents=True)
    os.symlink("../../blobs/abc", snap / "config.json")
    with pytest.raises(mf.ModelFilesError, match="outside the model directory"):
        mf.regular_files(snap)
    assert mf.regular_files(snap, link_root=hub) == [snap / "config.json"]


@pytest.mark.parametrize("data, path", [
    ({"auto_map": {"AutoConfig": "x.Y"}}, "auto_map"),
    ({"text_config": {"auto_map": {}}}, "text_config.auto_map"),
    ({"layers": [{}, {"custom_pipelines": {}}]}, "layers[1].custom_pipelines"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, None),
])
def test_code_key_finds_custom_code_anywhere(data: dict, path: str | None) -> None:
    assert mf.code_key(data) == path


def test_check_no_code_names_the_code_files(tmp_path: Path, tiny_dir: Path) -> None:
    root = _copy(tiny_dir, tmp_path / "m")
    mf.check_no_code(root)
    (root / "modeling_evil.py").write_text("import os\n")
    with pytest.raises(mf.ModelFilesError, match=r"holds code file\(s\) modeling_evil\.py"):
        mf.check_no_code(root)


def test_read_json_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"pad": "x" * 200}))
    with pytest.raises(mf.ModelFilesError, match="more than the 100 a model's JSON file may have"):
        mf.read_json(path, limit=100)
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(mf.ModelFilesError, match=r"nested too deeply|not valid JSON"):
        mf.read_json(path)


# ── safetensors headers ─────────────────────────────────────────────────────────────────────────


def test_our_header_parse_agrees_with_the_safetensors_library(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    tensors = {"b": torch.zeros(3, 5, dtype=torch.bfloat16), "a": torch.ones(7, dtype=torch.float64),
               "c": torch.zeros(0, 4), "d": torch.arange(6, dtype=torch.int32).reshape(2, 3)}
    save_file(tensors, str(path), metadata={"format": "pt"})
    ours = {t.name: t for t in mf.read_safetensors_header(path)}
    with safe_open(str(path), "pt") as f:
        names = f.keys()  # a safe_open handle is not iterable
        assert sorted(ours) == sorted(names)
        for name in names:
            assert list(ours[name].shape) == f.get_slice(name).get_shape()
    assert ours["b"].dtype == "BF16" and ours["b"].end - ours["b"].start == 3 * 5 * 2
    assert max(t.end for t in ours.values()) == path.stat().st_size  # the data ends at the end of the file


@pytest.mark.parametrize("header, data, match", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "needs 8 bytes, data_offsets give 4"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "not a list of non-negative"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "begin <= end"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 2, "truncated safetensors file"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9, "5 bytes after the last tensor"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "overlaps"),
    ({"w": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\0" * 2, "needs 1 bytes, data_offsets give 2"),
    ({"w": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "unknown dtype 'Q9'"),
    ({"w": [1, 2]}, b"", "entry is not an object"),
])
def test_malformed_headers_are_one_line_errors(tmp_path: Path, header: dict, data: bytes, match: str) -> None:
    path = _raw(tmp_path / "w.safetensors", header, data)
    with pytest.raises(mf.ModelFilesError, match=match) as err:
        mf.read_safetensors_header(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_header_length_is_bounded_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", mf.MAX_HEADER_BYTES + 1) + b"{}")
    with pytest.raises(mf.ModelFilesError, match=f"claims {mf.MAX_HEADER_BYTES + 1} bytes"):
        mf.read_safetensors_header(path)
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")  # within the bound, beyond the file
    with pytest.raises(mf.ModelFilesError, match="header of 1000 bytes, file of 10"):
        mf.read_safetensors_header(path)
    path.write_bytes(b"\1\0")
    with pytest.raises(mf.ModelFilesError, match="no header"):
        mf.read_safetensors_header(path)


def test_a_pickle_only_directory_is_refused_and_safetensors_wins(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    (root / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(mf.ModelFilesError, match="pickle-format weights only"):
        mf.weight_files(root, mf.regular_files(root))
    save_file({"w": torch.zeros(1)}, str(root / "model.safetensors"))
    assert mf.weight_files(root, mf.regular_files(root)) == [root / "model.safetensors"]


# ── weights against config.json ────────────────────────────────────────────────────────────────


def _t(name: str, *shape: int) -> mf.Tensor:
    return mf.Tensor(name, "F32", shape, 0, 0)


TENSORS = [_t("model.embed_tokens.weight", 100, 16), _t("model.layers.0.mlp.up_proj.weight", 48, 16),
           _t("model.layers.1.mlp.up_proj.weight", 48, 16), _t("lm_head.weight", 100, 16)]


@pytest.mark.parametrize("config, match", [
    ({"vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 2}, None),
    ({"text_config": {"vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 2}}, None),
    ({"vocab_size": 101, "hidden_size": 16, "num_hidden_layers": 2}, "vocab_size=101 but the weights' "),
    ({"vocab_size": 100, "hidden_size": 65536, "num_hidden_layers": 2}, "hidden_size=65536 but"),
    ({"vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 3}, "num_hidden_layers=3 but the weights hold 2"),
    ({"vocab_size": "100"}, "vocab_size='100' is not a positive integer"),
    ({"hidden_size": True}, "hidden_size=True is not a positive integer"),
])
def test_weights_against_config(tmp_path: Path, config: dict, match: str | None) -> None:
    path = tmp_path / "config.json"
    if match is None:
        mf.check_weights_match_config(path, config, TENSORS)
    else:
        with pytest.raises(mf.ModelFilesError, match=match):
            mf.check_weights_match_config(path, config, TENSORS)


def test_architecture_shapes_come_from_a_meta_build(tmp_path: Path, tiny_dir: Path) -> None:
    """The meta device builds the architecture without memory: a config asking for a 4096-wide MLP
    against 96-wide weights is refused, even though vocab, hidden size and layers all match."""
    tensors = [t for p in tiny_dir.glob("*.safetensors") for t in mf.read_safetensors_header(p)]
    mf.check_architecture(tiny_dir, tensors)
    root = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((root / "config.json").read_text())
    cfg["intermediate_size"] = 1 << 20  # 2^20 × 32 floats per MLP matrix: never allocated
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mf.ModelFilesError, match=r"wants model\.layers\.0\.mlp\.\w+_proj\.weight of shape"):
        mf.check_architecture(root, tensors)


# ── tokenizer and chat templates ───────────────────────────────────────────────────────────────


def test_tokenizer_size_counts_vocab_and_added_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 7}}, "added_tokens": [{"id": 9}]}))
    assert mf.tokenizer_size(path) == 10
    path.write_text(json.dumps({"model": {"vocab": [["a", 0.0], ["b", -1.0], ["c", -2.0]]}}))  # Unigram
    assert mf.tokenizer_size(path) == 3


def test_tokenizer_bigger_than_the_embedding_is_refused(tmp_path: Path, tiny_dir: Path) -> None:
    vocab = json.loads((tiny_dir / "config.json").read_text())["vocab_size"]
    assert mf.tokenizer_size(tiny_dir / "tokenizer.json") == vocab  # a real pair fits exactly
    mf.check_tokenizer_fits(tiny_dir, vocab)
    with pytest.raises(mf.ModelFilesError, match=f"token ids go up to {vocab - 1}, .* has {vocab - 1} rows"):
        mf.check_tokenizer_fits(tiny_dir, vocab - 1)


def test_a_real_chat_template_renders_in_the_child() -> None:
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    expected = "<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n"
    assert mf.check_chat_template("t", template) == len(expected)


@pytest.mark.parametrize("template, match", [
    # printing an unsafe attribute alone renders '' (the sandbox's undefined); using it raises
    ("{{ messages.__class__.__mro__ }}", "SecurityError: access to attribute '__class__'"),
    ("{{ raise_exception('no system role') }}", "rendering failed: TemplateError: no system role"),
    ("{% for x in %}", "not a valid Jinja template"),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "renders more than 65536 bytes"),
    ("{{ 'x' * 10000000000 }}", "needs more than 512 MiB"),  # folded by the compiler: the child compiles
    ("{{ 'x'|center(2000000000) }}", "needs more than 512 MiB"),
])
def test_hostile_templates_are_one_line_errors(template: str, match: str) -> None:
    with pytest.raises(mf.ModelFilesError, match=match) as err:
        mf.check_chat_template("tokenizer_config.json: chat_template", template, max_output=65536)
    assert str(err.value).startswith("tokenizer_config.json: chat_template: ") and "\n" not in str(err.value)


def test_a_template_that_never_ends_is_stopped_in_time() -> None:
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"  # 10^10 steps
    started = time.monotonic()
    with pytest.raises(mf.ModelFilesError, match="rendering took more than 1 s"):
        mf.check_chat_template("t", loop, seconds=1.0)
    assert time.monotonic() - started < 10


# A template that passes the one-message probe above and attacks only the real prompts (longer than 40 chars).
LONG_ONLY = "{% if messages[0]['content']|length > 40 %}"


@pytest.fixture
def char_tok():
    from amft_lib.model import build_char_tokenizer

    return build_char_tokenizer()


def test_prompts_are_rendered_by_the_tokenizer_once_in_the_bounded_child(char_tok, monkeypatch) -> None:
    from amft_lib import rollout

    char_tok.chat_template = ("{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}"
                              "{% if add_generation_prompt %}<a>{% endif %}")
    calls: list[int] = []
    real = mf.render_chat_prompts
    monkeypatch.setattr(mf, "render_chat_prompts", lambda tok, ps: calls.append(len(ps)) or real(tok, ps))
    prompts = ["1 + 1", "2 * 3", "1 + 1"]
    texts = rollout.render_prompts(char_tok, prompts, chat_template=True)
    assert texts == [char_tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                  add_generation_prompt=True) for p in prompts]
    assert texts[0] == "<u>1 + 1</u><a>" and calls == [2]  # one child, the distinct prompts
    assert rollout.render_prompts(char_tok, ["2 * 3"], chat_template=True) == ["<u>2 * 3</u><a>"]
    assert calls == [2]  # cached: no second child
    assert rollout.render_prompts(char_tok, prompts, chat_template=False) == prompts


@pytest.mark.parametrize("attack, match", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     r"rendering took more than 1\.02 s (of CPU )?for 1 prompt\(s\)"),  # CPU or wall limit: a busy box
    ("{{ messages[0]['content'] * 100000 }}", r"renders 4500045 characters for a prompt of 45"),
])
def test_a_template_that_attacks_only_real_prompts_is_stopped_at_render_time(char_tok, monkeypatch, attack,
                                                                             match) -> None:
    """It passes check_chat_template (the probe's message is short) and is stopped when training renders its
    prompts: bounded CPU and output, one line, within seconds — not a hung or OOM-killed trainer."""
    from amft_lib import rollout

    template = LONG_ONLY + attack + "{% endif %}{{ messages[0]['content'] }}"
    assert mf.check_chat_template("t", template) > 0
    char_tok.chat_template = template
    monkeypatch.setattr(mf, "TEMPLATE_SECONDS", 1.0)
    started = time.monotonic()
    with pytest.raises(mf.ModelFilesError, match=match) as err:
        rollout.render_prompts(char_tok, ["Using the numbers 3, 7 and 12, make exactly 31"[:45]], chat_template=True)
    assert str(err.value).startswith("the model's chat template: ") and "\n" not in str(err.value)
    assert time.monotonic() - started < 10


def test_templates_are_found_in_every_place_the_tokenizer_reads(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "default", "template": "A"}, {"name": "tool_use", "template": "B"}]}))
    (tmp_path / "chat_template.jinja").write_text("C")
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "rag.jinja").write_text("D")
    assert [t for _, t in mf.chat_templates(tmp_path)] == ["A", "B", "D", "C"]


# ── the whole directory ────────────────────────────────────────────────────────────────────────


def test_a_saved_model_passes_every_check(tiny_dir: Path) -> None:
    mf.check_model_dir(tiny_dir)


def test_errors_are_user_errors_naming_the_file(tmp_path: Path, tiny_dir: Path) -> None:
    root = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoConfig": "evil.C"}}))
    with pytest.raises(UserError) as err:
        mf.check_model_dir(root)
    assert str(err.value).startswith(f"{root}/config.json: key 'auto_map' names custom code")


# ── identity ───────────────────────────────────────────────────────────────────────────────────


def test_content_digest_ignores_caches_and_volatile_keys(tmp_path: Path, tiny_dir: Path) -> None:
    base = mf.content_digest(tiny_dir)
    root = _copy(tiny_dir, tmp_path / "m")
    (root / ".amft-source.json").write_text('{"source": "s3://b/p"}')
    (root / "README.md").write_text("hello")
    (root / "MLmodel").write_text("flavors: {}")
    cfg = json.loads((root / "config.json").read_text())
    cfg["transformers_version"] = "9.9.9"
    (root / "config.json").write_text(json.dumps(cfg, indent=7))  # other whitespace, other key order is fine
    tc = json.loads((root / "tokenizer_config.json").read_text())
    (root / "tokenizer_config.json").write_text(json.dumps({**tc, "is_local": True, "local_files_only": True}))
    assert mf.content_digest(root) == base


def test_content_digest_sees_tensors_not_file_bytes(tmp_path: Path) -> None:
    """Header order and metadata do not matter; sharding does not matter; any tensor byte does."""
    a, b, c = (tmp_path / n for n in ("a", "b", "c"))
    for d in (a, b, c):
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "llama"}')
    x, y = torch.arange(4.0), torch.ones(2, 2)
    save_file({"x": x, "y": y}, str(a / "model.safetensors"), metadata={"format": "pt"})
    save_file({"x": x}, str(b / "model-00001-of-00002.safetensors"))
    save_file({"y": y}, str(b / "model-00002-of-00002.safetensors"), metadata={"note": "other"})
    assert mf.content_digest(a) == mf.content_digest(b)
    y2 = y.clone()
    y2.view(-1)[3] = torch.nextafter(y2.view(-1)[3], torch.tensor(2.0))
    save_file({"x": x, "y": y2}, str(c / "model.safetensors"))
    assert mf.content_digest(c) != mf.content_digest(a)
    (c / "config.json").write_text('{"model_type": "mistral"}')
    save_file({"x": x, "y": y}, str(c / "model.safetensors"))
    assert mf.content_digest(c) != mf.content_digest(a)  # same tensors, another config


# ── every load in the library passes trust_remote_code=False ──────────────────────────────────


LOADERS = {"from_pretrained", "from_config", "for_model"}


def test_every_transformers_load_in_the_library_passes_trust_remote_code_false() -> None:
    """A source check (like test_architecture's): every `X.from_pretrained(...)`/`from_config(...)` call
    in amft_lib names trust_remote_code=False, so no directory or hub repo can turn it on by default.
    `AutoConfig.for_model` takes the config's fields as kwargs (no code lookup) and is exempt."""
    missing = []
    for path in sorted(LIB.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOADERS:
                if node.func.attr == "for_model":
                    continue
                ok = any(k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is False
                         for k in node.keywords)
                if not ok:
                    missing.append(f"{path.relative_to(LIB.parent)}:{node.lineno}")
    assert not missing, missing
