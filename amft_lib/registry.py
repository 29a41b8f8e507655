"""The MLflow Model Registry step: register a model only when the evaluation blessed it.

Why MLflow and these rules (DESIGN.md, research anchors B and F):
- **Blessed only.** Like TFX's Pusher, registration reads the evaluation verdict and does nothing
  at all for an unblessed model: no experiment, no run, no version (the result says why).
- **Servable, never pickled.** The model is logged as an MLflow `transformers` model (task
  text-generation, explicit pip requirements): `mlflow.pyfunc.load_model("models:/NAME@champion")`
  answers a prompt and `mlflow models serve` works. Inside it the weights stay safetensors (no
  pickled `mlflow.pytorch` model); directories holding pickle-format weights, code files, symlinks
  or custom-code config keys are refused (amft_lib.model_files), every load passes trust_remote_code=False.
- **Never the same model twice.** The version is tagged with the model's content digest
  (model_files.content_digest: tensors, config, tokenizer — not a folder listing); a blessed model
  whose content equals the current champion's is not registered again and the alias stays.
- **Provenance on the version.** Tags carry the pipeline run id, data sha256, validation result,
  base model, warm-start stats, μ summary, flattened eval metrics and the lineage URI, so the
  registry answers "what made this model" without the pipeline UI (KFP is dropping MLMD lineage).
- **Idempotent.** A pipeline retry registers the same run id again: the version tagged with that
  run id is found (`search_model_versions` on the tag) and returned; nothing new is created.
- **`champion` alias** moves to each newly registered version; the evaluator compares the next
  candidate against it. Registered under another alias (e.g. `candidate`, the pipeline's
  p6_registry_alias), @champion is left to an approval: :func:`promote` moves it (the Airflow DAG's
  approval step does the same through MLflow's REST API).
- **Linked to its LoggedModel (MLflow 3).** When the training stage recorded its checkpoints as
  LoggedModels (amft_lib.tracking), the servable model is logged into the final checkpoint's
  LoggedModel (as `log_model(model_id=…)` completes an external model) and the version's source is
  `models:/<model_id>`: the registry, the checkpoint's step and val metrics and the weights in the run
  root are one object. Without them (no checkpoints, tracking off), the register run holds it as before.

Tracking store: ``--tracking-uri`` / ``$MLFLOW_TRACKING_URI`` when set (any MLflow server in
production), else an embedded SQLite store ``sqlite:///$AMFT_STATE_DIR/mlflow.db`` (default state
dir ``~/.local/state/amft``). Artifacts of a new experiment go to ``$AMFT_MLFLOW_ARTIFACT_ROOT``
(local folder, or ``s3://…`` with ``MLFLOW_S3_ENDPOINT_URL`` and the AWS variables set), else
``$AMFT_STATE_DIR/mlartifacts``. mlflow is imported inside the functions (``amft --help`` stays fast).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amft_lib import lineage, model_files, storage
from amft_lib.errors import UserError
from amft_lib.mlflow_names import CHECKPOINT_MODEL_TYPE, CHECKPOINT_STEP_TAG, EXTERNAL_TAG, STAGE_TAG

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
CANDIDATE_ALIAS = "candidate"
_ALIAS_RE = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,254}")
DEFAULT_EXPERIMENT = "amft"
MODEL_ARTIFACT_PATH = "model"
RUN_ID_TAG = "amft.run_id"
LINEAGE_TAG = "amft.lineage_uri"
CONTENT_TAG = "amft.model_content_sha256"
_MAX_TAG_VALUE = 5000  # MLflow allows more, but tags are for reading; a long value is truncated
_RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,199}")
_BAD_NAME_CHARS = set("'\"`\\@:\n\r\t")


class RegistryError(UserError):
    """A registry operation failed; the message is one line naming the model and the cause."""


class RegistryInputError(RegistryError, ValueError):
    """A bad name, run id, model directory or evaluation file given to the registry step."""


class ModelDirNotFoundError(RegistryInputError, FileNotFoundError):
    """The model directory to register does not exist or is not a Hugging Face directory."""


class ModelLookupError(RegistryError, LookupError):
    """A model, version or alias that the registry does not hold."""


# ── where the registry lives ────────────────────────────────────────────────────────────────────


def state_dir() -> Path:
    """Local state for embedded defaults (SQLite registry, artifacts): $AMFT_STATE_DIR or ~/.local/state/amft."""
    return Path(os.environ.get("AMFT_STATE_DIR") or Path.home() / ".local" / "state" / "amft")


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the embedded SQLite store in the state dir."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(state_dir() / 'mlflow.db').resolve()}"


def default_artifact_root() -> str:
    """$AMFT_MLFLOW_ARTIFACT_ROOT (a folder or s3:// URI), else `mlartifacts` in the state dir."""
    return os.environ.get("AMFT_MLFLOW_ARTIFACT_ROOT") or str((state_dir() / "mlartifacts").resolve())


# MLflow's HTTP client retries a failed request 7 times with backoff factor 2 and waits up to 120 s
# per request (mlflow/environment_variables.py, read at each request in mlflow/utils/rest_utils.py):
# an unreachable tracking URI held a stage for minutes. These bound it — a refused connection fails
# in ~3 s, a silent host in ≤ 3 × 30 s — and stay overridable: a value already in the environment wins.
HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",  # per request; an artifact upload through the server must fit it
}
REACHABLE_TIMEOUT_S = 5.0  # preflight's one connection attempt to an http(s) tracking URI


class RegistryUnreachableError(RegistryError, ConnectionError):
    """The tracking server did not answer at all (no HTTP response) within the probe's deadline."""


def bound_http_waits() -> None:
    """Put :data:`HTTP_BOUNDS` into the environment where the user set nothing (MLflow reads them
    at each request; task subprocesses inherit them). Called wherever a client is made."""
    for name, value in HTTP_BOUNDS.items():
        os.environ.setdefault(name, value)


def check_reachable(tracking_uri: str, timeout_s: float = REACHABLE_TIMEOUT_S) -> str:
    """One HTTP request to an http(s) tracking server with a deadline, no retries: any HTTP answer
    (even 401/404) means it is there. Raises RegistryUnreachableError in one line (credentials
    scrubbed) otherwise; other stores (sqlite, file) are not probed. Returns a one-line detail.

    Why not just the client's first call: with retries and backoff that call takes seconds to
    minutes to fail; preflight should say "unreachable" within a few seconds."""
    import urllib.error
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https"):
        return f"{lineage.redact_text(tracking_uri)} (not an HTTP server: not probed)"
    host = parts.netloc.rpartition("@")[2]  # no userinfo on the wire here: reachability needs no login
    url = urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health", "", ""))
    safe = lineage.redact_text(tracking_uri)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        pass  # an HTTP status is an answer
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RegistryUnreachableError(
            f"tracking URI {safe}: unreachable within {timeout_s:g} s ({type(reason).__name__}: "
            f"{lineage.redact_text(' '.join(str(reason).split()))})") from None
    return f"{safe} answers"


@functools.lru_cache(maxsize=8)
def _client(tracking_uri: str) -> Any:
    """One MlflowClient per store: opening a SQLite store runs its schema check (~seconds on first use)."""
    from mlflow import MlflowClient

    bound_http_waits()
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def get_client(tracking_uri: str | None = None) -> Any:
    """An MlflowClient for `tracking_uri` (default: :func:`default_tracking_uri`) for tracking and registry."""
    return _client(tracking_uri or default_tracking_uri())


def _error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


def _mlflow_error() -> type[BaseException]:
    from mlflow.exceptions import MlflowException

    return MlflowException


def _one_line(exc: BaseException) -> str:
    return lineage.redact_text(" ".join(str(exc).split()))


# ── names and specs ─────────────────────────────────────────────────────────────────────────────


def _check_name(name: str) -> str:
    if not name or not name.strip() or _BAD_NAME_CHARS & set(name):
        raise RegistryInputError(
            f"model name {name!r}: must be non-empty and must not contain quotes, backslashes, '@', ':' or "
            "control characters (':' and '@' separate the version or alias)"
        )
    return name


def _check_run_id(run_id: str) -> str:
    if not _RUN_ID_RE.fullmatch(run_id or ""):
        raise RegistryInputError(
            f"run id {run_id!r}: use letters, digits and . _ : - (at most 200 characters), e.g. a KFP run UUID"
        )
    return run_id


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``NAME``, ``NAME:VERSION`` or ``NAME@ALIAS`` (``models:/`` prefix and
    ``models:/NAME/VERSION`` accepted too)."""

    name: str
    version: str | None = None
    alias: str | None = None


def parse_model_spec(spec: str) -> ModelSpec:
    """Split a model spec; ValueError (naming the accepted forms) when it is malformed."""
    text = spec.strip()
    if text.startswith("models:/"):
        text = text[len("models:/") :]
        head, sep, tail = text.rpartition("/")
        if sep and tail.isdigit():
            text = f"{head}:{tail}"
    usage = "expected NAME, NAME:VERSION or NAME@ALIAS (e.g. amft-gp@champion)"
    if "@" in text:
        name, _, alias = text.partition("@")
        if not alias or not re.fullmatch(r"[A-Za-z0-9_\-]+", alias):
            raise RegistryInputError(f"model spec {spec!r}: bad alias; {usage}")
        return ModelSpec(_check_name(name), alias=alias)
    if ":" in text:
        name, _, version = text.rpartition(":")
        if not version.isdigit():
            raise RegistryInputError(f"model spec {spec!r}: version must be a number; {usage}")
        return ModelSpec(_check_name(name), version=str(int(version)))
    try:
        return ModelSpec(_check_name(text))
    except ValueError:
        raise RegistryInputError(f"model spec {spec!r}: {usage}") from None


# ── results ─────────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class ModelRef:
    """One registered model version as the registry describes it.

    artifact_uri: where the HF directory lies (a local path or s3:// URI), for loading.
    """

    name: str
    version: str
    run_id: str | None
    source: str
    artifact_uri: str | None
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class RegisterResult:
    """What :func:`register_model` did. `registered` is False for an unblessed model and for one whose
    content equals the champion's (`version` then names the champion); `created` is False when the
    run id was already registered (idempotent retry)."""

    registered: bool
    reason: str
    name: str
    version: str | None = None
    created: bool = False
    alias_moved: bool = False
    mlflow_run_id: str | None = None
    model_uri: str | None = None
    logged_model_id: str | None = None  # the LoggedModel the version's source is (None: a runs:/ source)
    alias: str = CHAMPION_ALIAS


# ── tags ────────────────────────────────────────────────────────────────────────────────────────


def _tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= _MAX_TAG_VALUE else text[: _MAX_TAG_VALUE - 1] + "…"


def _flatten(prefix: str, obj: Any, out: dict[str, Any]) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif obj is not None:
        out[prefix] = obj


def registry_tags(
    eval_metrics: Mapping[str, Any],
    run_id: str,
    record: Mapping[str, Any] | None = None,
    lineage_uri: str | None = None,
) -> dict[str, str]:
    """Model-version tags (pure; secrets redacted): provenance from the lineage `record`, the eval
    verdict and every scalar eval metric of the candidate flattened as ``amft.eval.<split>.<metric>``."""
    tags: dict[str, Any] = {
        RUN_ID_TAG: run_id,
        "amft.blessed": "true" if eval_metrics.get("blessed") is True else "false",
        "amft.blessing_reason": eval_metrics.get("reason"),
    }
    for split, metrics in eval_metrics.items():
        if split in ("comparisons", "config", "decoding", "training", "blessing") or not isinstance(metrics, Mapping):
            continue
        for key, value in metrics.items():
            if isinstance(value, int | float | str) and not isinstance(value, bool):
                tags[f"amft.eval.{split}.{key}"] = value
    if lineage_uri:
        tags[LINEAGE_TAG] = lineage_uri
    if record:
        data_uris = sorted({e.get("group") or e["uri"] for e in record.get("inputs", []) if e.get("name") == "dataset"})
        tags["amft.data_sha256"] = lineage.data_digest(record)
        tags["amft.data_uri"] = ",".join(data_uris) or None
        tags["amft.config_hash"] = record.get("config_hash")
        tags["amft.git_commit"] = record.get("git_commit")
        tags["amft.pipeline_version"] = record.get("pipeline_version")
        validation = record.get("validation") or {}
        if validation:
            passed = validation.get("passed", validation.get("success"))
            tags["amft.validation.passed"] = None if passed is None else str(bool(passed)).lower()
            stats = validation.get("statistics") or {}
            for key in ("success_percent", "evaluated_expectations", "unsuccessful_expectations"):
                tags[f"amft.validation.{key}"] = stats.get(key)
        base = record.get("base_model") or {}
        tags["amft.base_model"] = base.get("id")
        tags["amft.base_model_sha256"] = base.get("sha256")
        flat: dict[str, Any] = {}
        _flatten("amft.warm_start", record.get("warm_start") or {}, flat)
        _flatten("amft.mu", record.get("mu_summary") or {}, flat)
        tags.update(flat)
    secrets = lineage.secret_values()
    return {
        lineage.redact_text(k, secrets)[:250]: lineage.redact_text(_tag_value(v), secrets)
        for k, v in tags.items()
        if v is not None
    }


# ── registration ────────────────────────────────────────────────────────────────────────────────


def read_eval_metrics(eval_uri: str) -> dict[str, Any]:
    """`metrics.json` of an evaluation output folder (or the file itself), local or s3://."""
    uri = eval_uri if eval_uri.endswith(".json") else storage.join(eval_uri, "metrics.json")
    if not storage.is_s3(uri) and os.path.isdir(uri):
        raise RegistryInputError(f"{uri}: is a directory, expected the evaluation's metrics.json")
    try:
        data = json.loads(storage.get_bytes(uri).decode("utf-8"))
    except storage.ObjectNotFoundError:
        raise RegistryInputError(f"{uri}: no evaluation metrics.json there (run `amft evaluate` first)") from None
    except UnicodeDecodeError:
        raise RegistryInputError(f"{uri}: not a UTF-8 JSON file") from None
    except json.JSONDecodeError as exc:
        raise RegistryInputError(f"{uri}: not valid JSON ({exc.msg})") from None
    except OSError as exc:  # permission denied and the like, on a local path
        raise RegistryInputError(f"{uri}: cannot read: {exc.strerror or exc}") from None
    if not isinstance(data, dict) or "blessed" not in data:
        raise RegistryInputError(f"{uri}: not an evaluation metrics.json (no 'blessed' field)")
    return data


def check_model_dir(model_dir: str | Path) -> Path:
    """The HF directory to register: data only — config.json and safetensors weights that match it, no
    pickle-format or code files, no symlinks out, no custom-code keys (amft_lib.model_files)."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ModelDirNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
    files = model_files.check_files(path)  # before anything reads (or uploads) a linked file
    model_files.check_no_code(path)
    pickled = sorted(str(p.relative_to(path)) for p in files if p.suffix.lower() in model_files.PICKLE_SUFFIXES)
    if pickled:
        raise RegistryInputError(
            f"{path}: refusing pickle-format weights ({', '.join(pickled[:3])}); save with safetensors "
            "(amft_lib.model.save_policy does)"
        )
    if not any(p.suffix == ".safetensors" for p in files):
        raise RegistryInputError(f"{path}: no .safetensors weights found")
    model_files.check_model_dir(path)
    return path


def experiment_id(client: Any, experiment: str, artifact_root: str | None) -> str:
    """The id of MLflow experiment `experiment`, created (artifacts under `artifact_root`) if missing."""
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    location = storage.join(artifact_root or default_artifact_root(), experiment)
    try:
        return client.create_experiment(experiment, artifact_location=location)
    except _mlflow_error() as exc:
        if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":  # another process won the race
            raise
        return client.get_experiment_by_name(experiment).experiment_id


def _find_by_run_id(client: Any, name: str, run_id: str) -> Any | None:
    found = client.search_model_versions(f"name = '{name}' and tags.`{RUN_ID_TAG}` = '{run_id}'")
    return min(found, key=lambda mv: int(mv.version)) if found else None


def _champion_version(client: Any, name: str, alias: str) -> int | None:
    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except _mlflow_error():
        return None


def _same_as_champion(client: Any, name: str, alias: str, digest: str, run_id: str) -> str | None:
    """The champion's version when its recorded content digest equals `digest` and another run
    registered it, else None (a champion of this very run id is the idempotent-retry case).

    Why here as well as in evaluation: the evaluator refuses to bless an identical candidate, but a
    metrics.json from elsewhere (or an older one) can still say blessed; the same weights must never
    become a new version. Versions registered before the tag existed have none and never match."""
    version = _champion_version(client, name, alias)
    if version is None:
        return None
    tags = client.get_model_version(name, str(version)).tags or {}
    return str(version) if tags.get(CONTENT_TAG) == digest and tags.get(RUN_ID_TAG) != run_id else None


def _move_alias(client: Any, name: str, alias: str, version: str) -> bool:
    """Point `alias` at `version` unless it already points at a newer one (a retried old run must not
    demote a champion registered after it). Returns whether the alias changed."""
    current = _champion_version(client, name, alias)
    if current is not None and current >= int(version):
        return False
    client.set_registered_model_alias(name, alias, version)
    return True


def _sync_lineage(lineage_uri: str, registry: dict[str, Any]) -> None:
    """Write the registry name/version into the lineage record (only when they differ)."""
    record = lineage.read_lineage(lineage_uri)
    if (record.get("registry") or {}) != registry:
        record["registry"] = registry
        lineage.write_lineage(record, lineage_uri if lineage_uri.endswith(".json") else
                              storage.join(lineage_uri, lineage.LINEAGE_FILE))


def register_model(
    model_dir: str | Path,
    eval_metrics: Mapping[str, Any],
    name: str,
    run_id: str,
    *,
    lineage_uri: str | None = None,
    tracking_uri: str | None = None,
    artifact_root: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    alias: str = CHAMPION_ALIAS,
) -> RegisterResult:
    """Register `model_dir` as a new version of `name` if `eval_metrics` (an evaluation's
    metrics.json) says blessed; tag it with provenance and move `alias` to it.

    Idempotent on `run_id` (the pipeline run id): when a version with that run id exists it is
    returned (`created=False`) and nothing is created; only a lineage record missing the registry
    fields, or an alias left behind by an interrupted earlier attempt, is completed.
    """
    _check_name(name)
    _check_run_id(run_id)
    check_alias(alias)
    if eval_metrics.get("blessed") is not True:
        reason = eval_metrics.get("reason") or "no verdict in metrics.json"
        log.info("not registering %s for run %s: not blessed (%s)", name, run_id, reason)
        reason = lineage.redact_text(f"not registered: the evaluation did not bless the model ({reason})")
        return RegisterResult(False, reason, name)
    path = check_model_dir(model_dir)
    digest = model_files.content_digest(path)
    record = lineage.read_lineage(lineage_uri) if lineage_uri else None
    uri = tracking_uri or default_tracking_uri()
    client = get_client(uri)
    safe_uri = lineage.redact_text(uri)
    MlflowException = _mlflow_error()
    try:
        existing = _find_by_run_id(client, name, run_id)
        if existing is not None:
            moved = _move_alias(client, name, alias, existing.version)
            model_id = logged_model_id(existing.source)
            if lineage_uri:
                _sync_lineage(lineage_uri, {"name": name, "version": str(existing.version), "alias": alias,
                                            "tracking_uri": safe_uri, "mlflow_run_id": existing.run_id,
                                            "logged_model_id": model_id})
            log.info("run %s is already registered as %s version %s; nothing created", run_id, name, existing.version)
            return RegisterResult(True, f"already registered by run {run_id}", name, str(existing.version),
                                  created=False, alias_moved=moved, mlflow_run_id=existing.run_id,
                                  model_uri=f"models:/{name}/{existing.version}", logged_model_id=model_id,
                                  alias=alias)

        same = _same_as_champion(client, name, alias, digest, run_id)
        if same is not None:
            log.info("not registering %s for run %s: same content as version %s (@%s)", name, run_id, same, alias)
            return RegisterResult(False, f"not registered: the model's content (weights, config, tokenizer) equals "
                                  f"{name} version {same} (@{alias}); the champion stays", name, same)
        tags = {**registry_tags(eval_metrics, run_id, record, lineage_uri), CONTENT_TAG: digest}
        exp_id = experiment_id(client, experiment, artifact_root)
        run = client.create_run(exp_id, run_name=f"register-{run_id}", tags={RUN_ID_TAG: run_id})
        mlflow_run_id = run.info.run_id
        try:
            final = final_logged_model(client, run_id)
            log.info("logging %s as an MLflow transformers model of %s", path,
                     f"LoggedModel {final.model_id}" if final else f"run {mlflow_run_id}")
            with tempfile.TemporaryDirectory(prefix="amft-mlmodel-") as tmp:
                servable = servable_model(path, Path(tmp) / MODEL_ARTIFACT_PATH)
                if final is None:
                    client.log_artifacts(mlflow_run_id, str(servable), artifact_path=MODEL_ARTIFACT_PATH)
                else:
                    attach_servable(client, final.model_id, servable, mlflow_run_id)
            _log_eval_metrics(client, mlflow_run_id, tags)
            with contextlib.suppress(MlflowException):
                client.create_registered_model(name, description="AMFT fine-tuned reasoner (amft register)")
            with _global_tracking_uri(uri):  # see _global_tracking_uri
                version = client.create_model_version(
                    name,
                    source=final.model_uri if final else f"runs:/{mlflow_run_id}/{MODEL_ARTIFACT_PATH}",
                    run_id=mlflow_run_id,
                    tags=tags,
                    description=lineage.redact_text(f"pipeline run {run_id}: {eval_metrics.get('reason', '')}")[:1000],
                    model_id=final.model_id if final else None,
                )
            first = _find_by_run_id(client, name, run_id)
            if first is not None and int(first.version) < int(version.version):
                return _yield_to(client, name, run_id, version.version, mlflow_run_id, first, alias, lineage_uri,
                                 safe_uri)
            moved = _move_alias(client, name, alias, version.version)
            registry = {"name": name, "version": str(version.version), "alias": alias,
                        "tracking_uri": safe_uri, "mlflow_run_id": mlflow_run_id,
                        "logged_model_id": final.model_id if final else None}
            if lineage_uri:
                _sync_lineage(lineage_uri, registry)
                with tempfile.TemporaryDirectory(prefix="amft-lineage-") as tmp:
                    local = Path(tmp) / lineage.LINEAGE_FILE
                    lineage.write_lineage(lineage.read_lineage(lineage_uri), str(local))
                    client.log_artifact(mlflow_run_id, str(local), artifact_path="lineage")
            client.set_terminated(mlflow_run_id, "FINISHED")
        except BaseException:
            with contextlib.suppress(Exception):
                client.set_terminated(mlflow_run_id, "FAILED")
            raise
    except MlflowException as exc:
        raise RegistryError(f"register {name} for run {run_id} at {safe_uri} failed: {_one_line(exc)}") from None
    log.info("registered %s version %s (alias @%s %s)", name, version.version, alias, "moved" if moved else "kept")
    reason = lineage.redact_text(f"registered: {eval_metrics.get('reason', '')}".strip())
    return RegisterResult(True, reason, name, str(version.version),
                          created=True, alias_moved=moved, mlflow_run_id=mlflow_run_id,
                          model_uri=f"models:/{name}/{version.version}",
                          logged_model_id=final.model_id if final else None, alias=alias)


def _yield_to(client: Any, name: str, run_id: str, ours: str, mlflow_run_id: str, first: Any, alias: str,
              lineage_uri: str | None, safe_uri: str) -> RegisterResult:
    """Another process registered `run_id` concurrently and its version is older: delete ours.

    Why this serialises registrations per run id (optimistic, no lock to go stale): the registry
    gives version numbers in commit order (max + 1 under a unique (name, version) key, retried on
    conflict; deleted versions keep their number), and a version's tags are written in the same
    transaction. So when our version N is committed, every lower version with this run-id tag is
    already visible to our search, and the lowest one is the same for every racer: exactly one
    process (the lowest version's) keeps its version and moves the alias, every other deletes its
    own. An MLflow tag "check-and-set" is not atomic, and an S3 lock object needs S3 (this step also
    runs on a plain SQLite + local-folder registry) plus a conditional PUT: the registry is the one
    store every registration shares, so it arbitrates.
    """
    log.info("run %s was registered concurrently as %s version %s; deleting our version %s", run_id, name,
             first.version, ours)
    client.delete_model_version(name, ours)
    with contextlib.suppress(Exception):
        client.set_tag(mlflow_run_id, "amft.duplicate_of", f"models:/{name}/{first.version}")
        client.set_terminated(mlflow_run_id, "KILLED")
        client.delete_run(mlflow_run_id)
    if lineage_uri:
        _sync_lineage(lineage_uri, {"name": name, "version": str(first.version), "alias": alias,
                                    "tracking_uri": safe_uri, "mlflow_run_id": first.run_id,
                                    "logged_model_id": logged_model_id(first.source)})
    return RegisterResult(True, f"already registered by run {run_id} (concurrently)", name, str(first.version),
                          created=False, alias_moved=False, mlflow_run_id=first.run_id,
                          model_uri=f"models:/{name}/{first.version}", logged_model_id=logged_model_id(first.source),
                          alias=alias)


def _log_eval_metrics(client: Any, run_id: str, tags: Mapping[str, str]) -> None:
    """Numeric eval metrics also as run metrics, so the MLflow UI can chart them across runs."""
    for key, value in tags.items():
        if key.startswith("amft.eval."):
            with contextlib.suppress(ValueError):
                client.log_metric(run_id, key[len("amft.eval.") :].replace("@", "_at_"), float(value))


# ── LoggedModels (MLflow 3) and the candidate alias ──────────────────────────────────────────────


def check_alias(alias: str) -> str:
    """An alias to register under: a letter, then letters, digits, '_' or '-' (MLflow's own rule
    forbids 'latest' and version-like 'v<N>'; ours is narrower and also refuses those)."""
    if not _ALIAS_RE.fullmatch(alias or "") or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise RegistryInputError(f"alias {alias!r}: use a letter then letters, digits, '_' or '-' (not 'latest' or "
                                 f"v<N>), e.g. {CHAMPION_ALIAS} or {CANDIDATE_ALIAS}")
    return alias


def logged_model_id(source: str | None) -> str | None:
    """The LoggedModel id of a version whose source is `models:/<model_id>` (MLflow 3); None otherwise."""
    match = re.fullmatch(r"models:/(m-[0-9a-f]+)", source or "")
    return match.group(1) if match else None


def _lm_experiments(client: Any) -> list[str]:
    """Where the training stage's LoggedModels live: our experiment, and with KFP's MLflow plugin
    ($MLFLOW_RUN_ID, this task's run) the plugin's experiment of this KFP run."""
    ids = []
    found = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    if found is not None:
        ids.append(found.experiment_id)
    if os.environ.get("MLFLOW_RUN_ID"):
        with contextlib.suppress(Exception):
            ids.append(client.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id)
    return sorted(set(ids))


def final_logged_model(client: Any, run_id: str) -> Any | None:
    """The LoggedModel of pipeline run `run_id`'s final training checkpoint (the highest step the
    training stage recorded; its weights are the trained model's), or None when it recorded none."""
    experiments = _lm_experiments(client)
    if not experiments:
        return None
    models = [m for m in client.search_logged_models(
        experiments, filter_string=f"tags.`{RUN_ID_TAG}` = '{_check_run_id(run_id)}' and tags.`{STAGE_TAG}` = 'train'",
        max_results=1000) if m.model_type == CHECKPOINT_MODEL_TYPE and CHECKPOINT_STEP_TAG in m.tags]
    return max(models, key=lambda m: int(m.tags[CHECKPOINT_STEP_TAG]), default=None)


def attach_servable(client: Any, model_id: str, servable_dir: str | Path, mlflow_run_id: str) -> None:
    """Log the servable model (servable_model's folder) into LoggedModel `model_id`, as MLflow's
    `log_model(model_id=…)` completes an external model: its files, then the external tag goes. The
    checkpoint it points at stays where it is (tag amft.checkpoint_uri)."""
    client.log_model_artifacts(model_id, str(servable_dir))
    with contextlib.suppress(_mlflow_error()):  # already gone on a retried registration
        client.delete_logged_model_tag(model_id, EXTERNAL_TAG)
    client.set_logged_model_tags(model_id, {"amft.registered_by_run": mlflow_run_id})


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Any:
    """MLflow's SQL registry resolves a `models:/<model_id>` source with a client on the *global*
    tracking URI (sqlalchemy_store.create_model_version, "TODO: Propagate tracking URI"), not the
    store it belongs to: point the global URI at `uri` for the call, then put back what was there."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    before, env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri = before
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def promote(name: str, version: str, *, alias: str = CHAMPION_ALIAS, tracking_uri: str | None = None) -> bool:
    """Move `alias` (default @champion) to `version` of `name` after an approval; as at registration
    it only moves forward (an approval of an older candidate never demotes a newer champion).
    Returns whether it moved."""
    _check_name(name)
    check_alias(alias)
    client = get_client(tracking_uri)
    try:
        client.get_model_version(name, str(version))
        return _move_alias(client, name, alias, str(version))
    except _mlflow_error() as exc:
        raise ModelLookupError(f"promote {name}:{version} to @{alias}: {_one_line(exc)}") from None


# ── lookup ──────────────────────────────────────────────────────────────────────────────────────


def _ref(client: Any, mv: Any, aliases: tuple[str, ...] | None = None) -> ModelRef:
    artifact_uri = None
    if logged_model_id(mv.source):  # the servable model lives in the LoggedModel's artifacts
        with contextlib.suppress(Exception):
            artifact_uri = client.get_logged_model(logged_model_id(mv.source)).artifact_location
    elif mv.run_id:
        with contextlib.suppress(Exception):
            artifact_uri = storage.join(client.get_run(mv.run_id).info.artifact_uri, MODEL_ARTIFACT_PATH)
    return ModelRef(
        name=mv.name,
        version=str(mv.version),
        run_id=mv.run_id,
        source=mv.source,
        artifact_uri=artifact_uri,
        aliases=tuple(aliases if aliases is not None else (mv.aliases or ())),
        tags=dict(mv.tags or {}),
    )


def resolve(spec: str, tracking_uri: str | None = None) -> ModelRef:
    """Look up ``NAME`` (its latest version), ``NAME:VERSION`` or ``NAME@ALIAS``.

    Raises LookupError (one line) when the model, version or alias does not exist.
    """
    parsed = parse_model_spec(spec)
    client = get_client(tracking_uri)
    MlflowException = _mlflow_error()
    try:
        if parsed.alias:
            mv = client.get_model_version_by_alias(parsed.name, parsed.alias)
        elif parsed.version:
            mv = client.get_model_version(parsed.name, parsed.version)
        else:
            versions = client.search_model_versions(f"name = '{parsed.name}'")
            if not versions:
                raise ModelLookupError(f"model {parsed.name!r} has no versions in the registry")
            mv = max(versions, key=lambda v: int(v.version))
            # search results may leave aliases out; fetch the version itself for them
            mv = client.get_model_version(parsed.name, str(mv.version))
    except MlflowException as exc:
        raise ModelLookupError(f"{spec}: {_one_line(exc)}") from None
    return _ref(client, mv)


# What a registered model needs besides the project: explicit, so MLflow does not guess (it otherwise
# looks for torchvision) and `mlflow models serve` builds the same stack.
SERVING_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate")


def servable_model(model_dir: str | Path, out_dir: str | Path) -> Path:
    """An MLflow `transformers` model (task text-generation) of the HF directory `model_dir`, written to
    `out_dir`: `mlflow.pyfunc.load_model("models:/NAME@champion")` and `mlflow models serve` work on it.
    Weights stay safetensors (transformers' save_pretrained), nothing is pickled; pip requirements are
    the installed versions of SERVING_PACKAGES."""
    import importlib.metadata

    import mlflow.transformers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = check_model_dir(model_dir)
    requirements = []
    for package in SERVING_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            requirements.append(f"{package}=={importlib.metadata.version(package)}")
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)
    # round-trips exactly (AutoTokenizer may not)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path, trust_remote_code=False)
    flavor_log = logging.getLogger("mlflow.transformers")
    level = flavor_log.level
    flavor_log.setLevel(logging.ERROR)  # it warns that a local model has no hub model card or license: known
    try:
        mlflow.transformers.save_model(transformers_model={"model": model, "tokenizer": tokenizer},
                                       path=str(out_dir), task="text-generation", pip_requirements=requirements)
    finally:
        flavor_log.setLevel(level)
    return Path(out_dir)


def hf_directory(mlflow_model: str | Path, dst: str | Path) -> Path:
    """The plain HF directory (weights + tokenizer in one folder) inside a downloaded MLflow transformers
    model, assembled in `dst`; a folder that already is one (older registrations) is returned as is."""
    src = Path(mlflow_model)
    if not (src / "MLmodel").is_file():
        return check_model_dir(src)
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    for part in (src / "model", src / "components" / "tokenizer"):
        for file in part.iterdir() if part.is_dir() else ():
            if file.is_file():
                shutil.copy2(file, out / file.name)
    return check_model_dir(out)


def download_model(ref: ModelRef | str, dst: str | Path, tracking_uri: str | None = None) -> Path:
    """Copy a registered model to `dst` as a plain HF directory (e.g. the champion, for evaluation)."""
    if isinstance(ref, str):
        ref = resolve(ref, tracking_uri)
    if not ref.run_id:
        raise ModelLookupError(f"{ref.uri}: no MLflow run holds its artifacts (source {ref.source})")
    client = get_client(tracking_uri)
    Path(dst).mkdir(parents=True, exist_ok=True)
    if logged_model_id(ref.source) and ref.artifact_uri:  # a LoggedModel's artifacts (MLflow 3)
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        (Path(dst) / "mlflow").mkdir(exist_ok=True)
        local = get_artifact_repository(ref.artifact_uri).download_artifacts("", str(Path(dst) / "mlflow"))
        return hf_directory(local, Path(dst) / "hf")
    local = client.download_artifacts(ref.run_id, MODEL_ARTIFACT_PATH, dst_path=str(Path(dst) / "mlflow"))
    return hf_directory(local, Path(dst) / "hf")


# ── read-only: a registered version's artifacts, for `amft lineage --verify` ────────────────────
# Kept apart from registration: the lineage audit reads what the registry serves, never writes it.


@contextlib.contextmanager
def registered_artifacts(ref: ModelRef, tracking_uri: str | None = None) -> Iterator[tuple[str, str]]:
    """``(folder, location)``: a folder :mod:`amft_lib.storage` can read holding the version's MLflow
    model artifacts (what ``models:/NAME@champion`` loads), and where the registry keeps them.

    An s3:// or local artifact root is read in place (the audit streams each object, bounded); any
    other scheme (``mlflow-artifacts:``, http) is downloaded into a temp folder that lives as long
    as the ``with`` block. The location always comes from the registry, never from a lineage record.
    """
    if not ref.run_id or not ref.artifact_uri:
        raise ModelLookupError(f"{ref.uri}: no MLflow run holds its artifacts (source {ref.source})")
    location = ref.artifact_uri
    if storage.is_s3(location) or location.startswith("file://") or "://" not in location:
        yield location, location
        return
    with tempfile.TemporaryDirectory(prefix="amft-registry-copy-") as tmp:
        if logged_model_id(ref.source):  # the version's LoggedModel holds them (MLflow 3)
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            local = get_artifact_repository(location).download_artifacts("", tmp)
        else:
            local = get_client(tracking_uri).download_artifacts(ref.run_id, MODEL_ARTIFACT_PATH, dst_path=tmp)
        yield local, location


def logged_lineage(ref: ModelRef, tracking_uri: str | None = None) -> bytes | None:
    """The lineage record logged in the version's MLflow run (`lineage/lineage.json`), or None."""
    if not ref.run_id:
        return None
    with tempfile.TemporaryDirectory(prefix="amft-lineage-") as tmp:
        try:
            local = get_client(tracking_uri).download_artifacts(ref.run_id, f"lineage/{lineage.LINEAGE_FILE}",
                                                                dst_path=tmp)
        except Exception:  # MLflow raises its own types, OSError or a 404: no copy is an answer
            return None
        return Path(local).read_bytes()
