"""Table of bad inputs across `amft data prepare|validate`, `train`, `warm-start`, `evaluate`, `register`.

Every row runs the real command line in-process (`amft_lib.cli.main([...])`, the same entry point as
the `amft` console script) and asserts what a user sees: exit status 2 (1 for a failed gate), exactly
one line starting `error:` that names the field/file, no traceback, and the output location exactly
as it was before (absent stays absent; an existing file or dataset keeps its bytes). One row also
runs the installed `amft` script as a subprocess, to show the in-process path is the real one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from amft_lib.cli import main

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
ROOT_SKIP = pytest.mark.skipif(IS_ROOT, reason="root ignores file permissions")


@dataclass(frozen=True)
class Case:
    id: str
    argv: str  # a command line; {name} fields come from the `world` fixture
    fragment: str  # must appear in the single `error:` line
    out: str | None = "{out}"  # the output location that must be left exactly as it was
    rc: int = 2
    marks: tuple = ()


def _snapshot(path: Path) -> object:
    """What 'unchanged' compares: absent, a file's bytes, or every file under a folder with its bytes."""
    if not path.exists():
        return None
    if path.is_file():
        return ("file", path.read_bytes())
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else b"<dir>") for p in path.rglob("*"))


# ── the world the bad inputs live in ───────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from amft_lib import checkpoint
    from amft_lib.config import ModelConfig
    from amft_lib.data.prepare import PrepareConfig, run_prepare
    from amft_lib.model import load_policy, save_policy

    t = tmp_path_factory.mktemp("bad-inputs")
    w: dict[str, Path] = {"t": t}

    # datasets: a small General Points one, a math one, and broken copies
    gp = t / "gp"
    run_prepare(PrepareConfig(out_dir=str(gp), train_size=40, val_size=8, test_id_size=8, test_ood_size=8))
    w["gp"] = gp
    q = [{"question": f"Item {i}: how many apples are {i} plus {i + 1}?", "answer": f"#### {2 * i + 1}"}
         for i in range(60)]
    math_in = t / "math.jsonl"
    math_in.write_text("".join(json.dumps(r) + "\n" for r in q))
    w["math_in"] = math_in
    run_prepare(PrepareConfig(out_dir=str(t / "math"), task="math", input=str(math_in), ngram_n=0))
    w["math"] = t / "math"
    tampered = t / "tampered"
    shutil.copytree(gp, tampered)
    table = pq.read_table(tampered / "val.parquet")
    pq.write_table(table.slice(1), tampered / "val.parquet")
    w["tampered"] = tampered
    holey = t / "holey"
    shutil.copytree(gp, holey)
    (holey / "val.parquet").unlink()
    w["holey"] = holey
    badcard = t / "badcard"
    shutil.copytree(gp, badcard)
    (badcard / "card.json").write_text("{not json")
    w["badcard"] = badcard
    nodemo = t / "nodemo"
    nodemo.mkdir()
    rows = pq.read_table(gp / "train.parquet").to_pylist()
    pq.write_table(pa.Table.from_pylist([{**r, "demonstration": None} for r in rows]), nodemo / "train.parquet")
    w["nodemo"] = nodemo
    (t / "emptydir").mkdir()
    w["emptydir"] = t / "emptydir"
    previous = t / "previous"  # a complete earlier dataset that a failed run must leave intact
    shutil.copytree(gp, previous)
    w["previous"] = previous

    # user input files for `data prepare`
    def put(name: str, data: str | bytes) -> None:
        path = t / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        w[name.replace(".", "_")] = path

    put("empty.jsonl", "")
    put("badjson.jsonl", '{"question": "a", "answer": "1"}\n{"question": \n')
    put("array.jsonl", "[1, 2]\n")
    put("nofield.jsonl", '{"question": "how many?"}\n')
    put("extra.jsonl", '{"question": "how many?", "answer": "1", "hint": "x"}\n')
    put("wrongtype.jsonl", '{"question": 5, "answer": "1"}\n')
    put("nullq.jsonl", '{"question": null, "answer": "1"}\n')
    put("latin1.jsonl", b'{"question": "caf\xe9", "answer": "1"}\n')
    put("nan.jsonl", '{"question": "how many?", "answer": NaN}\n')
    put("big.jsonl", json.dumps({"question": "x" * 200, "answer": "1"}) + "\n")
    put("dupids.jsonl", '{"id": "a", "question": "q1?", "answer": "1"}\n'
                        '{"id": "a", "question": "q2?", "answer": "2"}\n')
    put("input.txt", "question,answer\n")
    put("fake.parquet", "this is not parquet")
    put("afile", "I am a file, not a folder\n")
    put("bin.yaml", b"\xff\xfe\x00garbage")
    put("bad.yaml", "optim: {lr: [1, 2\n")
    put("unknown.yaml", "optim:\n  lrr: 0.1\n")

    # models
    model, tok = load_policy(ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2), seed=0)
    w["model"] = save_policy(model, tok, t / "model")
    pickled = t / "pickled"
    shutil.copytree(w["model"], pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    w["pickled"] = pickled
    noweights = t / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text("{}")
    w["noweights"] = noweights

    # evaluation outputs for `register`
    for name, content in (("eval", {"blessed": True, "reason": "blessed: test", "test_id": {"accuracy": 0.5}}),
                          ("eval_noverdict", {"test_id": {"accuracy": 0.5}})):
        (t / name).mkdir()
        (t / name / "metrics.json").write_text(json.dumps(content))
        w[name] = t / name
    (t / "eval_badjson").mkdir()
    (t / "eval_badjson" / "metrics.json").write_text("{oops")
    w["eval_badjson"] = t / "eval_badjson"
    (t / "evaldir.json").mkdir()
    w["evaldir_json"] = t / "evaldir.json"

    # checkpoint roots: every checkpoint corrupt; one valid checkpoint written under another config
    corrupt = t / "ckpt_corrupt"
    step = corrupt / "checkpoints" / "step-0000005"
    step.mkdir(parents=True)
    (step / "MANIFEST.json").write_text("{truncated")
    (step / "model.safetensors").write_bytes(b"\x00" * 16)
    w["ckpt_corrupt"] = corrupt
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(lin.parameters())
    payload = checkpoint.CheckpointPayload(
        model_state=dict(lin.state_dict()), optimizer_state=opt.state_dict(),
        scheduler_state=torch.optim.lr_scheduler.LinearLR(opt).state_dict(), controller_state={"mu": 0.5},
        rng_state=checkpoint.capture_rng_state(), trainer_state={"step": 5, "config_hash": "another-config"},
    )
    w["ckpt_other"] = t / "ckpt_other"
    checkpoint.save_checkpoint(str(w["ckpt_other"]), 5, payload, "another-config")
    w["ckpt_other_step"] = Path(checkpoint.checkpoint_uri(str(w["ckpt_other"]), 5))

    w["tracking"] = f"sqlite:///{t / 'registry' / 'mlflow.db'}"
    w["registry"] = t / "registry"
    w["readonly"] = t / "readonly"
    w["readonly"].mkdir()
    w["unreadable"] = t / "unreadable.jsonl"
    w["unreadable"].write_text('{"question": "q?", "answer": "1"}\n')
    if not IS_ROOT:
        w["readonly"].chmod(0o555)
        w["unreadable"].chmod(0o000)
    return {k: str(v) for k, v in w.items()}


PREP = "data prepare --task math --out-dir {out} --input"
TRAIN = "train --no-progress --max-steps 1 --out {out} --data {gp}"
WARM = "warm-start --out {out} --data {gp}"
EVAL = "evaluate --model {model} --data {gp} --out {out} --device cpu"
REG = "register --name amft-bad --run-id run-1 --tracking-uri {tracking} --model {model} --eval {eval}"

CASES = [
    # ── data prepare ──
    Case("prep-math-needs-input", "data prepare --task math --out-dir {out}", "needs input"),
    Case("prep-missing-input", PREP + " {t}/nope.jsonl", "nope.jsonl: no such file"),
    Case("prep-empty-file", PREP + " {empty_jsonl}", "empty file"),
    Case("prep-malformed-json", PREP + " {badjson_jsonl}", "badjson.jsonl:2: malformed JSON"),
    Case("prep-not-an-object", PREP + " {array_jsonl}", "expected a JSON object"),
    Case("prep-missing-field", PREP + " {nofield_jsonl}", "missing field(s) 'answer'"),
    Case("prep-extra-field", PREP + " {extra_jsonl}", "unexpected field(s) 'hint'"),
    Case("prep-wrong-type", PREP + " {wrongtype_jsonl}", "field 'question' must be a string"),
    Case("prep-null-field", PREP + " {nullq_jsonl}", "field 'question' is null"),
    Case("prep-not-utf8", PREP + " {latin1_jsonl}", "not valid UTF-8"),
    Case("prep-nan-literal", PREP + " {nan_jsonl}", "malformed JSON"),
    Case("prep-row-too-big", PREP + " {big_jsonl} --max-row-bytes 50", "max_row_bytes=50"),
    Case("prep-duplicate-ids", PREP + " {dupids_jsonl} --id-field id", "duplicate id 'a'"),
    Case("prep-unsupported-suffix", PREP + " {input_txt}", "unsupported input format '.txt'"),
    Case("prep-fake-parquet", PREP + " {fake_parquet}", "fake.parquet: not a readable parquet file"),
    Case("prep-fractions-sum", PREP + " {math_in} --split-fractions train=0.5,val=0.2", "must sum to 1"),
    Case("prep-fractions-no-train", PREP + " {math_in} --split-fractions train=0,val=1", "train needs a fraction"),
    Case("prep-fractions-unknown", PREP + " {math_in} --split-fractions train=0.9,bogus=0.1", "unknown split"),
    Case("prep-negative-size", "data prepare --out-dir {out} --train-size -1", "train_size=-1"),
    Case("prep-max-row-bytes-0", PREP + " {math_in} --max-row-bytes 0", "max_row_bytes=0"),
    Case("prep-ngram-negative", PREP + " {math_in} --ngram-n -1", "ngram_n=-1"),
    Case("prep-unknown-task", "data prepare --task chess --out-dir {out}", "task='chess'"),
    Case("prep-gp-with-input", "data prepare --task general_points --input {math_in} --out-dir {out}", "generated"),
    Case("prep-bad-rule", "data prepare --out-dir {out} --id-rule bogus --train-size 5", "id_rule='bogus'"),
    Case("prep-out-is-file", "data prepare --task math --input {math_in} --out-dir {afile}", "is not a directory",
         out="{afile}"),
    Case("prep-out-under-file", "data prepare --task math --input {math_in} --out-dir {afile}/sub",
         "is not a directory", out="{afile}"),
    Case("prep-keeps-previous-dataset", "data prepare --task math --input {badjson_jsonl} --out-dir {previous}",
         "malformed JSON", out="{previous}"),
    Case("prep-out-readonly", "data prepare --task math --input {math_in} --out-dir {readonly}/ds",
         "permission denied", out="{readonly}", marks=(ROOT_SKIP,)),
    Case("prep-input-unreadable", PREP + " {unreadable}", "unreadable.jsonl: cannot read", marks=(ROOT_SKIP,)),
    # ── data validate ──
    Case("val-missing-dataset", "data validate --dataset {t}/nope --out-dir {out}", "nope: no such dataset"),
    Case("val-empty-dir", "data validate --dataset {emptydir} --out-dir {out}", "no parquet files"),
    Case("val-fake-parquet", "data validate --dataset {fake_parquet} --out-dir {out}", "not a readable parquet"),
    Case("val-card-file-missing", "data validate --dataset {holey} --out-dir {out}", "val.parquet: listed in card"),
    Case("val-sha-mismatch", "data validate --dataset {tampered} --out-dir {out}", "sha256 differs"),
    Case("val-bad-card", "data validate --dataset {badcard} --out-dir {out}", "cannot read dataset card"),
    Case("val-unknown-task", "data validate --dataset {gp} --task chess --out-dir {out}", "task='chess'"),
    Case("val-token-bounds", "data validate --dataset {gp} --min-prompt-tokens 5 --max-prompt-tokens 2 --out-dir {out}",
         "min_prompt_tokens=5"),
    Case("val-no-tokenizer", "data validate --dataset {gp} --tokenizer {t}/nope --out-dir {out}",
         "cannot load tokenizer"),
    Case("val-out-is-file", "data validate --dataset {gp} --out-dir {afile}", "is not a directory", out="{afile}"),
    Case("val-min-rows-unknown", "data validate --dataset {gp} --min-rows bogus=3 --out-dir {out}", "unknown split"),
    Case("val-fraction-bounds", "data validate --dataset {gp} --split-fractions train=0.9:0.1 --out-dir {out}",
         "need [low, high]"),
    Case("val-negative-examples", "data validate --dataset {gp} --examples -1 --out-dir {out}", "examples=-1"),
    Case("val-out-readonly", "data validate --dataset {gp} --out-dir {readonly}/r", "permission denied",
         out="{readonly}", marks=(ROOT_SKIP,)),
    # ── train ──
    Case("train-missing-data", "train --no-progress --out {out} --data {t}/nope", "nope: no such dataset"),
    Case("train-unknown-model", TRAIN + " --model {t}/nomodel", "model.name="),
    Case("train-out-is-file", "train --no-progress --out {afile} --data {gp}", "exists and is not a directory",
         out="{afile}"),
    Case("train-config-is-dir", TRAIN + " --config {t}", "is a directory"),
    Case("train-config-missing", TRAIN + " --config {t}/nope.yaml", "config file not found"),
    Case("train-config-binary", TRAIN + " --config {bin_yaml}", "not a UTF-8 text file"),
    Case("train-config-bad-yaml", TRAIN + " --config {bad_yaml}", "not valid YAML"),
    Case("train-config-unknown-key", TRAIN + " --config {unknown_yaml}", "unknown key(s) lrr"),
    Case("train-lr-nan", TRAIN + " --set optim.lr=nan", "optim.lr=nan"),
    Case("train-lr-inf", TRAIN + " --set optim.lr=.inf", "optim.lr=inf"),
    Case("train-lr-negative", TRAIN + " --set optim.lr=-1", "optim.lr=-1.0"),
    Case("train-temperature-nan", TRAIN + " --set rollout.temperature=nan", "rollout.temperature=nan"),
    Case("train-prompts-per-step-0", TRAIN + " --set rollout.prompts_per_step=0", "rollout.prompts_per_step=0"),
    Case("train-max-new-tokens-0", TRAIN + " --set rollout.max_new_tokens=0", "rollout.max_new_tokens=0"),
    Case("train-tiny-heads-0", TRAIN + " --set model.tiny_heads=0", "model.tiny_heads=0"),
    Case("train-checkpoint-every-neg", TRAIN + " --set checkpoint_every=-1", "checkpoint_every=-1"),
    Case("train-eval-every-neg", TRAIN + " --set eval_every=-5", "eval_every=-5"),
    Case("train-set-yaml-error", TRAIN + " --set optim.lr=[1,2", "override 'optim.lr=[1,2'"),
    Case("train-set-unknown-section", TRAIN + " --set nosuch.key=1", "'nosuch' is not a config section"),
    Case("train-group-size-1", TRAIN + " --set rollout.group_size=1", "rollout.group_size=1"),
    Case("train-mu-init-2", TRAIN + " --set controller.mu_init=2", "controller.mu_init=2.0"),
    Case("train-beta1-1", TRAIN + " --set optim.beta1=1.0", "optim.beta1=1.0"),
    Case("train-clip-eps-0", TRAIN + " --set loss.clip_eps=0", "loss.clip_eps=0.0"),
    Case("train-bad-method", TRAIN + " --set controller.method=bogus", "controller.method='bogus'"),
    Case("train-max-steps-0", "train --no-progress --max-steps 0 --out {out} --data {gp}", "max_steps=0"),
    Case("train-unknown-task", TRAIN + " --task chess", "data.task='chess'"),
    Case("train-task-mismatch", TRAIN + " --task math", "rows are for task(s) general_points"),
    Case("train-task-mismatch-math", "train --no-progress --max-steps 1 --out {out} --data {math}",
         "rows are for task(s) math"),
    Case("train-no-demonstrations", "train --no-progress --max-steps 1 --out {out} --data {nodemo}",
         "needs demonstrations"),
    Case("train-lora-no-targets", TRAIN + " --set model.lora=true --set model.lora_targets=[nope]",
         "model.lora_targets"),
    Case("train-resume-missing-uri", TRAIN + " --resume {t}/nope/checkpoints/step-0000001", "no checkpoint there"),
    Case("train-resume-all-corrupt", TRAIN + " --resume auto --checkpoint-root {ckpt_corrupt}",
         "are corrupt, refusing to restart from step 0", out="{out}"),
    Case("train-resume-config-mismatch", TRAIN + " --resume auto --checkpoint-root {ckpt_other}",
         "config hash another-config"),
    Case("train-resume-uri-mismatch", TRAIN + " --resume {ckpt_other_step}", "config hash another-conf"),
    Case("train-resume-auto-no-root", TRAIN + " --resume auto", "--checkpoint-root"),
    Case("train-checkpoint-root-is-file", TRAIN + " --checkpoint-root {afile} --set checkpoint_every=1",
         "checkpoint root", out="{afile}"),
    Case("train-cuda-without-gpu", TRAIN + " --set device=cuda", "no CUDA device",
         marks=(pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),)),
    # ── warm-start ──
    Case("ws-missing-data", "warm-start --out {out} --data {t}/nope", "nope: no such dataset"),
    Case("ws-unknown-model", WARM + " --model {t}/nomodel", "model.name="),
    Case("ws-lr-negative", WARM + " --set lr=-1", "lr=-1.0"),
    Case("ws-batch-size-0", WARM + " --set batch_size=0", "batch_size=0"),
    Case("ws-rs-temperature-nan", WARM + " --set rs_temperature=nan", "rs_temperature=nan"),
    Case("ws-final-ratio-0", WARM + " --set final_sft_lr_ratio=0", "final_sft_lr_ratio=0.0"),
    Case("ws-max-new-tokens-0", WARM + " --set max_new_tokens=0", "max_new_tokens=0"),
    Case("ws-out-is-file", "warm-start --out {afile} --data {gp}", "exists and is not a directory", out="{afile}"),
    Case("ws-config-is-dir", WARM + " --config {t}", "is a directory"),
    Case("ws-task-mismatch", WARM + " --task math", "rows are for task(s) general_points"),
    Case("ws-no-demonstrations", "warm-start --out {out} --data {nodemo}", "needs demonstrations"),
    # ── evaluate ──
    Case("eval-unknown-model", "evaluate --model {t}/nomodel --data {gp} --out {out} --device cpu", "model.name="),
    Case("eval-missing-data", "evaluate --model {model} --data {t}/nope --out {out}", "nope: no such dataset"),
    Case("eval-out-is-file", "evaluate --model {model} --data {gp} --out {afile}", "is not a directory",
         out="{afile}"),
    Case("eval-temperature-nan", EVAL + " --temperature nan", "eval.temperature=nan"),
    Case("eval-max-regression-nan", EVAL + " --max-regression nan", "eval.max_regression=nan"),
    Case("eval-pass-k-0", EVAL + " --pass-k 0", "eval.pass_k=0"),
    Case("eval-n-below-k", EVAL + " --n-samples 2 --pass-k 4", "pass@k needs n >= k"),
    Case("eval-bad-metric", EVAL + " --metric bogus", "eval.metric='bogus'"),
    Case("eval-threshold-2", EVAL + " --threshold 2", "eval.threshold=2.0"),
    Case("eval-unknown-split", EVAL + " --splits test_id,bogus", "eval.splits"),
    Case("eval-batch-size-0", EVAL + " --batch-size 0", "eval.batch_size"),
    Case("eval-unknown-task", EVAL + " --task chess", "eval.task='chess'"),
    Case("eval-task-mismatch", EVAL + " --task math", "not eval.task='math'"),
    Case("eval-no-eval-rows", "evaluate --model {model} --data {nodemo} --out {out}", "none of the eval splits"),
    # ── register ──
    Case("reg-model-missing", "register --name amft-bad --run-id r1 --tracking-uri {tracking} --model {t}/nomodel "
         "--eval {eval}", "not a Hugging Face model directory", out="{registry}"),
    Case("reg-eval-missing", "register --name amft-bad --run-id r1 --tracking-uri {tracking} --model {model} "
         "--eval {t}/noeval", "no evaluation metrics.json", out="{registry}"),
    Case("reg-eval-bad-json", "register --name amft-bad --run-id r1 --tracking-uri {tracking} --model {model} "
         "--eval {eval_badjson}", "not valid JSON", out="{registry}"),
    Case("reg-eval-no-verdict", "register --name amft-bad --run-id r1 --tracking-uri {tracking} --model {model} "
         "--eval {eval_noverdict}", "no 'blessed' field", out="{registry}"),
    Case("reg-eval-is-dir", "register --name amft-bad --run-id r1 --tracking-uri {tracking} --model {model} "
         "--eval {evaldir_json}", "is a directory", out="{registry}"),
    Case("reg-bad-name", REG.replace("amft-bad", "bad@name"), "model name 'bad@name'", out="{registry}"),
    Case("reg-bad-run-id", REG.replace("run-1", "bad/run"), "run id 'bad/run'", out="{registry}"),
    Case("reg-pickle-weights", REG.replace("{model}", "{pickled}"), "refusing pickle-format weights",
         out="{registry}"),
    Case("reg-no-safetensors", REG.replace("{model}", "{noweights}"), "no .safetensors weights", out="{registry}"),
]


def _fill(text: str, world: dict[str, str], out: str) -> str:
    return text.format(out=out, **world)


def run_row(case: Case, world: dict[str, str], out: str, capsys: pytest.CaptureFixture, *,
            argv: list[str] | None = None, fragment: str | None = None) -> pytest.CaptureResult:
    """One row of any bad-input table (this one, test_bad_inputs_{data,models,ops}.py): run the CLI
    in-process and check what a user sees. Exit `case.rc`; no traceback; for rc 2 exactly one `error:`
    line holding the fragment, for rc 1 (a failed gate: a result, not an error) none, and the gate's
    report naming the failed check; the watched output location exactly as it was. `argv` defaults to
    the row's command with {fields} filled after splitting (filled values may hold spaces)."""
    argv = argv if argv is not None else [_fill(token, world, out) for token in case.argv.split()]
    fragment = case.fragment if fragment is None else fragment
    watched = Path(_fill(case.out, world, out)) if case.out else None
    before = _snapshot(watched) if watched else None
    rc = main(argv)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert rc == case.rc, (rc, captured.err[-3000:])
    assert "Traceback" not in captured.err + captured.out
    if case.rc == 1:
        assert not errors, errors
        assert f"failed {fragment}" in captured.out, captured.out[-3000:]
    else:
        assert len(errors) == 1, captured.err[-3000:]
        assert fragment in errors[0], errors[0]
    if watched is not None:
        assert _snapshot(watched) == before, f"{watched} changed"
    return captured


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case: Case, world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_row(case, world, str(tmp_path / "out"), capsys)


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 60, len(CASES)


def test_failed_gate_exits_1_without_an_error_line(world: dict[str, str], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """A dataset that reads but fails the gate is a result (exit 1, reports written), not an error."""
    rc = main(["data", "validate", "--dataset", world["gp"], "--min-rows", "train=100000",
               "--out-dir", str(tmp_path / "r")])
    captured = capsys.readouterr()
    assert rc == 1
    assert not [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert "validation FAILED" in captured.out and "Traceback" not in captured.err
    assert (tmp_path / "r" / "report.md").is_file()


def test_console_script_subprocess(world: dict[str, str], tmp_path: Path) -> None:
    """The installed `amft` script behaves like main(): one error line, exit 2, nothing written."""
    amft = Path(sys.executable).with_name("amft")
    out = tmp_path / "out"
    proc = subprocess.run([str(amft), "train", "--out", str(out), "--data", world["gp"], "--set", "optim.lr=nan"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: optim.lr=nan: must be a finite number > 0 (default 0.0002)"]
    assert "Traceback" not in proc.stderr and not out.exists()
