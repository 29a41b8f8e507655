"""`amft bench NAME ARGS…` finds the checkout's benchmark script and runs it with ARGS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amft_lib.cli import bench as bench_commands
from amft_lib.cli import main


def test_every_listed_benchmark_exists():
    for name, (script, _) in bench_commands.BENCHMARKS.items():
        assert (bench_commands.BENCH_DIR / script).is_file(), name


def test_arguments_and_exit_status_pass_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake = tmp_path / "bench_data.py"
    fake.write_text("import json, sys\n"
                    "open(sys.argv[0] + '.argv', 'w').write(json.dumps(sys.argv[1:]))\n"
                    "sys.exit(3)\n")
    monkeypatch.setattr(bench_commands, "BENCH_DIR", tmp_path)
    monkeypatch.setattr(bench_commands.script_path, "__defaults__", (tmp_path,))
    assert main(["bench", "data", "--rows", "10", "--out", "x y"]) == 3
    assert json.loads((tmp_path / "bench_data.py.argv").read_text()) == ["--rows", "10", "--out", "x y"]


def test_real_script_help_exits_zero(capsys: pytest.CaptureFixture[str]):
    assert main(["bench", "methods", "--help"]) == 0
    assert "usage: bench_methods.py" in capsys.readouterr().out


def test_missing_checkout_is_a_clear_error(tmp_path: Path):
    with pytest.raises(SystemExit, match="benchmarks run from a source checkout"):
        bench_commands.script_path("speed", tmp_path)
