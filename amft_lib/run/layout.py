"""The run folder: `s3://BUCKET/PREFIX/runs/RUN_ID/…` (or a local directory), one owner for every path.

Why one class: the layout is a user contract (README "Contracts") that auditors, the registry and
the run summary all read. Spelling `"validation/gate.json"` in ten files let them drift; here each
path has one name and every stage asks `RunRoot` for it.

    runs/RUN_ID/
      preflight.json          resolved configs and the preflight checks
      data/                   prepared parquet + card.json
      validation/             GX report (Markdown, HTML, JSON) and gate.json
      base_model/             the model the warm start began from
      base_model_source.json  where it came from: kind, revision, every file's sha256
      warm_start/             stats.json, config.yaml, sft_history.jsonl, model/,
                              checkpoints/ (step-NNNNNNN/, LATEST: the warm start's own, resume auto)
      checkpoints/            step-NNNNNNN/ (MANIFEST.json last), LATEST
      train/                  metrics.jsonl, controller.jsonl, config.yaml, result.json, logs/
      model/                  the trained model
      launch/                 train.json, warm_start.json: what a launched (torchrun / TrainJob) stage's workers read
      eval/                   metrics.json, report.md, report.html
      registry.json           what the register stage did
      lineage.json            the lineage record
      summary.json            the run summary (exit handler)
    cache/eval-scores/        beside runs/: evaluation scores keyed by model content hash (all runs)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amft_lib import storage
from amft_lib.errors import UserError

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}")


class RunError(UserError):
    """The run id or run root cannot be used (bad characters, empty root)."""


@dataclass(frozen=True)
class RunRoot:
    """Every path of one run folder. `uri` is `s3://…/runs/RUN_ID` or a local directory."""

    uri: str
    run_id: str

    @classmethod
    def resolve(cls, s3_root: str, run_id: str, job_id: str = "") -> RunRoot:
        """The run root for an explicit run id, else the KFP job id. An explicit id wins so a new
        pipeline run given an old run id continues that run (training resumes from its checkpoints)."""
        rid = (run_id or job_id or "").strip()
        if not _RUN_ID.fullmatch(rid):
            raise RunError(f"run id {rid!r}: use letters, digits, '.', '_' and '-' (at most 128), e.g. the KFP job id")
        if not s3_root.strip():
            raise RunError("s3_root is empty: name the S3 prefix runs go under, e.g. s3://bucket/amft")
        return cls(storage.join(s3_root.strip().rstrip("/"), "runs", rid), rid)

    @classmethod
    def at(cls, uri: str) -> RunRoot:
        """A RunRoot for an existing run folder URI (the run id is its last path part)."""
        uri = uri.rstrip("/")
        return cls(uri, uri.rsplit("/", 1)[-1])

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    # ── one name per file or folder of the contract ──
    @property
    def preflight(self) -> str:
        return self.path("preflight.json")

    @property
    def data(self) -> str:
        return self.path("data")

    @property
    def data_card(self) -> str:
        return self.path("data", "card.json")

    @property
    def validation(self) -> str:
        return self.path("validation")

    @property
    def gate(self) -> str:
        return self.path("validation", "gate.json")

    @property
    def base_model(self) -> str:
        return self.path("base_model")

    @property
    def base_model_source(self) -> str:
        """Where the base model came from (kind, revision, every file's sha256): model_source.lineage()."""
        return self.path("base_model_source.json")

    @property
    def warm_start(self) -> str:
        return self.path("warm_start")

    @property
    def warm_start_model(self) -> str:
        return self.path("warm_start", "model")

    @property
    def warm_start_stats(self) -> str:
        return self.path("warm_start", "stats.json")

    @property
    def warm_start_result(self) -> str:
        """A launched (multi-process) warm start's numbers, written by its rank 0 for the launching task."""
        return self.path("warm_start", "result.json")

    @property
    def warm_start_config(self) -> str:
        return self.path("warm_start", "config.yaml")

    @property
    def train(self) -> str:
        return self.path("train")

    @property
    def train_result(self) -> str:
        return self.path("train", "result.json")

    @property
    def model(self) -> str:
        return self.path("model")

    def launch_spec(self, stage: str) -> str:
        """What the launcher of a multi-process `stage` hands its workers (resolved config, init model
        URI): the one thing that crosses from the KFP task to torchrun's processes or a TrainJob's pods."""
        return self.path("launch", f"{stage}.json")

    @property
    def eval(self) -> str:
        return self.path("eval")

    @property
    def eval_metrics(self) -> str:
        return self.path("eval", "metrics.json")

    @property
    def registry(self) -> str:
        return self.path("registry.json")

    @property
    def lineage(self) -> str:
        return self.path("lineage.json")

    @property
    def summary(self) -> str:
        return self.path("summary.json")

    @property
    def s3_root(self) -> str:
        """The prefix runs go under (`p0_s3_root`): the parent of `runs/RUN_ID`."""
        return self.uri.rsplit("/runs/", 1)[0]

    @property
    def score_cache(self) -> str:
        """Evaluation scores by model content hash, shared by every run under the same S3 root: the
        base model (and an unchanged champion) is generated once, not on every run."""
        return storage.join(self.s3_root, "cache", "eval-scores")

    @property
    def mlflow_artifacts(self) -> str:
        """Default artifact root of the MLflow experiment (`p6_registry_artifact_root` empty)."""
        return storage.join(self.s3_root, "mlflow")

    @property
    def fault_marker(self) -> str:
        return self.path("faults", "train-killed")

    @property
    def warm_start_fault_marker(self) -> str:
        return self.path("faults", "warm-start-killed")


def use_s3_endpoint(endpoint_url: str) -> None:
    """Point boto3 (amft_lib.storage) and MLflow at `endpoint_url`; empty keeps the environment's."""
    if endpoint_url:
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint_url
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = endpoint_url


def json_bytes(obj: Any) -> bytes:
    """Stable, redacted JSON: what every stage record under the run root is written as."""
    from amft_lib import lineage

    return (json.dumps(lineage.redact(obj), indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")


def put_json(uri: str, obj: Any) -> None:
    """Write one stage record under the run root (secrets redacted, keys sorted)."""
    storage.put_bytes(uri, json_bytes(obj))


def publish(local_dir: str | Path, uri: str) -> list[str]:
    """Copy every file under `local_dir` to `uri` (same relative paths); returns the URIs written."""
    base = Path(local_dir)
    written = []
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        target = storage.join(uri, path.relative_to(base).as_posix())
        storage.put_file(str(path), target)
        written.append(target)
    return written


POINTER_FILE = "MODEL_URI.json"


def write_pointer(artifact_dir: str | Path, uri: str, **details: Any) -> None:
    """Make a KFP `Model` artifact a pointer to the model's one stored copy under the run root.

    Why: KFP uploads an output artifact's folder to its own store, and the run root already holds
    the model; a multi-GB model written to both is stored (and uploaded) twice. The artifact keeps
    a small JSON file naming the URI; `open_model` on the consuming side stages the real files.
    """
    folder = Path(artifact_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / POINTER_FILE).write_text(json.dumps({"uri": uri, **details}, indent=2, sort_keys=True) + "\n",
                                       encoding="utf-8")


def model_uri(artifact_dir: str | Path) -> str:
    """Where a model artifact's files are: the run-root URI its pointer names, else the folder itself."""
    pointer = Path(artifact_dir) / POINTER_FILE
    return json.loads(pointer.read_text(encoding="utf-8"))["uri"] if pointer.is_file() else str(artifact_dir)


def open_model(artifact_dir: str | Path, staging_dir: str | Path) -> str:
    """A local HF directory for a model artifact: the artifact itself when it holds the files,
    else the run-root copy its pointer names, downloaded into `staging_dir`."""
    return stage_model(model_uri(artifact_dir), staging_dir)


def stage_model(uri: str, staging_dir: str | Path) -> str:
    """A local HF directory for the model at `uri`: a local path as it is, an s3:// prefix downloaded
    into `staging_dir`."""
    if not storage.is_s3(uri):
        return uri
    if not storage.download_prefix(uri, staging_dir):
        raise RunError(f"{uri}: the model this artifact points to has no files (was the run root cleaned?)")
    return str(staging_dir)


def fetch_input(uri: str, dest_dir: str | Path) -> str:
    """A local path for a user's input file: s3:// objects are downloaded into `dest_dir`."""
    if not storage.is_s3(uri):
        return uri
    local = Path(dest_dir) / uri.rstrip("/").rsplit("/", 1)[-1]
    storage.get_file(uri, local)
    return str(local)
