"""Operations safety (issue 21): scrubbing of printed output and log tracebacks, bounded MLflow waits,
the state-dir lock, stale temp folders of dead runs, and the stage-parameter check that runs before
any service starts. Real processes, real files, a real HTTP listener; no mocks.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from amft_lib import redact, registry
from amft_lib.config import ConfigError
from amft_lib.proclock import BusyError, DirLock, process_alive, process_start_time
from amft_lib.run.preflight import check_stage_parameters
from pipelines.local import clean_stale_tmp, state_lock

PASSWORD = "Sw0rdf1sh-ops-21"


def _dead_process() -> tuple[int, int]:
    """(pid, start time) of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    start = process_start_time(proc.pid)
    assert start is not None
    proc.kill()
    proc.wait()
    return proc.pid, start


def _holder(lock_path: Path) -> subprocess.Popen:
    """Another process that takes the lock on `lock_path` and keeps it until killed."""
    code = ("import sys; from amft_lib.proclock import DirLock; DirLock(sys.argv[1], 'x').acquire(); "
            "print('locked', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout.readline().strip() == "locked"
    return proc


# ── scrubbing ─────────────────────────────────────────────────────────────────────────────────────


def test_redacting_stream_scrubs_a_secret_split_across_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    stream = redact.RedactingStream(out)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "set-after-the-stream-was-made-42")  # read per line
    stream.write(f"uri http://u:{PASSWORD[:5]}")
    assert out.getvalue() == ""  # held until the newline
    stream.write(f"{PASSWORD[5:]}@h:5000/x and set-after-the-stream-was-made-42\npartial ")
    stream.flush()
    assert out.getvalue() == "uri http://***@h:5000/x and ***\npartial "


def test_log_filter_scrubs_tracebacks_and_secrets_set_later(monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger("amft.test.ops.redact")
    logger.propagate = False
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        redact.install_log_redaction(logger)
        assert any(isinstance(f, redact.RedactingFilter) for f in logger.filters)  # survives a handler swap
        monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-arrived-late-99")
        try:
            raise ConnectionError(f"cannot reach https://admin:{PASSWORD}@kfp.example.com")
        except ConnectionError:
            logger.debug("submit failed with tok-arrived-late-99", exc_info=True)
            logger.error("submit failed", exc_info=True)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "https://***@kfp.example.com" in text and "Traceback" in text
    assert PASSWORD not in text and "tok-arrived-late-99" not in text


# ── bounded waits on the tracking server ───────────────────────────────────────────────────────────


def test_mlflow_http_retries_are_bounded_unless_the_user_set_them(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for name in registry.HTTP_BOUNDS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # the user's value wins
    registry.get_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    retries, factor, timeout = (MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get(),
                                MLFLOW_HTTP_REQUEST_TIMEOUT.get())
    assert (retries, factor, timeout) == (2, 1, 7)
    # urllib3 backoff: 0 before the first retry, then factor·2^(n-1) (+ ≤ 1 s jitter each): a refused
    # connection gives up after ~2-4 s instead of MLflow's default 7 retries with factor 2 (~2 min)
    assert sum(factor * 2 ** (n - 1) for n in range(2, retries + 1)) + retries <= 10


def test_unreachable_tracking_uri_is_one_line_without_the_password() -> None:
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(registry.RegistryUnreachableError) as err:
            registry.check_reachable(f"http://admin:{PASSWORD}@127.0.0.1:{port}")
    message = str(err.value)
    assert "\n" not in message and PASSWORD not in message
    assert message.startswith(f"tracking URI http://***@127.0.0.1:{port}: unreachable within 5 s")


def test_silent_tracking_server_fails_at_the_probe_deadline() -> None:
    """A host that accepts the connection but never answers: the probe's deadline ends it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)  # the kernel completes the handshake; nobody ever reads or answers
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(registry.RegistryUnreachableError, match=r"unreachable within 0\.5 s"):
            registry.check_reachable(f"http://127.0.0.1:{port}", timeout_s=0.5)
        assert time.monotonic() - t0 < 30  # it returns (loose: the deadline is 0.5 s)


def test_any_http_answer_counts_as_reachable() -> None:
    class Deny(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Deny)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        detail = registry.check_reachable(f"http://u:{PASSWORD}@127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    assert detail.endswith("answers") and PASSWORD not in detail
    assert "not probed" in registry.check_reachable("sqlite:///somewhere/mlflow.db")


# ── the state-dir lock ─────────────────────────────────────────────────────────────────────────────


def test_state_lock_names_the_live_holder_and_frees_when_it_dies(tmp_path: Path) -> None:
    state = tmp_path / "state"
    holder = _holder(state / ".amft-run.lock")
    try:
        with pytest.raises(BusyError) as err, state_lock(state):
            pass
        assert f"in use by pid {holder.pid} (" in str(err.value) and "\n" not in str(err.value)
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the flock
        holder.wait()
    with state_lock(state) as lock:  # a dead holder's lock file does not block
        assert lock.held
        with pytest.raises(BusyError, match=f"pid {os.getpid()} "):
            DirLock(state / ".amft-run.lock", "state dir").acquire()  # a second open in this process too


def test_lock_record_has_no_secret_from_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["amft", "pipeline", "submit", "--host", f"https://u:{PASSWORD}@kfp.example"])
    with DirLock(tmp_path / "x.lock", "x"):
        text = (tmp_path / "x.lock").read_text()
    assert "https://***@kfp.example" in text and PASSWORD not in text


# ── stale temp folders ─────────────────────────────────────────────────────────────────────────────


def test_stale_temp_folder_of_a_dead_run_is_removed_and_live_ones_are_kept(tmp_path: Path) -> None:
    tmp_root = tmp_path / "tmp"
    dead_pid, dead_start = _dead_process()
    stale = tmp_root / f"run-{dead_pid}-{dead_start}"
    (stale / "model-copy").mkdir(parents=True)
    (stale / "model-copy" / "model.safetensors").write_bytes(b"\0" * 1024)
    live = tmp_root / f"run-{os.getpid()}-{process_start_time(os.getpid())}"
    (live / "x").mkdir(parents=True)
    reused = tmp_root / f"run-{os.getpid()}-1"  # our pid, another start time: a dead run whose pid was reused
    reused.mkdir()
    other = tmp_root / "not-a-run-folder"
    other.mkdir()
    # a dead run's folder that a surviving task still uses as TMPDIR is kept
    dead2_pid, dead2_start = _dead_process()
    used = tmp_root / f"run-{dead2_pid}-{dead2_start}"
    used.mkdir()
    task = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                            env={**os.environ, "TMPDIR": str(used)})
    try:
        removed = clean_stale_tmp(tmp_root)
    finally:
        task.kill()
        task.wait()
    assert sorted(removed) == sorted([stale, reused])
    assert not stale.exists() and not reused.exists()
    assert live.is_dir() and other.is_dir() and used.is_dir()
    assert not process_alive(dead_pid, dead_start) and process_alive(os.getpid(), process_start_time(os.getpid()))


# ── stage parameters checked before anything starts ────────────────────────────────────────────────


@pytest.mark.parametrize(("params", "named"), [
    ({"p4_train_overrides": ["nosuch.key=1"]}, "p4_train_overrides: train config: override 'nosuch.key=1'"),
    ({"p3_warm_start_overrides": ["optim.lr=-1"]}, "p3_warm_start_overrides: warm_start config:"),
    ({"p3_model_settings": ["model.lora"]}, "p3_model_settings: "),
    ({"p4_train_overrides": ["eval_every=2"], "p3_warm_start_overrides": ["bogus=1"]}, "p3_warm_start_overrides:"),
])
def test_a_bad_stage_parameter_is_named(params: dict, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_stage_parameters(params)
    assert str(err.value).startswith(named), str(err.value)


def test_good_stage_parameters_give_both_configs() -> None:
    warm, train = check_stage_parameters({"p4_train_overrides": ["eval_every=7"], "p0_run_id": "not-a-config-key"})
    assert train.eval_every == 7 and warm is not None


def test_preflight_names_an_unreachable_tracking_uri_and_a_bad_override_in_one_line_each(tmp_path: Path) -> None:
    """The cluster path: preflight's own report (a local-folder run root stands in for S3 here)."""
    from amft_lib.run.preflight import run_preflight

    with socket.socket() as s:  # bound, never listening: the tracking server refuses connections
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        t0 = time.monotonic()
        result = run_preflight({"p0_s3_root": str(tmp_path / "s3"), "p0_run_id": "ops-21", "p3_model_name": "tiny",
                                "p6_registry_tracking_uri": f"http://admin:{PASSWORD}@127.0.0.1:{port}",
                                "p4_train_overrides": ["eval_every=2", "nosuch=1"]})
        elapsed = time.monotonic() - t0
    failed = {c.name: c.detail for c in result.checks if not c.ok}
    assert set(failed) == {"config", "registry"}, failed
    assert failed["registry"].startswith(f"tracking URI http://***@127.0.0.1:{port}: unreachable within 5 s")
    assert failed["config"].startswith("p4_train_overrides: train config: override 'nosuch=1'")
    assert all("\n" not in d and PASSWORD not in d for d in failed.values())
    assert elapsed < 30  # loose: it returns, instead of MLflow's minutes of retries


@pytest.mark.parametrize("command", [["submit"], ["schedule", "--cron", "0 3 * * *"]])
def test_verbose_submit_and_schedule_never_print_the_host_password(command: list[str]) -> None:
    """The installed script with -v: the error line, the debug traceback and urllib3's retry warnings
    all pass the scrubber (no KFP API server can run here: the host refuses connections)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        repo = Path(__file__).resolve().parents[2]
        argv = [str(Path(sys.executable).with_name("amft")), "-v", "pipeline", *command,
                "--host", f"http://admin:{PASSWORD}@127.0.0.1:{port}",
                "--package", str(repo / "pipelines" / "amft_pipeline.yaml")]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(repo)})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-2000:]
    assert PASSWORD not in output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {command[0]} to http://***@127.0.0.1:{port} failed")
    assert "Traceback" in output  # -v logged the cause with its traceback, scrubbed
