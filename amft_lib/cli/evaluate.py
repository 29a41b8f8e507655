"""`amft evaluate`, `amft register`, `amft lineage`: the last stages of the pipeline on the command line.

Each handler calls the same library function the KFP component calls (run_evaluate,
register_model, audit_lineage). Exit codes: 0 done (an unblessed model is a result, not an
error), 1 a check failed (`--fail-if-not-blessed`, `lineage --verify`), 2 a user error (bad input,
unknown model, unreachable registry), reported by the CLI boundary as one `error: …` line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from amft_lib.errors import UserError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the evaluate, register and lineage subcommands to the `amft` parser."""
    _add_evaluate(sub)
    _add_register(sub)
    _add_lineage(sub)


# ── amft evaluate ───────────────────────────────────────────────────────────────────────────────


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a model on test_id/test_ood vs base, warm start and champion; decide blessing",
        description="Greedy pass@1 and sampled pass@k on every eval split, compared with optional base, "
        "warm-start and champion models. Blessed when METRIC >= --threshold and no eval split regresses "
        "by more than --max-regression vs the champion (skipped without one). Writes metrics.json, "
        "report.md, report.html and plots/ under --out.",
    )
    p.add_argument("--model", required=True, help="candidate: HF dir, s3:// folder or models:/NAME@ALIAS")
    p.add_argument("--data", required=True, help="prepared dataset folder, parquet file or s3:// URI")
    p.add_argument("--out", required=True, help="output folder (local or s3://)")
    p.add_argument("--base", help="base model to compare with (dir, s3://, models:/…, tiny, smollm2-135m)")
    p.add_argument("--warm-start", help="warm-start model to compare with")
    p.add_argument("--champion", help="champion to compare with, e.g. models:/amft-gp@champion (absent ⇒ first run)")
    p.add_argument("--run-dir", help="training output folder (metrics.jsonl) for curve plots")
    p.add_argument("--metric", help="gating metric SPLIT.FIELD (default test_id.accuracy)")
    p.add_argument("--threshold", type=float, help="absolute lower bound of the gating metric (default 0)")
    p.add_argument("--max-regression", type=float, help="δ: largest tolerated drop vs the champion (default 0)")
    p.add_argument("--no-warm-start-check", dest="warm_start_check", action="store_false", default=None,
                   help="bless even when significantly worse than --warm-start (default: such a model is not blessed)")
    p.add_argument("--pass-k", type=int, help="k of pass@k (default 4)")
    p.add_argument("--n-samples", type=int, help="samples per prompt for pass@k (default 8; 0 skips)")
    p.add_argument("--temperature", type=float, help="sampling temperature for pass@k (default 1.0)")
    p.add_argument("--max-new-tokens", type=int,
                   help="maximum completion tokens (default: the model's generation_config.json, else 96)")
    p.add_argument("--max-examples", type=int, help="prompts per split, 0 = all (default 0)")
    p.add_argument("--batch-size", type=int, help="prompts per generation call (default 64)")
    p.add_argument("--splits", help="comma-separated eval splits (default test_id,test_ood)")
    p.add_argument("--task", help="verifier (default: the dataset's task column)")
    p.add_argument("--seed", type=int, help="pass@k sampling seed (default 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="device (default auto)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float64"),
                   help="parameter dtype (default auto: bfloat16 on a GPU, float32 on CPU)")
    p.add_argument("--chat-template", action="store_true", help="wrap prompts with the chat template")
    p.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                   help="engine setting, repeatable, e.g. --engine kv_cache=dynamic (see engine.* in --help-config)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ URIs")
    p.add_argument("--data-card-sha256", help="refuse the data unless its card.json has this sha256 (the data gate's "
                   "record; an audit re-runs evaluation on exactly the validated dataset)")
    p.add_argument("--fail-if-not-blessed", action="store_true", help="exit 1 when the model is not blessed")
    p.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from amft_lib.config import engine_overrides
    from amft_lib.evaluate import EvalConfig, run_evaluate

    kwargs = {
        "model": args.model, "data": args.data, "out_dir": args.out, "base_model": args.base,
        "warm_start_model": args.warm_start, "champion_model": args.champion, "run_dir": args.run_dir,
        "metric": args.metric, "threshold": args.threshold, "max_regression": args.max_regression,
        "warm_start_check": args.warm_start_check,
        "pass_k": args.pass_k, "n_samples": args.n_samples, "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens, "max_examples": args.max_examples, "batch_size": args.batch_size,
        "task": args.task, "seed": args.seed, "device": args.device, "dtype": args.dtype,
        "tracking_uri": args.tracking_uri, "data_card_sha256": args.data_card_sha256,
        "splits": [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None,
        "chat_template": args.chat_template or None,
    }
    kwargs["engine"] = engine_overrides(args.engine)
    cfg = EvalConfig(**{k: v for k, v in kwargs.items() if v is not None})
    result = run_evaluate(cfg)
    parts = []
    for split in ("test_id", "test_ood"):
        m = result.metrics.get(split)
        if isinstance(m, dict):
            pk = "-" if m.get("pass_at_k") is None else f"{m['pass_at_k']:.3f}"
            parts.append(f"{split} acc={m['accuracy']:.3f} pass@{m['k']}={pk}")
    print(f"blessed={'yes' if result.blessed else 'no'} {' '.join(parts)} out={result.out_dir}")
    print(result.reason)
    return 1 if args.fail_if_not_blessed and not result.blessed else 0


# ── amft register ───────────────────────────────────────────────────────────────────────────────


def _add_register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "register",
        help="register a blessed model in the MLflow registry and move the champion alias",
        description="Registers --model (an HF directory with safetensors) as a new version of --name when "
        "--eval/metrics.json says blessed; otherwise registers nothing. Idempotent on --run-id.",
    )
    p.add_argument("--model", required=True, help="HF model directory (safetensors)")
    p.add_argument("--eval", required=True, help="evaluation output folder with metrics.json (local or s3://)")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--run-id", required=True, help="pipeline run id (the idempotency key)")
    p.add_argument("--lineage", help="lineage record URI (lineage.json or its run folder)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or embedded SQLite)")
    p.add_argument("--artifact-root", help="artifact root for a new experiment (folder or s3://)")
    p.add_argument("--experiment", default="amft", help="MLflow experiment of the registration runs")
    p.add_argument("--alias", default="champion", help="alias moved to the new version (default champion)")
    p.set_defaults(handler=_register)


def _register(args: argparse.Namespace) -> int:
    from amft_lib.registry import read_eval_metrics, register_model
    from amft_lib.run.summary import record_registry_copy

    result = register_model(
        args.model, read_eval_metrics(args.eval), args.name, args.run_id, lineage_uri=args.lineage,
        tracking_uri=args.tracking_uri, artifact_root=args.artifact_root, experiment=args.experiment,
        alias=args.alias,
    )
    record_registry_copy(args.lineage, result, args.tracking_uri)
    if not result.registered:
        print(result.reason)
        return 0
    state = "created" if result.created else "existing"
    alias = f", @{args.alias} moved" if result.alias_moved else ""
    print(f"{result.name} version {result.version} ({state}{alias}) {result.model_uri}")
    return 0


# ── amft lineage ────────────────────────────────────────────────────────────────────────────────


def _add_lineage(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lineage",
        help="print a registered model's lineage back to the raw data; --verify proves the model against it",
        description="MODEL is NAME (latest version), NAME:VERSION or NAME@ALIAS. Prints the chain model → "
        "eval → training → warm start → base model → validation → data → code. With --verify, re-hashes every "
        "recorded file (data, the model in the run root and in the registry, warm-start model, configs, "
        "metrics; bounded, regular files only), compares the recorded metrics with the evaluation artifact, "
        "checks the signature when $AMFT_LINEAGE_SECRET_KEY is set, and exits 1 with one line per mismatch "
        "and a summary.",
    )
    p.add_argument("model", metavar="MODEL", help="NAME, NAME:VERSION or NAME@champion")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or embedded SQLite)")
    p.add_argument("--state-dir", type=Path,
                   help="a local run's state dir (`amft pipeline run-local --state-dir`): use its registry and, "
                   "unless an S3 endpoint is configured, start its embedded SeaweedFS for this command")
    p.add_argument("--verify", action="store_true",
                   help="re-hash every recorded object (run root and registry copy), compare metrics, check the "
                   "signature; exit 1 naming each mismatch")
    p.add_argument("--json", action="store_true", help="print the lineage record as JSON instead of the chain")
    p.set_defaults(handler=_lineage)


class LineageNotFoundError(UserError, LookupError):
    """A registered model version without a lineage record."""


def _record_for(ref, tracking_uri: str | None) -> dict:
    """The lineage record of a model version: from its lineage-URI tag, else the copy logged in its run."""
    from amft_lib import lineage, registry

    uri = ref.tags.get(registry.LINEAGE_TAG)
    if uri:
        return lineage.read_lineage(uri)
    logged = registry.logged_lineage(ref, tracking_uri)
    if logged is not None:
        return lineage.parse_lineage(logged, f"{ref.uri} lineage/{lineage.LINEAGE_FILE}")
    raise LineageNotFoundError(f"{ref.uri}: no lineage record (no {registry.LINEAGE_TAG} tag and none logged in its "
                               "run)")


def _audit(ref, record: dict, tracking_uri: str | None):
    """lineage.audit_lineage against the registry's view of `ref`: its artifacts (where the registry
    keeps them), its tags, and the record copy logged in its run (must equal the one read)."""
    from amft_lib import lineage, registry

    key = lineage.signing_key()
    try:
        with registry.registered_artifacts(ref, tracking_uri) as (folder, _):
            audit = lineage.audit_lineage(record, registry_copy=folder, registered=(ref.name, ref.version),
                                          registry_tags=ref.tags, key=key)
    except registry.ModelLookupError as exc:
        audit = lineage.audit_lineage(record, registered=(ref.name, ref.version), registry_tags=ref.tags, key=key)
        audit.mismatches.append(lineage.Mismatch(lineage.REGISTRY_OBJECT, ref.uri, f"unreadable: {exc}"))
    logged = registry.logged_lineage(ref, tracking_uri)
    if logged is not None and ref.tags.get(registry.LINEAGE_TAG):
        audit.objects.add("lineage copy")
        try:
            same = lineage.parse_lineage(logged, "logged copy") == record
        except ValueError:
            same = False
        if not same:
            audit.mismatches.append(lineage.Mismatch(
                "lineage copy", f"{ref.uri} lineage/{lineage.LINEAGE_FILE}",
                f"differs from the record at {ref.tags[registry.LINEAGE_TAG]}"))
    return audit


@contextlib.contextmanager
def _local_services(state_dir: Path | None, tracking_uri: str | None) -> Iterator[str | None]:
    """The tracking URI to use; with a run-local state dir, its SQLite registry and — when no S3
    endpoint is configured — its SeaweedFS, started for the command and stopped after it."""
    if state_dir is None:
        yield tracking_uri
        return
    if not (state_dir / "mlflow.db").is_file():
        raise FileNotFoundError(f"--state-dir {state_dir}: no mlflow.db there (run `amft pipeline run-local` first)")
    uri = tracking_uri or f"sqlite:///{(state_dir / 'mlflow.db').resolve()}"
    if os.environ.get("AWS_ENDPOINT_URL_S3") or not (state_dir / "s3").is_dir():
        yield uri
        return
    from amft_lib.s3server import EmbeddedS3

    server = EmbeddedS3(state_dir / "s3")
    saved = dict(os.environ)
    os.environ.update(server.start().env())
    try:
        yield uri
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()


def _lineage(args: argparse.Namespace) -> int:
    with _local_services(args.state_dir, args.tracking_uri) as tracking_uri:
        args.tracking_uri = tracking_uri
        return _print_lineage(args)


def _print_lineage(args: argparse.Namespace) -> int:
    from amft_lib import lineage, registry

    ref = registry.resolve(args.model, args.tracking_uri)
    record = _record_for(ref, args.tracking_uri)
    if args.json:
        print(json.dumps(lineage.redact(record), indent=2, sort_keys=True))
    else:
        model = {"name": ref.name, "version": ref.version, "aliases": list(ref.aliases), "source": ref.source}
        print(lineage.format_chain(record, model))
    if not args.verify:
        return 0
    audit = _audit(ref, record, args.tracking_uri)
    for m in audit.mismatches:
        print(f"verify: FAILED {lineage.redact_text(str(m))}")
    if audit.mismatches:
        print(f"verify: FAILED {len(audit.mismatches)} mismatch(es); {audit.summary()}")
        return 1
    print(f"verify: ok ({audit.summary()}; the run root and the registry's copy of {ref.uri} match the record, "
          "and so do its metrics)")
    return 0
