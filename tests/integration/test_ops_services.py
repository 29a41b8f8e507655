"""Operations of the local services (issue 21), with real SeaweedFS and real `amft` processes:

- one SeaweedFS per data dir: a second start on a busy dir is one line naming the holder, and no
  second weed is spawned;
- a weed left running by a run that died is stopped *before* a rerun spawns its own;
- `amft pipeline run-local` on SIGTERM stops its tasks and its weed before it exits, and releases
  the state dir;
- `amft -v pipeline run-local` never prints the tracking URI's password or the S3 secret key (a run
  that fails fast in preflight: the tracking server refuses connections).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amft_lib.proclock import BusyError, descendants, process_alive, read_record
from amft_lib.s3server import EmbeddedS3, S3ServerError, find_weed

PASSWORD = "Tr0ub4dor-ops-21"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _weed_installed() -> None:
    try:
        find_weed()
    except S3ServerError as exc:
        pytest.skip(str(exc))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def weeds_on(data_dir: Path) -> list[int]:
    """Live weed processes serving `data_dir` (from their command lines)."""
    marker = f"-dir={data_dir.absolute() / 'data'}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().split(b"\0") and process_alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_second_server_on_a_busy_data_dir_is_refused_naming_the_holder(tmp_path: Path) -> None:
    first = EmbeddedS3(tmp_path / "s3")
    first.start()
    try:
        with pytest.raises(BusyError) as err:
            EmbeddedS3(tmp_path / "s3").start()
        assert f"in use by pid {os.getpid()}" in str(err.value) and "\n" not in str(err.value)
        assert weeds_on(tmp_path / "s3") == [first.pid]  # no second weed was spawned
    finally:
        first.stop()
    assert not weeds_on(tmp_path / "s3") and not (tmp_path / "s3" / "weed.pid").exists()


def test_weed_of_a_killed_owner_is_stopped_before_a_rerun_starts_one(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "s3"
    # Started from a worker thread (as a scheduler's thread would), so weed gets no PDEATHSIG and
    # outlives its owner for sure: the rerun must stop it, not just wait for it.
    code = ("import sys, threading, time; from amft_lib.s3server import EmbeddedS3; s = EmbeddedS3(sys.argv[1]); "
            "t = threading.Thread(target=s.start); t.start(); t.join(); print(s.pid, flush=True); time.sleep(600)")
    owner = subprocess.Popen([sys.executable, "-c", code, str(data)], stdout=subprocess.PIPE, text=True, env=_env())
    old = int(owner.stdout.readline())
    assert weeds_on(data) == [old] and read_record(data / "weed.pid")["pid"] == old
    owner.send_signal(signal.SIGTERM)  # Python's default: exit at once, no cleanup
    owner.wait(timeout=30)
    assert process_alive(old)  # the orphan still serves the data dir
    seen_at_spawn: list[bool] = []
    spawn = EmbeddedS3._spawn

    def spy(self, weed, ports):  # records, then does the real spawn
        seen_at_spawn.append(process_alive(old))
        return spawn(self, weed, ports)

    monkeypatch.setattr(EmbeddedS3, "_spawn", spy)
    rerun = EmbeddedS3(data)
    try:
        rerun.start()
    except BaseException:
        if process_alive(old):
            os.kill(old, signal.SIGKILL)
        raise
    try:
        assert seen_at_spawn == [False]  # the old weed was gone before the new one was spawned
        assert weeds_on(data) == [rerun.pid]
    finally:
        rerun.stop()
        if process_alive(old):  # only if the fix failed: leave no server behind
            os.kill(old, signal.SIGKILL)


def test_busy_state_dir_then_sigterm_stops_run_local_and_its_seaweedfs_before_it_exits(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real run-local: a second run-local and the printed `amft lineage … --state-dir` command get one
    line naming it (no second weed); then SIGTERM stops its tasks and its weed before it exits."""
    from amft_lib.cli import main

    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    state = tmp_path / "state"
    amft = Path(sys.executable).with_name("amft")
    proc = subprocess.Popen([str(amft), "pipeline", "run-local", "--profile", "test", "--threads", "1",
                             "--state-dir", str(state)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    try:
        _wait_for(lambda: weeds_on(state / "s3"), 120, "run-local's SeaweedFS")
        weed = weeds_on(state / "s3")[0]
        _wait_for(lambda: (state / "mlflow.db").is_file(), 120, "the registry (preflight creates it)")
        capsys.readouterr()
        for argv, says in ((["pipeline", "run-local", "--profile", "test", "--state-dir", str(state)],
                            f"error: state dir {state}: in use by pid {proc.pid} (amft pipeline run-local"),
                           (["lineage", "gp:1", "--state-dir", str(state), "--verify"],
                            f"error: SeaweedFS data dir {state / 's3'}: in use by pid {proc.pid} (amft pipeline "
                            "run-local")):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert [line for line in err.splitlines() if line.startswith("error:")] == [err.strip()], err
            assert err.startswith(says) and "Traceback" not in err and "panic" not in err
        assert weeds_on(state / "s3") == [weed]  # neither started a second SeaweedFS on the data
        _wait_for(lambda: set(descendants(proc.pid)) - {weed}, 120, "the first task")
        tasks = set(descendants(proc.pid)) - {weed}
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "error: interrupted" in err and "Traceback" not in err
    assert not process_alive(weed) and not weeds_on(state / "s3")  # gone when run-local exited
    assert not [pid for pid in tasks if process_alive(pid)]  # no task outlived it
    assert not list((state / "tmp").glob("run-*"))  # its tasks' temp folder went with it
    lock = json.loads((state / ".amft-run.lock").read_text() or "null")
    assert lock is None  # released


def test_verbose_run_local_never_prints_the_tracking_password_or_the_s3_secret(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with socket.socket() as s:  # bound, never listening: the tracking server refuses connections
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        amft = Path(sys.executable).with_name("amft")
        proc = subprocess.run(
            [str(amft), "-v", "pipeline", "run-local", "--profile", "test", "--threads", "1", "--state-dir",
             str(state), "--set", f"p6_registry_tracking_uri=http://admin:{PASSWORD}@127.0.0.1:{port}"],
            capture_output=True, text=True, env=_env(), timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    secret = json.loads((state / "s3" / "s3-identities.json").read_text())["identities"][0]["credentials"][0]
    assert PASSWORD not in output and secret["secretKey"] not in output
    assert f"http://***@127.0.0.1:{port}" in output  # the URI was printed, scrubbed
    assert "unreachable within 5 s" in output  # preflight said why, in its one line
    assert "preflight" in output and "FAILED" in output
