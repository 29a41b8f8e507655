"""Table of bad inputs for the operations commands: `amft pipeline run-local|submit|schedule` and
`amft lineage --state-dir` (issue 21, item 4; the style of tests/unit/test_bad_inputs.py).

Every row runs the real command line in-process (`amft_lib.cli.main([...])`) and asserts what a user
sees: exit status 2, exactly one line starting `error:` that names the parameter (or the busy state
dir and the pid holding it), no traceback, no password anywhere in the output, and the watched
location exactly as it was — for run-local rows the state dir stays absent: the stage parameters are
checked before SeaweedFS, MLflow or any task starts, so no weed process and no state file exist.

The `--host` URLs carry a password and point at a port where nothing listens (no KFP API server can
run here; a refused connection is the real failure a user meets). The busy state dir is held by a
real second process through the same locks run-local and SeaweedFS take.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_bad_inputs import Case, _fill, run_row  # the main table's row type and row runner, shared

PASSWORD = "Corr3ct-Horse-ops21"


def _weeds_on(path: Path) -> list[str]:
    """Command lines of live `weed` processes that mention `path` (one on that state dir would)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if Path(argv[0]).name == "weed" and str(path) in " ".join(argv):
                found.append(" ".join(argv))
    return found


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    t = tmp_path_factory.mktemp("bad-inputs-ops")
    busy = t / "busy"
    (busy / "s3").mkdir(parents=True)
    (busy / "mlflow.db").write_bytes(b"")  # what `amft lineage --state-dir` looks for first
    params = t / "params.yaml"
    params.write_text("p4_train_overrides: ['optim.nosuch=1']\n")
    # Another process holds the state dir and its SeaweedFS data dir, as a running run-local does.
    code = ("import sys; from amft_lib.proclock import DirLock; "
            "[DirLock(p, 'x').acquire() for p in sys.argv[1:]]; print('locked', flush=True); sys.stdin.read()")
    locks = [str(busy / ".amft-run.lock"), str(busy / "s3" / "weed.lock")]
    holder = subprocess.Popen([sys.executable, "-c", code, *locks], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert holder.stdout.readline().strip() == "locked"
    with socket.socket() as s:  # bound, never listening: a KFP host that refuses connections
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        try:
            yield {"busy": str(busy), "params": str(params), "holder": str(holder.pid),
                   "host": f"http://admin:{PASSWORD}@127.0.0.1:{port}", "port": str(port)}
        finally:
            holder.kill()
            holder.wait()


RUN = "pipeline run-local --state-dir {out}"
SUBMIT = "pipeline submit --host {host}"
SCHEDULE = "pipeline schedule --host {host} --cron 0_3_*_*_*"  # `_` → spaces after splitting

CASES = [
    # ── run-local: stage parameters checked before any service starts ──
    Case("run-local-override-unknown-key", RUN + " --set p4_train_overrides=[nosuch=1]",
         "p4_train_overrides: train config: override 'nosuch=1': unknown key 'nosuch'"),
    Case("run-local-override-unknown-section", RUN + " --set p4_train_overrides=[nosuch.lr=1]",
         "p4_train_overrides: train config: override 'nosuch.lr=1'"),
    Case("run-local-override-without-equals", RUN + " --set p4_train_overrides=[eval_every]",
         "p4_train_overrides: train config: override 'eval_every': expected KEY=VALUE"),
    Case("run-local-override-bad-value", RUN + " --set p4_train_overrides=[optim.lr=nan]",
         "p4_train_overrides: train config: optim.lr=nan"),
    Case("run-local-override-not-yaml", RUN + " --set p4_train_overrides=['optim.lr=[1,']",
         "p4_train_overrides: train config: override 'optim.lr=[1,': not valid YAML"),
    Case("run-local-override-not-a-list", RUN + " --set p4_train_overrides=eval_every=3",
         "p4_train_overrides"),
    Case("run-local-warm-start-override", RUN + " --set p3_warm_start_overrides=[optim.nosuch=1]",
         "p3_warm_start_overrides: warm_start config: override 'optim.nosuch=1'"),
    Case("run-local-model-settings", RUN + " --set p3_model_settings=[model.nosuch=true]",
         "p3_model_settings: "),
    Case("run-local-named-setting", RUN + " --set p4_train_lr=-1", "p4_train_lr: train config: optim.lr=-1"),
    Case("run-local-distributed-strategy", RUN + " --set p4_train_distributed_strategy=bogus",
         "p4_train_distributed_strategy: train config:"),
    Case("run-local-params-file-override", RUN + " --params-file {params}",
         "p4_train_overrides: train config: override 'optim.nosuch=1'"),
    Case("run-local-test-profile-override", RUN + " --profile test --set p4_train_overrides=[rollout.nosuch=2]",
         "p4_train_overrides: train config: override 'rollout.nosuch=2'"),
    # ── the state dir is busy: one line naming the process that holds it ──
    Case("run-local-busy-state-dir", "pipeline run-local --state-dir {busy}",
         "state dir {busy}: in use by pid {holder} (", out="{busy}"),
    Case("lineage-busy-state-dir", "lineage gp:1 --state-dir {busy}",
         "SeaweedFS data dir {busy}/s3: in use by pid {holder} (", out="{busy}"),
    # ── submit / schedule: the --host password never printed; bad overrides refused before sending ──
    Case("submit-unreachable-host-with-password", SUBMIT,
         "submit to http://***@127.0.0.1:{port} failed: MaxRetryError", out=None),
    Case("schedule-unreachable-host-with-password", SCHEDULE,
         "schedule to http://***@127.0.0.1:{port} failed: MaxRetryError", out=None),
    Case("submit-bad-override", SUBMIT + " --set p4_train_overrides=[nosuch=1]",
         "p4_train_overrides: train config: override 'nosuch=1'", out=None),
    Case("schedule-bad-override", SCHEDULE + " --set p3_warm_start_overrides=[nosuch=1]",
         "p3_warm_start_overrides: warm_start config: override 'nosuch=1'", out=None),
    Case("submit-bad-named-setting", SUBMIT + " --set p4_train_mu_init=7", "p4_train_mu_init: train config:",
         out=None),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input(case: Case, world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)  # `amft lineage --state-dir` would use a configured S3 instead
    out = str(tmp_path / "state")
    argv = [arg.replace("_", " ") if arg.startswith("0_") else arg for arg in _fill(case.argv, world, out).split()]
    captured = run_row(case, world, out, capsys, argv=argv, fragment=_fill(case.fragment, world, out))
    assert PASSWORD not in captured.err + captured.out
    if case.out is not None:
        assert not _weeds_on(Path(_fill(case.out, world, out)))  # no SeaweedFS was started on it


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 12, len(CASES)
