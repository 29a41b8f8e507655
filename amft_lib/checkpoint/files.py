"""Resumable training checkpoints on a local folder or S3, decoupled from the trainer.

The trainer hands over plain dicts with named keys (STYLE.md §2.6) and gets them back; this module
owns the layout, integrity and retention. Layout under a run root (DESIGN.md, "S3 layout")::

    <root>/checkpoints/step-0000200/model.safetensors   model or LoRA-adapter tensors (safetensors)
                                    optimizer.pt        torch.save(optimizer.state_dict())
                                    scheduler.pt        torch.save(scheduler.state_dict())
                                    rng.pt              python/numpy/torch RNG states, tensors only
                                    controller.json     μ controller state
                                    trainer_state.json  step, data cursor / sampler position, …
                                    MANIFEST.json       written LAST: sha256 + size of every file above
    <root>/checkpoints/LATEST                          "step-0000200", written after the manifest

**Complete means "has a MANIFEST.json".** Files go up first, the manifest after them, ``LATEST``
last, so a crash or an unreachable store at any point leaves either the previous state or an
incomplete folder that :func:`find_resumable` skips; ``LATEST`` never names an incomplete checkpoint.
Resuming does not trust ``LATEST``: it scans for the newest checkpoint whose manifest verifies, so a
crash between the manifest and ``LATEST`` loses nothing. ``LATEST`` is for people and tools.

**Nothing is unpickled**: tensors in safetensors, the ``.pt`` files are read with
``torch.load(weights_only=True)`` (tensors, dicts, lists, numbers, strings only), the rest is JSON.
Python's and numpy's RNG states are stored as tensors so ``rng.pt`` loads under the same rule.

**The μ trajectory** is not stored here a second time: the controller state in every checkpoint
carries its history, and the run's `metrics.jsonl` (the per-step contract, kept under
``<root>/logs/`` and cut at the checkpoint's step on resume) holds μ for every step.

**Retention** after each save: keep the ``keep_last`` newest complete checkpoints (by step), the best
one by the caller's metric (``metric_mode`` "max" or "min"; ties go to the newer), and whatever
``LATEST`` names; delete the other complete ones, manifest first so an interrupted deletion leaves an
incomplete folder, never a complete-looking one with files missing. Incomplete folders are left
alone (only a crashed save makes them; saving that step again clears it).

**Logging**: each save and each retention deletion is a DEBUG line. A run saves every N steps, and at
INFO those pairs were 80 % of the demo's log (issue 25); the loops log one line per phase or per
evaluation instead (e.g. the warm start's "checkpoints: …" at each phase's end). Warnings (corrupt
checkpoints, newer checkpoints present) stay warnings.

Single writer: call the save on one rank (rank 0) per run root. Staging goes through a local temp
dir (``$TMPDIR``; point it at a big or memory-backed disk for large models) that is removed even on
failure. Files are uploaded three at a time while a background thread hashes them.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from amft_lib import storage
from amft_lib.errors import UserError

logger = logging.getLogger(__name__)

FORMAT = "amft-checkpoint/1"
CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
MANIFEST = "MANIFEST.json"

# Named keys of a checkpoint (torchtune keeps these as constants too) → file names.
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
CONTROLLER_FILE = "controller.json"
TRAINER_FILE = "trainer_state.json"
FILES = (MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE, CONTROLLER_FILE, TRAINER_FILE)

_STEP_DIR = re.compile(r"^step-(\d{7,})$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used (incomplete, corrupt, or refused); the message names it and the fix."""


class CorruptCheckpointError(CheckpointError):
    """Missing manifest or file, sha256/size mismatch, or content that fails to load safely."""


class ConfigMismatchError(CheckpointError):
    """The newest valid checkpoint was written under a different config hash."""


class NoValidCheckpointError(CheckpointError):
    """Checkpoints exist under the run root but none verifies: restarting from step 0 would silently
    throw the run away (and retention would then delete the new checkpoints), so resume refuses."""


@dataclass
class CheckpointPayload:
    """Everything a resumed run needs, as plain dicts with named keys.

    model_state: tensors by name (full model or only the trainable/LoRA ones; saved as given).
    optimizer_state / scheduler_state: their ``state_dict()``s (tensors, numbers, strings, lists).
    controller_state: the μ controller's state as JSON (μ, its optimiser moments, H*, …).
    rng_state: from :func:`capture_rng_state`.
    trainer_state: JSON with at least the step and the data cursor / sampler position.
    """

    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    controller_state: dict[str, Any]
    rng_state: dict[str, Any]
    trainer_state: dict[str, Any]
    sharded_dir: str | None = None  # a `dcp` checkpoint: local folder of its torch.distributed.checkpoint files


# ── names ───────────────────────────────────────────────────────────────────────────────────────


def step_dir_name(step: int) -> str:
    """``step-0000200``: 7 digits so names sort by step up to 10M steps (parsing never relies on it)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:07d}"


def checkpoint_uri(root: str, step: int) -> str:
    return storage.join(root, CHECKPOINTS, step_dir_name(step))


def _parent_and_name(uri: str) -> tuple[str, str]:
    head, _, name = uri.rstrip("/").rpartition("/")
    if not storage.is_s3(uri):
        head, name = os.path.split(os.path.normpath(uri))
    return head, name


def _scan(root: str) -> dict[int, set[str]]:
    """step → names of the files present in its folder (one listing of ``checkpoints/``)."""
    base = storage.join(root, CHECKPOINTS)
    found: dict[int, set[str]] = {}
    for uri in storage.list_prefix(base):
        rel = uri[len(base) :].replace(os.sep, "/").strip("/")
        parts = rel.split("/")
        if len(parts) != 2:
            continue
        match = _STEP_DIR.match(parts[0])
        if match:
            found.setdefault(int(match.group(1)), set()).add(parts[1])
    return found


def _read_latest(root: str) -> str | None:
    uri = storage.join(root, CHECKPOINTS, LATEST)
    try:
        return storage.get_bytes(uri).decode().strip() or None
    except storage.ObjectNotFoundError:
        return None


# ── JSON helpers ────────────────────────────────────────────────────────────────────────────────


def _json_default(value: Any) -> Any:
    """Let callers pass 0-dim tensors / numpy scalars and small arrays in JSON states and records."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable; convert it before checkpointing")


def _dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(obj, default=_json_default, **kwargs)


# ── RNG ─────────────────────────────────────────────────────────────────────────────────────────


def capture_rng_state() -> dict[str, Any]:
    """Python ``random``, numpy's global RNG, torch CPU and (once CUDA is in use) every CUDA device.

    Stored as tensors and numbers only, so ``torch.load(weights_only=True)`` accepts it. numpy
    ``Generator`` objects the caller creates itself are not global state: keep their seeds in
    ``trainer_state``.
    """
    import numpy as np

    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),  # 624 words + index, all < 2**32
            "gauss_next": gauss_next,
        },
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        # Only if CUDA is already in use: get_rng_state_all() would otherwise create a context on
        # every GPU (hundreds of MB each) in a process that never meant to touch them.
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; after it the next random numbers repeat.

    CUDA states are restored for as many devices as both the checkpoint and this machine have.
    """
    import numpy as np

    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["bit_generator"],
            npy["keys"].numpy().astype(np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    cuda_states = list(state.get("cuda") or [])
    if cuda_states and torch.cuda.is_available():
        count = min(len(cuda_states), torch.cuda.device_count())
        if count < len(cuda_states):
            logger.warning("checkpoint has RNG states for %d GPUs, this machine %d", len(cuda_states), count)
        for device, cuda_state in enumerate(cuda_states[:count]):
            torch.cuda.set_rng_state(cuda_state.to(torch.uint8).cpu(), device)


# ── save ────────────────────────────────────────────────────────────────────────────────────────


def _safetensors_ready(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing memory (tied embeddings): safetensors refuses
    shared storage, so later aliases are cloned; loading gives separate but equal tensors."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"model_state[{name!r}] is {type(tensor).__name__}, expected a tensor")
        t = tensor.detach().cpu().contiguous()
        ident = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and ident in seen:
            t = t.clone()
        else:
            seen.add(ident)
        out[name] = t
    return out


def _stage(payload: CheckpointPayload, folder: str, step: int) -> None:
    from safetensors.torch import save_file

    save_file(
        _safetensors_ready(payload.model_state),
        os.path.join(folder, MODEL_FILE),
        metadata={"format": "pt", "step": str(step)},
    )
    torch.save(payload.optimizer_state, os.path.join(folder, OPTIMIZER_FILE))
    torch.save(payload.rng_state, os.path.join(folder, RNG_FILE))
    stage_states(folder, payload.scheduler_state, payload.controller_state, payload.trainer_state)


def stage_states(folder: str, scheduler_state: Mapping[str, Any], controller_state: Mapping[str, Any],
                 trainer_state: Mapping[str, Any]) -> None:
    """The small, replicated part of a checkpoint (both layouts): scheduler, μ controller, trainer state."""
    torch.save(scheduler_state, os.path.join(folder, SCHEDULER_FILE))
    for name, obj in ((CONTROLLER_FILE, controller_state), (TRAINER_FILE, trainer_state)):
        with open(os.path.join(folder, name), "w") as f:
            f.write(_dumps(obj, indent=2, sort_keys=True) + "\n")


def save_checkpoint(
    root: str,
    step: int,
    payload: CheckpointPayload,
    config_hash: str,
    *,
    keep_last: int = 2,
    metric: float | None = None,
    metric_mode: Literal["max", "min"] = "max",
) -> str:
    """Write checkpoint ``step`` under ``root`` and return its URI.

    Args:
        root: run root, local path or ``s3://bucket/prefix/runs/RUN_ID``.
        step: optimizer steps done; the folder is ``step-NNNNNNN``.
        payload: the state to save (see :class:`CheckpointPayload`).
        config_hash: hash of the training config; resuming under another hash is refused.
        keep_last: how many newest complete checkpoints retention keeps (>= 1).
        metric: this checkpoint's score for "keep the best" (e.g. validation reward); None = unscored.
        metric_mode: "max" if higher is better, "min" if lower is.

    Raises:
        storage.StorageError: the store failed (after botocore's retries). The checkpoint is then
            incomplete (no manifest) and ``LATEST`` still names the previous one.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if metric_mode not in ("max", "min"):
        raise ValueError(f"metric_mode must be 'max' or 'min', got {metric_mode!r}")
    uri = checkpoint_uri(root, step)
    present = prepare_step(root, step)

    with tempfile.TemporaryDirectory(prefix="amft-ckpt-") as staging:
        _stage(payload, staging, step)
        files = upload_and_hash(staging, uri)
    return commit_checkpoint(root, step, files, config_hash, present=present, keep_last=keep_last, metric=metric,
                             metric_mode=metric_mode)


def prepare_step(root: str, step: int) -> dict[int, set[str]]:
    """Before writing checkpoint `step`: warn about newer ones, clear a crashed or repeated save of
    this step; returns the listing `commit_checkpoint` reuses."""
    present = _scan(root)
    newer = sorted(s for s, files in present.items() if s > step and MANIFEST in files)
    if newer:
        logger.warning(
            "saving %s while newer checkpoints exist (%s); resume prefers the newest valid one. "
            "Branch from an old checkpoint into a new run root instead.",
            step_dir_name(step),
            ", ".join(step_dir_name(s) for s in newer),
        )
    if step in present:
        _clear_step(root, step, present)
    return present


def commit_checkpoint(root: str, step: int, files: Mapping[str, Mapping[str, Any]], config_hash: str, *,
                      present: dict[int, set[str]], keep_last: int = 2, metric: float | None = None,
                      metric_mode: str = "max", extra: Mapping[str, Any] | None = None) -> str:
    """The files of checkpoint `step` are uploaded (`files`: name → sha256 and size): write its
    MANIFEST, then LATEST, then apply retention. `extra` adds manifest keys (a sharded layout)."""
    uri = checkpoint_uri(root, step)
    manifest = {
        "format": FORMAT,
        "step": step,
        "config_hash": config_hash,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "files": dict(files),
        "metric": metric,
        "metric_mode": metric_mode,
        **(extra or {}),
    }
    storage.put_bytes(storage.join(uri, MANIFEST), (_dumps(manifest, indent=2) + "\n").encode())
    storage.put_bytes(storage.join(root, CHECKPOINTS, LATEST), (step_dir_name(step) + "\n").encode())
    logger.debug("saved checkpoint %s", uri)  # DEBUG: every N steps would drown the run's story; callers summarise
    complete = sorted({s for s, f in present.items() if MANIFEST in f} | {step})
    _apply_retention(root, complete, latest=step, keep_last=keep_last, metric_mode=metric_mode, known={step: metric})
    return uri


def upload_and_hash(staging: str, uri: str) -> dict[str, dict[str, Any]]:
    """Upload the staged files (3 at a time, largest first, so the small ones ride along with the
    model) while one background thread hashes them (hashlib releases the GIL): the manifest then
    costs about nothing beyond the upload itself. Returns the manifest's ``files`` entry."""
    names = [os.path.relpath(os.path.join(d, f), staging).replace(os.sep, "/")
             for d, _, fs in os.walk(staging) for f in fs]
    paths = {n: os.path.join(staging, n) for n in names}
    sizes = {n: os.path.getsize(p) for n, p in paths.items()}
    order = sorted(names, key=lambda n: -sizes[n])
    with (
        concurrent.futures.ThreadPoolExecutor(max_workers=1) as hash_pool,
        concurrent.futures.ThreadPoolExecutor(max_workers=3) as upload_pool,
    ):
        digests = {n: hash_pool.submit(storage.sha256_file, paths[n]) for n in order}
        uploads = {n: upload_pool.submit(storage.put_file, paths[n], storage.join(uri, n)) for n in order}
        try:
            for n in order:
                uploads[n].result()  # the first failure propagates; the folder stays incomplete
        except BaseException:
            for future in (*uploads.values(), *digests.values()):
                future.cancel()
            raise
        return {n: {"sha256": digests[n].result(), "size": sizes[n]} for n in sorted(names)}


def _clear_step(root: str, step: int, present: dict[int, set[str]]) -> None:
    """Make room to save ``step`` again (a crashed save, or a re-save after resume)."""
    name = step_dir_name(step)
    if _read_latest(root) == name:
        others = [s for s, files in present.items() if s != step and MANIFEST in files]
        latest_uri = storage.join(root, CHECKPOINTS, LATEST)
        if others:
            storage.put_bytes(latest_uri, (step_dir_name(max(others)) + "\n").encode())
        else:
            storage.delete(latest_uri)
    uri = checkpoint_uri(root, step)
    storage.delete(storage.join(uri, MANIFEST))  # incomplete first, then empty
    storage.delete_prefix(uri)


def _apply_retention(
    root: str,
    complete: list[int],
    *,
    latest: int,
    keep_last: int,
    metric_mode: str,
    known: Mapping[int, float | None],
) -> list[int]:
    """Delete complete checkpoints outside last-K ∪ best ∪ LATEST; returns the deleted steps.

    ``complete`` comes from the save's own listing (plus the new step), so a save in steady state
    costs no extra listing; manifests are read for their metric only when something may go.

    The last-K slots go to *valid* checkpoints only: older ones are verified (sha256 of every file)
    newest first until K - 1 pass, and a corrupt one neither takes a slot nor survives. Otherwise K
    corrupt checkpoints would hold the slots forever and each new valid save would be deleted by
    the next. Cost: when something may be deleted, re-reading up to K - 1 checkpoints per save
    (one for the default K = 2); nothing extra while fewer than K + 1 exist.
    """
    keep = set(complete[-keep_last:]) | {latest}
    if all(s in keep for s in complete):
        return []
    keep, corrupt = {latest}, set()
    for s in sorted((s for s in complete if s != latest), reverse=True):
        if len(keep) >= keep_last:
            break
        try:
            verify_checkpoint(checkpoint_uri(root, s))
        except CorruptCheckpointError as exc:
            logger.warning("retention: %s is corrupt and does not count as kept (%s)", step_dir_name(s), exc)
            corrupt.add(s)
            continue
        keep.add(s)
    scored: list[tuple[float, int]] = []
    for s in complete:
        if s in corrupt:
            continue
        if s in known:
            value = known[s]
        else:
            try:
                value = read_manifest(checkpoint_uri(root, s)).get("metric")
            except CheckpointError:
                continue
        if isinstance(value, int | float) and math.isfinite(value):
            scored.append((value if metric_mode == "max" else -value, s))
    if scored:
        keep.add(max(scored)[1])  # ties → the newer step
    deleted = []
    for s in complete:
        if s in keep:
            continue
        uri = checkpoint_uri(root, s)
        storage.delete(storage.join(uri, MANIFEST))  # incomplete first, then gone
        storage.delete_prefix(uri)
        deleted.append(s)
    if deleted:
        logger.debug("retention: deleted %s", ", ".join(step_dir_name(s) for s in deleted))
    return deleted


# ── verify and load ─────────────────────────────────────────────────────────────────────────────


def read_manifest(uri: str) -> dict[str, Any]:
    """The parsed MANIFEST.json of checkpoint ``uri``; CorruptCheckpointError if missing or malformed."""
    try:
        manifest = json.loads(storage.get_bytes(storage.join(uri, MANIFEST)))
    except storage.ObjectNotFoundError:
        raise CorruptCheckpointError(f"{uri} is incomplete: no {MANIFEST} (an interrupted save)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{uri}/{MANIFEST} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise CorruptCheckpointError(f"{uri}/{MANIFEST} is not an {FORMAT} manifest")
    files = manifest.get("files")
    if manifest.get("format") != FORMAT or not isinstance(files, dict) or not isinstance(manifest.get("step"), int):
        raise CorruptCheckpointError(f"{uri}/{MANIFEST} is not an {FORMAT} manifest")
    missing = [n for n in required_files(manifest) if n not in files]
    if missing:
        raise CorruptCheckpointError(f"{uri}/{MANIFEST} does not list {', '.join(missing)}")
    _, name = _parent_and_name(uri)
    if _STEP_DIR.match(name) and int(name[5:]) != manifest["step"]:
        raise CorruptCheckpointError(f"{uri}/{MANIFEST} says step {manifest['step']}, the folder says {name}")
    return manifest


SHARDED_MARK = "dcp/.metadata"
SHARDED = "dcp"  # manifest "layout" of a torchrun checkpoint: torch.distributed.checkpoint files + per-rank RNG
DCP_DIR = "dcp"


def rng_file(rank: int) -> str:
    return f"rng-{rank:05d}.pt"


def required_files(manifest: Mapping[str, Any]) -> list[str]:
    """The files a complete checkpoint of this manifest's layout has (beyond DCP's own shard files)."""
    if manifest.get("layout") != SHARDED:
        return list(FILES)
    world = int(manifest.get("world_size", 0))
    return [SCHEDULER_FILE, CONTROLLER_FILE, TRAINER_FILE, f"{DCP_DIR}/.metadata",
            *(rng_file(r) for r in range(world))]


def _fetch_verified(uri: str, manifest: Mapping[str, Any], staging: str) -> dict[str, str]:
    """Local paths of the checkpoint's files, each checked against the manifest's size and sha256.

    S3 files are downloaded into ``staging`` (3 at a time; each download hashes as it goes); local
    ones are checked in place.
    """
    names = sorted(manifest["files"])
    if storage.is_s3(uri):
        for n in names:
            os.makedirs(os.path.dirname(os.path.join(staging, n)), exist_ok=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
            futures = {
                n: pool.submit(_fetch_one, uri, n, manifest["files"][n], os.path.join(staging, n)) for n in names
            }
            try:
                return {n: futures[n].result() for n in names}
            except BaseException:
                for future in futures.values():
                    future.cancel()
                raise
    return {n: _check_local(uri, n, manifest["files"][n]) for n in names}


def _fetch_one(uri: str, name: str, entry: Mapping[str, Any], path: str) -> str:
    src = storage.join(uri, name)
    try:
        storage.get_file(src, path, expected_sha256=entry["sha256"])
    except storage.ObjectNotFoundError as exc:
        raise CorruptCheckpointError(f"{uri} is missing {name}: {exc}") from None
    except storage.IntegrityError as exc:
        raise CorruptCheckpointError(str(exc)) from None
    return path


def _check_local(uri: str, name: str, entry: Mapping[str, Any]) -> str:
    path = storage.join(uri, name)
    if not os.path.isfile(path):
        raise CorruptCheckpointError(f"{uri} is missing {name}")
    size = os.path.getsize(path)
    if size != entry["size"]:
        raise CorruptCheckpointError(f"{path} has {size} bytes, the manifest says {entry['size']} (truncated?)")
    actual = storage.sha256_file(path)
    if actual != entry["sha256"]:
        raise CorruptCheckpointError(f"sha256 mismatch for {path}: expected {entry['sha256']}, got {actual}")
    return path


def _load_files(uri: str, paths: Mapping[str, str]) -> CheckpointPayload:
    from safetensors.torch import load_file

    def pt(name: str) -> Any:
        try:
            return torch.load(paths[name], map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for anything beyond plain tensors/containers
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CorruptCheckpointError(f"{uri}/{name} refused by torch.load(weights_only=True): {first}") from None

    def js(name: str) -> Any:
        with open(paths[name]) as f:
            return json.load(f)

    if SHARDED_MARK in paths:  # a torchrun checkpoint: model and optimizer stay DCP files until the trainer loads them
        ranks = sorted(n for n in paths if n.startswith("rng-"))
        return CheckpointPayload(
            model_state={}, optimizer_state={}, scheduler_state=pt(SCHEDULER_FILE),
            controller_state=js(CONTROLLER_FILE),
            rng_state={"per_rank": [pt(n) for n in ranks]}, trainer_state=js(TRAINER_FILE),
            sharded_dir=os.path.dirname(paths[f"{DCP_DIR}/.metadata"]),
        )
    try:
        model_state = load_file(paths[MODEL_FILE])
    except Exception as exc:  # SafetensorError: a header that does not parse
        raise CorruptCheckpointError(f"{uri}/{MODEL_FILE} is not a readable safetensors file: {exc}") from None
    return CheckpointPayload(
        model_state=model_state,
        optimizer_state=pt(OPTIMIZER_FILE),
        scheduler_state=pt(SCHEDULER_FILE),
        controller_state=js(CONTROLLER_FILE),
        rng_state=pt(RNG_FILE),
        trainer_state=js(TRAINER_FILE),
    )


def load_checkpoint(uri: str) -> tuple[int, CheckpointPayload]:
    """Verify every file of checkpoint ``uri`` against its manifest, then load it (tensors on CPU).

    Raises CorruptCheckpointError if anything is missing, truncated, altered or unsafe to load, and
    CheckpointError when nothing at all exists at ``uri`` (a mistyped ``--resume``).
    """
    if not (storage.exists(storage.join(uri, MANIFEST)) or storage.list_prefix(uri)):
        raise CheckpointError(
            f"{uri}: no checkpoint there; give a checkpoints/step-NNNNNNN folder, or --resume auto with "
            "--checkpoint-root"
        )
    manifest = read_manifest(uri)
    return manifest["step"], _fetch_and_load(uri, manifest, [])


def _fetch_and_load(uri: str, manifest: dict[str, Any], staging_dirs: list[str]) -> CheckpointPayload:
    """Download (S3) and verify, then load. Staging folders go into `staging_dirs` for the caller to
    remove — except a sharded checkpoint's, whose DCP files the trainer still has to read: its
    `payload.sharded_dir` is then the caller's to remove (`release`)."""
    staging = tempfile.mkdtemp(prefix="amft-ckpt-")
    try:
        payload = _load_files(uri, _fetch_verified(uri, manifest, staging))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if payload.sharded_dir is None or not payload.sharded_dir.startswith(staging):
        staging_dirs.append(staging)
        for d in staging_dirs:
            shutil.rmtree(d, ignore_errors=True)
        staging_dirs.clear()
    return payload


def release(payload: CheckpointPayload) -> None:
    """Remove the staged download of a sharded checkpoint once its DCP files are loaded."""
    tmp = tempfile.gettempdir()
    if payload.sharded_dir and os.path.basename(os.path.dirname(payload.sharded_dir)).startswith("amft-ckpt-") \
            and payload.sharded_dir.startswith(tmp):
        shutil.rmtree(os.path.dirname(payload.sharded_dir), ignore_errors=True)


def verify_checkpoint(uri: str) -> dict[str, Any]:
    """Check every file's size and sha256; returns the manifest or raises CorruptCheckpointError."""
    manifest = read_manifest(uri)
    with tempfile.TemporaryDirectory(prefix="amft-ckpt-") as staging:
        _fetch_verified(uri, manifest, staging)
    return manifest


def _newest_valid(
    root: str, config_hash: str, force: bool, use: Callable[[str, dict[str, Any]], Any],
    skipped: list[tuple[int, bool, str]] | None = None,
) -> tuple[str, dict[str, Any], Any] | None:
    """Walk checkpoints newest first; skip (with a warning) incomplete or corrupt ones; apply the
    config-hash rule to the first valid one; return (uri, manifest, use(uri, manifest)).

    ``skipped`` collects (step, had a manifest, reason) of every checkpoint passed over."""
    for step, files in sorted(_scan(root).items(), reverse=True):
        uri = checkpoint_uri(root, step)
        try:
            manifest = read_manifest(uri)
            result = use(uri, manifest)
        except CorruptCheckpointError as exc:
            logger.warning("skipping checkpoint %s: %s", step_dir_name(step), exc)
            if skipped is not None:
                skipped.append((step, MANIFEST in files, str(exc)))
            continue
        found = manifest.get("config_hash")
        if found != config_hash:
            if not force:
                raise ConfigMismatchError(
                    f"newest valid checkpoint {uri} was written with config hash {found}, this run has "
                    f"{config_hash}; resume with force=True (the run's config wins) or start a new run root"
                )
            logger.warning(
                "resuming from %s despite a config hash mismatch (checkpoint %s, run %s): the run's config wins",
                uri,
                found,
                config_hash,
            )
        return uri, manifest, result
    return None


def find_resumable(root: str, config_hash: str, *, force: bool = False) -> str | None:
    """URI of the newest checkpoint under ``root`` whose files all match its manifest, or None.

    Incomplete (no manifest) and corrupt (missing, truncated or altered file) checkpoints are skipped
    with a warning. A different config hash raises ConfigMismatchError unless ``force`` (then a
    warning says the run's config wins). This downloads S3 checkpoints to hash them; to verify and
    load in one pass use :func:`resume`.
    """

    def check(uri: str, manifest: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="amft-ckpt-") as staging:
            _fetch_verified(uri, manifest, staging)

    found = _newest_valid(root, config_hash, force, check)
    return None if found is None else found[0]


def resume(
    root: str, config_hash: str, *, force: bool = False, force_restart: bool = False
) -> tuple[str, int, CheckpointPayload] | None:
    """:func:`find_resumable` + :func:`load_checkpoint` with one download: (uri, step, payload) or None.

    None means "start from step 0" and is returned only when there is nothing to lose: no
    checkpoint at all, or only incomplete ones (a crash during the first save). When complete
    checkpoints exist but every one is corrupt, NoValidCheckpointError names each and its reason,
    unless ``force_restart`` (then a warning, and None).
    """
    staging_dirs: list[str] = []
    skipped: list[tuple[int, bool, str]] = []
    try:
        found = _newest_valid(root, config_hash, force, lambda u, m: _fetch_and_load(u, m, staging_dirs), skipped)
    finally:
        for staging in staging_dirs:
            shutil.rmtree(staging, ignore_errors=True)
    if found is None:
        corrupt = [(step, reason) for step, complete, reason in skipped if complete]
        if corrupt:
            detail = "; ".join(f"{step_dir_name(step)}: {reason}" for step, reason in corrupt[:3])
            more = f" (and {len(corrupt) - 3} more)" if len(corrupt) > 3 else ""
            if not force_restart:
                raise NoValidCheckpointError(
                    f"{storage.join(root, CHECKPOINTS)}: all {len(corrupt)} complete checkpoint(s) are corrupt, "
                    f"refusing to restart from step 0: {detail}{more}; repair or remove them, or pass "
                    "--force-restart to train from scratch"
                )
            logger.warning("every checkpoint under %s is corrupt (%s); force_restart: starting from step 0",
                           root, detail)
        return None
    uri, manifest, payload = found
    return uri, manifest["step"], payload


def list_checkpoints(root: str) -> list[tuple[int, str, bool]]:
    """(step, uri, complete) for every step folder under ``root``, oldest first (no verification)."""
    return [
        (step, checkpoint_uri(root, step), MANIFEST in files) for step, files in sorted(_scan(root).items())
    ]
