"""The `amft` entry point: version, config help that reads the given file, the user-error boundary."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from amft_lib import cli

ROOT = Path(__file__).resolve().parents[2]


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    meta = configparser.ConfigParser()
    meta.read(ROOT / "setup.cfg")
    assert capsys.readouterr().out.strip() == f"amft {meta['metadata']['version']}"


def test_help_config_shows_the_values_of_the_given_file(capsys):
    assert cli.main(["train", "--help-config", "--config", str(ROOT / "configs" / "tiny_gp.yaml"),
                     "--set", "optim.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "controller.mu_init = 0.7  (default 0.5)" in out  # the file's value, not the dataclass default
    assert "optim.lr = 0.5  (default " in out
    assert "controller.eta_mu = 0.05\n" in out  # unchanged keys show their value alone


def test_a_user_error_is_one_line_and_exit_2(capsys, tmp_path):
    code = cli.main(["train", "--out", str(tmp_path / "o"), "--set", "controller.mu_init=7"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "mu_init" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
