"""Table of bad `engine.*` settings (issue 25, item 1) across `amft train`, `warm-start` and `evaluate`.

Same contract as tests/unit/test_bad_inputs.py (whose Case and row runner this reuses): every row runs the
real command line in-process (`amft_lib.cli.main`) and a user sees exit status 2, exactly one `error:` line
naming the setting (`engine.<key>`, `--engine` or the config file), no traceback, and the output location
exactly as it was: the engine section is validated when the config loads, before a model is loaded or
anything is written. Two rows cover the top-level `precision` key that moved into `engine.precision`: the
error says where it went instead of a bare "unknown key".
"""

from __future__ import annotations

from pathlib import Path

import pytest
import test_bad_inputs as table  # the main table's Case and row runner (pytest puts tests/unit on sys.path)

Case = table.Case
TRAIN, WARM = table.TRAIN, table.WARM
EVAL = "evaluate --model {t}/nomodel --data {gp} --out {out}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from amft_lib.data.prepare import PrepareConfig, run_prepare

    t = tmp_path_factory.mktemp("bad-engine")
    gp = t / "gp"
    run_prepare(PrepareConfig(out_dir=str(gp), train_size=40, val_size=8, test_id_size=8, test_ood_size=8))
    files = {
        "old_precision_yaml": "precision: bf16-mixed\n",
        "engine_list_yaml": "engine: [1, 2]\n",
        "engine_fp16_yaml": "engine:\n  precision: fp16\n",
        "engine_unknown_yaml": "engine:\n  compiler: inductor\n",
        "engine_bucket_yaml": "engine:\n  length_bucket: 0\n",
    }
    w = {"t": str(t), "gp": str(gp)}
    for name, text in files.items():
        path = t / f"{name}.yaml"
        path.write_text(text)
        w[name] = str(path)
    return w


CASES = [
    # amft train --set engine.*
    Case("train-engine-precision-bf16", TRAIN + " --set engine.precision=bf16", "engine.precision='bf16'"),
    Case("train-engine-precision-fp16", TRAIN + " --set engine.precision=fp16", "engine.precision='fp16'"),
    Case("train-engine-compile-maybe", TRAIN + " --set engine.compile=maybe", "engine.compile='maybe'"),
    Case("train-engine-compile-off", TRAIN + " --set engine.compile=off", "reads on/off/yes/no as true/false"),
    Case("train-engine-compile-yes", TRAIN + " --set engine.compile=yes", "engine.compile=True"),  # YAML 1.1 bool
    Case("train-engine-compile-min-steps-0", TRAIN + " --set engine.compile_min_steps=0",
         "engine.compile_min_steps=0"),
    Case("train-engine-compile-min-steps-float", TRAIN + " --set engine.compile_min_steps=1.5",
         "engine.compile_min_steps=1.5"),
    Case("train-engine-bucket-0", TRAIN + " --set engine.length_bucket=0", "engine.length_bucket=0"),
    Case("train-engine-bucket-negative", TRAIN + " --set engine.length_bucket=-16", "engine.length_bucket=-16"),
    Case("train-engine-kv-cache-static", TRAIN + " --set engine.kv_cache=static", "engine.kv_cache='static'"),
    Case("train-engine-threads-negative", TRAIN + " --set engine.threads=-1", "engine.threads=-1"),
    Case("train-engine-threads-word", TRAIN + " --set engine.threads=two", "engine.threads='two'"),
    Case("train-engine-threads-nan", TRAIN + " --set engine.threads=nan", "engine.threads='nan'"),
    Case("train-engine-unknown-key", TRAIN + " --set engine.compiler=inductor", "unknown key 'engine.compiler'"),
    Case("train-engine-not-a-section", TRAIN + " --set engine=fast", "engine"),
    Case("train-old-precision-override", TRAIN + " --set precision=bf16-mixed", "now engine.precision"),
    Case("train-old-precision-in-config", TRAIN + " --config {old_precision_yaml}",
         "precision is now engine.precision"),
    Case("train-engine-list-in-config", TRAIN + " --config {engine_list_yaml}", "engine: expected a mapping"),
    Case("train-engine-fp16-in-config", TRAIN + " --config {engine_fp16_yaml}", "engine.precision='fp16'"),
    Case("train-engine-unknown-in-config", TRAIN + " --config {engine_unknown_yaml}", "unknown key(s) compiler"),
    Case("train-engine-bucket-in-config", TRAIN + " --config {engine_bucket_yaml}", "engine.length_bucket=0"),
    # amft warm-start --set engine.*
    Case("warm-engine-precision", WARM + " --set engine.precision=half", "engine.precision='half'"),
    Case("warm-engine-compile-on", WARM + " --set engine.compile=on", "engine.compile=True"),  # YAML: true
    Case("warm-engine-threads", WARM + " --set engine.threads=-4", "engine.threads=-4"),
    Case("warm-engine-kv-cache", WARM + " --set engine.kv_cache=paged", "engine.kv_cache='paged'"),
    Case("warm-old-precision", WARM + " --set precision=fp32", "now engine.precision"),
    # amft evaluate --engine KEY=VALUE
    Case("eval-engine-kv-cache", EVAL + " --engine kv_cache=static", "engine.kv_cache='static'"),
    Case("eval-engine-threads", EVAL + " --engine threads=-2", "engine.threads=-2"),
    Case("eval-engine-unknown", EVAL + " --engine compiler=inductor", "unknown key 'engine.compiler'"),
    Case("eval-engine-no-equals", EVAL + " --engine kv_cache", "--engine: override 'engine.kv_cache'"),
    Case("eval-engine-bucket", EVAL + " --engine length_bucket=0", "engine.length_bucket=0"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_engine_input(case: Case, world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    table.run_row(case, world, str(tmp_path / "out"), capsys)


def test_table_size() -> None:
    assert len(CASES) >= 30, len(CASES)
