"""Smaller hardening items of issue 17: file modes follow the umask, stale prepare temp dirs go,
metrics.jsonl stays valid JSON without a val split, report Markdown is inert, the math verifier has a
length cap, and every numeric config field is range-checked by one mechanism."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import subprocess
import sys
import time
import typing
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from amft_lib.config import ConfigError, TrainConfig, WarmStartConfig, apply_overrides
from amft_lib.data.prepare import PrepareConfig, remove_stale_temp_dirs, run_prepare
from amft_lib.reports import evaluation_report, to_markdown
from amft_lib.reports import md_escape as escape_markdown_cell
from amft_lib.tasks.math import MAX_COMPLETION_CHARS, MathTask

SMALL = {"train_size": 40, "val_size": 8, "test_id_size": 8, "test_ood_size": 8}


def test_prepared_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        result = run_prepare(PrepareConfig(out_dir=str(tmp_path / "gp"), **SMALL))
    finally:
        os.umask(old)
    for path in [*result.files.values(), result.card_path]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_stale_prepare_temp_dirs_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "gp"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = os.uname().nodename.replace("-", "_")
    killed = out / f".prepare-{host}-{dead.pid}-abc123"  # what a SIGKILLed prepare leaves
    legacy = out / ".prepare-x1y2z3"  # the old mkdtemp name
    live = out / f".prepare-{host}-{os.getpid()}-def456"  # a prepare still running (this process)
    other_host = out / ".prepare-elsewhere-12345-ghi789"  # another node on a shared volume, recent
    for d in (killed, legacy, live, other_host):
        d.mkdir()
        (d / "train.parquet").write_bytes(b"partial")
    removed = remove_stale_temp_dirs(out)
    assert set(removed) == {killed, legacy}
    assert live.exists() and other_host.exists()
    old = time.time() - 2 * 24 * 3600
    os.utime(other_host, (old, old))
    assert remove_stale_temp_dirs(out) == [other_host]
    run_prepare(PrepareConfig(out_dir=str(out), **SMALL))  # a normal run leaves only its outputs (+ the live one)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [live.name]


def test_metrics_jsonl_is_strict_json_without_a_val_split(tmp_path: Path) -> None:
    from amft_lib.trainer import run_train

    data = tmp_path / "data"
    run_prepare(PrepareConfig(out_dir=str(data), **SMALL))
    (data / "val.parquet").unlink()
    (data / "card.json").unlink()
    cfg = apply_overrides(TrainConfig(), [
        f"data.path={data}", "max_steps=1", "model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2",
        "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=8", "loss.sft_batch_size=2",
        "device=cpu",
    ])
    run_train(cfg, tmp_path / "run", progress=False)

    def strict(token: str) -> float:
        raise ValueError(f"bare {token} in metrics.jsonl")

    records = [json.loads(line, parse_constant=strict) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    final = records[-1]
    assert final["final"] is True and final["val_reward"] is None and final["val_accuracy"] is None


def test_markdown_escaping_keeps_html_out() -> None:
    evil = "gp-1`</code><script>alert(1)</script>|[x](http://e.vil)"
    cell = escape_markdown_cell(evil)
    assert "<" not in cell and ">" not in cell and "`" not in cell.replace("\\`", "")
    assert "|" not in cell.replace("\\|", "") and "](" not in cell.replace("\\](", "")
    assert "\n" not in escape_markdown_cell("a\nb")
    metrics = {"model": "m", "blessed": False, "reason": "r", "blessing": {}, "comparisons": {}}
    report = to_markdown(evaluation_report(metrics, {}, {"test_id": [{"id": evil, "completion": "x", "reward": 1.0}]}))
    assert "<script>" not in report and "&lt;script&gt;" in report


def test_math_verifier_caps_the_completion_length() -> None:
    task = MathTask()
    t0 = time.perf_counter()
    verdict = task.verify("2", "1 " * 5_000_000 + "#### 2")  # 10 MB
    assert time.perf_counter() - t0 < 0.1
    assert verdict.reward == 0.0 and verdict.reason == "too_long"
    assert task.verify("2", "x" * (MAX_COMPLETION_CHARS - 10) + "#### 2").reward == 1.0


def _numeric_fields(cls: type, prefix: str = "") -> list[tuple[str, type]]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _numeric_fields(tp, f"{prefix}{f.name}.")
        elif tp in (int, float) or (typing.get_origin(tp) in (typing.Union, __import__("types").UnionType)
                                    and float in typing.get_args(tp)):
            out.append((prefix + f.name, tp))
    return out


@pytest.mark.parametrize("cls", [TrainConfig, WarmStartConfig])
def test_every_float_field_refuses_nan_and_inf(cls: type) -> None:
    floats = [name for name, tp in _numeric_fields(cls) if tp is not int]
    assert len(floats) >= 4
    for name in floats:
        for bad in ("nan", ".inf", "-.inf"):
            with pytest.raises(ConfigError, match=rf"{name.rsplit('.', 1)[-1]}=(nan|-?inf)"):
                apply_overrides(cls(), [f"{name}={bad}"])


def test_range_errors_name_the_field_and_the_fix() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(TrainConfig(), ["rollout.prompts_per_step=0"])
    assert str(info.value) == "rollout.prompts_per_step=0: must be >= 1 (default 8)"
    assert math.isfinite(TrainConfig().optim.lr)


def test_sigkilled_prepare_leaves_nothing_after_the_next_run(tmp_path: Path) -> None:
    """Kill -9 a real `amft data prepare` while its temp dir exists; the next run cleans it up."""
    import signal

    src = tmp_path / "in.jsonl"
    with src.open("w") as f:
        for i in range(60_000):
            f.write(json.dumps({"question": f"Q{i}: what is {i} plus 1?", "answer": f"#### {i + 1}"}) + "\n")
    out = tmp_path / "out"
    amft = Path(sys.executable).with_name("amft")
    cmd = [str(amft), "data", "prepare", "--task", "math", "--input", str(src), "--out-dir", str(out)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list(out.glob(".prepare-*")):
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.skip("prepare finished before its temp dir could be observed (machine too fast)")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(out.glob(".prepare-*")), "the killed run should have left its temp dir"
    assert subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          timeout=300).returncode == 0
    assert not list(out.glob(".prepare-*"))
    assert sum(pq.read_metadata(p).num_rows for p in out.glob("*.parquet")) == 60_000
