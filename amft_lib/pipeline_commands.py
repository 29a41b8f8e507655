"""`amft pipeline compile|run-local|submit|schedule|params`, and the pipeline-level steps the components call.

Two halves, one module:

- **Steps** (no kfp): what the preflight, train, register and run-summary components do beyond
  calling one stage function — resolve the run's S3 root, turn UI parameters into validated
  configs, probe S3 and the registry, publish a stage's local outputs under the run root, build
  the lineage record from the run root, and summarise a run. Components import these, so a
  cluster task and `amft pipeline run-local` run the same code.
- **Commands** (kfp imported inside the functions only, so `amft --help` stays fast and amft_lib
  stays importable without kfp): compile the pipeline to IR YAML, run the whole DAG locally under
  `kfp.local` against an embedded SeaweedFS and an MLflow SQLite registry, submit a run or an
  idempotent recurring run to a KFP API server.

Why the run root (DESIGN.md "S3 layout"): every stage also writes its outputs to
`s3://BUCKET/PREFIX/runs/RUN_ID/<stage>/`. KFP's own artifact store is an implementation detail
of the cluster (and a temp folder under `kfp.local`); the run root is the durable, documented
layout that checkpoints, lineage records, the registry and auditors point at.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime as dt
import html
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
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_YAML = REPO_ROOT / "pipelines" / "amft_pipeline.yaml"
# Files each stage leaves under the run root; the run summary reads them back.
PREFLIGHT_FILE = "preflight.json"
GATE_FILE = "validation/gate.json"
TRAIN_RESULT_FILE = "train/result.json"
REGISTRY_FILE = "registry.json"
SUMMARY_FILE = "summary.json"
# Test hook: SIGKILL the training task once, right after its first complete checkpoint.
FAULT_ENV = "AMFT_FAULT_KILL_TRAIN_AFTER_CHECKPOINT"
FAULT_MARKER = "faults/train-killed"
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}")
_STAGES = ("preflight", "prepare-data", "validate-data", "stop-run", "warm-start", "train", "evaluate", "register",
           "run-summary")


# ══ steps the components call ═══════════════════════════════════════════════════════════════════


def use_s3_endpoint(endpoint_url: str) -> None:
    """Point boto3 (amft_lib.storage) and MLflow at `endpoint_url`; empty keeps the environment's."""
    if endpoint_url:
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint_url
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = endpoint_url


def resolve_run(s3_root: str, run_id: str, job_id: str) -> tuple[str, str]:
    """(run id, run root). An explicit run id wins over the KFP job id, so a new pipeline run given
    an old run id continues that run (training resumes from its checkpoints)."""
    from amft_lib import storage

    rid = (run_id or job_id or "").strip()
    if not _RUN_ID.fullmatch(rid):
        raise ValueError(f"run id {rid!r}: use letters, digits, '.', '_' and '-' (at most 128), e.g. the KFP job id")
    if not s3_root.strip():
        raise ValueError("s3_root is empty: name the S3 prefix runs go under, e.g. s3://bucket/amft")
    return rid, storage.join(s3_root.strip().rstrip("/"), "runs", rid)


def build_configs(
    *,
    task: str,
    model_name: str,
    model_settings: Sequence[str],
    max_new_tokens: int,
    warmup_steps: int,
    final_sft_steps: int,
    rs_samples: int,
    rs_max_prompts: int,
    warm_start_overrides: Sequence[str],
    method: str,
    max_steps: int,
    lr: float,
    mu_init: float,
    mu_min: float,
    mu_max: float,
    eta_mu: float,
    eta_h: float,
    meta_interval: int,
    checkpoint_every: int,
    seed: int,
    train_overrides: Sequence[str],
) -> tuple[Any, Any]:
    """(WarmStartConfig, TrainConfig) from the pipeline's UI parameters, validated.

    Order: dataclass defaults → named parameters → `model_settings` (KEY=VALUE for both configs,
    e.g. model.lora=true, precision=bf16-mixed) → the stage's own overrides. Later wins, so the
    override lists are the escape hatch for any key the UI does not name. Raises ConfigError.
    """
    from amft_lib.config import TrainConfig, WarmStartConfig, apply_overrides, config_from_dict, config_to_dict

    ws = config_to_dict(WarmStartConfig())
    ws.update(seed=seed, warmup_steps=warmup_steps, final_sft_steps=final_sft_steps, rs_samples=rs_samples,
              rs_max_prompts=rs_max_prompts, max_new_tokens=max_new_tokens)
    ws["model"]["name"], ws["data"]["task"] = model_name, task
    warm_start = apply_overrides(config_from_dict(ws, WarmStartConfig), [*model_settings, *warm_start_overrides])

    tr = config_to_dict(TrainConfig())
    tr.update(seed=seed, max_steps=max_steps, checkpoint_every=checkpoint_every)
    tr["model"]["name"], tr["data"]["task"] = model_name, task
    tr["rollout"]["max_new_tokens"] = max_new_tokens
    tr["optim"]["lr"] = lr
    tr["controller"].update(method=method, mu_init=mu_init, mu_min=mu_min, mu_max=mu_max, eta_mu=eta_mu,
                            eta_h=eta_h, meta_interval=meta_interval)
    train = apply_overrides(config_from_dict(tr, TrainConfig), [*model_settings, *train_overrides])
    return warm_start, train


@dataclasses.dataclass
class Check:
    """One preflight check: a name, whether it passed, and a one-line detail (never a secret)."""

    name: str
    ok: bool
    detail: str


def run_preflight(
    *,
    s3_root: str,
    run_id: str,
    job_id: str,
    tracking_uri: str,
    model_name: str,
    data_input_uri: str,
    config_kwargs: Mapping[str, Any],
) -> tuple[list[Check], dict[str, Any]]:
    """Everything that can fail before a GPU is requested: run id, configs, S3 read/write under the
    run root, registry reachability, the input data's presence. Returns (checks, resolved) where
    `resolved` holds run_id, run_root and both configs as JSON strings (empty when a check failed).
    Every check runs even after a failure, so one report lists every problem."""
    from amft_lib import lineage, storage
    from amft_lib.config import config_to_dict

    checks: list[Check] = []
    resolved: dict[str, Any] = {"run_id": "", "run_root": "", "warm_start_config": "", "train_config": ""}

    def attempt(name: str, fn: Any) -> Any:
        try:
            value, detail = fn()
        except Exception as exc:  # a failed check is a result, reported with its cause
            checks.append(Check(name, False, lineage.redact_text(" ".join(str(exc).split()) or type(exc).__name__)))
            return None
        checks.append(Check(name, True, detail))
        return value

    run = attempt("run id", lambda: (resolve_run(s3_root, run_id, job_id), f"{run_id or job_id}"))
    configs = attempt("config", lambda: (build_configs(**config_kwargs), "warm-start and training configs are valid"))

    def probe_s3() -> tuple[bool, str]:
        root = run[1]
        probe = storage.join(root, f".preflight-{uuid.uuid4().hex[:8]}")
        payload = b"amft preflight\n"
        storage.put_bytes(probe, payload)
        try:
            if storage.get_bytes(probe) != payload:
                raise RuntimeError(f"{probe}: read back different bytes")
        finally:
            storage.delete(probe)
        from amft_lib import checkpoint

        done = [step for step, _, complete in checkpoint.list_checkpoints(root) if complete]
        resume = f"; existing checkpoints up to step {max(done)} (training will resume)" if done else ""
        return True, f"write/read/delete under {root} ok{resume}"

    if run is not None:
        attempt("s3", probe_s3)

    def probe_registry() -> tuple[bool, str]:
        from amft_lib import registry

        uri = tracking_uri or registry.default_tracking_uri()
        registry.get_client(uri).search_registered_models(max_results=1)
        return True, f"reachable at {lineage.redact_text(uri)}"

    attempt("registry", probe_registry)

    def probe_model() -> tuple[bool, str]:
        if model_name in ("tiny", "smollm2-135m"):
            return True, f"built-in model {model_name!r}"
        if not Path(model_name, "config.json").is_file():
            raise FileNotFoundError(f"{model_name}: not a built-in name and no config.json there (local dirs only)")
        return True, f"local model directory {model_name}"

    attempt("base model", probe_model)
    if data_input_uri:
        def probe_data() -> tuple[bool, str]:
            found = storage.exists(data_input_uri) if storage.is_s3(data_input_uri) else Path(data_input_uri).is_file()
            if not found:
                raise FileNotFoundError(f"{data_input_uri}: input data not found")
            return True, f"{data_input_uri} exists"

        attempt("input data", probe_data)

    if all(c.ok for c in checks):
        resolved.update(run_id=run[0], run_root=run[1],
                        warm_start_config=json.dumps(config_to_dict(configs[0]), sort_keys=True),
                        train_config=json.dumps(config_to_dict(configs[1]), sort_keys=True))
        record = {"checks": [dataclasses.asdict(c) for c in checks], "run_id": run[0],
                  "warm_start_config": config_to_dict(configs[0]), "train_config": config_to_dict(configs[1])}
        storage.put_bytes(storage.join(run[1], PREFLIGHT_FILE), _json_bytes(record))
    return checks, resolved


def checks_markdown(checks: Sequence[Check]) -> str:
    """The preflight report shown in the KFP UI."""
    ok = all(c.ok for c in checks)
    lines = [f"# Preflight: {'passed' if ok else 'FAILED'}", "", "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c.name} | {'ok' if c.ok else '**failed**'} | {c.detail.replace('|', '/')} |" for c in checks]
    return "\n".join(lines) + "\n"


def publish(local_dir: str | Path, uri: str) -> list[str]:
    """Copy every file under `local_dir` to `uri` (same relative paths); returns the URIs written."""
    from amft_lib import storage

    base = Path(local_dir)
    written = []
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        target = storage.join(uri, path.relative_to(base).as_posix())
        storage.put_file(str(path), target)
        written.append(target)
    return written


def put_json(uri: str, obj: Any) -> None:
    """Write one stage record (stable JSON) under the run root."""
    from amft_lib import storage

    storage.put_bytes(uri, _json_bytes(obj))


def _json_bytes(obj: Any) -> bytes:
    from amft_lib import lineage

    return (json.dumps(lineage.redact(obj), indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")


def fetch_input(uri: str, dest_dir: str | Path) -> str:
    """A local path for a user's input file: s3:// objects are downloaded into `dest_dir`."""
    from amft_lib import storage

    if not storage.is_s3(uri):
        return uri
    local = Path(dest_dir) / uri.rstrip("/").rsplit("/", 1)[-1]
    storage.get_file(uri, local)
    return str(local)


def training_report_html(run_dir: str | Path, result: Mapping[str, Any]) -> str:
    """A self-contained HTML page (inline PNGs) with the μ, reward, entropy, loss and validation curves."""
    from amft_lib.evaluate import plot_training_curves, read_training_curves

    pngs = plot_training_curves(read_training_curves(str(run_dir)))
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in result.items())
    images = "".join(
        f'<figure><img alt="{stem}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>'
        for stem, png in pngs.items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>AMFT training curves</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:1.5em}figure{display:inline-block;margin:.5em}"
        "th{text-align:left;padding-right:1em}</style></head><body><h1>AMFT training</h1>"
        f"<table>{rows}</table>{images}</body></html>\n"
    )


def arm_train_fault(run_root: str) -> None:
    """Test hook (``AMFT_FAULT_KILL_TRAIN_AFTER_CHECKPOINT=1``): SIGKILL this process once, as soon as
    the first complete checkpoint is under the run root, to prove a retried task resumes from it.
    A marker object under the run root makes the retry (a fresh process) leave itself alone."""
    if os.environ.get(FAULT_ENV) != "1":
        return
    from amft_lib import checkpoint, storage

    marker = storage.join(run_root, FAULT_MARKER)
    if storage.exists(marker):
        return

    def watch() -> None:
        while True:
            with contextlib.suppress(Exception):
                if any(complete for _, _, complete in checkpoint.list_checkpoints(run_root)):
                    storage.put_bytes(marker, b"SIGKILL after the first complete checkpoint\n")
                    log.warning("fault injection: SIGKILL after the first checkpoint (%s)", FAULT_ENV)
                    os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.2)

    threading.Thread(target=watch, name="amft-fault", daemon=True).start()


def write_run_lineage(run_root: str, run_id: str) -> str:
    """Build the lineage record of a run from what its stages left under the run root and write it
    to `<run_root>/lineage.json` (the registry then adds its name/version). Returns the URI."""
    import yaml

    from amft_lib import lineage, storage
    from amft_lib.evaluate import load_metrics

    def read_json(rel: str) -> Any:
        return json.loads(storage.get_bytes(storage.join(run_root, rel)).decode("utf-8"))

    warm_cfg = yaml.safe_load(storage.get_bytes(storage.join(run_root, "warm_start", "config.yaml")))
    train_cfg = lineage.read_run_config(storage.join(run_root, "train"))
    gate = read_json(GATE_FILE)
    record = lineage.build_lineage(
        run_id,
        config={"warm_start": warm_cfg, "train": train_cfg},
        inputs=lineage.describe_inputs("dataset", storage.join(run_root, "data")),
        validation={"passed": gate.get("passed"), "statistics": gate.get("statistics")},
        base_model={"id": warm_cfg["model"]["name"], "uri": storage.join(run_root, "base_model")},
        warm_start=_tag_safe({**read_json("warm_start/stats.json"),
                              "model_uri": storage.join(run_root, "warm_start", "model")}),
        checkpoints=lineage.find_checkpoints(run_root),
        mu_summary=lineage.summarize_mu(lineage.mu_trajectory(storage.join(run_root, "train"))),
        eval_metrics=load_metrics(storage.join(run_root, "eval")),
    )
    return lineage.write_lineage(record, storage.join(run_root, lineage.LINEAGE_FILE))


def _tag_safe(obj: Any) -> Any:
    """Keys MLflow accepts as tag names (the registry flattens warm-start stats into tags, and
    acceptance buckets are named like `easy(>10)`); values are left alone."""
    if isinstance(obj, Mapping):
        return {re.sub(r"[^A-Za-z0-9_\-. :/]", "_", str(k)): _tag_safe(v) for k, v in obj.items()}
    return obj


def summarize_run(s3_root: str, run_id: str, job_id: str, state: str, error: str = "") -> dict[str, Any]:
    """What happened in a run, from the stage records under its run root: data, gate, warm start,
    training, evaluation (base / warm start / final accuracy), registration and lineage. Never
    raises for a missing or unreadable record (a failed run has few); `problems` lists them."""
    from amft_lib import lineage, storage

    summary: dict[str, Any] = {"run_id": run_id or job_id, "state": state, "error": lineage.redact_text(error or ""),
                               "stages": {}, "accuracy": {}, "problems": []}
    try:
        rid, root = resolve_run(s3_root, run_id, job_id)
    except ValueError as exc:
        summary["problems"].append(str(exc))
        return summary
    summary.update(run_id=rid, run_root=root)

    def read(rel: str) -> Any:
        try:
            return json.loads(storage.get_bytes(storage.join(root, rel)).decode("utf-8"))
        except storage.ObjectNotFoundError:
            return None
        except Exception as exc:  # unreadable: note it and carry on
            summary["problems"].append(f"{rel}: {lineage.redact_text(' '.join(str(exc).split()))}")
            return None

    stages = summary["stages"]
    card = read("data/card.json")
    if card:
        stages["data"] = {"uri": storage.join(root, "data"),
                          "rows": {k: v.get("rows") for k, v in (card.get("splits") or {}).items()}}
    gate = read(GATE_FILE)
    if gate:
        stages["validation"] = {"passed": gate.get("passed"), "failed_checks": gate.get("failed_checks"),
                                "report": storage.join(root, "validation", "report.md")}
    ws = read("warm_start/stats.json")
    if ws:
        rs = ws.get("rejection_sampling") or {}
        stages["warm_start"] = {"acceptance_rate": rs.get("acceptance_rate"), "pass_at_k": rs.get("pass_at_k"),
                                "target_entropy": ws.get("target_entropy"), "val_accuracy": ws.get("val_accuracy"),
                                "model": storage.join(root, "warm_start", "model")}
    train = read(TRAIN_RESULT_FILE)
    if train:
        stages["train"] = {**train, "model": storage.join(root, "model"),
                           "checkpoints": storage.join(root, "checkpoints")}
    metrics = read("eval/metrics.json")
    if metrics:
        stages["eval"] = {"blessed": metrics.get("blessed"), "reason": metrics.get("reason"),
                          "report": storage.join(root, "eval", "report.html")}
        roles = {"base": (metrics.get("comparisons") or {}).get("base"),
                 "warm_start": (metrics.get("comparisons") or {}).get("warm_start"),
                 "final": metrics,
                 "champion": (metrics.get("comparisons") or {}).get("champion")}
        for role, block in roles.items():
            if not isinstance(block, Mapping):
                continue
            summary["accuracy"][role] = {
                split: {"accuracy": block[split].get("accuracy"), "pass_at_k": block[split].get("pass_at_k"),
                        "n": block[split].get("n")}
                for split in ("test_id", "test_ood") if isinstance(block.get(split), Mapping)
            }
    reg = read(REGISTRY_FILE)
    if reg:
        stages["register"] = reg
    if storage_exists(storage.join(root, lineage.LINEAGE_FILE)):
        stages["lineage"] = {"uri": storage.join(root, lineage.LINEAGE_FILE)}
        if reg and reg.get("registered"):
            stages["lineage"]["command"] = f"amft lineage {reg.get('name')}:{reg.get('version')} --verify"
    summary["finished_at"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return summary


def storage_exists(uri: str) -> bool:
    """storage.exists that answers False (not an exception) when S3 cannot be reached."""
    from amft_lib import storage

    try:
        return storage.exists(uri)
    except storage.StorageError:
        return False


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if value is None:
        return "–"
    return str(value)


def accuracy_table(accuracy: Mapping[str, Any]) -> list[str]:
    """Markdown rows: one per model role, accuracy (pass@1) and pass@k on ID and OOD test splits."""
    lines = ["| model | test_id acc | test_id pass@k | test_ood acc | test_ood pass@k |", "|---|---|---|---|---|"]
    for role in ("base", "warm_start", "final", "champion"):
        block = accuracy.get(role)
        if not block:
            continue
        cells = [_fmt((block.get(s) or {}).get(f)) for s in ("test_id", "test_ood") for f in ("accuracy", "pass_at_k")]
        lines.append(f"| {role.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The run summary as Markdown (the exit handler's UI artifact and `run-local`'s closing print)."""
    stages = summary.get("stages") or {}
    lines = [f"# AMFT run {summary.get('run_id')}: {summary.get('state')}", ""]
    if summary.get("error"):
        lines += [f"Error: {summary['error']}", ""]
    lines += [f"Run root: `{summary.get('run_root', '?')}`", ""]
    if "data" in stages:
        rows = ", ".join(f"{k} {v}" for k, v in (stages["data"].get("rows") or {}).items())
        lines.append(f"- data: {rows}")
    if "validation" in stages:
        v = stages["validation"]
        failed = f" (failed: {', '.join(v.get('failed_checks') or [])})" if not v.get("passed") else ""
        lines.append(f"- validation gate: {'passed' if v.get('passed') else 'FAILED'}{failed}; report `{v['report']}`")
    if "warm_start" in stages:
        w = stages["warm_start"]
        lines.append(f"- warm start: acceptance {_fmt(w.get('acceptance_rate'))}, pass@k {_fmt(w.get('pass_at_k'))}, "
                     f"H* {_fmt(w.get('target_entropy'))}")
    if "train" in stages:
        t = stages["train"]
        resumed = f", resumed from step {t['resumed_from_step']}" if t.get("resumed_from_step") else ""
        lines.append(f"- training: {t.get('steps')} steps, μ final {_fmt(t.get('mu_final'))}, val accuracy "
                     f"{_fmt(t.get('val_accuracy_initial'))} → {_fmt(t.get('val_accuracy_final'))}{resumed}")
    if "eval" in stages:
        e = stages["eval"]
        lines.append(f"- evaluation: {'BLESSED' if e.get('blessed') else 'not blessed'} — {e.get('reason')}")
    if "register" in stages:
        r = stages["register"]
        what = f"{r.get('name')} version {r.get('version')}" if r.get("registered") else "nothing registered"
        lines.append(f"- registry: {what}")
    if "lineage" in stages:
        cmd = stages["lineage"].get("command")
        lines.append(f"- lineage: `{stages['lineage']['uri']}`" + (f"; `{cmd}`" if cmd else ""))
    if summary.get("accuracy"):
        lines += ["", *accuracy_table(summary["accuracy"])]
    if summary.get("problems"):
        lines += ["", "Problems reading the run root:", *[f"- {p}" for p in summary["problems"]]]
    return "\n".join(lines) + "\n"


# ══ commands ═══════════════════════════════════════════════════════════════════════════════════


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `amft pipeline compile|params|run-local|submit|schedule` to the main CLI."""
    p = subparsers.add_parser("pipeline", help="compile, run locally, submit or schedule the Kubeflow pipeline",
                              description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="pipeline_command", metavar="SUBCOMMAND", required=True)

    c = sub.add_parser("compile", help="write the pipeline's IR YAML (default pipelines/amft_pipeline.yaml)",
                       description="Compile the cluster variant of the pipeline. Images come from AMFT_IMAGE_CPU / "
                       "AMFT_IMAGE_CUDA at compile time.")
    c.add_argument("--out", type=Path, default=DEFAULT_YAML, help="output YAML path")
    c.set_defaults(handler=_compile)

    s = sub.add_parser("params", help="list every pipeline parameter with its type and default")
    s.set_defaults(handler=_params)

    r = sub.add_parser(
        "run-local", help="run the whole DAG under kfp.local with embedded SeaweedFS and MLflow (SQLite)",
        description="Start SeaweedFS (S3) and an MLflow SQLite registry under --state-dir, run every stage with "
        "kfp.local.SubprocessRunner, stop the services (also on failure) and print a summary: each stage's status and "
        "time, artifact URIs, base vs warm start vs final accuracy, blessing, registered version, lineage command. "
        "Uses the local profile (tiny model) unless --profile default.")
    r.add_argument("--state-dir", type=Path, default=Path("runs/local-pipeline"),
                   help="S3 data, MLflow database, KFP outputs and temp files (kept between runs)")
    r.add_argument("--profile", choices=("local", "default"), default="local",
                   help="local: small-but-real settings that finish on 2 CPU cores; default: the pipeline's defaults")
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


def _ensure_importable() -> None:
    """`pipelines` and `components` sit beside amft_lib; an editable install made before they existed
    maps only amft_lib, so fall back to the checkout on sys.path."""
    try:
        import pipelines.amft_pipeline  # noqa: F401
    except ModuleNotFoundError:
        sys.path.insert(0, str(REPO_ROOT))


def pipeline_inputs(pipeline: Any) -> dict[str, tuple[str, Any]]:
    """{name: (KFP type name, default)} of a compiled-in pipeline's parameters."""
    return {name: (spec.type, spec.default) for name, spec in pipeline.component_spec.inputs.items()}


def parse_params(pipeline: Any, settings: Sequence[str], params_file: Path | None = None,
                 base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merge `base`, a params file and PARAM=VALUE strings into pipeline arguments, typed and checked
    against the pipeline's parameters (unknown names and wrong types are errors naming the fix)."""
    import yaml

    inputs = pipeline_inputs(pipeline)
    raw: dict[str, Any] = dict(base or {})
    if params_file is not None:
        loaded = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{params_file}: expected a mapping of pipeline parameters")
        raw.update(loaded)
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected PARAM=VALUE")
        raw[key.strip()] = value if inputs.get(key.strip(), ("String",))[0] == "String" else yaml.safe_load(value)
    out = {}
    for key, value in raw.items():
        if key not in inputs:
            raise ValueError(f"unknown pipeline parameter {key!r}; `amft pipeline params` lists them")
        out[key] = _coerce_param(key, inputs[key][0], value)
    return out


def _coerce_param(key: str, kind: str, value: Any) -> Any:
    checks = {"String": (str,), "Integer": (int,), "Float": (int, float), "Boolean": (bool,), "Dict": (dict,),
              "List": (list,)}
    wanted = checks.get(kind, (object,))
    if isinstance(value, bool) and kind in ("Integer", "Float"):
        wanted = ()
    if kind == "String" and value is not None and not isinstance(value, str):
        value = str(value)
    if not isinstance(value, wanted):
        raise ValueError(f"pipeline parameter {key}={value!r}: expected {kind}")
    return float(value) if kind == "Float" else value


def _load_pipeline(local: bool = False) -> Any:
    _ensure_importable()
    from pipelines import amft_pipeline as module

    return module.amft_pipeline_local if local else module.amft_pipeline


def compile_pipeline(out: Path | str) -> Path:
    """Compile the cluster variant to IR YAML at `out`, byte-for-byte reproducibly."""
    from kfp import compiler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(_load_pipeline(), str(out))
    out.write_text(stable_header(out.read_text(encoding="utf-8")), encoding="utf-8")
    return out


_DEFAULT_COMMENT = re.compile(r"^(#.*\[Default: )(.*)(\])$")


def stable_header(text: str) -> str:
    """kfp writes a comment header listing each parameter's default; dict defaults come out of a
    protobuf map whose order changes from process to process, so the committed YAML would change
    on every compile. Re-render those defaults with sorted keys (comments only; the spec is sorted)."""
    import ast

    def ordered(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: ordered(value[k]) for k in sorted(value)}
        if isinstance(value, list):
            return [ordered(v) for v in value]
        return value

    lines = []
    for line in text.splitlines(keepends=True):
        m = _DEFAULT_COMMENT.match(line.rstrip("\n"))
        if m:
            with contextlib.suppress(ValueError, SyntaxError):
                line = f"{m.group(1)}{ordered(ast.literal_eval(m.group(2)))!r}{m.group(3)}\n"
        lines.append(line)
    return "".join(lines)


def _compile(args: argparse.Namespace) -> int:
    path = compile_pipeline(args.out)
    print(f"compiled {path}")
    return 0


def _params(args: argparse.Namespace) -> int:
    for name, (kind, default) in sorted(pipeline_inputs(_load_pipeline()).items()):
        print(f"{name} ({kind}) = {json.dumps(default)}")
    return 0


# ── run-local ──────────────────────────────────────────────────────────────────────────────────


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TASK_START = re.compile(r"^Executing task '([^']+)'")
_TASK_END = re.compile(r"^Task '([^']+)' finished with status (\w+)")


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
def _s3_for(state_dir: Path, settings: Any | None) -> Iterator[Any]:
    """The caller's S3 settings, or an embedded SeaweedFS under the state dir, stopped on exit."""
    if settings is not None:
        yield settings
        return
    from amft_lib.s3server import EmbeddedS3

    server = EmbeddedS3(state_dir / "s3")
    server.start()
    try:
        yield server.settings
    finally:
        server.stop()


def run_local(state_dir: Path | str, arguments: Mapping[str, Any], *, s3_settings: Any | None = None,
              threads: int | None = None) -> LocalRun:
    """Run the local variant of the DAG end to end under kfp.local; never raises for a failed run.

    Services live under `state_dir`: `s3/` (SeaweedFS data and keys), `mlflow.db` (+ `mlartifacts/`),
    `kfp/outputs` (pipeline root), `tmp/` (TMPDIR of every task). `s3_settings` reuses a running S3
    (tests) instead of starting one. Credentials reach the tasks through the inherited environment
    only: they are not pipeline arguments, so they never appear in task logs or outputs.
    """
    from kfp import local

    from amft_lib import lineage

    t0 = time.perf_counter()
    state = Path(state_dir).absolute()
    for sub in ("tmp", "kfp/outputs"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{state / 'mlflow.db'}"
    pipeline = _load_pipeline(local=True)
    args = dict(arguments)
    args.setdefault("p0_run_id", "local-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    args.setdefault("p0_s3_root", "s3://amft/local")
    args.setdefault("p6_registry_tracking_uri", tracking_uri)
    env = {"TMPDIR": str(state / "tmp"), "AMFT_STATE_DIR": str(state), "GX_ANALYTICS_ENABLED": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    task_log = TaskLog()  # kfp.local logs through the root logger
    root_logger = logging.getLogger()
    state_name, error, chain = "SUCCEEDED", "", ""
    with _s3_for(state, s3_settings) as s3, _environment({**env, **s3.env()}):
        tempfile.tempdir = None  # re-read TMPDIR
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(state / "kfp" / "outputs"),
                   workspace_root=str(state / "kfp" / "workspace"), raise_on_error=True)
        root_logger.addFilter(task_log)
        try:
            with warnings.catch_warnings():
                # Known and expected locally: our image is not a plain Python image, and display
                # names are for the cluster UI. Anything else kfp.local warns about stays visible.
                warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom")
                warnings.filterwarnings("ignore", message=r".*settings \['display_name'\] have no effect")
                pipeline(**args)
        except RuntimeError as exc:
            state_name, error = "FAILED", _ANSI.sub("", str(exc))
        finally:
            root_logger.removeFilter(task_log)
            tempfile.tempdir = None
            # each task leaves its ephemeral component file behind (`mktemp -d` in the task command)
            for leftover in (state / "tmp").glob("tmp.*"):
                shutil.rmtree(leftover, ignore_errors=True)
        # Re-read rather than trust the exit handler's copy: it cannot see the pipeline's final state.
        summary = summarize_run(args["p0_s3_root"], args["p0_run_id"], "", state_name, error)
        reg = summary["stages"].get("register") or {}
        if reg.get("registered"):
            with contextlib.suppress(Exception):
                record = lineage.read_lineage(summary["stages"]["lineage"]["uri"])
                chain = lineage.format_chain(record, {"name": reg.get("name"), "version": reg.get("version")})
    return LocalRun(state_name, error, task_log.tasks, summary, state / "kfp" / "outputs",
                    args["p6_registry_tracking_uri"], chain, time.perf_counter() - t0)


def local_report(run: LocalRun, state_dir: Path) -> str:
    """The closing print of `amft pipeline run-local`."""
    lines = ["", "═" * 100, f"AMFT local pipeline run {run.summary.get('run_id')}: {run.state} in {run.seconds:.0f} s"]
    if run.error:
        lines.append(f"error: {run.error}")
    lines += ["", f"{'stage':<16}{'status':<12}{'attempts':>9}{'seconds':>10}"]
    for name in _STAGES:
        task = run.tasks.get(name)
        if task is None:
            if name != "stop-run":
                lines.append(f"{name:<16}{'not run':<12}{'-':>9}{'-':>10}")
            continue
        lines.append(f"{name:<16}{task['status']:<12}{task['attempts']:>9}{task['seconds']:>10.1f}")
    lines += ["", summary_markdown(run.summary).rstrip(), "", f"KFP artifacts (pipeline root): {run.pipeline_root}",
              f"registry: {run.tracking_uri}"]
    reg = (run.summary.get("stages") or {}).get("register") or {}
    if reg.get("registered"):
        s3_dir = state_dir.absolute() / "s3"
        lines += ["lineage (S3 must be up: `amft s3 serve --data-dir "
                  f"{s3_dir}` in another shell, then `. {s3_dir}/s3.env`):",
                  f"  amft lineage {reg.get('name')}:{reg.get('version')} --tracking-uri {run.tracking_uri} --verify"]
    if run.lineage_chain:
        lines += ["", run.lineage_chain]
    return "\n".join(lines) + "\n"


def _run_local(args: argparse.Namespace) -> int:
    _ensure_importable()
    from pipelines.amft_pipeline import LOCAL_PROFILE

    pipeline = _load_pipeline(local=True)
    try:
        arguments = parse_params(pipeline, args.set, args.params_file,
                                 base=LOCAL_PROFILE if args.profile == "local" else None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run = run_local(args.state_dir, arguments, threads=args.threads)
    write_run_record(run, args.record or Path(args.state_dir) / "run-record.json")
    print(local_report(run, args.state_dir))
    return 0 if run.state == "SUCCEEDED" else 1


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


# ── submit / schedule ──────────────────────────────────────────────────────────────────────────


def kfp_client(host: str, namespace: str | None = None) -> Any:
    """A kfp.Client for `host`; a bearer token comes from $KFP_TOKEN only."""
    import kfp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2 and later"
        return kfp.Client(host=host, existing_token=os.environ.get("KFP_TOKEN") or None,
                          namespace=namespace or "kubeflow")


@contextlib.contextmanager
def _package(path: Path | None) -> Iterator[str]:
    if path is not None:
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="amft-kfp-") as tmp:
        yield str(compile_pipeline(Path(tmp) / "amft_pipeline.yaml"))


def normalize_cron(expr: str) -> str:
    """KFP's scheduler takes 6 fields (seconds first); a classic 5-field cron gets '0' seconds."""
    fields = expr.split()
    if len(fields) == 5:
        fields.insert(0, "0")
    if len(fields) != 6:
        raise ValueError(f"cron {expr!r}: expected 6 fields (sec min hour day month weekday) or 5 classic ones")
    return " ".join(fields)


def submit_run(host: str, params: Mapping[str, Any], *, experiment: str = "amft", run_name: str | None = None,
               namespace: str | None = None, package: Path | None = None) -> str:
    """Create one run; returns its run id."""
    client = kfp_client(host, namespace)
    name = run_name or "amft-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    with _package(package) as path:
        result = client.create_run_from_pipeline_package(path, arguments=dict(params), run_name=name,
                                                         experiment_name=experiment, namespace=namespace)
    return result.run_id


def schedule_run(host: str, cron: str, params: Mapping[str, Any], *, name: str = "amft-retrain",
                 experiment: str = "amft", namespace: str | None = None, package: Path | None = None,
                 enabled: bool = True) -> tuple[str, list[str]]:
    """Create the recurring run `name` (max_concurrency=1, no catch-up) and delete any older one of
    that name in the experiment, so re-running updates the schedule. KFP has no update call for
    recurring runs; creating first and deleting after means a failure never leaves no schedule.
    Returns (new id, replaced ids)."""
    cron = normalize_cron(cron)
    client = kfp_client(host, namespace)
    experiment_id = client.create_experiment(name=experiment, namespace=namespace).experiment_id
    old = _recurring_runs_named(client, experiment_id, name)
    with _package(package) as path:
        created = client.create_recurring_run(
            experiment_id=experiment_id, job_name=name, cron_expression=cron, max_concurrency=1, no_catchup=True,
            params=dict(params), pipeline_package_path=path, enabled=enabled,
            description="AMFT scheduled retraining (amft pipeline schedule)")
    for rid in old:
        client.delete_recurring_run(rid)
    return created.recurring_run_id, old


def _recurring_runs_named(client: Any, experiment_id: str, name: str) -> list[str]:
    flt = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    found, token = [], ""
    while True:
        page = client.list_recurring_runs(experiment_id=experiment_id, page_size=100, page_token=token, filter=flt)
        found += [r.recurring_run_id for r in page.recurring_runs or [] if r.display_name == name]
        token = page.next_page_token or ""
        if not token:
            return found


def _remote_params(args: argparse.Namespace) -> dict[str, Any]:
    return parse_params(_load_pipeline(), args.set, args.params_file)


def _submit(args: argparse.Namespace) -> int:
    try:
        params = _remote_params(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        run_id = submit_run(args.host, params, experiment=args.experiment, run_name=args.run_name,
                            namespace=args.namespace, package=args.package)
    except Exception as exc:  # API/connection errors: one line, no traceback, no token
        return _remote_error("submit", args.host, exc)
    print(f"submitted run {run_id} to {args.host} (experiment {args.experiment})")
    return 0


def _remote_error(what: str, host: str, exc: BaseException) -> int:
    from amft_lib.lineage import redact_text

    log.debug("%s failed", what, exc_info=True)
    detail = redact_text(" ".join(str(exc).split())[:400] or type(exc).__name__)
    print(f"error: {what} to {host} failed: {type(exc).__name__}: {detail}", file=sys.stderr)
    return 2


def _schedule(args: argparse.Namespace) -> int:
    try:
        params = _remote_params(args)
        cron = normalize_cron(args.cron)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        new_id, old = schedule_run(args.host, cron, params, name=args.name, experiment=args.experiment,
                                   namespace=args.namespace, package=args.package, enabled=not args.disabled)
    except Exception as exc:
        return _remote_error("schedule", args.host, exc)
    action = f"replaced {len(old)} older schedule(s) of that name" if old else "new schedule"
    print(f"recurring run {args.name!r} = {new_id} ({action}); cron '{cron}', max_concurrency=1, no catch-up")
    return 0
