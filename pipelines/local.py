"""`amft pipeline run-local`: the whole DAG under kfp.local, against an embedded SeaweedFS (S3) and
an MLflow registry on SQLite, with the services started and stopped around the run.

kfp.local runs each task as a subprocess (`SubprocessRunner(use_venv=False)`) in this environment,
so what runs here is the component code a cluster runs, minus the platform config (GPUs, secrets)
that only Kubernetes can apply.

Operations (issue 21): the stage parameters are checked against the typed configs before anything
starts or is written; the state dir is locked for the run (a second run, or `amft lineage
--state-dir` during it, gets one line naming the holder); SIGTERM stops the tasks and SeaweedFS
before the process exits; each run's tasks get a temp folder named after the run's process, removed
at the end, and folders of runs that died (owner no longer alive) are removed at the next start;
printed task output and log lines pass through the secret scrubber (`-v` included).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import io
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from amft_lib.proclock import DirLock, descendants, process_alive, process_start_time
from amft_lib.redact import RedactingFilter, RedactingStream, redact_text
from amft_lib.run.summary import accuracy_table, changes_table, summarize_run, summary_markdown, verdict_reason
from pipelines.build import load_pipeline

STAGES = ("preflight", "prepare-data", "validate-data", "stop-run", "warm-start", "train", "evaluate", "register",
          "run-summary")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TASK_START = re.compile(r"^Executing task '([^']+)'")
_TASK_END = re.compile(r"^Task '([^']+)' finished with status (\w+)")
STATE_LOCK = ".amft-run.lock"  # in the state dir: flock held by the run-local that uses it
_RUN_TMP = re.compile(r"^run-(\d+)-(\d+)$")  # state/tmp/run-<owner pid>-<owner start time>: one run's TMPDIR
_TASK_STOP_TIMEOUT = 10.0  # s the tasks of an interrupted run get to exit on SIGTERM before SIGKILL


class TaskLog(logging.Filter):
    """Stage status, attempts and wall time from kfp.local's own log lines (it reports no timings).

    A filter on the root logger rather than a handler: kfp.local swaps the root logger's handlers
    while it runs, but leaves its filters alone. It only observes; every record passes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tasks: dict[str, dict[str, Any]] = {}
        self._started: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = _ANSI.sub("", record.getMessage())
        if m := _TASK_START.match(message):
            self._started[m.group(1)] = record.created
        elif m := _TASK_END.match(message):
            name, status = m.groups()
            task = self.tasks.setdefault(name, {"status": status, "attempts": 0, "seconds": 0.0})
            task["attempts"] += 1
            task["status"] = status
            task["seconds"] += record.created - self._started.pop(name, record.created)
        return True


@dataclasses.dataclass
class LocalRun:
    """What `run_local` did: the pipeline state, per-task records, the run summary and where things are."""

    state: str
    error: str
    tasks: dict[str, dict[str, Any]]
    summary: dict[str, Any]
    pipeline_root: Path
    tracking_uri: str
    lineage_chain: str
    seconds: float


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block (the task subprocesses inherit them), then restore."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextlib.contextmanager
def _s3_for(state_dir: Path, settings: Any | None) -> Iterator[tuple[Any, int | None]]:
    """(S3 settings, weed pid): the caller's settings, or an embedded SeaweedFS under the state dir,
    stopped on exit (weed is gone when this exits: stop waits, then kills)."""
    if settings is not None:
        yield settings, None
        return
    from amft_lib.s3server import EmbeddedS3

    server = EmbeddedS3(state_dir / "s3")
    server.start()
    try:
        yield server.settings, server.pid
    finally:
        server.stop()


def state_lock(state: Path) -> DirLock:
    """The lock a run holds on its state dir (`with state_lock(state):`): BusyError naming the
    holder's pid and command when another live process holds it."""
    return DirLock(state / STATE_LOCK, f"state dir {state}")


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt for the block, so a terminated run unwinds like Ctrl-C:
    its tasks are stopped and SeaweedFS is stopped (and waited for) before the process exits,
    instead of weed lingering ~27 s while a rerun starts another on the same data. Main thread only
    (Python delivers signals there); elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_tasks(keep: set[int]) -> None:
    """SIGTERM every process this one started except `keep` (SeaweedFS, stopped after them), wait up
    to _TASK_STOP_TIMEOUT s, SIGKILL what is left: an interrupted run leaves no task running."""
    pids = [pid for pid in descendants(os.getpid()) if pid not in keep and not set(descendants(pid)) & keep]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (_TASK_STOP_TIMEOUT if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and any(process_alive(pid) for pid in pids):
            for pid in pids:  # reap those that are our children, or they stay zombies; never weed's status
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        pids = [pid for pid in pids if process_alive(pid)]
        if not pids:
            return


def _tmpdirs_in_use() -> set[str]:
    """TMPDIR of every live process we can read (/proc/PID/environ): a task that outlived its run
    (its run-local was SIGKILLed) still owns its temp folder."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                for item in (entry / "environ").read_bytes().split(b"\0"):
                    if item.startswith(b"TMPDIR="):
                        found.add(os.fsdecode(item[len(b"TMPDIR="):]).rstrip("/"))
    return found


def clean_stale_tmp(tmp_root: Path) -> list[Path]:
    """Remove the run temp folders (`run-<pid>-<start>`) under `tmp_root` whose owner is dead and
    that no live process uses as TMPDIR; returns what was removed.

    Why: a killed task leaves its temp folder — each holds a model copy — and nothing else ever
    removed it. The owner is the run-local process (pid and start time, so a reused pid does not
    keep a dead run's folder); a live one is kept, whoever it is."""
    removed = []
    in_use: set[str] | None = None
    for folder in sorted(tmp_root.glob("run-*")):
        m = _RUN_TMP.match(folder.name)
        if not m or not folder.is_dir() or process_alive(int(m.group(1)), int(m.group(2))):
            continue
        in_use = _tmpdirs_in_use() if in_use is None else in_use
        if str(folder) in in_use:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def run_tmp(state: Path) -> Path:
    """This process's run temp folder under the state dir (the TMPDIR of its tasks)."""
    return state / "tmp" / f"run-{os.getpid()}-{process_start_time(os.getpid()) or 0}"


class KfpChatter(logging.Filter):
    """Drop kfp.local's bookkeeping records ("Streamed logs:", each task's output dump — the resolved
    configs as JSON —, the dashed rulers, "Running pipeline" and the not-taken branches of a gate) so
    the log keeps one line per event: the stages' start and end, and the stages' own lines. `--verbose`
    keeps them."""

    _NOISE = re.compile(r"^(Streamed logs:|Task '[^']+' outputs:|-{20,}$|Running pipeline:|"
                        r"Skipping conditional task)")

    def filter(self, record: logging.LogRecord) -> bool:
        return not self._NOISE.match(_ANSI.sub("", record.getMessage()))


class QuietExecutor(io.TextIOBase):
    """A stdout that drops the KFP executor's own bookkeeping from the streamed task logs — where it
    looks for the component, the executor_input JSON it dumps (two thirds of a demo's log), where it
    wrote its output — and shortens the executor's log prefix on the task's own lines (our stage logs
    and progress, which go through the executor's logging format) to the time of day."""

    _PREFIX = re.compile(r"^\s*\[KFP Executor \d{4}-\d\d-\d\d (\d\d:\d\d:\d\d),\d+ (\w+)\]: ?")
    _RULER = re.compile(r"^-{20,}\s*$")
    _BOOKKEEPING = re.compile(r"^(Looking for component|Loading KFP component|Got executor_input:|"
                              r"Wrote executor output file|Did not write output file)")

    def __init__(self, target: Any) -> None:
        self.target = target
        self._in_dump = False
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            kept = self._keep(line)
            if kept is not None:
                self.target.write(kept + "\n")
        return len(text)

    def _keep(self, line: str) -> str | None:
        """The line to print (prefix shortened), or None to drop it."""
        if self._in_dump:
            self._in_dump = line.rstrip() != "    }"  # the dump's closing brace, at its own indent
            return None
        m = self._PREFIX.match(line)
        if m:
            message = line[m.end():]
            if self._BOOKKEEPING.match(message):
                self._in_dump = message.startswith("Got executor_input:")
                return None
            return f"    {m.group(1)} {m.group(2)} {message}"
        return line if line.strip() and not self._RULER.match(line) else None

    def flush(self) -> None:
        kept = self._keep(self._pending) if self._pending else None
        if kept is not None:
            self.target.write(kept)
        self._pending = ""
        self.target.flush()


def run_local(state_dir: Path | str, arguments: Mapping[str, Any], *, s3_settings: Any | None = None,
              threads: int | None = None, verbose: bool = False) -> LocalRun:
    """Run the local variant of the DAG end to end under kfp.local; never raises for a failed run.

    Services live under `state_dir`: `s3/` (SeaweedFS data and keys), `mlflow.db` (+ `mlartifacts/`),
    `kfp/outputs` (pipeline root), `tmp/run-<pid>-<start>/` (TMPDIR of every task of this run).
    `s3_settings` reuses a running S3 (tests) instead of starting one. Credentials reach the tasks
    through the inherited environment only: they are not pipeline arguments, so they never appear in
    task logs or outputs. Unless `verbose`, kfp.local's own bookkeeping (executor input dumps, output
    dumps) is left out of the log; in both modes printed output is scrubbed of secrets.

    Raises ConfigError naming the parameter when a stage parameter is bad (before anything starts
    or is written), BusyError naming the holder when another process uses the state dir.
    """
    from amft_lib.run.preflight import check_stage_parameters

    t0 = time.perf_counter()
    state = Path(state_dir).absolute()
    check_stage_parameters(arguments)  # a bad override fails here, not after S3 and the first task started
    with state_lock(state), _sigterm_unwinds():
        tmp = run_tmp(state)
        try:
            return _run_locked(state, tmp, arguments, s3_settings, threads, verbose, t0)
        finally:  # every task's temp files: component files (`mktemp -d`), model copies of a killed task
            shutil.rmtree(tmp, ignore_errors=True)


def _run_locked(state: Path, tmp: Path, arguments: Mapping[str, Any], s3_settings: Any | None,
                threads: int | None, verbose: bool, t0: float) -> LocalRun:
    """`run_local` once the state dir is ours; `tmp` is the TMPDIR of this run's tasks."""
    from kfp import local

    from amft_lib import lineage

    for folder in clean_stale_tmp(state / "tmp"):
        logging.getLogger(__name__).info("removed the temp folder of a run that died: %s", folder)
    for sub in (tmp, state / "kfp" / "outputs"):
        sub.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{state / 'mlflow.db'}"
    pipeline = load_pipeline(local=True)
    args = dict(arguments)
    args.setdefault("p0_run_id", "local-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    args.setdefault("p0_s3_root", "s3://amft/local")
    args.setdefault("p6_registry_tracking_uri", tracking_uri)
    env = {"TMPDIR": str(tmp), "AMFT_STATE_DIR": str(state), "GX_ANALYTICS_ENABLED": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # per-file load/save bars: noise in a pipeline log
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    task_log = TaskLog()  # kfp.local logs through the root logger
    root_logger = logging.getLogger()
    state_name, error, chain = "SUCCEEDED", "", ""
    with _s3_for(state, s3_settings) as (s3, weed_pid), _environment({**env, **s3.env()}):
        tempfile.tempdir = None  # re-read TMPDIR
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(state / "kfp" / "outputs"),
                   workspace_root=str(state / "kfp" / "workspace"), raise_on_error=True)
        root_logger.addFilter(task_log)
        quiet = contextlib.ExitStack()
        # Scrub what kfp.local prints (task output, executor inputs holding the pipeline arguments) and
        # the records logged straight to the root logger while kfp.local has swapped its handlers.
        # The environment (with S3's secret key, set just above) is read at each line.
        scrub = RedactingFilter()
        root_logger.addFilter(scrub)
        quiet.callback(root_logger.removeFilter, scrub)
        out: Any = RedactingStream(sys.stdout)
        quiet.callback(out.flush)
        if not verbose:  # a root-logger filter: kfp.local swaps the handlers while it runs, not the filters
            chatter = KfpChatter()
            out = QuietExecutor(out)
            root_logger.addFilter(chatter)  # after task_log, which still sees every record
            quiet.callback(root_logger.removeFilter, chatter)
        quiet.enter_context(contextlib.redirect_stdout(out))
        try:
            with quiet, warnings.catch_warnings():
                # Known and expected locally: our image is not a plain Python image, and display
                # names are for the cluster UI. Anything else kfp.local warns about stays visible.
                warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom")
                warnings.filterwarnings("ignore", message=r".*settings \['display_name'\] have no effect")
                pipeline(**args)
        except RuntimeError as exc:
            state_name, error = "FAILED", redact_text(_ANSI.sub("", str(exc)))
        except BaseException:  # Ctrl-C or SIGTERM: no task outlives the run, then weed stops (leaving the with)
            _stop_tasks({weed_pid} if weed_pid else set())
            raise
        finally:
            root_logger.removeFilter(task_log)
            tempfile.tempdir = None
        # Re-read rather than trust the exit handler's copy: it cannot see the pipeline's final state.
        summary = summarize_run(args["p0_s3_root"], args["p0_run_id"], "", state_name, error)
        reg = summary["stages"].get("register") or {}
        if reg.get("registered"):
            with contextlib.suppress(Exception):
                record = lineage.read_lineage(summary["stages"]["lineage"]["uri"])
                chain = lineage.format_chain(record, {"name": reg.get("name"), "version": reg.get("version")})
    return LocalRun(state_name, error, task_log.tasks, summary, state / "kfp" / "outputs",
                    redact_text(args["p6_registry_tracking_uri"]), chain, time.perf_counter() - t0)


def local_report(run: LocalRun, state_dir: Path) -> str:
    """The closing print of `amft pipeline run-local`."""
    lines = ["", "═" * 100, f"AMFT local pipeline run {run.summary.get('run_id')}: {run.state} in {run.seconds:.0f} s"]
    if run.error:
        lines.append(f"error: {run.error}")
    lines += ["", f"{'stage':<16}{'status':<12}{'attempts':>9}{'seconds':>10}"]
    for name in STAGES:
        task = run.tasks.get(name)
        if task is None:
            if name != "stop-run":
                lines.append(f"{name:<16}{'not run':<12}{'-':>9}{'-':>10}")
            continue
        lines.append(f"{name:<16}{task['status']:<12}{task['attempts']:>9}{task['seconds']:>10.1f}")
    lines += ["", summary_markdown(run.summary).rstrip(), "", f"KFP artifacts (pipeline root): {run.pipeline_root}",
              f"registry: {run.tracking_uri}"]
    command = ((run.summary.get("stages") or {}).get("lineage") or {}).get("command")
    if command:  # it starts this state dir's S3 and registry by itself
        lines += ["lineage of the registered model:", f"  {command}"]
    if run.lineage_chain:
        lines += ["", run.lineage_chain]
    return "\n".join(lines) + "\n"


def run_record(run: LocalRun) -> dict[str, Any]:
    """What a local run did, as JSON: what schedulers (Airflow) and the README read back."""
    return {"state": run.state, "error": run.error, "seconds": round(run.seconds, 1),
            "tasks": {k: {**v, "seconds": round(v["seconds"], 1)} for k, v in run.tasks.items()},
            "summary": run.summary, "tracking_uri": run.tracking_uri}


def write_run_record(run: LocalRun, path: Path) -> None:
    """Atomically write `run_record(run)` to `path` (temp name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(run_record(run), indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def demo_markdown(record: Mapping[str, Any]) -> str:
    """The README's demo section, rendered from a run record (`run-local --record`): what the demo
    printed — stage times, warm start, μ, the accuracy table, blessing and registration — so the
    README can only show numbers a run produced (tests/unit/test_readme.py compares them)."""
    from amft_lib.reports import fmt

    summary = record.get("summary") or {}
    stages = summary.get("stages") or {}
    tasks = record.get("tasks") or {}
    times = ", ".join(f"{name} {tasks[name]['seconds']:.0f} s" for name in STAGES if name in tasks)
    ws, tr = stages.get("warm_start") or {}, stages.get("train") or {}
    reg, ev = stages.get("register") or {}, stages.get("eval") or {}
    lines = [
        f"One run of `bash scripts/demo.sh` on this 2-core machine: **{record.get('state')} in "
        f"{record.get('seconds', 0):.0f} s** ({times}).",
        "",
        f"- warm start: rejection-sampling acceptance {fmt(ws.get('acceptance_rate'))}, H* "
        f"{fmt(ws.get('target_entropy'))} nats/token",
        f"- training: {tr.get('steps')} steps of {tr.get('method')}, μ final {fmt(tr.get('mu_final'))}, val accuracy "
        f"{fmt(tr.get('val_accuracy_initial'))} → {fmt(tr.get('val_accuracy_final'))}",
        f"- evaluation: {'blessed' if ev.get('blessed') else 'not blessed'} ({verdict_reason(ev.get('reason'))})",
        f"- registry: {reg.get('name')} version {reg.get('version')}" if reg.get("registered") else
        "- registry: nothing registered",
        "",
        *accuracy_table(summary.get("accuracy") or {}),
        *(["", *changes_table(summary["changes"])] if summary.get("changes") else []),
    ]
    return "\n".join(lines) + "\n"
