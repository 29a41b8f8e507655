"""Training checkpoints: one package for how they are written, verified, loaded safely and resumed.

- `files`    — the layout on a local folder or S3, MANIFEST.json (sha256 of every file) written last,
               LATEST, retention, verification, and nothing unpickled (safetensors, weights-only `.pt`, JSON).
- `sharded`  — the torchrun layout: model and optimizer as `torch.distributed.checkpoint` shards,
               one RNG file per rank, the same manifest rules.
- `safe_dcp` — loading DCP files through an allowlisting unpickler (imported only when a sharded
               checkpoint is loaded: DCP is slow to import).
- `resume_point` — which checkpoint a run continues from (`find_resume_point`) and whether this launch may
                   (`check_world`).
- `state`    — `save_training_state` / `restore_training_state`: the one save and restore both training
               loops (trainer, warm start) call.

The names of `files` are the package's names (`from amft_lib import checkpoint; checkpoint.load_checkpoint`).
"""

from amft_lib.checkpoint.files import (
    CHECKPOINTS,
    CONTROLLER_FILE,
    DCP_DIR,
    FILES,
    FORMAT,
    LATEST,
    MANIFEST,
    MODEL_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    SCHEDULER_FILE,
    SHARDED,
    SHARDED_MARK,
    TRAINER_FILE,
    CheckpointError,
    CheckpointPayload,
    ConfigMismatchError,
    CorruptCheckpointError,
    NoValidCheckpointError,
    capture_rng_state,
    checkpoint_uri,
    commit_checkpoint,
    find_resumable,
    list_checkpoints,
    load_checkpoint,
    prepare_step,
    read_manifest,
    release,
    required_files,
    restore_rng_state,
    resume,
    rng_file,
    save_checkpoint,
    stage_states,
    step_dir_name,
    upload_and_hash,
    verify_checkpoint,
)
from amft_lib.checkpoint.resume_point import check_world, find_resume_point, root_of
from amft_lib.checkpoint.state import restore_training_state, save_training_state

__all__ = [
    "CHECKPOINTS", "CONTROLLER_FILE", "DCP_DIR", "FILES", "FORMAT", "LATEST", "MANIFEST", "MODEL_FILE",
    "OPTIMIZER_FILE", "RNG_FILE", "SCHEDULER_FILE", "SHARDED", "SHARDED_MARK", "TRAINER_FILE", "CheckpointError",
    "CheckpointPayload", "ConfigMismatchError", "CorruptCheckpointError", "NoValidCheckpointError",
    "capture_rng_state", "check_world", "checkpoint_uri", "commit_checkpoint", "find_resumable", "find_resume_point",
    "list_checkpoints", "load_checkpoint", "prepare_step", "read_manifest", "release", "required_files",
    "restore_rng_state", "restore_training_state", "resume", "rng_file", "root_of", "save_checkpoint",
    "save_training_state", "stage_states", "step_dir_name", "upload_and_hash", "verify_checkpoint",
]
