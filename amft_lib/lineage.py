"""The lineage record: what an auditor needs to trace a registered model back to its raw data.

Why our own record (and not KFP's lineage graph): KFP is removing MLMD and its Lineage Explorer
(kubeflow/pipelines#11760, #12645), so lineage must live with the model. We write one JSON file per
pipeline run (`runs/RUN_ID/lineage.json`, DESIGN.md "S3 layout"), tag the registered model version
with its URI, and keep a copy in the registry run's artifacts.

What a record holds (DESIGN.md "Lineage record"): run id, pipeline version, git commit, image
digests, config and its hash, input URIs with sha256, the validation result, base model id + hash,
warm-start stats, checkpoint URIs, the μ trajectory summary, eval metrics, registry name/version.

Rules this module enforces:
- **Verifiable.** Every input (the data) and every object that makes the model (its files in the run
  root, the warm-start model, the configs, the evaluation metrics, and at registration the
  registry's copy) is recorded per file with its sha256 and size; :func:`verify_lineage` re-reads
  each one (local or s3:// through :mod:`amft_lib.storage`) and reports what changed, went missing
  or appeared since. A folder's listing counts too: a file added next to a dataset is reported.
- **Bounded.** Verification reads at most the recorded size (+1 byte) of each file and refuses a
  local path that is not a regular file (FIFO, device, a symlink leaving its folder): a record
  cannot make the verifier hang on /dev/zero or fill a disk.
- **Signed (optional).** With ``AMFT_LINEAGE_SECRET_KEY`` set (the pipeline mounts it from a
  Kubernetes secret), :func:`write_lineage` adds an HMAC-SHA256 over the canonical record; the
  audit (:func:`audit_lineage`) checks it. README "Lineage and audit" says what it does and does
  not prove.
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
import hmac
import json
import logging
import os
import re
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amft_lib import storage
from amft_lib.config import config_hash
from amft_lib.errors import UserError

# The scrubber lives in amft_lib.redact (one copy for storage errors, the CLI and records); these
# names stay importable from here for the modules that use them as lineage.redact_text etc.
from amft_lib.redact import REDACTED as REDACTED
from amft_lib.redact import redact as redact
from amft_lib.redact import redact_text as redact_text
from amft_lib.redact import secret_values as secret_values

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: `run_root`, `objects` (the model's files, configs, metrics, registry copy), `signature`
LINEAGE_FILE = "lineage.json"
SIGNING_KEY_ENV = "AMFT_LINEAGE_SECRET_KEY"  # a secret-looking name: the scrubber replaces its value everywhere
SIGNATURE_ALG = "hmac-sha256"
# What a record must name for `--verify` to say the model is proven (besides a non-empty data list).
REQUIRED_OBJECTS = ("model", "warm_start_model", "train_config", "eval_metrics")
REGISTRY_OBJECT = "registry_model"  # the registered version's MLflow artifacts, added at registration
_CHUNK = 1 << 20
MAX_RECORD_BYTES = 64 << 20  # a record lists files, not their contents: megabytes at most
_METRICS_MAX = 16 << 20  # an evaluation's metrics.json is kilobytes; the audit parses no more than this
_IN_MEMORY = 8 << 20  # S3 objects up to this size are hashed from memory


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


class UnsafeObjectError(UserError, OSError):
    """A path lineage will not read: not a regular file (FIFO, device, socket), a symlink leaving
    its folder, or more bytes than the record says. Reading such a thing is how a record (or a model
    directory) makes a hash hang on /dev/zero or fill a disk."""


class SizeExceededError(UnsafeObjectError):
    """More bytes than the record says: a changed file, not read further than that."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def _regular_path(path: str, inside: str | None) -> str:
    """`path` when it is a regular file; a symlink only when it resolves inside the folder `inside`
    (to the resolved path). Anything else raises :class:`UnsafeObjectError` before it is opened."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(path)
        root = os.path.realpath(inside) if inside else None
        if root is None or os.path.commonpath([root, target]) != root:
            raise UnsafeObjectError(f"a symlink to {target}, outside its folder")
        path, st = target, os.stat(target)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeObjectError(f"{_kind(st.st_mode)}, not a regular file")
    return path


def _open_regular(path: str) -> Any:
    """Open a file :func:`_regular_path` accepted, unbuffered. O_NONBLOCK|O_NOFOLLOW and the fstat
    catch a FIFO or link swapped in after the lstat (opening a FIFO would block)."""
    f = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)), "rb", buffering=0)
    mode = os.fstat(f.fileno()).st_mode
    if not stat.S_ISREG(mode):
        f.close()
        raise UnsafeObjectError(f"{_kind(mode)}, not a regular file")
    return f


def _hash_local(path: str, limit: int | None) -> tuple[str, int]:
    """Stream-hash a regular local file, reading at most `limit` + 1 bytes (one more than allowed
    is enough to know it grew)."""
    with _open_regular(path) as f:
        digest, size = hashlib.sha256(), 0
        while chunk := f.read(_CHUNK if limit is None else min(_CHUNK, limit + 1 - size)):
            digest.update(chunk)
            size += len(chunk)
            if limit is not None and size > limit:
                raise SizeExceededError(f"more than the recorded {limit} bytes")
        return digest.hexdigest(), size


def _s3_size(uri: str) -> int:
    """Size of one S3 object from its folder's listing (no read of the object itself)."""
    parent = uri.rsplit("/", 1)[0]
    for found, size, _ in storage.list_objects(parent):
        if found == uri:
            return size
    raise storage.ObjectNotFoundError(f"read {uri} failed: no such object", uri=uri, code="NoSuchKey")


def hash_object(uri: str, *, limit: int | None = None, inside: str | None = None,
                size: int | None = None) -> tuple[str, int]:
    """(sha256, bytes) of one local file or S3 object, refusing what is not a regular file and
    reading at most `limit` (+1) bytes. An S3 object larger than `limit` (by its listed `size`, or a
    listing of its folder) is not downloaded; a smaller one is hashed from memory (up to 8 MiB) or
    streamed through a temp file."""
    if not storage.is_s3(uri):
        return _hash_local(_regular_path(_local_path(uri), inside), limit)
    listed = _s3_size(uri) if size is None else size
    if limit is not None and listed > limit:
        raise SizeExceededError(f"{listed} bytes, more than the recorded {limit}")
    if listed <= _IN_MEMORY:  # configs, tokenizers, metrics: one GET, no temp file
        data = storage.get_bytes(uri)
        if limit is not None and len(data) > limit:
            raise SizeExceededError(f"{len(data)} bytes, more than the recorded {limit}")
        return hashlib.sha256(data).hexdigest(), len(data)
    with tempfile.TemporaryDirectory(prefix="amft-sha-") as tmp:
        local = os.path.join(tmp, "object")
        storage.get_file(uri, local)
        return _hash_local(local, limit)


def read_bounded(uri: str, limit: int) -> bytes:
    """The bytes of one small local file or S3 object, refusing anything over `limit` bytes or not
    a regular file (what the audit parses, e.g. the evaluation metrics)."""
    if storage.is_s3(uri):
        if _s3_size(uri) > limit:
            raise UnsafeObjectError(f"{uri}: more than {limit} bytes")
        return storage.get_bytes(uri)
    try:
        path = _regular_path(_local_path(uri), None)
    except FileNotFoundError:
        raise storage.ObjectNotFoundError(f"read {uri} failed: no such file", uri=uri, code="NoSuchKey") from None
    with _open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnsafeObjectError(f"{uri}: more than {limit} bytes")
    return data


def _is_folder(uri: str) -> bool:
    if storage.is_s3(uri):
        return not storage.exists(uri)
    return os.path.isdir(_local_path(uri))


def describe_inputs(name: str, uri: str) -> list[dict[str, Any]]:
    """One record entry per file of an input: ``{name, uri, sha256, bytes}`` plus ``group`` (the
    folder URI) and ``path`` (relative to it) when `uri` is a folder, so verification can also notice
    files added to it and compare a copy of the folder elsewhere (the registry's) path by path.
    A FIFO, device or symlink out of the folder raises :class:`UnsafeObjectError` naming the file."""
    uri = str(uri)
    if not _is_folder(uri):
        sha, size = _hash_named(name, uri, None)
        return [{"name": name, "uri": uri, "sha256": sha, "bytes": size}]
    files = storage.list_objects(uri)
    if not files:
        raise FileNotFoundError(f"input {name!r}: {uri} is empty or does not exist")
    base = uri.rstrip("/")
    entries = []
    for file_uri, listed, _ in files:
        sha, size = _hash_named(name, file_uri, base, listed)
        entries.append({"name": name, "uri": file_uri, "sha256": sha, "bytes": size, "group": uri,
                        "path": file_uri[len(base):].lstrip("/").replace(os.sep, "/")})
    return entries


def _hash_named(name: str, uri: str, inside: str | None, size: int | None = None) -> tuple[str, int]:
    try:
        return hash_object(uri, inside=inside, size=size)
    except UnsafeObjectError as exc:
        raise UnsafeObjectError(f"{name} {uri}: {exc}") from None


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
    objects: Iterable[Mapping[str, Any]] = (),
    run_root: str | None = None,
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

    inputs: the data: entries from :func:`describe_inputs` (name, uri, sha256[, bytes, group, path]).
    objects: what makes the model, same entries: its files (`model`), the warm-start model, the
        training and warm-start configs, the evaluation metrics file (REQUIRED_OBJECTS); the
        registry's copy is added at registration (:data:`REGISTRY_OBJECT`).
    raw_data: how the dataset was made (:func:`raw_data_summary` of its card); read from the
        `card.json` among the `dataset` inputs when not given.
    base_model: ``{"id": "tiny" | hub id | path, "uri": dir (optional)}``; when `uri` is given and
        no ``sha256``, the directory's :func:`tree_sha256` is computed.
    config: a config dataclass or a plain dict; stored with its canonical hash.
    """
    import amft_lib

    config_dict = _plain(config)
    inputs = [dict(e) for e in inputs]
    objects = [dict(e) for e in objects]
    base = dict(base_model) if base_model else None
    if base and base.get("uri") and not base.get("sha256"):
        base["sha256"] = tree_sha256(str(base["uri"]))
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "run_root": run_root,
        "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "pipeline_version": amft_lib.__version__,
        "git_commit": git_commit(),
        "image_digests": image_digests(),
        "config": config_dict,
        "config_hash": config_hash(config_dict) if config_dict is not None else None,
        "inputs": inputs,
        "objects": objects,
        "raw_data": dict(raw_data) if raw_data is not None else _raw_data_from_inputs(inputs),
        "validation": dict(validation) if validation is not None else None,
        "base_model": base,
        "warm_start": dict(warm_start) if warm_start is not None else None,
        "checkpoints": list(checkpoints),
        "mu_summary": dict(mu_summary) if mu_summary is not None else None,
        "eval": dict(eval_metrics) if eval_metrics is not None else None,
        "registry": dict(registry) if registry is not None else None,
    }
    for entry in [*record["inputs"], *record["objects"]]:
        missing = {"name", "uri", "sha256"} - set(entry)
        if missing:
            raise ValueError(f"lineage input {entry!r}: missing {', '.join(sorted(missing))}")
    return redact(record)


def write_lineage(record: Mapping[str, Any], uri: str) -> str:
    """Write the record atomically as stable JSON (redacted once more on the way out); returns `uri`.

    Every write re-signs: with a key in $AMFT_LINEAGE_SECRET_KEY the record gets a fresh signature
    over what is written (so the registry's name/version, added later, are covered too); without
    one an old signature is dropped rather than left to fail against the changed record.
    """
    out = redact(dict(record))
    out.pop("signature", None)
    key = signing_key()
    if key is not None:
        out["signature"] = sign_record(out, key)
    blob = json.dumps(out, indent=2, sort_keys=True, allow_nan=False) + "\n"
    storage.put_bytes(uri, blob.encode("utf-8"))
    return uri


# ── signature ───────────────────────────────────────────────────────────────────────────────────


class LineageKeyError(UserError, ValueError):
    """The signing key in the environment is unusable (too short to be a secret)."""


MIN_KEY_CHARS = 32


def signing_key(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The HMAC key from $AMFT_LINEAGE_SECRET_KEY (None when unset or empty). A short key is refused:
    it would be guessable, and the log scrubber does not replace values under 6 characters."""
    value = (os.environ if environ is None else environ).get(SIGNING_KEY_ENV, "")
    if not value:
        return None
    if len(value) < MIN_KEY_CHARS:
        raise LineageKeyError(f"{SIGNING_KEY_ENV}: shorter than {MIN_KEY_CHARS} characters; use e.g. "
                              "`openssl rand -hex 32`")
    return value.encode("utf-8")


def canonical_bytes(record: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: the record without its `signature`, as canonical JSON
    (sorted keys, no whitespace, ASCII): the same for every reader, whatever the file's layout."""
    body = {k: v for k, v in record.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def key_id(key: bytes) -> str:
    """A short name for a key that does not reveal it (an HMAC of a fixed label): tells a verifier
    with the wrong key apart from a record changed after signing."""
    return hmac.new(key, b"amft lineage key id", hashlib.sha256).hexdigest()[:16]


def sign_record(record: Mapping[str, Any], key: bytes) -> dict[str, str]:
    """``{alg, key_id, hmac}``: HMAC-SHA256 of :func:`canonical_bytes`."""
    mac = hmac.new(key, canonical_bytes(record), hashlib.sha256).hexdigest()
    return {"alg": SIGNATURE_ALG, "key_id": key_id(key), "hmac": mac}


def check_signature(record: Mapping[str, Any], key: bytes | None) -> tuple[str, str | None]:
    """(status for the summary line, problem or None). With a key, a record must carry a valid
    signature: an attacker who rewrites the record would otherwise simply delete it."""
    sig = record.get("signature")
    if not sig:
        if key is not None:
            return "unsigned", f"missing: the record is unsigned but {SIGNING_KEY_ENV} is set"
        return "unsigned", None
    if key is None:
        return f"signed (not checked: no {SIGNING_KEY_ENV})", None
    if not isinstance(sig, Mapping) or sig.get("alg") != SIGNATURE_ALG or not isinstance(sig.get("hmac"), str):
        return "INVALID", f"mismatch: not an {SIGNATURE_ALG} signature"
    ours = key_id(key)
    if hmac.compare_digest(sign_record(record, key)["hmac"], sig["hmac"]):
        return f"valid (key id {ours})", None
    if sig.get("key_id") != ours:
        return "INVALID", f"mismatch: signed with another key (key id {sig.get('key_id')}, ours {ours})"
    return "INVALID", "mismatch: the record was changed after it was signed"


def read_lineage(uri: str) -> dict[str, Any]:
    """Read a record written by :func:`write_lineage` (a run root or the file itself)."""
    if not uri.endswith(".json"):
        uri = storage.join(uri, LINEAGE_FILE)
    return parse_lineage(read_bounded(uri, MAX_RECORD_BYTES), uri)


class LineageRecordError(UserError, ValueError):
    """A file that is not a lineage record (not JSON, not an object, no run_id)."""


def parse_lineage(blob: bytes, where: str) -> dict[str, Any]:
    """A record from its JSON bytes; `where` names it in the one-line error."""
    try:
        record = json.loads(blob.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        detail = f"{exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise LineageRecordError(f"{where}: not a JSON lineage record ({detail})") from None
    if not isinstance(record, dict) or "run_id" not in record:
        raise LineageRecordError(f"{where}: not a lineage record (no run_id)")
    return record


# ── verification ────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Mismatch:
    """One thing that no longer matches the record. `problem` is ``sha256 mismatch``, ``missing``,
    ``unexpected file``, ``not recorded``, ``refused: …``, ``unreadable: …`` or a metric/signature
    difference spelled out."""

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


@dataclass
class Audit:
    """What :func:`audit_lineage` checked (objects by name, files, bytes read) and found."""

    mismatches: list[Mismatch] = field(default_factory=list)
    objects: set[str] = field(default_factory=set)
    files: int = 0
    bytes: int = 0
    signature: str = "unsigned"

    def summary(self) -> str:
        return (f"{len(self.objects)} object(s), {self.files} file(s), {self.bytes} bytes re-hashed; "
                f"signature {self.signature}")


def _check_entry(entry: Mapping[str, Any], uri: str, inside: str | None, listed: int | None,
                 audit: Audit) -> None:
    """Re-hash one recorded file at `uri`, reading at most its recorded size (+1)."""
    name, expected = str(entry["name"]), str(entry["sha256"])
    limit = entry.get("bytes")
    limit = int(limit) if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0 else None
    try:
        actual, size = hash_object(uri, limit=limit, inside=inside, size=listed)
    except (storage.ObjectNotFoundError, FileNotFoundError):
        audit.mismatches.append(Mismatch(name, uri, "missing", expected, None))
        return
    except SizeExceededError as exc:
        audit.mismatches.append(Mismatch(name, uri, f"size mismatch: {exc} (not read further)"))
        return
    except UnsafeObjectError as exc:
        audit.mismatches.append(Mismatch(name, uri, f"refused: {exc}"))
        return
    except (storage.StorageError, OSError) as exc:
        audit.mismatches.append(Mismatch(name, uri, f"unreadable: {redact_text(str(exc))}"))
        return
    audit.files += 1
    audit.bytes += size
    if actual != expected:
        audit.mismatches.append(Mismatch(name, uri, "sha256 mismatch", expected, actual))


def _check_entries(entries: Sequence[Mapping[str, Any]], audit: Audit, base: str | None = None) -> None:
    """Re-hash `entries` (one object's or input's files) and list their folders again: a file
    added since is reported too. With `base`, the files are looked up by their relative `path`
    under `base` instead of their recorded URI (the registry copy, wherever the registry says)."""
    groups: dict[str, tuple[str, set[str]]] = {}
    located = []
    for entry in entries:
        audit.objects.add(str(entry["name"]))
        group = str(base if base is not None else entry.get("group") or "")
        uri = storage.join(base, str(entry.get("path") or "")) if base is not None else str(entry["uri"])
        if group:
            groups.setdefault(group, (str(entry["name"]), set()))[1].add(uri)
        located.append((entry, uri, group or None))
    listings: dict[str, dict[str, int]] = {}
    for group, (name, known) in groups.items():
        try:
            listings[group] = dict((u, n) for u, n, _ in storage.list_objects(group))
        except (storage.StorageError, OSError) as exc:
            audit.mismatches.append(Mismatch(name, group, f"unreadable: {redact_text(str(exc))}"))
            continue
        audit.mismatches.extend(Mismatch(name, u, "unexpected file") for u in sorted(set(listings[group]) - known))
    for entry, uri, group in located:
        listing = listings.get(group or "")
        if listing is not None and uri not in listing:
            audit.mismatches.append(Mismatch(str(entry["name"]), uri, "missing", str(entry["sha256"]), None))
            continue
        _check_entry(entry, uri, group, listing.get(uri) if listing else None, audit)


def _by_name(entries: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for entry in entries:
        out.setdefault(str(entry["name"]), []).append(entry)
    return out


def _check_base_model(record: Mapping[str, Any], audit: Audit) -> None:
    base = record.get("base_model") or {}
    if not (base.get("uri") and base.get("sha256")):
        return
    audit.objects.add("base_model")
    try:
        actual = tree_sha256(str(base["uri"]))
    except (storage.StorageError, OSError) as exc:
        audit.mismatches.append(Mismatch("base_model", str(base["uri"]), f"unreadable: {redact_text(str(exc))}"))
        return
    if actual != base["sha256"]:
        audit.mismatches.append(Mismatch("base_model", str(base["uri"]), "sha256 mismatch", base["sha256"], actual))


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _entry_problem(entry: Any, registry_copy: bool) -> str | None:
    if not isinstance(entry, Mapping):
        return "not an object"
    for key in ("name", "uri", "sha256"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            return f"no {key}"
    if not _SHA256.fullmatch(entry["sha256"]):
        return "sha256 is not 64 hex digits"
    size = entry.get("bytes")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        return "bytes is not a size"
    if registry_copy and not isinstance(entry.get("path"), str):
        return "no path"
    return None


def _well_formed(record: Mapping[str, Any], audit: Audit) -> dict[str, Any]:
    """A copy of `record` whose `inputs`, `objects`, `registry` and `base_model` have the shapes
    the checks read; each malformed part is a mismatch (a hostile record is input, not a traceback)."""
    clean = dict(record)
    for section in ("inputs", "objects"):
        entries = record.get(section) or []
        if not isinstance(entries, list):
            audit.mismatches.append(Mismatch("record", section, "malformed: not a list"))
            entries = []
        kept = []
        for i, entry in enumerate(entries):
            why = _entry_problem(entry, isinstance(entry, Mapping) and entry.get("name") == REGISTRY_OBJECT)
            if why:
                audit.mismatches.append(Mismatch("record", f"{section}[{i}]", f"malformed entry: {why}"))
            else:
                kept.append(entry)
        clean[section] = kept
    for section in ("registry", "base_model"):
        if record.get(section) is not None and not isinstance(record[section], Mapping):
            audit.mismatches.append(Mismatch("record", section, "malformed: not an object"))
            clean[section] = None
    return clean


def _check_files(record: Mapping[str, Any], audit: Audit, registry_copy: str | None = None) -> None:
    for entries in _by_name(record.get("inputs") or []).values():
        _check_entries(entries, audit)
    for name, entries in _by_name(record.get("objects") or []).items():
        _check_entries(entries, audit, registry_copy if name == REGISTRY_OBJECT else None)
    _check_base_model(record, audit)


def verify_lineage(record: Mapping[str, Any]) -> list[Mismatch]:
    """Re-read every recorded file (data, model objects, base model folder) and compare sha256 and
    size, at the URIs the record names. Also lists each recorded folder again: a file that appeared
    in it since would be read by the next `read_rows` and change the data without changing any
    recorded hash. :func:`audit_lineage` is the full check `amft lineage --verify` runs."""
    audit = Audit()
    _check_files(_well_formed(record, audit), audit)
    return audit.mismatches


def _flat(obj: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(obj, Mapping) and obj:
        for k, v in obj.items():
            _flat(v, f"{prefix}.{k}", out)
    else:
        out[prefix] = obj
    return out


def compare_metrics(recorded: Any, artifact: Any) -> list[str]:
    """One line per leaf where the record's `eval` and the evaluation artifact (metrics.json)
    differ, e.g. ``eval.test_id.accuracy: the record says 0.99, the evaluation artifact says 0.0``."""
    ours, theirs = _flat(recorded, "eval", {}), _flat(redact(artifact), "eval", {})
    return [f"{k}: the record says {ours.get(k, '(absent)')!r}, the evaluation artifact says "
            f"{theirs.get(k, '(absent)')!r}" for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]


def _check_metrics(record: Mapping[str, Any], audit: Audit, tags: Mapping[str, str]) -> None:
    """The record's eval metrics against the evaluation artifact they were read from (its bytes
    are re-hashed separately), and the registry's `amft.eval.*` tags against the same artifact."""
    entries = [e for e in record.get("objects") or [] if e.get("name") == "eval_metrics"]
    if len(entries) != 1:
        return
    uri = str(entries[0]["uri"])
    audit.objects.add("eval")
    try:
        artifact = json.loads(read_bounded(uri, max(int(entries[0].get("bytes") or 0), _METRICS_MAX)))
    except (storage.StorageError, OSError, ValueError) as exc:
        audit.mismatches.append(Mismatch("eval", uri, f"unreadable: {redact_text(str(exc))}"))
        return
    for line in compare_metrics(record.get("eval"), artifact):
        audit.mismatches.append(Mismatch("eval", uri, line))
    values = _flat(artifact, "amft.eval", {}) if isinstance(artifact, Mapping) else {}
    for tag, text in sorted(tags.items()):
        value = values.get(tag)
        if tag.startswith("amft.eval.") and isinstance(value, int | float) and not isinstance(value, bool):
            with contextlib.suppress(ValueError):
                if float(text) != float(value):
                    audit.mismatches.append(Mismatch("registry tag", tag, f"{text}, the evaluation artifact says "
                                                                          f"{values[tag]!r}"))


# The registry's copy holds the run root's model files byte for byte under these paths (MLflow's
# transformers flavour re-saves them; weights, config and generation config come out identical,
# tokenizer_config.json does not): so its record is bound to the run root's, not only to itself.
_SAME_IN_REGISTRY = ("model.safetensors", "config.json", "generation_config.json")


def _check_completeness(record: Mapping[str, Any], audit: Audit, registered: tuple[str, str] | None) -> None:
    """A record that leaves out what makes the model proves nothing about it: each required object
    must be named, the data list must not be empty, and the record must belong to the version asked."""
    if not any(e.get("name") == "dataset" for e in record.get("inputs") or []):
        audit.mismatches.append(Mismatch("inputs", "-", "empty: the record names no data files"))
    names = {str(e.get("name")) for e in record.get("objects") or []}
    need = [*REQUIRED_OBJECTS, *([REGISTRY_OBJECT] if registered else [])]
    audit.mismatches.extend(Mismatch(n, "-", "not recorded") for n in need if n not in names)
    if registered:
        reg = record.get("registry") or {}
        if (str(reg.get("name")), str(reg.get("version"))) != registered:
            audit.mismatches.append(Mismatch("registry", f"models:/{registered[0]}/{registered[1]}",
                                             f"the record belongs to {reg.get('name')} version {reg.get('version')}"))
    model = {e.get("path"): e.get("sha256") for e in record.get("objects") or [] if e.get("name") == "model"}
    for entry in record.get("objects") or []:
        path = str(entry.get("path") or "")
        if entry.get("name") == REGISTRY_OBJECT and path.startswith("model/") and path[6:] in _SAME_IN_REGISTRY \
                and path[6:] in model and model[path[6:]] != entry.get("sha256"):
            audit.mismatches.append(Mismatch(REGISTRY_OBJECT, path, f"differs from the run root's {path[6:]} in the "
                                             "record", model[path[6:]], entry.get("sha256")))


def audit_lineage(
    record: Mapping[str, Any],
    *,
    registry_copy: str | None = None,
    registered: tuple[str, str] | None = None,
    registry_tags: Mapping[str, str] | None = None,
    key: bytes | None = None,
) -> Audit:
    """Everything `amft lineage --verify` checks: the record is complete (data, model files,
    warm-start model, configs, metrics, and for a registered version its registry copy); every
    recorded file re-hashed (bounded, regular files only) at the run root and the registry's copy at
    `registry_copy` (the folder the registry names, never one the record names); the recorded eval
    metrics equal the evaluation artifact and the registry's tags; the signature, with a key."""
    audit = Audit()
    clean = _well_formed(record, audit)
    _check_completeness(clean, audit, registered)
    _check_files(clean, audit, registry_copy)
    _check_metrics(clean, audit, registry_tags or {})
    audit.signature, problem = check_signature(record, key)
    if problem:
        audit.mismatches.append(Mismatch("signature", SIGNATURE_ALG, problem))
    return audit


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


_MAPPING_PARTS = ("registry", "eval", "base_model", "validation", "raw_data", "mu_summary", "warm_start",
                  "image_digests")


def format_chain(record: Mapping[str, Any], model: Mapping[str, Any] | None = None) -> str:
    """The lineage as text, from the registered model back to the raw data (what `amft lineage`
    prints). `model` adds the registry's view (name, version, aliases, source). Parts of the wrong
    shape print as absent (`--verify` names them): a hostile record must not crash the printout."""
    record = {k: (None if k in _MAPPING_PARTS and not isinstance(v, Mapping) else v) for k, v in record.items()}
    inputs = record.get("inputs") if isinstance(record.get("inputs"), list) else []
    record["inputs"] = [e for e in inputs if isinstance(e, Mapping)]
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
        lines.append(f"{lead}{entry.get('name')}: {entry.get('uri')} sha256 {entry.get('sha256')}")
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
