"""Bad data and config inputs (issue 21 items 3, 4 and 6's CLI side): a table in the style of test_bad_inputs.py.

Rows are the main table's `Case` (fragment: for rc 1, the name of the failed gate check). Every row runs the real
command line in-process (`amft_lib.cli.main`) and asserts what a user sees: exit 2 and
exactly one `error:` line naming the file/column/row/key, no traceback, the output location exactly as it was.
Gate rows (`rc=1`) run the real GX gate and assert the named expectation failed and no `error:` line was printed.
Four tests also run the installed `amft` script in a subprocess with a timeout: FIFO and /dev/zero configs
hung before, and a hang must fail the test, not the suite.

The worlds: a prepared General Points dataset and broken copies. A "re-signed" copy has its card.json sha256
values rewritten to match the broken files, so only the check under test can refuse it (a tampered copy is the
opposite: untouched card, changed bytes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_bad_inputs import Case, run_row  # the main table's row type and row runner, shared

from amft_lib.cli import main
from amft_lib.data.schema import sha256_file


def _resign(dataset: Path) -> None:
    """Rewrite card.json's sha256 (and row counts) to match the files now there: a consistent card over bad data."""
    card = json.loads((dataset / "card.json").read_text())
    for info in card["splits"].values():
        info["sha256"] = sha256_file(dataset / info["file"])
        info["rows"] = pq.read_metadata(dataset / info["file"]).num_rows
    (dataset / "card.json").write_text(json.dumps(card))


def _edit_split(src: Path, dst: Path, split: str, edit, *more_splits: str) -> Path:
    """Copy a dataset, rewrite a split's rows with `edit(list of row dicts) -> list of row dicts`, re-sign."""
    shutil.copytree(src, dst)
    for name in (split, *more_splits):
        rows = pq.read_table(dst / f"{name}.parquet").to_pylist()
        pq.write_table(pa.Table.from_pylist(edit(rows)), dst / f"{name}.parquet")
    _resign(dst)
    return dst


BOMB = "[" + ",".join(["&a [x,x,x,x,x,x,x,x,x]"] + [f"&{c} [" + ",".join([f"*{p}"] * 9) + "]"
                                                     for p, c in zip("abcdefgh", "bcdefghi", strict=True)]) + "]"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from amft_lib.config import ModelConfig
    from amft_lib.data.prepare import PrepareConfig, run_prepare
    from amft_lib.model import load_policy, save_policy

    t = tmp_path_factory.mktemp("bad-data")
    w: dict[str, Path] = {"t": t}
    gp = t / "gp"
    run_prepare(PrepareConfig(out_dir=str(gp), train_size=40, val_size=8, test_id_size=8, test_ood_size=8))
    w["gp"] = gp

    # card.json integrity: changed bytes under an untouched card, a file the card does not list, a card
    # naming a file outside its folder
    tampered = t / "tampered"
    shutil.copytree(gp, tampered)
    table = pq.read_table(tampered / "val.parquet")
    pq.write_table(table.slice(1), tampered / "val.parquet")
    w["tampered"] = tampered
    poisoned = t / "poisoned"  # rows appended to train with the same schema: still valid parquet
    shutil.copytree(gp, poisoned)
    train = pq.read_table(poisoned / "train.parquet")
    pq.write_table(pa.concat_tables([train, train.slice(0, 1)]), poisoned / "train.parquet")
    w["poisoned"] = poisoned
    extra = t / "extra"
    shutil.copytree(gp, extra)
    shutil.copy(gp / "val.parquet", extra / "more.parquet")
    w["extra"] = extra
    escape = t / "escape"
    shutil.copytree(gp, escape)
    card = json.loads((escape / "card.json").read_text())
    card["splits"]["val"]["file"] = "../gp/val.parquet"
    (escape / "card.json").write_text(json.dumps(card))
    w["escape"] = escape
    fifocard = t / "fifocard"
    shutil.copytree(gp, fifocard)
    (fifocard / "card.json").unlink()
    os.mkfifo(fifocard / "card.json")
    w["fifocard"] = fifocard

    # rows and columns, each under a card that matches it
    w["dupids"] = _edit_split(gp, t / "dupids", "val", lambda rows: [{**r, "id": rows[0]["id"]} for r in rows])
    train_id = pq.read_table(gp / "train.parquet").column("id")[0].as_py()
    w["dupacross"] = _edit_split(gp, t / "dupacross", "val", lambda rows: [{**rows[0], "id": train_id}, *rows[1:]])
    w["control"] = _edit_split(gp, t / "control", "val",
                               lambda rows: [{**rows[0], "prompt": rows[0]["prompt"] + "\x1b[2J"}, *rows[1:]])
    w["nul"] = _edit_split(gp, t / "nul", "train",
                           lambda rows: [{**rows[0], "demonstration": "\x00" + rows[0]["demonstration"]}, *rows[1:]])
    w["long"] = _edit_split(gp, t / "long", "val", lambda rows: [{**rows[0], "prompt": "Cards: " + "A " * 600},
                                                                 *rows[1:]], "test_id")
    w["intprompt"] = _edit_split(gp, t / "intprompt", "val",
                                 lambda rows: [{**r, "prompt": i} for i, r in enumerate(rows)])
    w["structanswer"] = _edit_split(gp, t / "structanswer", "test_id",
                                    lambda rows: [{**r, "answer": json.loads(r["answer"])} for r in rows])
    w["noanswer"] = _edit_split(gp, t / "noanswer", "val",
                                lambda rows: [{k: v for k, v in r.items() if k != "answer"} for r in rows])
    w["nullid"] = _edit_split(gp, t / "nullid", "val", lambda rows: [{**rows[0], "id": None}, *rows[1:]])
    os.mkfifo(t / "data.fifo")
    w["datafifo"] = t / "data.fifo"

    # config and params files
    def put(name: str, text: str) -> None:
        (t / name).write_text(text)
        w[name.replace(".", "_")] = t / name

    put("dupkey.yaml", "optim:\n  lr: 0.001\n  lr: 0.5\n")
    put("dupsection.yaml", "optim:\n  lr: 0.001\nseed: 1\noptim:\n  beta1: 0.8\n")
    put("deep.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n")
    put("bomb.yaml", f"bomb: {BOMB}\n")
    put("lorabomb.yaml", f"model:\n  lora: true\n  lora_targets: {BOMB}\n")
    put("selfalias.yaml", "model: &m\n  lora_targets: *m\n")
    put("list.yaml", "- 1\n- 2\n")
    put("params_dup.yaml", "p4_train_max_steps: 1\np4_train_max_steps: 2\n")
    put("params_bomb.yaml", f"p4_train_max_steps: {BOMB}\n")
    put("params_deep.json", '{"a": ' + "[" * 5000 + "]" * 5000 + "}\n")
    (t / "big.yaml").write_bytes(b"# " + b"x" * (2 << 20) + b"\n")
    w["big_yaml"] = t / "big.yaml"
    os.mkfifo(t / "config.fifo")
    w["fifo"] = t / "config.fifo"
    (t / "confdir").mkdir()
    w["confdir"] = t / "confdir"
    w["bomb_text"] = BOMB  # type: ignore[assignment]

    model, tok = load_policy(ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2), seed=0)
    w["model"] = save_policy(model, tok, t / "model")
    return {k: str(v) for k, v in w.items()}


TRAIN = "train --no-progress --max-steps 1 --out {out} --data"
WARM = "warm-start --out {out} --data"
EVAL = "evaluate --model {model} --out {out} --device cpu --data"
SUBMIT = "pipeline submit --host http://127.0.0.1:9 --params-file"
SHA = "val.parquet: sha256 differs from card.json"

CASES = [
    # ── card.json integrity, at every stage that reads a dataset ──
    Case("train-card-mismatch", TRAIN + " {tampered}", SHA),
    Case("warm-card-mismatch", WARM + " {tampered}", SHA),
    Case("eval-card-mismatch", EVAL + " {tampered}", SHA),
    Case("train-poisoned-after-gate", TRAIN + " {poisoned}", "train.parquet: sha256 differs from card.json"),
    Case("warm-poisoned-after-gate", WARM + " {poisoned}", "train.parquet: sha256 differs from card.json"),
    Case("train-unlisted-parquet", TRAIN + " {extra}", "more.parquet: not listed in card.json"),
    Case("eval-unlisted-parquet", EVAL + " {extra}", "more.parquet: not listed in card.json"),
    Case("train-card-escapes-folder", TRAIN + " {escape}", "a card lists files inside its own folder"),
    Case("eval-card-is-fifo", EVAL + " {fifocard}", "card.json: dataset card is a FIFO"),
    Case("gate-card-is-fifo", "data validate --dataset {fifocard} --out-dir {out}",
         "card.json: dataset card is a FIFO"),
    # ── rows: duplicate ids (load and gate), control characters (gate), prompts over the context ──
    Case("train-duplicate-ids", TRAIN + " {dupids}", "val.parquet: row 2: duplicate id"),
    Case("warm-duplicate-ids-across-splits", WARM + " {dupacross}", "val.parquet: row 1: duplicate id"),
    Case("eval-duplicate-ids", EVAL + " {dupids}", "duplicate id"),
    Case("gate-duplicate-ids", "data validate --dataset {dupids} --out-dir {out}", "unique_ids", out=None, rc=1),
    Case("gate-esc-in-prompt", "data validate --dataset {control} --out-dir {out}", "control_characters",
         out=None, rc=1),
    Case("gate-nul-in-demonstration", "data validate --dataset {nul} --out-dir {out}", "control_characters",
         out=None, rc=1),
    Case("train-prompt-over-context", TRAIN + " {long}", "prompt is 1208 tokens"),
    Case("warm-prompt-over-context", WARM + " {long}", "exceeds the model's context of 512"),
    Case("eval-prompt-over-context", EVAL + " {long}", "long prompts are refused, not truncated"),
    # ── column types and shape ──
    Case("train-int-prompt", TRAIN + " {intprompt}", "val.parquet: column 'prompt' has type int64"),
    Case("eval-int-prompt", EVAL + " {intprompt}", "val.parquet: column 'prompt' has type int64"),
    Case("train-struct-answer", TRAIN + " {structanswer}", "test_id.parquet: column 'answer' has type struct<"),
    Case("eval-struct-answer", EVAL + " {structanswer}", "test_id.parquet: column 'answer' has type struct<"),
    Case("gate-int-prompt", "data validate --dataset {intprompt} --out-dir {out}", "type:prompt", out=None, rc=1),
    Case("gate-struct-answer", "data validate --dataset {structanswer} --out-dir {out}", "type:answer", out=None,
         rc=1),
    Case("train-missing-column", TRAIN + " {noanswer}", "val.parquet: no column 'answer'"),
    Case("train-null-id", TRAIN + " {nullid}", "val.parquet: row 1: column 'id' is null"),
    Case("train-data-is-fifo", TRAIN + " {datafifo}", "data.fifo: dataset file is a FIFO"),
    Case("eval-data-is-device", EVAL + " /dev/zero", "/dev/zero: dataset file is a device"),
    # ── config files (train and warm-start --config) ──
    Case("train-config-duplicate-key", TRAIN + " {gp} --config {dupkey_yaml}", "line 3: duplicate key 'lr'"),
    Case("ws-config-duplicate-section", WARM + " {gp} --config {dupsection_yaml}", "line 4: duplicate key 'optim'"),
    Case("train-config-deep-nesting", TRAIN + " {gp} --config {deep_yaml}", "nested deeper than 64 levels"),
    Case("train-config-alias-bomb", TRAIN + " {gp} --config {bomb_yaml}", "expands to more than"),
    Case("train-config-lora-targets-bomb", TRAIN + " {gp} --config {lorabomb_yaml}", "lorabomb.yaml:line 3"),
    Case("train-config-self-alias", TRAIN + " {gp} --config {selfalias_yaml}", "an alias refers to itself"),
    Case("train-config-fifo", TRAIN + " {gp} --config {fifo}", "config.fifo: config file is a FIFO"),
    Case("train-config-dev-zero", TRAIN + " {gp} --config /dev/zero", "/dev/zero: config file is a device"),
    Case("ws-config-dev-zero", WARM + " {gp} --config /dev/zero", "/dev/zero: config file is a device"),
    Case("train-config-too-big", TRAIN + " {gp} --config {big_yaml}", "larger than 1048576 bytes"),
    Case("train-config-not-mapping", TRAIN + " {gp} --config {list_yaml}", "top level must be a mapping"),
    Case("train-config-directory", TRAIN + " {gp} --config {confdir}", "confdir: is a directory"),
    Case("train-set-lora-targets-bomb", TRAIN + " {gp} --set model.lora_targets={bomb_text}",
         "override 'model.lora_targets=[&a"),
    # ── pipeline params files (parsed before any KFP call; nothing is written) ──
    Case("params-duplicate-key", SUBMIT + " {params_dup_yaml}", "line 2: duplicate key 'p4_train_max_steps'",
         out=None),
    Case("params-alias-bomb", SUBMIT + " {params_bomb_yaml}", "expands to more than", out=None),
    Case("params-deep-json", SUBMIT + " {params_deep_json}", "nested deeper than 64 levels", out=None),
    Case("params-fifo", SUBMIT + " {fifo}", "config.fifo: params file is a FIFO", out=None),
    Case("params-dev-zero", SUBMIT + " /dev/zero", "/dev/zero: params file is a device", out=None),
    Case("params-directory", SUBMIT + " {confdir}", "confdir: is a directory", out=None),
    Case("params-set-alias-bomb", "pipeline submit --host http://127.0.0.1:9 --set p4_train_max_steps={bomb_text}",
         "--set p4_train_max_steps", out=None),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input(case: Case, world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_row(case, world, str(tmp_path / "out"), capsys)


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 20, len(CASES)


def test_clean_copy_still_loads(world: dict[str, str]) -> None:
    """The broken copies fail for their own reason: the untouched dataset reads, with unique ids and string columns."""
    from amft_lib.dataset import read_rows

    splits = read_rows(world["gp"])
    assert {k: len(v) for k, v in splits.items()} == {"train": 40, "val": 8, "test_id": 8, "test_ood": 8}
    ids = [r["id"] for rows in splits.values() for r in rows]
    assert len(ids) == len(set(ids))


def test_clean_copy_passes_the_new_gate_checks(world: dict[str, str], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """The prepared dataset is not refused by the control-character expectation (it would fail every run)."""
    rc = main(["data", "validate", "--dataset", world["gp"], "--min-rows", "train=1,val=1,test_id=1",
               "--out-dir", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert "failed control_characters" not in out and "failed unique_ids" not in out, out
    report = json.loads((tmp_path / "r" / "validation.json").read_text())
    checks = {r["expectation_config"]["meta"]["check"]: r["success"] for r in report["results"]}
    assert checks["control_characters"] is True and checks["unique_ids"] is True
    assert rc in (0, 1)


@pytest.mark.parametrize("flag", ["--config", "--params-file"])
@pytest.mark.parametrize("path", ["fifo", "/dev/zero"])
def test_console_script_does_not_hang(flag: str, path: str, world: dict[str, str], tmp_path: Path) -> None:
    """The installed script on a FIFO or /dev/zero returns at once with one line (both hung before)."""
    amft = Path(sys.executable).with_name("amft")
    target = world.get(path, path)
    cmd = ([str(amft), "train", "--out", str(tmp_path / "o"), "--data", world["gp"], flag, target]
           if flag == "--config" else [str(amft), "pipeline", "submit", "--host", "http://127.0.0.1:9", flag, target])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)  # generous: the box is shared; a hang never ends
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and target in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
