"""`amft pipeline compile|params|run-local|submit|schedule`: the KFP layer's command line.

The `amft` entry point (amft_lib.cli) finds this group through the `amft.commands` entry point in
setup.cfg, so the library never imports the pipeline. Heavy imports (kfp, the DAG) happen inside
the handlers and keep `amft --help` fast. Bad parameters raise `ConfigError` (a UserError): one
`error:` line and exit 2 from the CLI boundary.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from pipelines.build import DEFAULT_YAML, compile_pipeline, load_pipeline, parse_params, pipeline_inputs
from pipelines.profiles import PROFILES
from pipelines.remote import normalize_cron, schedule_run, submit_run

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `amft pipeline compile|params|run-local|submit|schedule` to the main CLI."""
    p = subparsers.add_parser("pipeline", help="compile, run locally, submit or schedule the Kubeflow pipeline",
                              description="Compile, run locally, submit or schedule the AMFT Kubeflow pipeline.")
    sub = p.add_subparsers(dest="pipeline_command", metavar="SUBCOMMAND", required=True)

    c = sub.add_parser("compile", help="write the pipeline's IR YAML (default pipelines/amft_pipeline.yaml)",
                       description="Compile the cluster variant of the pipeline. Images come from AMFT_IMAGE_CPU / "
                       "AMFT_IMAGE_CUDA at compile time.")
    c.add_argument("--out", type=Path, default=DEFAULT_YAML, help="output YAML path")
    c.add_argument("--kueue-queue", default="", metavar="QUEUE", help="Kueue LocalQueue: label "
                   "kueue.x-k8s.io/queue-name on the GPU task pods and p0_kueue_queue's default (KFP fixes pod "
                   "labels at compile time); default none")
    c.add_argument("--kueue-priority-class", default="", metavar="CLASS", help="Kueue WorkloadPriorityClass, "
                   "applied like --kueue-queue (label kueue.x-k8s.io/priority-class)")
    c.set_defaults(handler=_compile)

    s = sub.add_parser("params", help="list every pipeline parameter: type, default, the local profile's value, "
                       "description")
    s.set_defaults(handler=_params)

    r = sub.add_parser(
        "run-local", help="run the whole DAG under kfp.local with embedded SeaweedFS and MLflow (SQLite)",
        description="Start SeaweedFS (S3) and an MLflow SQLite registry under --state-dir, run every stage with "
        "kfp.local.SubprocessRunner, stop the services (also on failure) and print a summary: each stage's status and "
        "time, artifact URIs, base vs warm start vs final accuracy, blessing, registered version, lineage command. "
        "Uses the local profile (tiny model) unless --profile default.")
    r.add_argument("--state-dir", type=Path, default=Path("runs/local-pipeline"),
                   help="S3 data, MLflow database, KFP outputs and temp files (kept between runs)")
    r.add_argument("--profile", choices=sorted(PROFILES), default="local",
                   help="local: small-but-real settings that finish on 2 CPU cores (the demo); test: a tiny model "
                   "and a few steps per stage (about a minute); default: the pipeline's defaults")
    _add_param_flags(r)
    r.add_argument("--threads", type=int, help="OMP/torch threads per task (default: the environment's)")
    r.add_argument("--record", type=Path,
                   help="also write the run record (state, stages, summary, registry) as JSON to this file "
                   "(default: STATE_DIR/run-record.json)")
    r.set_defaults(handler=_run_local)

    for name, text in (("submit", "submit one run to a KFP API server"),
                       ("schedule", "create or update (by name) a recurring run: max_concurrency=1, no catch-up")):
        q = sub.add_parser(name, help=text, description=text + ". A bearer token, if needed, is read from "
                           "$KFP_TOKEN (never from the command line, which shells and CI logs keep).")
        q.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
        q.add_argument("--experiment", default="amft", help="experiment name (created if missing)")
        q.add_argument("--namespace", help="Kubeflow profile namespace (multi-user deployments)")
        q.add_argument("--package", type=Path, help="compiled YAML to send (default: compile the pipeline now)")
        _add_param_flags(q)
        if name == "submit":
            q.add_argument("--run-name", help="run display name (default: amft-<timestamp>)")
            q.set_defaults(handler=_submit)
        else:
            q.add_argument("--cron", required=True,
                           help="cron with seconds first, as KFP expects ('0 0 3 * * *'); 5 fields get '0' prepended")
            q.add_argument("--name", default="amft-retrain", help="recurring run name; re-running replaces it")
            q.add_argument("--disabled", action="store_true", help="create the schedule paused")
            q.set_defaults(handler=_schedule)


def _add_param_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE",
                   help="pipeline parameter (see `amft pipeline params`); VALUE is YAML except for string "
                   "parameters, which take it as is: --set p4_train_max_steps=100 --set "
                   "'p4_train_overrides=[eval_every=10, optim.lr=5e-4]'")
    p.add_argument("--params-file", type=Path, help="YAML/JSON mapping of pipeline parameters (before --set)")


def _compile(args: argparse.Namespace) -> int:
    path = compile_pipeline(args.out, args.kueue_queue, args.kueue_priority_class)
    print(f"compiled {path}")
    return 0


def _params(args: argparse.Namespace) -> int:
    from amft_lib.run.settings import SETTINGS

    local = PROFILES["local"]
    for name, (kind, default) in pipeline_inputs(load_pipeline()).items():
        profile = f"  [local: {json.dumps(local[name])}]" if name in local else ""
        print(f"{name} ({kind}) = {json.dumps(default)}{profile}\n    {SETTINGS[name].help}")
    return 0


def _run_local(args: argparse.Namespace) -> int:
    from pipelines.local import local_report, run_local, write_run_record

    arguments = parse_params(load_pipeline(local=True), args.set, args.params_file, base=PROFILES[args.profile])
    run = run_local(args.state_dir, arguments, threads=args.threads, verbose=args.verbose)
    write_run_record(run, args.record or Path(args.state_dir) / "run-record.json")
    print(local_report(run, args.state_dir))
    return 0 if run.state == "SUCCEEDED" else 1


def _remote_params(args: argparse.Namespace) -> dict[str, Any]:
    """The run's parameters, typed and checked against the stage configs before anything is sent
    (preflight checks them again on the cluster)."""
    from amft_lib.run.preflight import check_stage_parameters

    params = parse_params(load_pipeline(), args.set, args.params_file)
    check_stage_parameters(params)
    return params


def _submit(args: argparse.Namespace) -> int:
    params = _remote_params(args)
    try:
        run_id = submit_run(args.host, params, experiment=args.experiment, run_name=args.run_name,
                            namespace=args.namespace, package=args.package)
    except Exception as exc:  # API/connection errors: one line, no traceback, no token
        return _remote_error("submit", args.host, exc)
    from amft_lib.redact import safe_url

    print(f"submitted run {run_id} to {safe_url(args.host)} (experiment {args.experiment})")
    return 0


def _remote_error(what: str, host: str, exc: BaseException) -> int:
    """One `error:` line for a failed API call: the host without its userinfo (a `--host` URL may
    carry `user:password@`), the cause scrubbed the same way (it may quote the URL)."""
    from amft_lib.redact import redact_text, safe_url

    log.debug("%s failed", what, exc_info=True)  # -v: the traceback, scrubbed by the CLI's log filter
    detail = redact_text(" ".join(str(exc).split())[:400] or type(exc).__name__)
    print(f"error: {what} to {safe_url(host)} failed: {type(exc).__name__}: {detail}", file=sys.stderr)
    return 2


def _schedule(args: argparse.Namespace) -> int:
    params = _remote_params(args)
    cron = normalize_cron(args.cron)
    try:
        new_id, old = schedule_run(args.host, cron, params, name=args.name, experiment=args.experiment,
                                   namespace=args.namespace, package=args.package, enabled=not args.disabled)
    except Exception as exc:
        return _remote_error("schedule", args.host, exc)
    action = f"replaced {len(old)} older schedule(s) of that name" if old else "new schedule"
    print(f"recurring run {args.name!r} = {new_id} ({action}); cron '{cron}', max_concurrency=1, no catch-up")
    return 0
