"""Table of malformed model directories across `amft train`, `warm-start`, `evaluate`, `register` (and preflight).

Same contract as tests/unit/test_bad_inputs.py: every row runs the real command line in-process
(`amft_lib.cli.main`), and a user sees exit status 2, exactly one `error:` line naming the file (and
key), no traceback, and the output location exactly as it was. On top of that, no row may run code
from the directory: the `auto_map` module, the pickle payload and the linked files all write or
read a marker, and the marker must never exist. One test runs the installed `amft` script as a
subprocess with `yes` on stdin (what made transformers run the directory's code before), one runs
preflight on the same directory.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import test_bad_inputs as table  # the main table's Case and row runner (pytest puts tests/unit on sys.path)

Case = table.Case

EVIL_PY = """\
from pathlib import Path
Path({marker!r}).write_text("the model directory's code ran")
from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel  # noqa: E402
"""


class _Payload:
    """Unpickling this writes the marker: a pickle-only weights file that must never be loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "the pickle ran"))


def _edit_json(folder: Path, name: str, **changes) -> None:
    path = folder / name
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


def _header(entries: dict) -> bytes:
    blob = json.dumps(entries).encode()
    return struct.pack("<Q", len(blob)) + blob


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from amft_lib.config import ModelConfig
    from amft_lib.data.prepare import PrepareConfig, run_prepare
    from amft_lib.model import load_policy, save_policy

    t = tmp_path_factory.mktemp("bad-models")
    w: dict[str, Path] = {"t": t, "marker": t / "MARKER"}
    run_prepare(PrepareConfig(out_dir=str(t / "gp"), train_size=16, val_size=4, test_id_size=4, test_ood_size=4))
    w["gp"] = t / "gp"
    model, tok = load_policy(ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2), seed=0)
    good = save_policy(model, tok, t / "good")
    w["good"] = good
    (t / "eval").mkdir()
    (t / "eval" / "metrics.json").write_text(json.dumps({"blessed": True, "reason": "blessed: test"}))
    w["eval"] = t / "eval"
    w["tracking"] = f"sqlite:///{t / 'registry' / 'mlflow.db'}"
    w["registry"] = t / "registry"
    w["preflight_tracking"] = f"sqlite:///{t / 'preflight-registry' / 'mlflow.db'}"  # not the one rows watch
    (t / "outside.txt").write_text("a host file that must never be copied or uploaded\n")

    def variant(name: str) -> Path:
        path = t / name
        shutil.copytree(good, path)
        w[name] = path
        return path

    evil_py = EVIL_PY.format(marker=str(w["marker"]))
    # custom code named from each config file transformers or a processor reads
    d = variant("automap")
    (d / "evil.py").write_text(evil_py)
    _edit_json(d, "config.json", model_type="evilnet",
               auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    d = variant("automap_tok")
    (d / "evil.py").write_text(evil_py)
    _edit_json(d, "tokenizer_config.json", auto_map={"AutoTokenizer": ["evil.EvilConfig", None]})
    d = variant("automap_gen")
    _edit_json(d, "generation_config.json", auto_map={"AutoConfig": "evil.EvilConfig"})
    d = variant("automap_proc")
    _edit_json(d, "processor_config.json", auto_map={"AutoProcessor": "evil.EvilConfig"})
    d = variant("automap_pre")
    _edit_json(d, "preprocessor_config.json", auto_map={"AutoImageProcessor": "evil.EvilConfig"})
    d = variant("automap_nested")
    _edit_json(d, "config.json", text_config={"auto_map": {"AutoConfig": "evil.EvilConfig"}})
    d = variant("pipelines")
    _edit_json(d, "config.json", custom_pipelines={"evil": {"impl": "evil.EvilPipeline"}})
    d = variant("unknown_type")
    _edit_json(d, "config.json", model_type="evilnet")
    d = variant("config_garbage")
    (d / "config.json").write_text("{not json")

    # weights
    d = variant("pickle_only")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(w["marker"]))))
    d = variant("huge_header")
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    d = variant("truncated")
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[: len(blob) - 100])
    d = variant("trailing")
    with (d / "model.safetensors").open("ab") as f:
        f.write(b"\0" * 64)
    d = variant("bad_dtype")
    (d / "model.safetensors").write_bytes(_header({"w": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}) + b"x")
    d = variant("shape_lie")
    (d / "model.safetensors").write_bytes(_header({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20],
                                                         "data_offsets": [0, 8]}}) + b"\0" * 8)
    d = variant("hidden_64k")  # config.json says 64k hidden: transformers would allocate it before any check
    _edit_json(d, "config.json", hidden_size=65536, intermediate_size=196608)
    d = variant("vocab_mismatch")
    _edit_json(d, "config.json", vocab_size=50000)
    d = variant("layers_mismatch")
    _edit_json(d, "config.json", num_hidden_layers=4)
    d = variant("ffn_mismatch")  # only the meta-device build of the architecture sees this one
    _edit_json(d, "config.json", intermediate_size=4096)

    # tokenizer and chat template
    d = variant("tok_too_big")
    data = json.loads((d / "tokenizer.json").read_text())
    data["added_tokens"].append({"id": 5000, "content": "<huge>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    (d / "tokenizer.json").write_text(json.dumps(data))
    templates = {
        "tpl_attr": "{{ messages.__class__.__mro__[1].__subclasses__() }}",
        "tpl_loop": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "tpl_output": "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
        "tpl_memory": "{{ 'a' * 10000000000 }}",
    }
    for name, template in templates.items():
        _edit_json(variant(name), "tokenizer_config.json", chat_template=template)
    (variant("tpl_jinja") / "chat_template.jinja").write_text("{{ cycler.__init__.__globals__ }}")

    # links and special files
    d = variant("link_out")
    os.symlink(t / "outside.txt", d / "notes.txt")
    d = variant("link_zero")
    os.symlink("/dev/zero", d / "extra.bin")
    d = variant("link_weights_out")
    shutil.move(d / "model.safetensors", t / "weights-elsewhere.safetensors")
    os.symlink(t / "weights-elsewhere.safetensors", d / "model.safetensors")
    d = variant("fifo")
    os.mkfifo(d / "stream.json")
    d = variant("code_file")
    (d / "helper.py").write_text("print('hi')\n")
    return {k: str(v) for k, v in w.items()}


TRAIN = "train --no-progress --max-steps 1 --out {out} --data {gp} --model "
WARM = "warm-start --out {out} --data {gp} --model "
EVAL = "evaluate --data {gp} --out {out} --device cpu --model "
REG = "register --name amft-bad --run-id run-1 --tracking-uri {tracking} --eval {eval} --model "
AUTOMAP = "config.json: key 'auto_map' names custom code"

CASES = [
    # ── custom code (auto_map) in every config file, refused by every stage ──
    Case("train-automap-config", TRAIN + "{automap}", AUTOMAP),
    Case("ws-automap-config", WARM + "{automap}", AUTOMAP),
    Case("eval-automap-config", EVAL + "{automap}", AUTOMAP),
    Case("reg-automap-config", REG + "{automap}", AUTOMAP, out="{registry}"),
    Case("train-automap-tokenizer-config", TRAIN + "{automap_tok}", "tokenizer_config.json: key 'auto_map'"),
    Case("eval-automap-generation-config", EVAL + "{automap_gen}", "generation_config.json: key 'auto_map'"),
    Case("ws-automap-processor-config", WARM + "{automap_proc}", "processor_config.json: key 'auto_map'"),
    Case("train-automap-preprocessor-config", TRAIN + "{automap_pre}", "preprocessor_config.json: key 'auto_map'"),
    Case("eval-automap-nested-text-config", EVAL + "{automap_nested}", "key 'text_config.auto_map'"),
    Case("reg-custom-pipelines", REG + "{pipelines}", "key 'custom_pipelines'", out="{registry}"),
    Case("train-unknown-model-type", TRAIN + "{unknown_type}", "not a causal LM transformers can build"),
    Case("eval-config-not-json", EVAL + "{config_garbage}", "config.json: not valid JSON"),
    # ── weights ──
    Case("train-pickle-only", TRAIN + "{pickle_only}", "pytorch_model.bin: pickle-format weights only"),
    Case("eval-pickle-only", EVAL + "{pickle_only}", "pickle-format weights only"),
    Case("train-huge-header", TRAIN + "{huge_header}", "safetensors header claims 1099511627776 bytes"),
    Case("eval-truncated-weights", EVAL + "{truncated}", "truncated safetensors file"),
    Case("reg-truncated-weights", REG + "{truncated}", "truncated safetensors file", out="{registry}"),
    Case("ws-trailing-bytes", WARM + "{trailing}", "64 bytes after the last tensor"),
    Case("eval-unknown-dtype", EVAL + "{bad_dtype}", "tensor 'w': unknown dtype 'Q9'"),
    Case("train-shape-larger-than-data", TRAIN + "{shape_lie}", "needs 4398046511104 bytes, data_offsets give 8"),
    Case("train-hidden-size-vs-weights", TRAIN + "{hidden_64k}", "hidden_size=65536 but the weights'"),
    Case("ws-vocab-size-vs-weights", WARM + "{vocab_mismatch}", "vocab_size=50000 but the weights'"),
    Case("eval-layers-vs-weights", EVAL + "{layers_mismatch}", "num_hidden_layers=4 but the weights hold 1"),
    Case("train-ffn-vs-architecture", TRAIN + "{ffn_mismatch}", "the architecture wants"),
    # ── tokenizer and chat templates ──
    Case("train-tokenizer-bigger-than-embedding", TRAIN + "{tok_too_big}", "token ids go up to 5000"),
    Case("eval-template-forbidden-attribute", EVAL + "{tpl_attr}", "chat_template: rendering failed: SecurityError"),
    Case("ws-template-jinja-file-forbidden", WARM + "{tpl_jinja}", "chat_template.jinja: rendering failed"),
    Case("train-template-infinite-loop", TRAIN + "{tpl_loop}", "rendering took more than"),
    Case("eval-template-huge-output", EVAL + "{tpl_output}", "renders more than 1048576 bytes"),
    Case("reg-template-huge-memory", REG + "{tpl_memory}", "needs more than 512 MiB to render", out="{registry}"),
    # ── links, special files, code ──
    Case("train-symlink-outside", TRAIN + "{link_out}", "notes.txt: symlink to"),
    Case("ws-symlink-dev-zero", WARM + "{link_zero}", "extra.bin: symlink to /dev/zero, outside"),
    Case("reg-symlink-outside", REG + "{link_out}", "outside the model directory", out="{registry}"),
    Case("reg-symlink-dev-zero", REG + "{link_zero}", "symlink to /dev/zero", out="{registry}"),
    Case("eval-weights-symlinked-outside", EVAL + "{link_weights_out}", "model.safetensors: symlink to"),
    Case("train-fifo-in-model-dir", TRAIN + "{fifo}", "stream.json: not a regular file"),
    Case("reg-code-file", REG + "{code_file}", "holds code file(s) helper.py", out="{registry}"),
    Case("reg-code-file-with-automap", REG + "{automap}", AUTOMAP, out="{registry}"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_model(case: Case, world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The main table's checks (exit 2, one `error:` line with the fragment, no traceback, output
    unchanged), with `yes` on stdin, and the marker proving no code from the directory ran."""
    monkeypatch.setattr("sys.stdin", _Yes())  # what `yes |` feeds: transformers must never get to ask
    table.test_bad_input(case, world, tmp_path, capsys)
    assert not Path(world["marker"]).exists(), "code from the model directory ran"


class _Yes:
    """A stdin that answers "y" forever, like `yes |`."""

    def readline(self, *_: object) -> str:
        return "y\n"

    def read(self, *_: object) -> str:
        return "y\n"

    def isatty(self) -> bool:
        return False


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 20, len(CASES)


def test_train_cli_subprocess_with_yes_on_stdin(world: dict[str, str], tmp_path: Path) -> None:
    """The installed `amft` script, fed `yes` on stdin, refuses the auto_map directory in one line and
    never imports its module (before: transformers asked "Do you wish to run the custom code?")."""
    amft = Path(sys.executable).with_name("amft")
    out = tmp_path / "out"
    proc = subprocess.run([str(amft), "train", "--no-progress", "--max-steps", "1", "--out", str(out),
                           "--data", world["gp"], "--model", world["automap"]],
                          input="y\n" * 10000, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert errors == [f"error: {world['automap']}/config.json: key 'auto_map' names custom code that transformers "
                      "would import and run; model directories are data, never code (remove the key, or use an "
                      "architecture transformers ships)"]
    assert "Traceback" not in proc.stderr and not out.exists()
    assert not Path(world["marker"]).exists()


@pytest.mark.parametrize("name, fragment", [
    ("automap", "config.json: key 'auto_map'"),
    ("tok_too_big", "token ids go up to 5000"),
    ("link_zero", "symlink to /dev/zero"),
    ("tpl_attr", "SecurityError"),
])
def test_preflight_refuses_the_model_before_any_gpu_stage(world: dict[str, str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, name: str,
                                                          fragment: str) -> None:
    """Preflight's base-model check runs the model-directory checks; every other check passes, so the
    one failure is the model's, and preflight.json (written only when all pass) is absent."""
    from amft_lib.run.preflight import run_preflight

    monkeypatch.setattr("sys.stdin", _Yes())
    params = {"p0_s3_root": str(tmp_path / "root"), "p0_run_id": "run-1", "p3_model_name": world[name],
              "p6_registry_tracking_uri": world["preflight_tracking"], "p1_data_input_uri": ""}
    result = run_preflight(params)
    assert not result.passed
    failures = result.failures()
    model = [f for f in failures if f.startswith("base model: ")]
    assert len(model) == 1 and fragment in model[0] and "\n" not in model[0], failures
    # the GPU-memory estimate reads the same config: it may fail too, on the same file, never elsewhere
    assert all(f.startswith(("base model: ", "gpu memory: ")) and world[name] in f for f in failures), failures
    assert not list((tmp_path / "root").rglob("preflight.json"))
    assert not Path(world["marker"]).exists()


def test_a_good_directory_passes_every_stage_check(world: dict[str, str], tmp_path: Path) -> None:
    """The control: the same directory without the defect passes preflight's model check."""
    from amft_lib.run.preflight import run_preflight

    params = {"p0_s3_root": str(tmp_path / "root"), "p0_run_id": "run-1", "p3_model_name": world["good"],
              "p6_registry_tracking_uri": world["preflight_tracking"], "p1_data_input_uri": ""}
    result = run_preflight(params)
    model_check = [c for c in result.checks if c.name == "base model"]
    assert model_check and model_check[0].ok and "checked: no code" in model_check[0].detail
