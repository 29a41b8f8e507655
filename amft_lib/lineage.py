"""The lineage record: what an auditor needs to trace a registered model back to its raw data.

Why our own record (and not KFP's lineage graph): KFP is removing MLMD and its Lineage Explorer
(kubeflow/pipelines#11760, #12645), so lineage must live with the model. We write one JSON file per
pipeline run (`runs/RUN_ID/lineage.json`, DESIGN.md "S3 layout"), tag the registered model version
with its URI, and keep a copy in the registry run's artifacts.

What a record holds (DESIGN.md "Lineage record"): run id, pipeline version, git commit, image
digests, config and its hash, input URIs with sha256, the validation result, base model id + hash,
warm-start stats, checkpoint URIs, the μ trajectory summary, eval metrics, registry name/version.

Rules this module enforces:
- **Verifiable.** Every input is recorded per file with its sha256; :func:`verify_lineage` re-reads
  each one (local or s3:// through :mod:`amft_lib.storage`) and reports what changed, went missing
  or appeared since. A dataset is a folder, so a file added next to it counts too.
- **No secrets.** Records are passed through :func:`redact` when built and again when written:
  values of secret-looking environment variables are replaced by ``***``, as are credentials
  embedded in URIs (``scheme://user:pass@host``) and signed-URL query parameters.
- **Atomic.** Written with :func:`amft_lib.storage.put_bytes` (temp + rename locally, one PUT on S3).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amft_lib import storage
from amft_lib.config import config_hash

# The scrubber lives in amft_lib.redact (one copy for storage errors, the CLI and records); these
# names stay importable from here for the modules that use them as lineage.redact_text etc.
from amft_lib.redact import REDACTED as REDACTED
from amft_lib.redact import redact as redact
from amft_lib.redact import redact_text as redact_text
from amft_lib.redact import secret_values as secret_values

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
LINEAGE_FILE = "lineage.json"


# ── hashing inputs ──────────────────────────────────────────────────────────────────────────────


def _local_path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def sha256_uri(uri: str) -> tuple[str, int]:
    """(sha256, size in bytes) of one local file or S3 object, streamed through a temp file on S3
    so a multi-GB shard never has to fit in memory."""
    if not storage.is_s3(uri):
        return storage.sha256_file(uri), os.path.getsize(_local_path(uri))
    with tempfile.TemporaryDirectory(prefix="amft-sha-") as tmp:
        local = os.path.join(tmp, "object")
        storage.get_file(uri, local)
        return storage.sha256_file(local), os.path.getsize(local)


def _is_folder(uri: str) -> bool:
    if storage.is_s3(uri):
        return not storage.exists(uri)
    return os.path.isdir(_local_path(uri))


def describe_inputs(name: str, uri: str) -> list[dict[str, Any]]:
    """One record entry per file of an input: ``{name, uri, sha256, bytes}`` plus ``group`` (the
    folder URI) when `uri` is a folder, so verification can also notice files added to it."""
    uri = str(uri)
    if not _is_folder(uri):
        sha, size = sha256_uri(uri)
        return [{"name": name, "uri": uri, "sha256": sha, "bytes": size}]
    files = storage.list_prefix(uri)
    if not files:
        raise FileNotFoundError(f"input {name!r}: {uri} is empty or does not exist")
    entries = []
    for file_uri in files:
        sha, size = sha256_uri(file_uri)
        entries.append({"name": name, "uri": file_uri, "sha256": sha, "bytes": size, "group": uri})
    return entries


def tree_sha256(uri: str) -> str:
    """One digest for a folder (a model directory): sha256 over sorted ``relative-path NUL sha256``
    lines, so renaming, adding or changing any file changes it."""
    base = str(uri).rstrip("/")
    lines = []
    for file_uri in storage.list_prefix(base):
        rel = file_uri[len(base) :].lstrip("/")
        lines.append(f"{rel}\0{sha256_uri(file_uri)[0]}\n")
    if not lines:
        raise FileNotFoundError(f"{uri}: no files to hash")
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def data_digest(record: Mapping[str, Any], name: str = "dataset") -> str | None:
    """A single sha256 for all files of the input `name` (the registry's `data_sha256` tag)."""
    entries = sorted(
        (e["uri"].rsplit("/", 1)[-1], e["sha256"]) for e in record.get("inputs", []) if e.get("name") == name
    )
    if not entries:
        return None
    if len(entries) == 1:
        return entries[0][1]
    return hashlib.sha256("".join(f"{f}\0{s}\n" for f, s in entries).encode()).hexdigest()


# ── facts about the code and the run ───────────────────────────────────────────────────────────


def git_commit() -> str | None:
    """`git rev-parse HEAD` of the checkout amft_lib runs from; else $AMFT_GIT_COMMIT (set at image
    build time, where there is no .git); else None. Read-only; never fails the caller."""
    here = Path(__file__).resolve().parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
        sha = out.stdout.strip()
        if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", sha):
            return sha
    return os.environ.get("AMFT_GIT_COMMIT") or None


def image_digests(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Image digests the pipeline knows, from ``AMFT_IMAGE_DIGEST_<NAME>`` variables (set by the
    pipeline from the compiled images): ``AMFT_IMAGE_DIGEST_CPU=sha256:…`` → ``{"cpu": "sha256:…"}``."""
    env = os.environ if environ is None else environ
    prefix = "AMFT_IMAGE_DIGEST_"
    return {k[len(prefix) :].lower(): v for k, v in sorted(env.items()) if k.startswith(prefix) and v}


def canonical_hash(obj: Any) -> str:
    """sha256 of canonical JSON (cache keys); a config's hash is :func:`amft_lib.config.config_hash`."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def summarize_mu(values: Sequence[float]) -> dict[str, float | int] | None:
    """min / max / final / mean of the μ trajectory (None for an empty one)."""
    mus = [float(v) for v in values if v is not None and v == v]
    if not mus:
        return None
    return {
        "min": min(mus),
        "max": max(mus),
        "final": mus[-1],
        "mean": sum(mus) / len(mus),
        "first": mus[0],
        "n": len(mus),
    }


def _read_jsonl(uri: str) -> list[dict[str, Any]]:
    text = storage.get_bytes(uri).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def mu_trajectory(run_dir: str) -> list[float]:
    """μ before every training step and, last, after the final update: the per-step `mu` of
    `metrics.jsonl` (the audited contract) followed by the final record's."""
    with contextlib.suppress(storage.ObjectNotFoundError):
        records = _read_jsonl(storage.join(run_dir, "metrics.jsonl"))
        steps = [float(r["mu"]) for r in records if not r.get("final") and r.get("mu") is not None]
        final = [float(r["mu"]) for r in records if r.get("final") and r.get("mu") is not None]
        return steps + final[-1:]
    return []


def raw_data_summary(card: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a dataset card (`card.json`, written by `amft data prepare`) that names the raw
    data: how it was made (generated + generator config, or ingested files with their sha256)."""
    return {
        "task": card.get("task"),
        "source": card.get("source"),
        "generator": card.get("generator"),
        "inputs": list(card.get("inputs") or []),
        "splits": {k: v.get("rows") for k, v in (card.get("splits") or {}).items() if isinstance(v, Mapping)},
    }


def _raw_data_from_inputs(inputs: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    for entry in inputs:
        if entry.get("name") == "dataset" and str(entry["uri"]).endswith("/card.json"):
            with contextlib.suppress(storage.StorageError, OSError, ValueError):
                card = json.loads(storage.get_bytes(str(entry["uri"])).decode("utf-8"))
                if isinstance(card, Mapping):
                    return raw_data_summary(card)
    return None


def read_run_config(run_dir: str) -> dict[str, Any] | None:
    """The training config the trainer saved as `config.yaml` (None if absent)."""
    import yaml

    try:
        return yaml.safe_load(storage.get_bytes(storage.join(run_dir, "config.yaml")))
    except storage.ObjectNotFoundError:
        return None


def find_checkpoints(run_root: str) -> list[str]:
    """Complete checkpoints under `run_root/checkpoints/` (those with a MANIFEST.json), oldest first."""
    found = []
    for uri in storage.list_prefix(storage.join(run_root, "checkpoints")):
        if uri.endswith("/MANIFEST.json"):
            found.append(uri.rsplit("/", 1)[0])
    return sorted(found)


# ── the record ──────────────────────────────────────────────────────────────────────────────────


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return obj


def build_lineage(
    run_id: str,
    *,
    config: Any = None,
    inputs: Iterable[Mapping[str, Any]] = (),
    validation: Mapping[str, Any] | None = None,
    base_model: Mapping[str, Any] | None = None,
    warm_start: Mapping[str, Any] | None = None,
    checkpoints: Sequence[str] = (),
    mu_summary: Mapping[str, Any] | None = None,
    eval_metrics: Mapping[str, Any] | None = None,
    registry: Mapping[str, Any] | None = None,
    raw_data: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a lineage record (secrets redacted). Code facts (version, commit, images) are
    read here so every caller records them the same way.

    inputs: entries from :func:`describe_inputs` (name, uri, sha256[, bytes, group]).
    raw_data: how the dataset was made (:func:`raw_data_summary` of its card); read from the
        `card.json` among the `dataset` inputs when not given.
    base_model: ``{"id": "tiny" | hub id | path, "uri": dir (optional)}``; when `uri` is given and
        no ``sha256``, the directory's :func:`tree_sha256` is computed.
    config: a config dataclass or a plain dict; stored with its canonical hash.
    """
    import amft_lib

    config_dict = _plain(config)
    inputs = [dict(e) for e in inputs]
    base = dict(base_model) if base_model else None
    if base and base.get("uri") and not base.get("sha256"):
        base["sha256"] = tree_sha256(str(base["uri"]))
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "pipeline_version": amft_lib.__version__,
        "git_commit": git_commit(),
        "image_digests": image_digests(),
        "config": config_dict,
        "config_hash": config_hash(config_dict) if config_dict is not None else None,
        "inputs": inputs,
        "raw_data": dict(raw_data) if raw_data is not None else _raw_data_from_inputs(inputs),
        "validation": dict(validation) if validation is not None else None,
        "base_model": base,
        "warm_start": dict(warm_start) if warm_start is not None else None,
        "checkpoints": list(checkpoints),
        "mu_summary": dict(mu_summary) if mu_summary is not None else None,
        "eval": dict(eval_metrics) if eval_metrics is not None else None,
        "registry": dict(registry) if registry is not None else None,
    }
    for entry in record["inputs"]:
        missing = {"name", "uri", "sha256"} - set(entry)
        if missing:
            raise ValueError(f"lineage input {entry!r}: missing {', '.join(sorted(missing))}")
    return redact(record)


def write_lineage(record: Mapping[str, Any], uri: str) -> str:
    """Write the record atomically as stable JSON (redacted once more on the way out); returns `uri`."""
    blob = json.dumps(redact(dict(record)), indent=2, sort_keys=True, allow_nan=False) + "\n"
    storage.put_bytes(uri, blob.encode("utf-8"))
    return uri


def read_lineage(uri: str) -> dict[str, Any]:
    """Read a record written by :func:`write_lineage` (a run root or the file itself)."""
    if not uri.endswith(".json"):
        uri = storage.join(uri, LINEAGE_FILE)
    try:
        record = json.loads(storage.get_bytes(uri).decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{uri}: not a JSON lineage record ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(record, dict) or "run_id" not in record:
        raise ValueError(f"{uri}: not a lineage record (no run_id)")
    return record


# ── verification ────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Mismatch:
    """One input that no longer matches the record. `problem` is ``sha256 mismatch``, ``missing``,
    ``unexpected file`` or ``unreadable: …``."""

    name: str
    uri: str
    problem: str
    expected: str | None = None
    actual: str | None = None

    def __str__(self) -> str:
        text = f"{self.name} {self.uri}: {self.problem}"
        if self.expected or self.actual:
            text += f" (expected sha256 {self.expected or '-'}, got {self.actual or '-'})"
        return text


def verify_lineage(record: Mapping[str, Any]) -> list[Mismatch]:
    """Re-read every recorded input (and the base model folder, when it has a URI) and compare sha256.

    Also lists each input folder again: a file that appeared in it since would be read by the next
    `read_rows` and change the data without changing any recorded hash.
    """
    problems: list[Mismatch] = []
    groups: dict[str, tuple[str, set[str]]] = {}
    for entry in record.get("inputs", []):
        name, uri, expected = entry["name"], entry["uri"], entry["sha256"]
        if entry.get("group"):
            groups.setdefault(entry["group"], (name, set()))[1].add(uri)
        try:
            actual, _ = sha256_uri(uri)
        except (storage.ObjectNotFoundError, FileNotFoundError):
            problems.append(Mismatch(name, uri, "missing", expected, None))
            continue
        except (storage.StorageError, OSError) as exc:
            problems.append(Mismatch(name, uri, f"unreadable: {redact_text(str(exc))}"))
            continue
        if actual != expected:
            problems.append(Mismatch(name, uri, "sha256 mismatch", expected, actual))
    for group, (name, known) in groups.items():
        try:
            present = set(storage.list_prefix(group))
        except (storage.StorageError, OSError) as exc:
            problems.append(Mismatch(name, group, f"unreadable: {redact_text(str(exc))}"))
            continue
        problems.extend(Mismatch(name, uri, "unexpected file") for uri in sorted(present - known))
    base = record.get("base_model") or {}
    if base.get("uri") and base.get("sha256"):
        try:
            actual = tree_sha256(str(base["uri"]))
        except (storage.StorageError, OSError) as exc:
            problems.append(Mismatch("base_model", str(base["uri"]), f"unreadable: {redact_text(str(exc))}"))
        else:
            if actual != base["sha256"]:
                problems.append(Mismatch("base_model", str(base["uri"]), "sha256 mismatch", base["sha256"], actual))
    return problems


# ── printing ────────────────────────────────────────────────────────────────────────────────────


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _kv(mapping: Mapping[str, Any] | None, limit: int = 8) -> str:
    if not mapping:
        return "-"
    items = [(k, v) for k, v in mapping.items() if not isinstance(v, Mapping | list)]
    text = ", ".join(f"{k}={_fmt(v)}" for k, v in items[:limit])
    return text + (", …" if len(items) > limit else "")


def format_chain(record: Mapping[str, Any], model: Mapping[str, Any] | None = None) -> str:
    """The lineage as text, from the registered model back to the raw data (what `amft lineage`
    prints). `model` adds the registry's view (name, version, aliases, source)."""
    lines = []
    reg = dict(record.get("registry") or {})
    if model:
        reg.update({k: v for k, v in model.items() if v is not None})
    if reg:
        aliases = ", ".join(f"@{a}" for a in reg.get("aliases", []) or [])
        lines.append(f"model       {reg.get('name', '?')} version {reg.get('version', '?')} {aliases}".rstrip())
        if reg.get("source"):
            lines.append(f"            source {reg['source']}")
    lines.append(f"run         {record.get('run_id')} (created {record.get('created_at', '?')})")
    ev = record.get("eval") or {}
    if ev:
        verdict = "blessed" if ev.get("blessed") else "not blessed"
        reason = str(ev.get("reason") or verdict)  # evaluate's reasons start with the verdict already
        lines.append(f"  ↑ eval        {reason if reason.startswith(verdict) else f'{verdict}: {reason}'}")
        for split in ("test_id", "test_ood"):
            if isinstance(ev.get(split), Mapping):
                m = ev[split]
                lines.append(
                    f"                {split}: accuracy={_fmt(m.get('accuracy'))} pass@{m.get('k', 'k')}="
                    f"{_fmt(m.get('pass_at_k'))} n={m.get('n')} format_errors={_fmt(m.get('format_error_rate'))}"
                )
    cks = record.get("checkpoints") or []
    mu = record.get("mu_summary")
    lines.append(
        f"  ↑ train       config sha256 {record.get('config_hash') or '-'}; μ {_kv(mu)}; "
        f"{len(cks)} checkpoint(s){f', last {cks[-1]}' if cks else ''}"
    )
    lines.append(f"  ↑ warm start  {_kv(record.get('warm_start'))}")
    base = record.get("base_model") or {}
    lines.append(
        f"  ↑ base model  {base.get('id', '-')}"
        + (f" ({base['uri']})" if base.get("uri") else "")
        + (f" sha256 {base['sha256']}" if base.get("sha256") else "")
    )
    val = record.get("validation")
    if val is not None:
        passed = val.get("passed", val.get("success"))
        lines.append(f"  ↑ validation  {'passed' if passed else 'FAILED'}; {_kv(val.get('statistics') or val)}")
    else:
        lines.append("  ↑ validation  -")
    inputs = record.get("inputs") or []
    if not inputs:
        lines.append("  ↑ data        -")
    for i, entry in enumerate(inputs):
        lead = "  ↑ data        " if i == 0 else "                "
        lines.append(f"{lead}{entry['name']}: {entry['uri']} sha256 {entry['sha256']}")
    raw = record.get("raw_data")
    if raw:
        lines.append(f"  ↑ raw data    {raw.get('source', '?')} {raw.get('task') or ''}; "
                     f"generator {_kv(raw.get('generator'))}; rows per split {_kv(raw.get('splits'))}")
        lines += [f"                {_kv(item)}" for item in raw.get("inputs") or []]
    images = record.get("image_digests") or {}
    lines.append(
        f"  ↑ code        amft {record.get('pipeline_version', '?')}, git {record.get('git_commit') or 'unknown'}"
        + (f", images {_kv(images)}" if images else "")
    )
    return "\n".join(lines)
